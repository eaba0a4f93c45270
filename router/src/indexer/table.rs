//! Node storage: the nodes in an arena in the order they were created, and an open-addressing
//! hash table from chained block hash to arena index.
//!
//! Memory, not arithmetic, bounds the index: a table of a few hundred thousand blocks is far
//! larger than the caches, and a lookup is a miss. Two things cut the misses. A Stored event's
//! new blocks are appended to the arena together, so the next block of a chain is usually the
//! very next node: a walk (query, store, removal) checks that node first and only falls back to
//! the table when the chain jumps — a long prompt costs a handful of table lookups and a
//! sequential scan, as an edge of a compressed radix tree would. And the table is small: one
//! `u64` per entry (the key's top 32 bits beside the arena index), eight to a cache line.
//!
//! Table: linear probing, power-of-two capacity, at most 3/4 full, home slot = the key's top bits
//! (keys are XXH3 outputs, uniformly mixed, so they are their own hash: pass-through). An entry
//! keeps the bits that pick its home, so growing and backward-shift deletion never read the
//! arena; a lookup confirms a candidate against the node's full key. A node nobody holds is dead:
//! dropped from the table at once, its arena slot reclaimed when dead nodes outnumber live ones
//! (the arena is rebuilt in order, which keeps chains contiguous).

use super::slots::SlotSet;

pub(crate) struct Node {
    key: u64,
    /// Hash of the block before this one in its chain; `key` itself for a first block (a block
    /// cannot be its own parent), which keeps a node at 32 bytes.
    parent: u64,
    pub(crate) holders: SlotSet,
}

impl Node {
    pub(crate) fn parent(&self) -> Option<u64> {
        (self.parent != self.key).then_some(self.parent)
    }

    fn dead(&self) -> bool {
        self.holders.is_empty()
    }
}

/// Index of a node in the arena.
pub(crate) type Idx = u32;

/// What [`NodeTable::compact`] maps a dropped node's index to.
pub(crate) const GONE: Idx = Idx::MAX;

const KEY_BITS: u64 = !0 << 32;
/// Most table entries allowed: homes come from the key's top 32 bits.
const MAX_CAPACITY: u64 = 1 << 32;
const MIN_CAPACITY: usize = 16;
/// Dead arena slots tolerated beside the live ones before a rebuild (and at least this many).
const MIN_COMPACT: usize = 1024;

/// How many items ahead a walk prefetches table lines: enough to overlap the misses of blocks
/// the arena does not already have next to each other.
const PREFETCH: usize = 8;

#[derive(Default)]
pub(crate) struct NodeTable {
    nodes: Vec<Node>,
    /// Dead nodes still in `nodes`.
    dead: usize,
    /// 0: empty; else the key's top 32 bits | (arena index + 1).
    slots: Vec<u64>,
    /// `64 − log2(slots.len())`; 64 while there are no slots.
    shift: u32,
}

impl NodeTable {
    /// Live nodes.
    pub(crate) fn len(&self) -> usize {
        self.nodes.len() - self.dead
    }

    #[inline]
    pub(crate) fn node(&self, idx: Idx) -> &Node {
        &self.nodes[idx as usize]
    }

    #[inline]
    pub(crate) fn get(&self, key: u64) -> Option<&Node> {
        self.find(key).map(|i| self.node(i))
    }

    /// The node of `key`, trying first the node right after `after` (the previous block of the
    /// same chain), where a block stored in the same event as its parent sits.
    #[inline]
    pub(crate) fn next(&self, after: Option<Idx>, key: u64) -> Option<Idx> {
        if let Some(after) = after {
            let next = after as usize + 1;
            if let Some(n) = self.nodes.get(next) {
                if n.key == key && !n.dead() {
                    return Some(next as Idx);
                }
            }
        }
        self.find(key)
    }

    #[inline]
    fn home(&self, key: u64) -> usize {
        key.checked_shr(self.shift).unwrap_or(0) as usize
    }

    #[inline]
    fn mask(&self) -> usize {
        self.slots.len().wrapping_sub(1)
    }

    /// The arena index of `key`'s node, if it is live.
    #[inline]
    pub(crate) fn find(&self, key: u64) -> Option<Idx> {
        self.find_slot(key).map(|(_, idx)| idx)
    }

    /// Table position and arena index of `key`.
    #[inline]
    fn find_slot(&self, key: u64) -> Option<(usize, Idx)> {
        if self.slots.is_empty() {
            return None;
        }
        let mask = self.mask();
        let mut i = self.home(key);
        loop {
            let e = self.slots[i];
            if e == 0 {
                return None;
            }
            if e & KEY_BITS == key & KEY_BITS {
                let idx = (e as u32).wrapping_sub(1);
                if self.nodes[idx as usize].key == key {
                    return Some((i, idx));
                }
            }
            i = (i + 1) & mask;
        }
    }

    /// Called with each `i` in turn before working on `items[i]` (keys through `key`): keeps
    /// the table lines of the next few items loading while the current one is handled.
    #[inline]
    pub(crate) fn prefetch_ahead<T>(&self, items: &[T], i: usize, key: impl Fn(&T) -> u64) {
        if i == 0 {
            for item in items.iter().take(PREFETCH) {
                self.prefetch(key(item));
            }
        }
        if let Some(item) = items.get(i + PREFETCH) {
            self.prefetch(key(item));
        }
    }

    /// Starts loading the table lines `key`'s probe would read; a hint, never a fault.
    #[inline]
    fn prefetch(&self, key: u64) {
        #[cfg(target_arch = "x86_64")]
        if !self.slots.is_empty() {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
            let home = self.home(key);
            let entry: *const u64 = &self.slots[home];
            // SAFETY: a prefetch has no architectural effect and the pointer is in bounds.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(entry.cast()) };
            // A probe for an absent key (a new block) runs ~5 slots at 2/3 load, so from most of
            // a line it continues into the next one.
            let next: *const u64 = &self.slots[(home + 8) & self.mask()];
            // SAFETY: as above.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(next.cast()) };
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = key;
    }

    /// Adds `slot` to the holders of `key`, creating its node under `parent` if nobody held it
    /// (an existing node keeps its parent: the same chained hash means the same prefix); `after`
    /// as for [`next`](Self::next). Returns the node's index and whether `slot` is new there.
    #[inline]
    pub(crate) fn insert_holder(
        &mut self,
        key: u64,
        parent: Option<u64>,
        slot: usize,
        after: Option<Idx>,
    ) -> (Idx, bool) {
        if let Some(idx) = self.next(after, key) {
            return (idx, self.nodes[idx as usize].holders.insert(slot));
        }
        if (self.len() + 1) * 4 > self.slots.len() * 3 {
            self.grow();
        }
        let idx = Idx::try_from(self.nodes.len())
            .ok()
            .filter(|&i| i < GONE)
            .expect("KV index holds over 4 billion blocks");
        let mut holders = SlotSet::default();
        holders.insert(slot);
        self.nodes.push(Node {
            key,
            parent: parent.unwrap_or(key),
            holders,
        });
        self.place((key & KEY_BITS) | (u64::from(idx) + 1));
        (idx, true)
    }

    /// Puts a table entry in the first free slot from its home.
    #[inline]
    fn place(&mut self, entry: u64) {
        let mask = self.mask();
        let mut i = self.home(entry);
        while self.slots[i] != 0 {
            i = (i + 1) & mask;
        }
        self.slots[i] = entry;
    }

    /// Removes `slot` from the holders of `key` (`after` as for [`next`](Self::next)), dropping
    /// the node with its last holder. Returns where the node is, as a hint for the next block,
    /// and whether `slot` held it.
    #[inline]
    pub(crate) fn remove_holder(
        &mut self,
        key: u64,
        slot: usize,
        after: Option<Idx>,
    ) -> (Option<Idx>, bool) {
        match self.next(after, key) {
            Some(idx) => (Some(idx), self.remove_holder_at(idx, slot)),
            None => (None, false),
        }
    }

    /// As [`remove_holder`](Self::remove_holder) for the node at `idx`, live or dead.
    #[inline]
    pub(crate) fn remove_holder_at(&mut self, idx: Idx, slot: usize) -> bool {
        let node = &mut self.nodes[idx as usize];
        if !node.holders.remove(slot) {
            return false;
        }
        if node.dead() {
            let key = node.key;
            let (pos, _) = self.find_slot(key).expect("a live node is in the table");
            self.close_gap(pos);
            self.dead += 1;
        }
        true
    }

    /// Whether dead nodes have come to outnumber the live ones: time for [`compact`](Self::compact).
    pub(crate) fn needs_compaction(&self) -> bool {
        self.dead > self.len().max(MIN_COMPACT)
    }

    /// Empties table slot `hole` and moves later entries of its probe run back, so no lookup
    /// stops short at the hole (backward-shift deletion).
    fn close_gap(&mut self, mut hole: usize) {
        let mask = self.mask();
        let mut j = hole;
        loop {
            j = (j + 1) & mask;
            let e = self.slots[j];
            if e == 0 {
                break;
            }
            let home = self.home(e);
            // The entry at `j` may fill the hole unless its home lies cyclically in (hole, j].
            let stays = if hole <= j {
                hole < home && home <= j
            } else {
                hole < home || home <= j
            };
            if !stays {
                self.slots[hole] = e;
                hole = j;
            }
        }
        self.slots[hole] = 0;
    }

    fn grow(&mut self) {
        let capacity = (self.slots.len() * 2).max(MIN_CAPACITY);
        assert!(capacity as u64 <= MAX_CAPACITY, "KV index table is full");
        let old = std::mem::replace(&mut self.slots, empty_slots(capacity));
        self.shift = 64 - capacity.trailing_zeros();
        for e in old.into_iter().filter(|&e| e != 0) {
            self.place(e);
        }
    }

    /// Drops the dead nodes from the arena, keeping the live ones in order, and re-indexes them.
    /// Returns each old index's new one ([`GONE`] for a dropped node), for holders of indices.
    pub(crate) fn compact(&mut self) -> Vec<Idx> {
        let mut remap = Vec::with_capacity(self.nodes.len());
        let mut kept: Idx = 0;
        for n in &self.nodes {
            remap.push(if n.dead() { GONE } else { kept });
            kept += Idx::from(!n.dead());
        }
        self.nodes.retain(|n| !n.dead());
        self.dead = 0;
        self.slots.iter_mut().for_each(|e| *e = 0);
        for idx in 0..self.nodes.len() {
            let key = self.nodes[idx].key;
            self.place((key & KEY_BITS) | (idx as u64 + 1));
        }
        remap
    }
}

/// `capacity` empty table slots straight from zeroed memory: a large fresh allocation comes
/// zeroed from the kernel, so no pass over the new table runs before the rehash fills it.
fn empty_slots(capacity: usize) -> Vec<u64> {
    let layout = std::alloc::Layout::array::<u64>(capacity).expect("table size overflows");
    // SAFETY: the layout has a non-zero size (capacity ≥ MIN_CAPACITY).
    let ptr = unsafe { std::alloc::alloc_zeroed(layout) }.cast::<u64>();
    if ptr.is_null() {
        std::alloc::handle_alloc_error(layout);
    }
    advise_huge_pages(ptr.cast(), layout.size());
    // SAFETY: allocated by the global allocator with the layout of a `Vec<u64>` of `capacity`,
    // every element initialised (zero).
    unsafe { Vec::from_raw_parts(ptr, capacity, capacity) }
}

/// Asks Linux to back a large table with transparent huge pages (where THP is in `madvise`
/// mode): lookups land on random pages, and with 4 KiB pages a large table spans more pages
/// than the TLB holds, so most lookups would add a page walk. Runs before the memory is first
/// touched. Best effort: failure only costs speed.
#[cfg(target_os = "linux")]
fn advise_huge_pages(ptr: *mut std::ffi::c_void, bytes: usize) {
    const HUGE_PAGE: usize = 2 << 20;
    if bytes < 2 * HUGE_PAGE {
        return;
    }
    let start = ptr as usize;
    let aligned = start.next_multiple_of(4096);
    let len = (bytes - (aligned - start)) & !4095;
    // SAFETY: the range lies inside the allocation (rounded inwards to whole pages), and
    // MADV_HUGEPAGE changes only how the kernel backs it, never its contents.
    unsafe { libc::madvise(aligned as *mut libc::c_void, len, libc::MADV_HUGEPAGE) };
}

#[cfg(not(target_os = "linux"))]
fn advise_huge_pages(_: *mut std::ffi::c_void, _: usize) {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colliding_homes_wrap_and_survive_removal() {
        let mut t = NodeTable::default();
        assert!(t.get(5).is_none());
        // Same top bits: one long probe run, wrapping past the end of the table.
        let keys: Vec<u64> = (0..11).map(|i| u64::MAX - i).collect();
        for &k in &keys {
            assert!(t.insert_holder(k, None, 0, None).1);
            assert!(!t.insert_holder(k, None, 0, None).1);
        }
        assert!(t.insert_holder(keys[3], Some(1), 70, None).1);
        assert_eq!(t.len(), 11);
        assert_eq!(t.get(keys[3]).unwrap().parent(), None);
        for &k in keys.iter().step_by(2) {
            assert!(t.remove_holder(k, 0, None).1);
            assert!(!t.remove_holder(k, 0, None).1);
        }
        assert!(t.get(keys[3]).is_some_and(|n| n.holders.contains(70)));
        for (i, &k) in keys.iter().enumerate() {
            assert_eq!(t.get(k).is_some(), i % 2 == 1, "key {i}");
        }
        // A dead node right after `after` is not taken for the key (keys[2] was at index 2).
        assert_eq!(t.next(Some(1), keys[2]), None);
        let (at, added) = t.insert_holder(keys[2], None, 1, Some(1));
        assert!(added && at != 2);
        assert_eq!(t.next(Some(1), keys[2]), Some(at));
        assert_eq!(t.len(), 6);
    }

    #[test]
    fn churn_compacts_and_keeps_chains() {
        let key = |i: u64| i.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut t = NodeTable::default();
        let mut live = std::collections::BTreeSet::new();
        for round in 0..6u64 {
            // A chain of 1000 new blocks, then most of the older ones removed.
            let mut after = None;
            for i in round * 1000..(round + 1) * 1000 {
                let parent = (i > round * 1000).then(|| key(i - 1));
                let (idx, added) = t.insert_holder(key(i), parent, 2, after);
                assert!(added);
                if let Some(a) = after {
                    assert_eq!(idx, a + 1, "a chain's new blocks are adjacent");
                }
                after = Some(idx);
                live.insert(i);
            }
            let doomed: Vec<u64> = live
                .iter()
                .copied()
                .filter(|i| i % 7 != 0)
                .take(900)
                .collect();
            let mut after = None;
            for i in doomed {
                let (at, removed) = t.remove_holder(key(i), 2, after);
                assert!(removed);
                after = at;
                live.remove(&i);
                if t.needs_compaction() {
                    let remap = t.compact();
                    after = after.map(|a| remap[a as usize]).filter(|&a| a != GONE);
                }
            }
            assert_eq!(t.len(), live.len());
            assert!(t.nodes.len() <= 2 * live.len().max(MIN_COMPACT) + 1000);
            for i in 0..(round + 1) * 1000 {
                let node = t.get(key(i));
                assert_eq!(node.is_some(), live.contains(&i), "block {i} round {round}");
                if let Some(n) = node {
                    assert!(n.holders.contains(2));
                    let first = i % 1000 == 0;
                    assert_eq!(n.parent(), (!first).then(|| key(i - 1)));
                }
            }
        }
        assert!(t.nodes.len() < 6000, "the arena was rebuilt");
    }
}
