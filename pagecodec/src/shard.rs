//! Spreading one migration's pages over several independent codec streams.
//!
//! Each stream has its own encoder, decoder and caches, so streams can be encoded on different
//! threads and carried on different channels with no ordering between them. What must stay
//! ordered is every version of one page: they all go to the same stream, because the shard of a
//! page depends only on its address. Pages are assigned in chunks of [`ShardMap::CHUNK_PAGES`]
//! contiguous pages, so runs of zero or unchanged pages stay long and each stream sees memory in
//! address order, and the chunk number is mixed so that a guest's access pattern (every 4th
//! chunk hot, say) does not land on one stream.

use crate::page::PageAddr;

/// Which stream (shard) carries each page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShardMap {
    shards: u32,
}

/// A shard map must have at least one shard.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("a shard map needs at least one shard")]
pub struct NoShards;

impl ShardMap {
    /// Contiguous pages that always share a shard.
    pub const CHUNK_PAGES: u64 = 64;

    /// A map over `shards` streams.
    pub fn new(shards: u32) -> Result<Self, NoShards> {
        if shards == 0 {
            return Err(NoShards);
        }
        Ok(Self { shards })
    }

    /// Number of shards.
    pub fn shards(&self) -> u32 {
        self.shards
    }

    /// The shard that carries `addr`.
    #[inline]
    pub fn shard_of(&self, addr: PageAddr) -> u32 {
        if self.shards == 1 {
            return 0;
        }
        let chunk = (u64::from(addr.region) << 40) ^ (addr.index / Self::CHUNK_PAGES);
        (splitmix64(chunk) % u64::from(self.shards)) as u32
    }
}

/// SplitMix64's finaliser: a cheap bijective mix with good avalanche.
fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_stay_together_and_shards_balance() {
        let map = ShardMap::new(4).unwrap();
        let mut counts = [0u32; 4];
        for chunk in 0..4096u64 {
            let first = map.shard_of(PageAddr::new(0, chunk * 64));
            for i in 1..64 {
                assert_eq!(map.shard_of(PageAddr::new(0, chunk * 64 + i)), first);
            }
            counts[first as usize] += 1;
        }
        for count in counts {
            assert!(
                (900..1150).contains(&count),
                "unbalanced shards: {counts:?}"
            );
        }
        assert_eq!(ShardMap::new(0), Err(NoShards));
        assert_eq!(ShardMap::new(1).unwrap().shard_of(PageAddr::new(9, 9)), 0);
    }
}
