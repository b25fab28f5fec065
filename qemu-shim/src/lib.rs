//! # pagestream-qemu-shim: QEMU's migration through pagestream
//!
//! A shim on each host sits between QEMU and the network: QEMU migrates to a unix socket of the
//! source shim, the destination shim feeds the destination QEMU's incoming socket, and between
//! them the stream travels compressed and authenticated. See `DESIGN.md`.

pub mod destination;
pub mod endpoint;
pub mod link;
pub mod multifd;
mod parsed;
mod process_use;
pub mod qmp;
pub mod relay;
mod return_path;
pub mod session;
pub mod source;
pub mod stream;
mod stream_end;
pub mod vm;
