//! What each end remembers per address, in 64-page chunks so that a stream that owns only some
//! of guest memory (one shard) pays only for the pages it carries.

use std::collections::HashMap;
use std::hash::BuildHasherDefault;

use crate::cache::AddrHasher;
use crate::page::PageAddr;

const CHUNK_SHIFT: u32 = 6;
const CHUNK_PAGES: u64 = 1 << CHUNK_SHIFT;

type ChunkMap<V> = HashMap<u64, V, BuildHasherDefault<AddrHasher>>;

/// Key of the chunk holding `addr`, and the page's bit in it. Regions are below 2^12 and page
/// indexes below 2^40 (see [`crate::page`]), so the key cannot collide.
fn chunk_of(addr: PageAddr) -> (u64, u32) {
    let key = (u64::from(addr.region) << 40) | (addr.index >> CHUNK_SHIFT);
    (key, (addr.index & (CHUNK_PAGES - 1)) as u32)
}

#[derive(Debug)]
struct DigestChunk {
    known: u64,
    digests: [u128; CHUNK_PAGES as usize],
}

/// The encoder's record of what it delivered: the XXH3-128 digest of the last content sent for
/// each address. An equal digest means "unchanged"; a 128-bit digest makes a false match far
/// less likely than a hardware memory error.
#[derive(Debug, Default)]
pub(crate) struct DeliveredDigests {
    index: ChunkMap<u32>,
    chunks: Vec<DigestChunk>,
    /// The chunk used last: pages mostly come in address order, 64 to a chunk.
    last: Option<(u64, u32)>,
}

impl DeliveredDigests {
    /// Stores `digest` as the content delivered at `addr` and returns the one it replaces.
    pub(crate) fn replace(&mut self, addr: PageAddr, digest: u128) -> Option<u128> {
        let (key, bit) = chunk_of(addr);
        let at = match self.last {
            Some((last_key, at)) if last_key == key => at,
            _ => {
                let next = self.chunks.len() as u32;
                let at = *self.index.entry(key).or_insert(next);
                if at == next {
                    self.chunks.push(DigestChunk {
                        known: 0,
                        digests: [0; CHUNK_PAGES as usize],
                    });
                }
                self.last = Some((key, at));
                at
            }
        };
        let chunk = &mut self.chunks[at as usize];
        let mask = 1u64 << bit;
        let previous = (chunk.known & mask != 0).then_some(chunk.digests[bit as usize]);
        chunk.known |= mask;
        chunk.digests[bit as usize] = digest;
        previous
    }
}

/// The decoder's record of which addresses the stream has delivered content for.
#[derive(Debug, Default)]
pub(crate) struct DeliveredSet {
    chunks: ChunkMap<u64>,
}

impl DeliveredSet {
    pub(crate) fn insert(&mut self, addr: PageAddr) {
        let (key, bit) = chunk_of(addr);
        *self.chunks.entry(key).or_insert(0) |= 1 << bit;
    }

    pub(crate) fn contains(&self, addr: PageAddr) -> bool {
        let (key, bit) = chunk_of(addr);
        self.chunks
            .get(&key)
            .is_some_and(|bits| bits & (1 << bit) != 0)
    }

    /// Distinct addresses delivered.
    pub(crate) fn len(&self) -> u64 {
        self.chunks
            .values()
            .map(|bits| u64::from(bits.count_ones()))
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_remember_last_value() {
        let mut d = DeliveredDigests::default();
        let a = PageAddr::new(3, 1000);
        assert_eq!(d.replace(a, 5), None);
        assert_eq!(d.replace(a, 0), Some(5));
        assert_eq!(d.replace(a, 7), Some(0));
        assert_eq!(d.replace(PageAddr::new(3, 1001), 1), None);
        assert_eq!(d.replace(PageAddr::new(4, 1000), 1), None);
    }

    #[test]
    fn delivered_set() {
        let mut s = DeliveredSet::default();
        let a = PageAddr::new(0, 63);
        let b = PageAddr::new(0, 64);
        s.insert(a);
        assert!(s.contains(a));
        assert!(!s.contains(b));
        s.insert(b);
        s.insert(b);
        assert_eq!(s.len(), 2);
    }
}
