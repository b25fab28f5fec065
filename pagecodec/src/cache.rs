//! Page caches that the encoder and the decoder keep identical.
//!
//! Both ends of a stream hold the same caches and apply the same operations to them in the same
//! order (the record order of the stream), so a record can refer to a cache slot by number. That
//! only works if eviction is a pure function of those operations: no clocks, no hashing of
//! addresses with random seeds, no memory-pressure heuristics. The policy here is CLOCK (second
//! chance): a slot that was used (hit) since the hand last passed survives one more sweep, a page
//! that was inserted and never used again is the first to go. That keeps popular duplicates
//! (a page of a shared library mapped by many processes) while a one-off stream of unique pages
//! flows through.
//!
//! Slot storage is reserved at once but only becomes resident as it is written, unless the owner
//! asks for it up front with `prefault` (the encoder does, so that the page stream never waits
//! for the kernel to hand out memory).

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use crate::page::{PAGE_SIZE, Page, PageAddr};

/// A fixed number of page slots with CLOCK eviction.
#[derive(Debug)]
pub(crate) struct PageSlots {
    capacity: u32,
    /// `capacity` pages; zero-initialised memory that the kernel maps on first write.
    data: Box<[u8]>,
    referenced: Vec<bool>,
    hand: u32,
}

impl PageSlots {
    pub(crate) fn new(capacity: u32) -> Self {
        Self {
            capacity,
            data: vec![0u8; capacity as usize * PAGE_SIZE].into_boxed_slice(),
            referenced: Vec::with_capacity(capacity as usize),
            hand: 0,
        }
    }

    /// Makes the slots' memory resident now rather than on first use.
    pub(crate) fn prefault(&mut self) {
        for page in self.data.chunks_exact_mut(PAGE_SIZE) {
            // A volatile write, so the store is not optimised away as redundant on memory that
            // is known to be zero.
            // SAFETY: `page` is a valid, exclusively borrowed, non-empty byte slice.
            unsafe { std::ptr::write_volatile(page.as_mut_ptr(), 0) };
        }
    }

    /// Slots in use.
    fn used(&self) -> u32 {
        self.referenced.len() as u32
    }

    /// Picks the slot for a new page and stores it there. Returns the slot and whether it held a
    /// page before (whose owner the caller must forget).
    pub(crate) fn insert(&mut self, page: &Page) -> (u32, bool) {
        debug_assert!(self.capacity > 0);
        if self.used() < self.capacity {
            let slot = self.used();
            self.referenced.push(false);
            self.page_mut(slot).copy_from_slice(page);
            return (slot, false);
        }
        loop {
            let slot = self.hand;
            self.hand = if slot + 1 == self.capacity {
                0
            } else {
                slot + 1
            };
            let referenced = &mut self.referenced[slot as usize];
            if *referenced {
                *referenced = false;
            } else {
                self.page_mut(slot).copy_from_slice(page);
                return (slot, true);
            }
        }
    }

    /// The page in `slot`, if the slot is in use.
    pub(crate) fn get(&self, slot: u32) -> Option<&Page> {
        if slot >= self.used() {
            return None;
        }
        let start = slot as usize * PAGE_SIZE;
        Some(
            self.data[start..start + PAGE_SIZE]
                .try_into()
                .expect("slot is a whole page"),
        )
    }

    /// The page in a slot known to be in use.
    pub(crate) fn page_mut(&mut self, slot: u32) -> &mut Page {
        let start = slot as usize * PAGE_SIZE;
        (&mut self.data[start..start + PAGE_SIZE])
            .try_into()
            .expect("slot is a whole page")
    }

    /// Marks a slot as used since the hand last passed.
    pub(crate) fn touch(&mut self, slot: u32) {
        self.referenced[slot as usize] = true;
    }
}

/// Hashes keys that are already uniformly distributed (XXH3 digests) by taking their low bits.
#[derive(Default, Debug)]
pub(crate) struct DigestHasher(u64);

impl Hasher for DigestHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8) | u64::from(b);
        }
    }
    fn write_u128(&mut self, value: u128) {
        self.0 = value as u64;
    }
}

/// A fast multiplicative hasher for small integer keys (page addresses).
#[derive(Default, Debug)]
pub(crate) struct AddrHasher(u64);

impl Hasher for AddrHasher {
    fn finish(&self) -> u64 {
        // Fold the high bits down: hashbrown takes both the top 7 bits and the low bits.
        self.0 ^ (self.0 >> 29)
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }
    fn write_u32(&mut self, value: u32) {
        self.write_u64(u64::from(value));
    }
    fn write_u64(&mut self, value: u64) {
        self.0 = (self.0.rotate_left(5) ^ value).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

pub(crate) type DigestMap<V> = HashMap<u128, V, BuildHasherDefault<DigestHasher>>;
pub(crate) type AddrMap<V> = HashMap<PageAddr, V, BuildHasherDefault<AddrHasher>>;

/// The encoder's view of the content cache: slots plus an index from content digest to slot.
#[derive(Debug)]
pub(crate) struct DupIndex {
    slots: PageSlots,
    by_digest: DigestMap<u32>,
    slot_digest: Vec<u128>,
}

impl DupIndex {
    pub(crate) fn new(capacity: u32) -> Self {
        Self {
            slots: PageSlots::new(capacity),
            by_digest: DigestMap::with_capacity_and_hasher(capacity as usize, Default::default()),
            slot_digest: Vec::with_capacity(capacity as usize),
        }
    }

    pub(crate) fn prefault(&mut self) {
        self.slots.prefault();
    }

    /// The slot holding exactly `page`, compared byte for byte: the digest only finds the
    /// candidate.
    pub(crate) fn find(&self, digest: u128, page: &Page) -> Option<u32> {
        let slot = *self.by_digest.get(&digest)?;
        (self.slots.get(slot)? == page).then_some(slot)
    }

    pub(crate) fn touch(&mut self, slot: u32) {
        self.slots.touch(slot);
    }

    pub(crate) fn insert(&mut self, digest: u128, page: &Page) {
        let (slot, evicted) = self.slots.insert(page);
        if evicted {
            let old = self.slot_digest[slot as usize];
            // Only forget the old digest if it still points here: a newer slot may have taken it.
            if self.by_digest.get(&old) == Some(&slot) {
                self.by_digest.remove(&old);
            }
            self.slot_digest[slot as usize] = digest;
        } else {
            self.slot_digest.push(digest);
        }
        self.by_digest.insert(digest, slot);
    }
}

/// Previous versions of recently re-sent pages, by address: the base for delta records.
/// Identical on both ends.
#[derive(Debug)]
pub(crate) struct DeltaCache {
    slots: PageSlots,
    by_addr: AddrMap<u32>,
    slot_addr: Vec<PageAddr>,
}

impl DeltaCache {
    pub(crate) fn new(capacity: u32) -> Self {
        Self {
            slots: PageSlots::new(capacity),
            by_addr: AddrMap::default(),
            slot_addr: Vec::new(),
        }
    }

    /// The slot caching `addr`.
    pub(crate) fn slot_of(&self, addr: PageAddr) -> Option<u32> {
        self.by_addr.get(&addr).copied()
    }

    pub(crate) fn page(&self, slot: u32) -> &Page {
        self.slots
            .get(slot)
            .expect("delta slots in the index are in use")
    }

    pub(crate) fn touch(&mut self, slot: u32) {
        self.slots.touch(slot);
    }

    /// Records that `addr` now holds `page`: updates its cached copy if it has one, otherwise
    /// caches it when `admit` is set.
    pub(crate) fn update(&mut self, addr: PageAddr, page: &Page, admit: bool) {
        if let Some(slot) = self.slot_of(addr) {
            self.slots.page_mut(slot).copy_from_slice(page);
        } else if admit {
            let (slot, evicted) = self.slots.insert(page);
            if evicted {
                let old = std::mem::replace(&mut self.slot_addr[slot as usize], addr);
                self.by_addr.remove(&old);
            } else {
                self.slot_addr.push(addr);
            }
            self.by_addr.insert(addr, slot);
        }
    }
}

/// The decoder's content cache: slots only, addressed by number.
#[derive(Debug)]
pub(crate) struct DupSlots {
    slots: PageSlots,
}

impl DupSlots {
    pub(crate) fn new(capacity: u32) -> Self {
        Self {
            slots: PageSlots::new(capacity),
        }
    }

    pub(crate) fn get(&self, slot: u32) -> Option<&Page> {
        self.slots.get(slot)
    }

    pub(crate) fn touch(&mut self, slot: u32) {
        self.slots.touch(slot);
    }

    pub(crate) fn insert(&mut self, page: &Page) {
        self.slots.insert(page);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(byte: u8) -> Page {
        [byte; PAGE_SIZE]
    }

    #[test]
    fn clock_gives_used_slots_a_second_chance() {
        let mut slots = PageSlots::new(3);
        assert_eq!(slots.insert(&page(1)), (0, false));
        assert_eq!(slots.insert(&page(2)), (1, false));
        assert_eq!(slots.insert(&page(3)), (2, false));
        slots.touch(0);
        // Slot 0 was used: the hand skips it (clearing its bit) and takes slot 1.
        assert_eq!(slots.insert(&page(4)), (1, true));
        assert_eq!(slots.get(1), Some(&page(4)));
        assert_eq!(slots.insert(&page(5)), (2, true));
        assert_eq!(slots.insert(&page(6)), (0, true));
        assert_eq!(slots.get(3), None);
    }

    #[test]
    fn dup_index_confirms_bytes_and_forgets_evicted() {
        let mut index = DupIndex::new(2);
        index.insert(1, &page(1));
        index.insert(2, &page(2));
        assert_eq!(index.find(1, &page(1)), Some(0));
        // Same digest, different bytes: never a match.
        assert_eq!(index.find(1, &page(9)), None);
        index.insert(3, &page(3));
        assert_eq!(index.find(1, &page(1)), None);
        assert_eq!(index.find(3, &page(3)), Some(0));
        assert_eq!(index.find(2, &page(2)), Some(1));
    }

    #[test]
    fn delta_cache_updates_and_evicts_by_address() {
        let mut cache = DeltaCache::new(1);
        let a = PageAddr::new(0, 1);
        let b = PageAddr::new(0, 2);
        cache.update(a, &page(1), false);
        assert!(cache.slot_of(a).is_none());
        cache.update(a, &page(1), true);
        cache.update(a, &page(2), false);
        assert_eq!(cache.page(cache.slot_of(a).unwrap()), &page(2));
        cache.update(b, &page(3), true);
        assert!(cache.slot_of(a).is_none());
        assert!(cache.slot_of(b).is_some());
    }
}
