//! A guest-memory image in ordinary process memory, as a [`PageSink`] for one stream or, split by
//! shard, for several streams decoded at once.

use std::marker::PhantomData;

use crate::decoder::{PageSink, SinkError};
use crate::page::{Generation, MemoryLayout, PAGE_SIZE, Page, PageAddr, is_zero_page};
use crate::shard::ShardMap;

/// Guest memory as one byte vector per region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryImage {
    layout: MemoryLayout,
    regions: Vec<Vec<u8>>,
}

/// A page address the image does not have.
#[derive(Debug, thiserror::Error)]
#[error("{addr} is outside the memory image")]
pub struct OutsideImage {
    /// The address.
    pub addr: PageAddr,
}

/// A page that belongs to another shard's writer.
#[derive(Debug, thiserror::Error)]
#[error("{addr} belongs to shard {owner}, not to this writer's shard {shard}")]
pub struct WrongShard {
    /// The address.
    pub addr: PageAddr,
    /// The shard that owns it.
    pub owner: u32,
    /// The writer's shard.
    pub shard: u32,
}

impl MemoryImage {
    /// An all-zero image of `layout`.
    pub fn zeroed(layout: MemoryLayout) -> Self {
        let regions = layout
            .region_pages()
            .iter()
            .map(|&pages| vec![0u8; pages as usize * PAGE_SIZE])
            .collect();
        Self { layout, regions }
    }

    /// A single-region image holding `bytes`, padded with zeros to whole pages.
    pub fn from_bytes(mut bytes: Vec<u8>) -> Self {
        let pages = bytes.len().div_ceil(PAGE_SIZE);
        bytes.resize(pages * PAGE_SIZE, 0);
        Self {
            layout: MemoryLayout::new(vec![pages as u64]).expect("one region is a valid layout"),
            regions: vec![bytes],
        }
    }

    /// The image's layout.
    pub fn layout(&self) -> &MemoryLayout {
        &self.layout
    }

    /// The bytes of region `region`.
    pub fn region(&self, region: u32) -> Option<&[u8]> {
        self.regions.get(region as usize).map(Vec::as_slice)
    }

    /// The page at `addr`.
    pub fn page(&self, addr: PageAddr) -> Option<&Page> {
        let start = usize::try_from(addr.index).ok()?.checked_mul(PAGE_SIZE)?;
        self.regions
            .get(addr.region as usize)?
            .get(start..start + PAGE_SIZE)
            .map(|s| s.try_into().expect("page-sized slice"))
    }

    /// The page at `addr`, writable.
    pub fn page_mut(&mut self, addr: PageAddr) -> Option<&mut Page> {
        let start = usize::try_from(addr.index).ok()?.checked_mul(PAGE_SIZE)?;
        self.regions
            .get_mut(addr.region as usize)?
            .get_mut(start..start + PAGE_SIZE)
            .map(|s| s.try_into().expect("page-sized slice"))
    }

    /// Every page address of the image, in order.
    pub fn addresses(&self) -> impl Iterator<Item = PageAddr> + '_ {
        self.layout
            .region_pages()
            .iter()
            .enumerate()
            .flat_map(|(region, &pages)| (0..pages).map(move |i| PageAddr::new(region as u32, i)))
    }

    /// One writer per shard of `map`, which together may fill the image from several threads.
    /// Each writer accepts only the pages of its own shard, so no two writers touch the same
    /// bytes; the image stays borrowed until all of them are gone.
    pub fn shard_writers(&mut self, map: ShardMap) -> Vec<ShardWriter<'_>> {
        let regions: Vec<(*mut u8, usize)> = self
            .regions
            .iter_mut()
            .map(|r| (r.as_mut_ptr(), r.len()))
            .collect();
        (0..map.shards())
            .map(|shard| ShardWriter {
                regions: regions.clone(),
                map,
                shard,
                _image: PhantomData,
            })
            .collect()
    }

    fn write(&mut self, addr: PageAddr, page: &Page) -> Result<(), SinkError> {
        let dst = self.page_mut(addr).ok_or(OutsideImage { addr })?;
        dst.copy_from_slice(page);
        Ok(())
    }
}

impl PageSink for MemoryImage {
    fn zero(&mut self, addr: PageAddr, _generation: Generation) -> Result<(), SinkError> {
        clear_page(self.page_mut(addr).ok_or(OutsideImage { addr })?);
        Ok(())
    }

    fn data(
        &mut self,
        addr: PageAddr,
        _generation: Generation,
        page: &Page,
    ) -> Result<(), SinkError> {
        self.write(addr, page)
    }
}

/// Makes `page` zero, writing it only if it is not zero already: a page of fresh memory (a
/// destination's guest memory before the first pass) reads as zero without being allocated,
/// and writing zeros into it would allocate and fault in memory for nothing. QEMU's destination
/// does the same (`buffer_is_zero` before `memset`).
fn clear_page(page: &mut Page) {
    if !is_zero_page(page) {
        page.fill(0);
    }
}

/// Writes the pages of one shard into a [`MemoryImage`] shared with the other shards' writers.
#[derive(Debug)]
pub struct ShardWriter<'a> {
    regions: Vec<(*mut u8, usize)>,
    map: ShardMap,
    shard: u32,
    _image: PhantomData<&'a mut MemoryImage>,
}

// SAFETY: a ShardWriter only writes pages whose shard is its own (checked in `page_ptr`), and
// `MemoryImage::shard_writers` creates exactly one writer per shard while holding the image's
// unique borrow, so writers on different threads never access the same bytes, and nothing else
// reads or writes the image until every writer is dropped.
unsafe impl Send for ShardWriter<'_> {}

impl ShardWriter<'_> {
    fn page_ptr(&self, addr: PageAddr) -> Result<*mut u8, SinkError> {
        let owner = self.map.shard_of(addr);
        if owner != self.shard {
            return Err(WrongShard {
                addr,
                owner,
                shard: self.shard,
            }
            .into());
        }
        let &(base, len) = self
            .regions
            .get(addr.region as usize)
            .ok_or(OutsideImage { addr })?;
        let start = usize::try_from(addr.index)
            .ok()
            .and_then(|i| i.checked_mul(PAGE_SIZE))
            .filter(|&start| start.checked_add(PAGE_SIZE).is_some_and(|end| end <= len))
            .ok_or(OutsideImage { addr })?;
        // SAFETY: `start + PAGE_SIZE <= len` was checked just above, so the offset stays inside
        // the region's allocation.
        Ok(unsafe { base.add(start) })
    }
}

impl PageSink for ShardWriter<'_> {
    fn zero(&mut self, addr: PageAddr, _generation: Generation) -> Result<(), SinkError> {
        let dst = self.page_ptr(addr)?;
        // SAFETY: `dst` points at PAGE_SIZE bytes inside the image (`page_ptr`), of a page this
        // writer alone may touch (see the `Send` impl), so no other reference to it exists.
        clear_page(unsafe { &mut *dst.cast::<Page>() });
        Ok(())
    }

    fn data(
        &mut self,
        addr: PageAddr,
        _generation: Generation,
        page: &Page,
    ) -> Result<(), SinkError> {
        let dst = self.page_ptr(addr)?;
        // SAFETY: as in `zero`; `page` is a separate allocation, so the ranges do not overlap.
        unsafe { std::ptr::copy_nonoverlapping(page.as_ptr(), dst, PAGE_SIZE) };
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_pages_clear_what_was_there_and_leave_zero_pages_alone() {
        let layout = MemoryLayout::new(vec![8]).unwrap();
        let mut image = MemoryImage::zeroed(layout.clone());
        image.page_mut(PageAddr::new(0, 3)).unwrap().fill(9);
        {
            let map = ShardMap::new(1).unwrap();
            let mut writers = image.shard_writers(map);
            let writer = &mut writers[0];
            writer.zero(PageAddr::new(0, 3), 1).unwrap();
            writer.zero(PageAddr::new(0, 4), 1).unwrap();
            writer
                .data(PageAddr::new(0, 5), 1, &[7; PAGE_SIZE])
                .unwrap();
        }
        image.zero(PageAddr::new(0, 5), 2).unwrap();
        image.zero(PageAddr::new(0, 6), 2).unwrap();
        assert!(image == MemoryImage::zeroed(layout));
    }
}
