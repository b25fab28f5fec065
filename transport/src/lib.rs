//! Not implemented yet: see DESIGN.md.
