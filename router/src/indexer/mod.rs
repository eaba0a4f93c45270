//! The KV-cache indexer: the router's view of which worker caches which KV blocks. The router
//! feeds it every worker's KV events from `{ns}.kv_events` ([`KvIndexer::apply`]; a gap or an
//! unknown parent comes back as an [`IndexGap`], and the router resyncs that worker with a
//! [`KvDump`] through [`KvIndexer::load_dump`]), forgets a worker that leaves discovery, and for
//! each request asks [`KvIndexer::find_matches`] how many leading blocks of the prompt each worker
//! already holds: the overlap the KV-aware cost credits (DESIGN.md §5). [`ApproxIndexer`] stands
//! in for engines that publish no events.
//!
//! The index is a prefix tree over blocks, stored flat: a block's chained hash identifies its
//! whole prefix (`block_hash[i] = xxh3(block_hash[i−1] ‖ tokens_hash[i])`), so a hash map from
//! chained hash to node *is* the radix tree keyed by `tokens_hash` along the path — the child of a
//! node for a given `tokens_hash` is found with one lookup of the chained hash, with no child
//! lists to search or keep. Each node keeps its parent's hash. The hashes are XXH3 outputs, so the
//! map uses them as their own hash. The map is the index's own (`table.rs`): nodes live in an
//! arena in creation order, so the blocks of one Stored event sit side by side and a walk down a
//! chain checks the next node before it pays for a hash lookup — a long prompt costs a few table
//! lookups and a sequential scan rather than one cache miss per block.
//!
//! Each node holds the set of workers caching it as a bitset over dense worker slots (inline for
//! the first 64 slots, spilled to the heap beyond); a query walks the prompt's hashes intersecting
//! that set (`active &= node`), and a worker dropping out of the intersection is credited the depth
//! reached. Per worker the index keeps its block count, the next event id it expects, and a log of
//! the nodes it stored, so purging a worker (`Cleared`, a dump, leaving) touches only its own
//! blocks rather than the whole tree. The log is append-only and compacted once it is more than
//! twice the worker's live blocks.

mod approx;
mod slots;
mod table;

use std::collections::BTreeSet;

use runtime::kv_event::{KvDump, KvEvent, KvEventData};

pub use approx::ApproxIndexer;
use slots::WorkerMap;
use table::{Idx, NodeTable, GONE};

/// Why an event could not be applied: the index has missed something of `worker`'s and must be
/// resynced (ask the worker for the missing events or a dump). Nothing of the event was applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IndexGap {
    /// Event ids of `worker` jumped: `expected` was next, `got` arrived (nothing applied).
    #[error("KV events of worker {worker:x} skipped ids: expected event {expected}, got {got}")]
    Missing {
        worker: u64,
        expected: u64,
        got: u64,
    },
    /// A Stored event names a parent the worker does not hold in the index (nothing applied).
    #[error(
        "KV event {event_id} of worker {worker:x} stores blocks under parent {parent:x}, which \
         the index does not have for that worker"
    )]
    UnknownParent {
        worker: u64,
        parent: u64,
        event_id: u64,
    },
}

struct WorkerState {
    slot: usize,
    /// Blocks this worker holds (its slot's bit set).
    blocks: usize,
    next_event_id: u64,
    /// The arena index of every node whose bit for this worker went from clear to set since the
    /// last compaction; entries may be stale (removed since) or repeated, never missing.
    log: Vec<Idx>,
}

/// Below this many entries the log is never compacted: not worth the pass.
const MIN_COMPACT_LOG: usize = 64;

/// See the module doc.
#[derive(Default)]
pub struct KvIndexer {
    nodes: NodeTable,
    workers: Workers,
}

/// The known workers and their slots.
#[derive(Default)]
struct Workers {
    by_id: WorkerMap<WorkerState>,
    /// Worker id by slot; `None` for a free slot.
    slots: Vec<Option<u64>>,
    /// Free slots below `slots.len()`; the lowest is reused first so up to 64 live workers stay in
    /// the inline word of every node however many have come and gone.
    free: BTreeSet<usize>,
}

impl Workers {
    /// The state of `worker`, registering it (next event id 0, lowest free slot) if new.
    fn entry(&mut self, worker: u64) -> &mut WorkerState {
        let (slots, free) = (&mut self.slots, &mut self.free);
        self.by_id.entry(worker).or_insert_with(|| {
            let slot = match free.pop_first() {
                Some(slot) => slot,
                None => {
                    slots.push(None);
                    slots.len() - 1
                }
            };
            slots[slot] = Some(worker);
            WorkerState {
                slot,
                blocks: 0,
                next_event_id: 0,
                log: Vec::new(),
            }
        })
    }

    /// Unregisters `worker`, freeing its slot; its blocks are the caller's to purge.
    fn remove(&mut self, worker: u64) -> Option<WorkerState> {
        let state = self.by_id.remove(&worker)?;
        self.slots[state.slot] = None;
        self.free.insert(state.slot);
        // Trailing free slots dropped, so the query walk covers only words in use.
        while let Some(None) = self.slots.last() {
            self.free.remove(&(self.slots.len() - 1));
            self.slots.pop();
        }
        Some(state)
    }
}

impl KvIndexer {
    pub fn new() -> Self {
        Self::default()
    }

    /// Applies one event of `worker`. A worker never seen expects event id 0. An id below the
    /// next expected one is a duplicate: ignored, Ok. Removed of an unknown hash: ignored.
    /// Cleared: drops all of that worker's blocks.
    pub fn apply(&mut self, worker: u64, event: &KvEvent) -> Result<(), IndexGap> {
        let known = self.workers.by_id.get(&worker);
        let expected = known.map_or(0, |s| s.next_event_id);
        if event.event_id < expected {
            return Ok(());
        }
        if event.event_id > expected {
            return Err(IndexGap::Missing {
                worker,
                expected,
                got: event.event_id,
            });
        }
        // Where the parent is: the chain's first block usually follows it in the arena.
        let mut after = None;
        if let KvEventData::Stored {
            parent_hash: Some(parent),
            ..
        } = event.data
        {
            let held = known.and_then(|s| {
                let at = self.nodes.find(parent)?;
                self.nodes.node(at).holders.contains(s.slot).then_some(at)
            });
            if held.is_none() {
                return Err(IndexGap::UnknownParent {
                    worker,
                    parent,
                    event_id: event.event_id,
                });
            }
            after = held;
        }
        // Also registers a worker first heard of through Removed/Cleared, so its next duplicate
        // is recognised.
        let state = self.workers.entry(worker);
        match &event.data {
            KvEventData::Stored {
                parent_hash,
                blocks,
            } => store_chain(&mut self.nodes, state, *parent_hash, after, blocks, |b| {
                b.block_hash
            }),
            KvEventData::Removed { block_hashes } => {
                remove_blocks(&mut self.nodes, state, block_hashes)
            }
            KvEventData::Cleared => purge(&mut self.nodes, state),
        }
        state.next_event_id = expected + 1;
        self.compact_if_due();
        Ok(())
    }

    /// Replaces everything known about `worker` with `dump`; afterwards the next expected event
    /// id is `dump.last_event_id + 1` (0 if `None`).
    pub fn load_dump(&mut self, worker: u64, dump: &KvDump) {
        let state = self.workers.entry(worker);
        purge(&mut self.nodes, state);
        // Parents come before children, so a block often follows its parent.
        let mut after = None;
        for (i, cached) in dump.blocks.iter().enumerate() {
            self.nodes
                .prefetch_ahead(&dump.blocks, i, |c| c.block.block_hash);
            let h = cached.block.block_hash;
            let (at, added) = self
                .nodes
                .insert_holder(h, cached.parent_hash, state.slot, after);
            after = Some(at);
            if added {
                state.log.push(at);
                state.blocks += 1;
            }
        }
        state.next_event_id = dump.last_event_id.map_or(0, |id| id + 1);
        self.compact_if_due();
    }

    /// Forgets `worker` entirely (it left discovery); its slot may be reused.
    pub fn remove_worker(&mut self, worker: u64) {
        if let Some(mut state) = self.workers.remove(worker) {
            purge(&mut self.nodes, &mut state);
            self.compact_if_due();
        }
    }

    /// For the chained block hashes of a request's prompt (in order), each worker holding at
    /// least the first block, with how many leading blocks it holds contiguously from the start.
    /// Order of the Vec unspecified.
    pub fn find_matches(&self, block_hashes: &[u64]) -> Vec<(u64, usize)> {
        let mut out = Vec::new();
        self.find_matches_into(block_hashes, &mut out);
        out
    }

    /// [`find_matches`](Self::find_matches) into a caller's buffer (cleared first), so a hot
    /// loop allocates nothing.
    pub fn find_matches_into(&self, block_hashes: &[u64], out: &mut Vec<(u64, usize)>) {
        out.clear();
        let Some(mut at) = block_hashes.first().and_then(|&h| self.nodes.find(h)) else {
            return;
        };
        let first = self.nodes.node(at);
        let words = self.workers.slots.len().div_ceil(64);
        if words <= 1 {
            // Up to 64 slots: the whole walk is one register.
            let mut active = first.holders.low;
            for (i, &h) in block_hashes.iter().enumerate().skip(1) {
                let held = match self.nodes.next(Some(at), h) {
                    Some(next) => {
                        at = next;
                        self.nodes.node(next).holders.low
                    }
                    None => 0,
                };
                let still = active & held;
                if still != active {
                    // The workers dropping out hold exactly the first `i` blocks.
                    self.emit(active & !still, 0, i, out);
                    if still == 0 {
                        return;
                    }
                    active = still;
                }
            }
            self.emit(active, 0, block_hashes.len(), out);
            return;
        }
        // Up to 512 slots the intersection stays on the stack.
        let mut stack = [0u64; 8];
        let mut heap = Vec::new();
        let active: &mut [u64] = if words <= stack.len() {
            &mut stack[..words]
        } else {
            heap.resize(words, 0);
            &mut heap
        };
        for (w, a) in active.iter_mut().enumerate() {
            *a = first.holders.word(w);
        }
        for (i, &h) in block_hashes.iter().enumerate().skip(1) {
            let node = self.nodes.next(Some(at), h).map(|next| {
                at = next;
                self.nodes.node(next)
            });
            let mut any = 0;
            for (w, a) in active.iter_mut().enumerate() {
                let still = *a & node.map_or(0, |n| n.holders.word(w));
                if still != *a {
                    self.emit(*a & !still, w, i, out);
                    *a = still;
                }
                any |= still;
            }
            if any == 0 {
                return;
            }
        }
        for (w, &a) in active.iter().enumerate() {
            self.emit(a, w, block_hashes.len(), out);
        }
    }

    /// Low-level store without event-id bookkeeping (approximate mode, tests): the chain
    /// `blocks` under `parent` (`None` = root) for `worker`. The parent need not be held.
    pub fn store(&mut self, worker: u64, parent: Option<u64>, blocks: &[u64]) {
        let after = parent.and_then(|p| self.nodes.find(p));
        let state = self.workers.entry(worker);
        store_chain(&mut self.nodes, state, parent, after, blocks, |&h| h);
    }

    /// Low-level removal without event-id bookkeeping: `worker` no longer holds these hashes
    /// (unknown ones are ignored).
    pub fn remove(&mut self, worker: u64, block_hashes: &[u64]) {
        if let Some(state) = self.workers.by_id.get_mut(&worker) {
            remove_blocks(&mut self.nodes, state, block_hashes);
            self.compact_if_due();
        }
    }

    /// Blocks `worker` holds.
    pub fn worker_blocks(&self, worker: u64) -> usize {
        self.workers.by_id.get(&worker).map_or(0, |s| s.blocks)
    }

    /// Distinct blocks in the tree (held by at least one worker).
    pub fn total_blocks(&self) -> usize {
        self.nodes.len()
    }

    /// The workers known to the index, in no particular order.
    pub fn workers(&self) -> Vec<u64> {
        self.workers.by_id.keys().copied().collect()
    }

    /// The event id the index expects next from `worker`: 0 for an unknown worker.
    pub fn next_event_id(&self, worker: u64) -> u64 {
        self.workers
            .by_id
            .get(&worker)
            .map_or(0, |s| s.next_event_id)
    }

    /// The block before `block_hash` in its chain: `Some(None)` for a sequence's first block,
    /// `None` when no worker holds `block_hash`.
    pub fn parent_of(&self, block_hash: u64) -> Option<Option<u64>> {
        self.nodes.get(block_hash).map(|n| n.parent())
    }

    /// Rebuilds the arena once dead nodes outnumber live ones, and renumbers the logs with it.
    fn compact_if_due(&mut self) {
        if !self.nodes.needs_compaction() {
            return;
        }
        let remap = self.nodes.compact();
        for state in self.workers.by_id.values_mut() {
            state.log.retain_mut(|idx| {
                *idx = remap[*idx as usize];
                *idx != GONE
            });
        }
    }

    /// Pushes `(worker, depth)` for every slot set in `bits`, word `word` of a slot set.
    #[inline]
    fn emit(&self, mut bits: u64, word: usize, depth: usize, out: &mut Vec<(u64, usize)>) {
        while bits != 0 {
            let slot = word * 64 + bits.trailing_zeros() as usize;
            bits &= bits - 1;
            if let Some(worker) = self.workers.slots[slot] {
                out.push((worker, depth));
            }
        }
    }
}

/// Drops every block of a worker (its log names them all), keeping the worker. A child left
/// behind by another worker is harmless: queries stop at the first block a worker lacks.
fn purge(nodes: &mut NodeTable, state: &mut WorkerState) {
    for &idx in &state.log {
        nodes.remove_holder_at(idx, state.slot);
    }
    state.log.clear();
    state.blocks = 0;
}

/// Stores the chain `blocks` (hashes through `hash`) under `parent`, whose node is at `after`
/// if known, for the worker of `state`.
fn store_chain<T>(
    nodes: &mut NodeTable,
    state: &mut WorkerState,
    mut parent: Option<u64>,
    mut after: Option<Idx>,
    blocks: &[T],
    hash: impl Fn(&T) -> u64,
) {
    for (i, block) in blocks.iter().enumerate() {
        nodes.prefetch_ahead(blocks, i, &hash);
        let h = hash(block);
        let (at, added) = nodes.insert_holder(h, parent, state.slot, after);
        if added {
            state.log.push(at);
            state.blocks += 1;
        }
        (parent, after) = (Some(h), Some(at));
    }
    if state.log.len() > MIN_COMPACT_LOG.max(2 * state.blocks) {
        let slot = state.slot;
        state
            .log
            .retain(|&idx| nodes.node(idx).holders.contains(slot));
        // A block stored, removed and stored again while others held it is logged twice.
        state.log.sort_unstable();
        state.log.dedup();
        debug_assert_eq!(state.log.len(), state.blocks);
    }
}

/// The worker of `state` no longer holds `block_hashes`.
fn remove_blocks(nodes: &mut NodeTable, state: &mut WorkerState, block_hashes: &[u64]) {
    // Removals list blocks in chain order, so each usually follows the one before in the arena.
    let mut after = None;
    for (i, &h) in block_hashes.iter().enumerate() {
        nodes.prefetch_ahead(block_hashes, i, |&h| h);
        let (at, removed) = nodes.remove_holder(h, state.slot, after);
        after = at;
        if removed {
            state.blocks -= 1;
        }
    }
}
