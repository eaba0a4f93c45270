//! Property test of the block manager: random operation sequences (allocations from shared
//! prefixes, appends, growing commits, frees, resets) keep the block accounting consistent, never
//! hand out a cached block with the wrong content, and the emitted KV events replay to exactly the
//! registered hashes.

use std::collections::{BTreeMap, HashSet};
use std::sync::mpsc::{channel, Receiver};

use proptest::prelude::*;
use proptest::sample::Index;

use super::*;

const NUM_BLOCKS: usize = 16;
const BS: usize = 4;
const PREFIX_LEN: usize = 12;

#[derive(Clone, Debug)]
enum Op {
    /// A prompt of `prefix_len` tokens of shared prefix `prefix`, then `suffix`.
    Allocate {
        prefix: u32,
        prefix_len: usize,
        suffix: Vec<u32>,
    },
    /// Generate `tokens` more and grow the table for them.
    Append {
        pick: Index,
        tokens: Vec<u32>,
    },
    /// Compute `percent` of the not-yet-computed tokens.
    Commit {
        pick: Index,
        percent: usize,
    },
    Free {
        pick: Index,
    },
    Reset,
}

fn op() -> impl Strategy<Value = Op> {
    let tokens = |n| prop::collection::vec(0..3u32, n);
    prop_oneof![
        4 => (0..3u32, 0..=PREFIX_LEN, tokens(0..6)).prop_map(|(prefix, prefix_len, suffix)| {
            Op::Allocate { prefix, prefix_len, suffix }
        }),
        3 => (any::<Index>(), tokens(1..8)).prop_map(|(pick, tokens)| Op::Append { pick, tokens }),
        4 => (any::<Index>(), 0..=100usize).prop_map(|(pick, percent)| Op::Commit { pick, percent }),
        2 => any::<Index>().prop_map(|pick| Op::Free { pick }),
        1 => Just(Op::Reset),
    ]
}

/// The test's own view of a live sequence.
struct Live {
    tokens: Vec<u32>,
    computed: usize,
}

/// Everything an operation refused with an error must leave unchanged.
#[derive(Debug, PartialEq)]
struct Snapshot {
    free: VecDeque<u32>,
    lru: BTreeMap<u64, u32>,
    cache: HashSet<u64>,
    tables: BTreeMap<SeqId, Vec<u32>>,
    ref_counts: Vec<u32>,
    next_event_id: u64,
}

fn snapshot(bm: &BlockManager) -> Snapshot {
    Snapshot {
        free: bm.free.clone(),
        lru: bm.lru.clone(),
        cache: bm.cached_block_hashes(),
        tables: bm.seqs.iter().map(|(&s, q)| (s, q.table.clone())).collect(),
        ref_counts: bm.blocks.iter().map(|b| b.ref_count).collect(),
        next_event_id: bm.next_event_id,
    }
}

struct Harness {
    bm: BlockManager,
    events: Receiver<KvEvent>,
    next_event_id: u64,
    replayed: HashSet<u64>,
    live: BTreeMap<SeqId, Live>,
    next_seq: SeqId,
    /// What the KV of each block slot holds, as the executor would have written it.
    content: Vec<[Option<u32>; BS]>,
    resets: usize,
    /// The last operation was a reset (its `Removed` is no eviction).
    in_reset: bool,
    stats: Stats,
}

/// How often the interesting paths were taken, to show the property test is not vacuous.
#[derive(Debug, Default)]
struct Stats {
    prefix_hits: usize,
    out_of_blocks: usize,
    evictions: usize,
    duplicates: usize,
}

impl Harness {
    fn new() -> Self {
        let (tx, events) = channel();
        let config = BlockManagerConfig {
            num_blocks: NUM_BLOCKS,
            block_size: BS,
            enable_prefix_caching: true,
        };
        Self {
            bm: BlockManager::new(config, Some(tx)),
            events,
            next_event_id: 0,
            replayed: HashSet::new(),
            live: BTreeMap::new(),
            next_seq: 0,
            content: vec![[None; BS]; NUM_BLOCKS],
            resets: 0,
            in_reset: false,
            stats: Stats::default(),
        }
    }

    fn pick(&self, pick: &Index) -> Option<SeqId> {
        if self.live.is_empty() {
            return None;
        }
        self.live.keys().nth(pick.index(self.live.len())).copied()
    }

    fn apply(&mut self, op: &Op) {
        self.in_reset = matches!(op, Op::Reset);
        match op {
            Op::Allocate {
                prefix,
                prefix_len,
                suffix,
            } => {
                let mut prompt: Vec<u32> = (0..*prefix_len as u32)
                    .map(|i| 100 * (prefix + 1) + i)
                    .collect();
                prompt.extend(suffix);
                let seq = self.next_seq;
                self.next_seq += 1;
                let hit = self.bm.cached_prefix_len(&prompt);
                let needed = self.bm.blocks_needed(&prompt);
                let available = self.bm.num_available_blocks();
                let before = snapshot(&self.bm);
                match self.bm.allocate(seq, &prompt) {
                    Ok(cached) => {
                        self.stats.prefix_hits += usize::from(cached > 0);
                        assert!(needed <= available);
                        assert_eq!(cached, hit);
                        assert_eq!(cached % BS, 0);
                        assert!(cached < prompt.len() || prompt.is_empty());
                        assert_eq!(self.bm.num_available_blocks(), available - needed);
                        let table = self.bm.block_table(seq).unwrap();
                        for (i, &block) in table[..cached / BS].iter().enumerate() {
                            let expected: Vec<_> = prompt[i * BS..(i + 1) * BS]
                                .iter()
                                .map(|&t| Some(t))
                                .collect();
                            assert_eq!(
                                self.content[block as usize][..],
                                expected[..],
                                "hit block {block} holds another prefix"
                            );
                        }
                        self.live.insert(
                            seq,
                            Live {
                                tokens: prompt,
                                computed: cached,
                            },
                        );
                    }
                    Err(err) => {
                        self.stats.out_of_blocks += 1;
                        assert_eq!(
                            err,
                            BlockError::OutOfBlocks(OutOfBlocks { needed, available })
                        );
                        assert!(needed > available);
                        assert_eq!(snapshot(&self.bm), before);
                    }
                }
            }
            Op::Append { pick, tokens } => {
                let Some(seq) = self.pick(pick) else { return };
                let live = self.live.get_mut(&seq).unwrap();
                let new_len = live.tokens.len() + tokens.len();
                let before = snapshot(&self.bm);
                let available = self.bm.num_available_blocks();
                let needed = new_len.div_ceil(BS) - self.bm.block_table(seq).unwrap().len();
                match self.bm.append_slots(seq, new_len) {
                    Ok(()) => {
                        assert!(needed <= available);
                        live.tokens.extend(tokens);
                    }
                    Err(err) => {
                        self.stats.out_of_blocks += 1;
                        assert_eq!(
                            err,
                            BlockError::OutOfBlocks(OutOfBlocks { needed, available })
                        );
                        assert_eq!(snapshot(&self.bm), before);
                    }
                }
            }
            Op::Commit { pick, percent } => {
                let Some(seq) = self.pick(pick) else { return };
                let live = self.live.get_mut(&seq).unwrap();
                let end = live.computed + (live.tokens.len() - live.computed) * percent / 100;
                // The executor writes the KV of the newly computed tokens into their slots: never
                // into a shared or registered block.
                let table = self.bm.block_table(seq).unwrap();
                for pos in live.computed..end {
                    let block = table[pos / BS] as usize;
                    assert_eq!(self.bm.blocks[block].ref_count, 1, "write to shared block");
                    assert_eq!(
                        self.bm.blocks[block].hash, None,
                        "write to registered block"
                    );
                    self.content[block][pos % BS] = Some(live.tokens[pos]);
                }
                let registered = self.bm.cache.len();
                let newly_full = end / BS - self.bm.seqs[&seq].committed_blocks.min(end / BS);
                self.bm.commit(seq, &live.tokens[..end]).unwrap();
                let stored = self.bm.cache.len() - registered;
                self.stats.duplicates += newly_full - stored;
                live.computed = end;
            }
            Op::Free { pick } => {
                assert!(!self.bm.free(SeqId::MAX));
                let Some(seq) = self.pick(pick) else { return };
                assert!(self.bm.free(seq));
                self.live.remove(&seq);
            }
            Op::Reset => {
                let cached = self.bm.num_cached_blocks();
                assert_eq!(self.bm.reset_prefix_cache(), cached);
                self.resets += 1;
            }
        }
    }

    /// Replays the new events and checks every invariant.
    fn check(&mut self) {
        for event in self.events.try_iter() {
            assert_eq!(event.event_id, self.next_event_id);
            self.next_event_id += 1;
            if !self.in_reset && matches!(event.data, KvEventData::Removed { .. }) {
                self.stats.evictions += 1;
            }
            match event.data {
                KvEventData::Stored { blocks, .. } => {
                    assert!(!blocks.is_empty());
                    for block in blocks {
                        assert!(self.replayed.insert(block.block_hash), "stored twice");
                    }
                }
                KvEventData::Removed { block_hashes } => {
                    assert!(!block_hashes.is_empty());
                    for hash in block_hashes {
                        assert!(self.replayed.remove(&hash), "removed unknown hash");
                    }
                }
                KvEventData::Cleared => self.replayed.clear(),
            }
        }
        let bm = &self.bm;
        assert_eq!(self.replayed, bm.cached_block_hashes());

        // Where each block is.
        let mut holders: Vec<Vec<(SeqId, usize)>> = vec![Vec::new(); NUM_BLOCKS];
        for (&seq, state) in &bm.seqs {
            for (i, &block) in state.table.iter().enumerate() {
                holders[block as usize].push((seq, i));
            }
        }
        let mut in_free = [0; NUM_BLOCKS];
        for &block in &bm.free {
            in_free[block as usize] += 1;
        }
        let mut in_lru = [0; NUM_BLOCKS];
        for (&tick, &block) in &bm.lru {
            in_lru[block as usize] += 1;
            assert_eq!(bm.blocks[block as usize].lru_tick, Some(tick));
        }
        let mut used = 0;
        for (block, meta) in bm.blocks.iter().enumerate() {
            let holders = &holders[block];
            assert_eq!(
                meta.ref_count as usize,
                holders.len(),
                "ref count of block {block}"
            );
            if meta.ref_count > 0 {
                used += 1;
                assert_eq!(
                    (in_free[block], in_lru[block]),
                    (0, 0),
                    "used block {block} pooled"
                );
                assert_eq!(meta.lru_tick, None);
            } else if meta.hash.is_some() {
                assert_eq!(
                    (in_free[block], in_lru[block]),
                    (0, 1),
                    "cached block {block}"
                );
            } else {
                assert_eq!(
                    (in_free[block], in_lru[block]),
                    (1, 0),
                    "free block {block}"
                );
                assert_eq!(meta.lru_tick, None);
            }
            if holders.len() > 1 {
                // Only computed full blocks are shared, and only registered ones (until a reset
                // unregisters them under their holders).
                assert!(
                    meta.hash.is_some() || self.resets > 0,
                    "shared unregistered {block}"
                );
                for &(seq, i) in holders {
                    assert!(
                        i < bm.seqs[&seq].committed_blocks,
                        "shared uncomputed {block}"
                    );
                    assert!((i + 1) * BS <= self.live[&seq].computed);
                }
            }
        }
        assert_eq!(used, bm.num_used_blocks());
        assert_eq!(
            bm.num_free_blocks() + bm.num_cached_blocks() + bm.num_used_blocks(),
            bm.total_blocks()
        );
        assert_eq!(bm.num_available_blocks(), NUM_BLOCKS - used);

        // The prefix cache index agrees with the blocks.
        assert_eq!(
            bm.cache.len(),
            bm.blocks.iter().filter(|b| b.hash.is_some()).count()
        );
        for (&hash, &block) in &bm.cache {
            assert_eq!(bm.blocks[block as usize].hash, Some(hash));
        }

        // Every live sequence's table covers its tokens, and only live sequences have tables.
        assert_eq!(bm.seqs.len(), self.live.len());
        for (&seq, live) in &self.live {
            assert!(bm.contains(seq));
            let table = bm.block_table(seq).unwrap();
            assert_eq!(table.len(), live.tokens.len().div_ceil(BS));
            let unique: HashSet<_> = table.iter().collect();
            assert_eq!(unique.len(), table.len(), "block twice in one table");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn random_operations_keep_invariants(ops in prop::collection::vec(op(), 1..100)) {
        let mut h = Harness::new();
        for op in &ops {
            h.apply(op);
            h.check();
        }
        let live: Vec<SeqId> = h.live.keys().copied().collect();
        for seq in live {
            prop_assert!(h.bm.free(seq));
            h.live.remove(&seq);
            h.check();
        }
        prop_assert_eq!(h.bm.num_used_blocks(), 0);
        prop_assert!(h.bm.blocks.iter().all(|b| b.ref_count == 0));
        prop_assert_eq!(h.bm.num_available_blocks(), NUM_BLOCKS);
    }
}

/// The operation mix reaches prefix hits, exhaustion, eviction and concurrent duplicates.
#[test]
fn random_operations_reach_every_path() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;

    let mut runner = TestRunner::deterministic();
    let mut total = Stats::default();
    for _ in 0..200 {
        let ops = prop::collection::vec(op(), 1..100)
            .new_tree(&mut runner)
            .unwrap()
            .current();
        let mut h = Harness::new();
        for op in &ops {
            h.apply(op);
            h.check();
        }
        total.prefix_hits += h.stats.prefix_hits;
        total.out_of_blocks += h.stats.out_of_blocks;
        total.evictions += h.stats.evictions;
        total.duplicates += h.stats.duplicates;
    }
    eprintln!("{total:?}");
    assert!(total.prefix_hits > 0 && total.out_of_blocks > 0);
    assert!(total.evictions > 0 && total.duplicates > 0);
}
