//! Pages, their addresses and the memory layout they live in.

use std::fmt;

/// Size of one guest page in bytes. The codec handles x86-64's 4 KiB pages only; the wire format
/// records the page size so that a future change cannot be misread silently.
pub const PAGE_SIZE: usize = 4096;

/// One page of guest memory, always a private copy (never a view of memory a guest may write).
pub type Page = [u8; PAGE_SIZE];

/// The all-zero page.
pub const ZERO_PAGE: Page = [0u8; PAGE_SIZE];

/// Largest number of memory regions a stream may declare.
pub const MAX_REGIONS: usize = 4096;

/// Largest number of pages one region may hold (2^40 pages = 4 PiB); keeps every address
/// computation far from overflow.
pub const MAX_REGION_PAGES: u64 = 1 << 40;

/// Where a page lives: a memory region (a RAM block, a memory slot) and the page's index in it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PageAddr {
    /// Index of the region in the stream's [`MemoryLayout`].
    pub region: u32,
    /// Page index inside the region (byte offset / [`PAGE_SIZE`]).
    pub index: u64,
}

impl PageAddr {
    /// The address of page `index` in `region`.
    pub const fn new(region: u32, index: u64) -> Self {
        Self { region, index }
    }
}

impl fmt::Display for PageAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "region {} page {}", self.region, self.index)
    }
}

/// Which pass over guest memory a page belongs to: 0 for the first full copy, then one more for
/// each pass over the pages dirtied meanwhile. Within one stream generations never go backwards.
pub type Generation = u32;

/// The regions of guest memory a stream may address, as page counts. Both ends know it before the
/// first page, so every address on the wire can be checked before anything is written.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct MemoryLayout {
    region_pages: Vec<u64>,
}

/// A memory layout that cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LayoutError {
    /// More regions than [`MAX_REGIONS`].
    #[error("memory layout has {count} regions, more than the limit of {MAX_REGIONS}")]
    TooManyRegions {
        /// Regions declared.
        count: usize,
    },
    /// A region larger than [`MAX_REGION_PAGES`].
    #[error("memory region {region} has {pages} pages, more than the limit of {MAX_REGION_PAGES}")]
    RegionTooLarge {
        /// The region's index.
        region: u32,
        /// Pages declared.
        pages: u64,
    },
}

impl MemoryLayout {
    /// A layout of regions with the given page counts.
    pub fn new(region_pages: Vec<u64>) -> Result<Self, LayoutError> {
        if region_pages.len() > MAX_REGIONS {
            return Err(LayoutError::TooManyRegions {
                count: region_pages.len(),
            });
        }
        if let Some((region, &pages)) = region_pages
            .iter()
            .enumerate()
            .find(|&(_, &pages)| pages > MAX_REGION_PAGES)
        {
            return Err(LayoutError::RegionTooLarge {
                region: region as u32,
                pages,
            });
        }
        Ok(Self { region_pages })
    }

    /// A single region of `bytes` bytes, rounded up to whole pages.
    pub fn single(bytes: u64) -> Result<Self, LayoutError> {
        Self::new(vec![bytes.div_ceil(PAGE_SIZE as u64)])
    }

    /// Page counts of the regions, in region order.
    pub fn region_pages(&self) -> &[u64] {
        &self.region_pages
    }

    /// Number of regions.
    pub fn region_count(&self) -> usize {
        self.region_pages.len()
    }

    /// Total pages over all regions.
    pub fn total_pages(&self) -> u64 {
        self.region_pages.iter().sum()
    }

    /// Whether the `count` pages starting at `addr` all lie inside one region.
    pub fn contains_run(&self, addr: PageAddr, count: u64) -> bool {
        self.region_pages
            .get(addr.region as usize)
            .is_some_and(|&pages| addr.index < pages && count <= pages - addr.index)
    }
}

/// The forms a page can take on the wire, cheapest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PageClass {
    /// All bytes zero.
    Zero,
    /// Same content as this stream already delivered for the same address.
    Unchanged,
    /// Same content as a page held in the shared content cache.
    Duplicate,
    /// XOR against the previous version of the same page, LZ4-compressed.
    Delta,
    /// zstd compression of the page (with up to 15 neighbours), for slow links.
    Zstd,
    /// LZ4 block compression of the page.
    Lz4,
    /// The page's bytes as they are.
    Raw,
}

impl PageClass {
    /// Every class, in wire-cost order.
    pub const ALL: [PageClass; 7] = [
        PageClass::Zero,
        PageClass::Unchanged,
        PageClass::Duplicate,
        PageClass::Delta,
        PageClass::Zstd,
        PageClass::Lz4,
        PageClass::Raw,
    ];

    /// A short lower-case name for reports.
    pub const fn name(self) -> &'static str {
        match self {
            PageClass::Zero => "zero",
            PageClass::Unchanged => "unchanged",
            PageClass::Duplicate => "duplicate",
            PageClass::Delta => "delta",
            PageClass::Zstd => "zstd",
            PageClass::Lz4 => "lz4",
            PageClass::Raw => "raw",
        }
    }

    const fn slot(self) -> usize {
        self as usize
    }
}

impl fmt::Display for PageClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Pages and wire bytes counted per [`PageClass`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClassCounts {
    pages: [u64; PageClass::ALL.len()],
    wire_bytes: [u64; PageClass::ALL.len()],
}

impl ClassCounts {
    /// Counts one record of `pages` pages of `class` that took `wire_bytes` bytes.
    pub fn add(&mut self, class: PageClass, pages: u64, wire_bytes: u64) {
        self.pages[class.slot()] += pages;
        self.wire_bytes[class.slot()] += wire_bytes;
    }

    /// Pages of `class`.
    pub fn pages(&self, class: PageClass) -> u64 {
        self.pages[class.slot()]
    }

    /// Record bytes spent on pages of `class` (frame headers and checksums not included).
    pub fn wire_bytes(&self, class: PageClass) -> u64 {
        self.wire_bytes[class.slot()]
    }

    /// Pages of every class.
    pub fn total_pages(&self) -> u64 {
        self.pages.iter().sum()
    }

    /// Adds `other`'s counts to these.
    pub fn merge(&mut self, other: &ClassCounts) {
        for i in 0..PageClass::ALL.len() {
            self.pages[i] += other.pages[i];
            self.wire_bytes[i] += other.wire_bytes[i];
        }
    }
}

/// Whether every byte of `page` is zero.
#[inline]
pub fn is_zero_page(page: &Page) -> bool {
    // OR-folding fixed 64-byte chunks vectorises well and stops early on the first non-zero chunk.
    page.chunks_exact(64).all(|chunk| {
        chunk.chunks_exact(8).fold(0u64, |acc, w| {
            acc | u64::from_ne_bytes(w.try_into().unwrap())
        }) == 0
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_detection() {
        let mut page = ZERO_PAGE;
        assert!(is_zero_page(&page));
        page[4095] = 1;
        assert!(!is_zero_page(&page));
        page[4095] = 0;
        page[0] = 0x80;
        assert!(!is_zero_page(&page));
    }

    #[test]
    fn layout_bounds() {
        let layout = MemoryLayout::new(vec![10, 5]).unwrap();
        assert!(layout.contains_run(PageAddr::new(0, 0), 10));
        assert!(!layout.contains_run(PageAddr::new(0, 1), 10));
        assert!(layout.contains_run(PageAddr::new(1, 4), 1));
        assert!(!layout.contains_run(PageAddr::new(1, 5), 1));
        assert!(!layout.contains_run(PageAddr::new(2, 0), 1));
        assert!(!layout.contains_run(PageAddr::new(0, u64::MAX), 2));
        assert_eq!(layout.total_pages(), 15);
        assert!(MemoryLayout::new(vec![MAX_REGION_PAGES + 1]).is_err());
    }
}
