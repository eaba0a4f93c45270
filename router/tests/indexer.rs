//! The KV indexer against hand-built cases (shared prefixes, duplicates, gaps, unknown parents,
//! Cleared, worker loss and slot reuse, more than 64 workers, dumps, approximate mode) and
//! against a brute-force model of the workers' caches under random events, some of them lost on
//! the way, with the router's resync by dump.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use proptest::prelude::*;
use router::indexer::{ApproxIndexer, IndexGap, KvIndexer};
use runtime::block_hash::{chain_hash, tokens_hash, BlockHash};
use runtime::kv_event::{CachedBlock, KvDump, KvEvent, KvEventData};

/// Tokens hash of the one-token block `letter`.
fn letter(letter: u8) -> u64 {
    tokens_hash(&[u32::from(letter)])
}

/// Chained block hashes of a sequence of one-token blocks.
fn chain(letters: &[u8]) -> Vec<u64> {
    let mut parent = None;
    letters
        .iter()
        .map(|&l| {
            let h = chain_hash(parent, letter(l));
            parent = Some(h);
            h
        })
        .collect()
}

fn stored(event_id: u64, parent: Option<u64>, hashes: &[u64]) -> KvEvent {
    KvEvent {
        event_id,
        data: KvEventData::Stored {
            parent_hash: parent,
            // The index keys on the chained hash; the tokens hash only rides along.
            blocks: hashes
                .iter()
                .map(|&h| BlockHash {
                    block_hash: h,
                    tokens_hash: !h,
                })
                .collect(),
        },
    }
}

fn removed(event_id: u64, hashes: &[u64]) -> KvEvent {
    KvEvent {
        event_id,
        data: KvEventData::Removed {
            block_hashes: hashes.to_vec(),
        },
    }
}

fn sorted(mut v: Vec<(u64, usize)>) -> Vec<(u64, usize)> {
    v.sort_unstable();
    v
}

fn sorted_ids(mut v: Vec<u64>) -> Vec<u64> {
    v.sort_unstable();
    v
}

fn matches(index: &KvIndexer, letters: &[u8]) -> Vec<(u64, usize)> {
    sorted(index.find_matches(&chain(letters)))
}

#[test]
fn shared_prefix_then_diverging() {
    let mut index = KvIndexer::new();
    let abcd = chain(&[0, 1, 2, 3]);
    let abef = chain(&[0, 1, 4, 5]);
    index.apply(1, &stored(0, None, &abcd)).unwrap();
    index.apply(2, &stored(0, None, &abef[..2])).unwrap();
    index
        .apply(2, &stored(1, Some(abef[1]), &abef[2..]))
        .unwrap();

    assert_eq!(matches(&index, &[0, 1, 2, 3]), vec![(1, 4), (2, 2)]);
    assert_eq!(matches(&index, &[0, 1, 4, 5]), vec![(1, 2), (2, 4)]);
    assert_eq!(matches(&index, &[0, 1, 4]), vec![(1, 2), (2, 3)]);
    assert_eq!(matches(&index, &[0, 1, 2, 3, 9]), vec![(1, 4), (2, 2)]);
    assert_eq!(matches(&index, &[0]), vec![(1, 1), (2, 1)]);
    // Block 1 on its own is a different prefix, so a different chained hash.
    assert_eq!(matches(&index, &[1, 2]), vec![]);
    assert_eq!(matches(&index, &[7]), vec![]);
    assert!(index.find_matches(&[]).is_empty());

    assert_eq!(index.total_blocks(), 6);
    assert_eq!(index.worker_blocks(1), 4);
    assert_eq!(index.worker_blocks(2), 4);
    assert_eq!(index.worker_blocks(3), 0);
    assert_eq!(sorted_ids(index.workers()), vec![1, 2]);
    assert_eq!(index.next_event_id(2), 2);
    assert_eq!(index.parent_of(abef[2]), Some(Some(abef[1])));
    assert_eq!(index.parent_of(abef[0]), Some(None));
    assert_eq!(index.parent_of(12345), None);

    // A worker dropping a middle block matches only up to it; the other is unaffected.
    index.apply(1, &removed(1, &[abcd[1]])).unwrap();
    assert_eq!(matches(&index, &[0, 1, 2, 3]), vec![(1, 1), (2, 2)]);
    assert_eq!(index.worker_blocks(1), 3);
    assert_eq!(index.total_blocks(), 6);
}

#[test]
fn duplicates_and_unknown_removals_are_ignored() {
    let mut index = KvIndexer::new();
    let abc = chain(&[0, 1, 2]);
    index.apply(5, &stored(0, None, &abc)).unwrap();
    index.apply(5, &removed(1, &[abc[2], 999])).unwrap();
    // Event 0 again, then event 1 again with different content: both already applied.
    index.apply(5, &stored(0, None, &abc)).unwrap();
    index.apply(5, &removed(1, &abc)).unwrap();
    assert_eq!(matches(&index, &[0, 1, 2]), vec![(5, 2)]);
    assert_eq!(index.next_event_id(5), 2);
    assert_eq!(index.worker_blocks(5), 2);
    // Storing blocks the worker already holds changes nothing.
    index.apply(5, &stored(2, None, &abc[..2])).unwrap();
    assert_eq!(index.worker_blocks(5), 2);
    assert_eq!(index.total_blocks(), 2);
}

#[test]
fn gap_is_detected_and_nothing_applied() {
    let mut index = KvIndexer::new();
    let abc = chain(&[0, 1, 2]);
    let gap = index.apply(9, &stored(1, None, &abc)).unwrap_err();
    assert_eq!(
        gap,
        IndexGap::Missing {
            worker: 9,
            expected: 0,
            got: 1
        }
    );
    assert_eq!(index.total_blocks(), 0);
    assert!(index.workers().is_empty());

    index.apply(9, &stored(0, None, &abc[..1])).unwrap();
    let gap = index.apply(9, &removed(3, &abc[..1])).unwrap_err();
    assert_eq!(
        gap,
        IndexGap::Missing {
            worker: 9,
            expected: 1,
            got: 3
        }
    );
    assert_eq!(
        gap.to_string(),
        "KV events of worker 9 skipped ids: expected event 1, got 3"
    );
    assert_eq!(matches(&index, &[0, 1, 2]), vec![(9, 1)]);
    assert_eq!(index.next_event_id(9), 1);
    index.apply(9, &stored(1, Some(abc[0]), &abc[1..])).unwrap();
    assert_eq!(matches(&index, &[0, 1, 2]), vec![(9, 3)]);
}

#[test]
fn unknown_parent_is_detected_and_nothing_applied() {
    let mut index = KvIndexer::new();
    let abc = chain(&[0, 1, 2]);
    index.apply(1, &stored(0, None, &abc)).unwrap();
    index.apply(2, &stored(0, None, &abc[..1])).unwrap();
    // Worker 2 names a parent only worker 1 holds.
    let gap = index
        .apply(2, &stored(1, Some(abc[1]), &abc[2..]))
        .unwrap_err();
    assert_eq!(
        gap,
        IndexGap::UnknownParent {
            worker: 2,
            parent: abc[1],
            event_id: 1
        }
    );
    assert!(gap.to_string().contains(&format!("{:x}", abc[1])), "{gap}");
    assert_eq!(matches(&index, &[0, 1, 2]), vec![(1, 3), (2, 1)]);
    assert_eq!(index.next_event_id(2), 1);
    // A parent nobody holds, from a worker never seen.
    let gap = index.apply(3, &stored(0, Some(77), &abc)).unwrap_err();
    assert!(matches!(
        gap,
        IndexGap::UnknownParent {
            worker: 3,
            parent: 77,
            event_id: 0
        }
    ));
    assert_eq!(index.worker_blocks(3), 0);
    // The low-level store accepts what apply refuses.
    index.store(3, Some(77), &abc[1..]);
    assert_eq!(index.worker_blocks(3), 2);
    assert_eq!(matches(&index, &[0, 1, 2]), vec![(1, 3), (2, 1)]);
}

#[test]
fn cleared_drops_only_that_worker() {
    let mut index = KvIndexer::new();
    let abc = chain(&[0, 1, 2]);
    let abd = chain(&[0, 1, 3]);
    index.apply(1, &stored(0, None, &abc)).unwrap();
    index.apply(2, &stored(0, None, &abd)).unwrap();
    index
        .apply(
            1,
            &KvEvent {
                event_id: 1,
                data: KvEventData::Cleared,
            },
        )
        .unwrap();
    assert_eq!(matches(&index, &[0, 1, 2]), vec![(2, 2)]);
    assert_eq!(index.worker_blocks(1), 0);
    assert_eq!(index.total_blocks(), 3);
    assert_eq!(index.next_event_id(1), 2);
    // The worker keeps its event ids and can store again from the root.
    index.apply(1, &stored(2, None, &abc[..1])).unwrap();
    assert_eq!(matches(&index, &[0, 1, 2]), vec![(1, 1), (2, 2)]);
}

#[test]
fn remove_worker_purges_and_its_slot_does_not_resurrect_blocks() {
    let mut index = KvIndexer::new();
    let abc = chain(&[0, 1, 2]);
    let xyz = chain(&[7, 8, 9]);
    index.apply(1, &stored(0, None, &abc)).unwrap();
    index.apply(2, &stored(0, None, &abc[..1])).unwrap();
    index.remove(1, &abc[1..2]);
    index.store(1, Some(abc[0]), &abc[1..2]); // logged twice now
    index.remove_worker(1);
    assert_eq!(matches(&index, &[0, 1, 2]), vec![(2, 1)]);
    assert_eq!(index.total_blocks(), 1);
    assert_eq!(index.next_event_id(1), 0);
    assert_eq!(index.workers(), vec![2]);
    // A newcomer takes worker 1's slot and must not inherit its blocks.
    index.apply(3, &stored(0, None, &xyz)).unwrap();
    assert_eq!(matches(&index, &[0, 1, 2]), vec![(2, 1)]);
    assert_eq!(matches(&index, &[7, 8, 9]), vec![(3, 3)]);
    // Worker 1 coming back starts over at event 0 with nothing cached.
    assert_eq!(
        index.apply(1, &stored(4, None, &abc)),
        Err(IndexGap::Missing {
            worker: 1,
            expected: 0,
            got: 4
        })
    );
    index.remove_worker(2);
    index.remove_worker(3);
    index.remove_worker(3);
    assert_eq!(index.total_blocks(), 0);
    assert!(index.workers().is_empty());
}

#[test]
fn more_than_64_workers() {
    let mut index = KvIndexer::new();
    let long: Vec<u8> = (0..12).collect();
    let hashes = chain(&long);
    let id = |w: u64| 0xABCD_0000_0000 + w * 7919;
    for w in 0..200u64 {
        let len = (w % 12 + 1) as usize;
        index
            .apply(id(w), &stored(0, None, &hashes[..len]))
            .unwrap();
    }
    let expected = |workers: &mut dyn Iterator<Item = u64>| {
        sorted(workers.map(|w| (id(w), (w % 12 + 1) as usize)).collect())
    };
    assert_eq!(sorted(index.find_matches(&hashes)), expected(&mut (0..200)));
    // Only workers holding the first 5 blocks or more report 5 on a 5-block query.
    assert_eq!(
        sorted(index.find_matches(&hashes[..5])),
        sorted(
            (0..200u64)
                .map(|w| (id(w), ((w % 12 + 1) as usize).min(5)))
                .collect()
        )
    );
    // Churn above slot 64 and reuse of the freed slots.
    for w in (60..200).step_by(3) {
        index.remove_worker(id(w));
    }
    let mut live = (0..200).filter(|w| !(w >= &60 && (w - 60) % 3 == 0));
    assert_eq!(sorted(index.find_matches(&hashes)), expected(&mut live));
    for w in 200..260u64 {
        index.store(id(w), None, &hashes[..1]);
    }
    let got = sorted(index.find_matches(&hashes));
    assert_eq!(got.len(), 200 - 47 + 60);
    assert!(got.contains(&(id(259), 1)) && got.contains(&(id(199), 8)));
    assert!(!got.iter().any(|&(w, _)| w == id(198)));
    for w in 0..260u64 {
        index.remove_worker(id(w));
    }
    assert_eq!(index.total_blocks(), 0);
    // Back to one word of slots.
    index.store(1, None, &hashes);
    assert_eq!(index.find_matches(&hashes), vec![(1, 12)]);
}

#[test]
fn load_dump_replaces_state_and_sets_next_id() {
    let mut index = KvIndexer::new();
    let abc = chain(&[0, 1, 2]);
    let xy = chain(&[5, 6]);
    index.apply(4, &stored(0, None, &abc)).unwrap();
    index.apply(8, &stored(0, None, &abc)).unwrap();
    let dump = KvDump {
        last_event_id: Some(9),
        blocks: [(None, xy[0]), (Some(xy[0]), xy[1]), (None, abc[0])]
            .into_iter()
            .map(|(parent_hash, h)| CachedBlock {
                parent_hash,
                block: BlockHash {
                    block_hash: h,
                    tokens_hash: 0,
                },
            })
            .collect(),
    };
    index.load_dump(4, &dump);
    assert_eq!(index.next_event_id(4), 10);
    assert_eq!(index.worker_blocks(4), 3);
    assert_eq!(matches(&index, &[0, 1, 2]), vec![(4, 1), (8, 3)]);
    assert_eq!(matches(&index, &[5, 6]), vec![(4, 2)]);
    // Events up to 9 are duplicates; 10 applies on top of the dump.
    index.apply(4, &removed(9, &xy)).unwrap();
    index.apply(4, &stored(10, Some(xy[1]), &[42])).unwrap();
    assert_eq!(index.worker_blocks(4), 4);
    // A dump of a worker that never emitted; then an empty one for a new worker.
    index.load_dump(
        8,
        &KvDump {
            last_event_id: None,
            blocks: vec![],
        },
    );
    assert_eq!(index.next_event_id(8), 0);
    assert_eq!(matches(&index, &[0, 1, 2]), vec![(4, 1)]);
    index.load_dump(11, &KvDump::default());
    assert_eq!(sorted_ids(index.workers()), vec![4, 8, 11]);
}

#[test]
fn churn_keeps_counts_and_purge_complete() {
    // Store/remove cycles make the per-worker log compact many times.
    let mut index = KvIndexer::new();
    let letters: Vec<u8> = (0..40).map(|i| i % 7).collect();
    let hashes = chain(&letters);
    for round in 0..50 {
        index.store(1, None, &hashes);
        index.store(2, None, &hashes[..10]);
        index.remove(1, &hashes[(round % 30)..]);
        assert_eq!(index.worker_blocks(1), round % 30);
        assert_eq!(
            sorted(index.find_matches(&hashes)),
            vec![(1, round % 30), (2, 10)]
                .into_iter()
                .filter(|&(_, n)| n > 0)
                .collect::<Vec<_>>()
        );
    }
    index.remove_worker(1);
    assert_eq!(index.total_blocks(), 10);
    index.remove_worker(2);
    assert_eq!(index.total_blocks(), 0);
}

#[test]
fn arena_rebuild_keeps_matches_and_purges() {
    // 4 000 nodes, 3 000 of them dropped: enough dead nodes for the index to rebuild its
    // storage (renumbering every worker's log) in the middle of the removals.
    let chains: Vec<Vec<u64>> = (0..20u8)
        .map(|c| {
            chain(
                &(0..200u32)
                    .map(|j| if j == 0 { c } else { (j % 251) as u8 })
                    .collect::<Vec<_>>(),
            )
        })
        .collect();
    let mut index = KvIndexer::new();
    for (c, hashes) in chains.iter().enumerate() {
        index.store(1, None, hashes);
        if c < 5 {
            index.store(2, None, hashes);
        }
    }
    assert_eq!(index.total_blocks(), 4000);
    for hashes in &chains[5..] {
        index.remove(1, hashes);
    }
    assert_eq!(index.total_blocks(), 1000);
    assert_eq!(index.worker_blocks(1), 1000);
    for (c, hashes) in chains.iter().enumerate() {
        let want = if c < 5 {
            vec![(1, 200), (2, 200)]
        } else {
            vec![]
        };
        assert_eq!(sorted(index.find_matches(hashes)), want, "chain {c}");
    }
    index.store(1, None, &chains[7]);
    assert_eq!(index.find_matches(&chains[7]), vec![(1, 200)]);
    index.remove_worker(1);
    assert_eq!(index.total_blocks(), 1000);
    for hashes in &chains[..5] {
        assert_eq!(index.find_matches(hashes), vec![(2, 200)]);
    }
    assert!(index.find_matches(&chains[7]).is_empty());
    index
        .apply(
            2,
            &KvEvent {
                event_id: 0,
                data: KvEventData::Cleared,
            },
        )
        .unwrap();
    assert_eq!(index.total_blocks(), 0);
}

#[test]
fn approx_learns_from_decisions_and_forgets_after_ttl() {
    let t0 = Instant::now();
    let s = Duration::from_secs;
    let mut approx = ApproxIndexer::new(s(10));
    let abc = chain(&[0, 1, 2]);
    approx.record(1, &abc, t0);
    approx.record(2, &abc[..2], t0 + s(5));
    assert_eq!(
        sorted(approx.find_matches(&abc, t0 + s(6))),
        vec![(1, 3), (2, 2)]
    );
    // Worker 1 refreshes its first block only; the rest of its chain expires at t0+10.
    approx.record(1, &abc[..1], t0 + s(8));
    assert_eq!(
        sorted(approx.find_matches(&abc, t0 + s(10))),
        vec![(1, 1), (2, 2)]
    );
    assert_eq!(approx.total_blocks(), 2);
    assert_eq!(approx.worker_blocks(1), 1);
    assert_eq!(sorted(approx.find_matches(&abc, t0 + s(15))), vec![(1, 1)]);
    assert_eq!(approx.find_matches(&abc, t0 + s(18)), vec![]);
    assert_eq!(approx.total_blocks(), 0);

    approx.record(3, &abc, t0 + s(20));
    approx.remove_worker(3);
    assert_eq!(approx.total_blocks(), 0);
    // The same worker recorded again is not expired by its old queue entries.
    approx.record(3, &abc, t0 + s(25));
    assert_eq!(approx.find_matches(&abc, t0 + s(31)), vec![(3, 3)]);
    assert_eq!(approx.find_matches(&abc, t0 + s(35)), vec![]);
}

// ---- The model: every worker's true cache, the events it emits, and some lost on the way ----

#[derive(Debug, Clone)]
enum Op {
    /// The worker caches `seq` from block `from` on (moved down to its first missing block when
    /// it lacks block `from - 1`, as a block manager only stores under a cached parent).
    Store {
        worker: usize,
        seq: Vec<u8>,
        from: usize,
        delivered: bool,
    },
    /// The worker evicts some of its blocks (indices into them, sorted), maybe plus one unknown.
    Remove {
        worker: usize,
        picks: Vec<usize>,
        unknown: bool,
        delivered: bool,
    },
    Clear {
        worker: usize,
        delivered: bool,
    },
    /// The worker leaves discovery; if it comes back it starts from nothing at event 0.
    Lose(usize),
    /// The last delivered event of the worker arrives again.
    Redeliver(usize),
}

struct Model {
    ids: Vec<u64>,
    held: Vec<HashSet<u64>>,
    /// The id of the next event each worker emits.
    next_id: Vec<u64>,
    /// False while an event of the worker was lost and the index has not noticed yet.
    synced: Vec<bool>,
    /// Whether the index has heard of the worker since it was last lost.
    known: Vec<bool>,
    last: Vec<Option<KvEvent>>,
    /// Parent and position of every block hash seen, for dumps (parents before children).
    blocks: HashMap<u64, (Option<u64>, usize)>,
    resyncs: usize,
}

impl Model {
    fn new(workers: usize) -> Self {
        Self {
            ids: (0..workers as u64)
                .map(|w| w.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xFF)
                .collect(),
            held: vec![HashSet::new(); workers],
            next_id: vec![0; workers],
            synced: vec![true; workers],
            known: vec![false; workers],
            last: vec![None; workers],
            blocks: HashMap::new(),
            resyncs: 0,
        }
    }

    fn chain(&mut self, seq: &[u8]) -> Vec<u64> {
        let hashes = chain(seq);
        for (i, &h) in hashes.iter().enumerate() {
            let parent = i.checked_sub(1).map(|p| hashes[p]);
            self.blocks.insert(h, (parent, i));
        }
        hashes
    }

    fn run(&self, w: usize, hashes: &[u64]) -> usize {
        hashes
            .iter()
            .take_while(|h| self.held[w].contains(h))
            .count()
    }

    /// The worker emits `data`; the index gets it when `delivered`.
    fn emit(&mut self, index: &mut KvIndexer, w: usize, data: KvEventData, delivered: bool) {
        let event = KvEvent {
            event_id: self.next_id[w],
            data,
        };
        self.next_id[w] += 1;
        if !delivered {
            self.synced[w] = false;
            return;
        }
        match index.apply(self.ids[w], &event) {
            Ok(()) => assert!(self.synced[w], "a lost event of worker {w} went unnoticed"),
            Err(gap) => {
                assert!(
                    matches!(gap, IndexGap::Missing { worker, got, .. }
                        if worker == self.ids[w] && got == event.event_id),
                    "{gap:?} for worker {w}"
                );
                assert!(!self.synced[w], "spurious {gap:?}");
                self.resync(index, w, event.event_id);
            }
        }
        self.known[w] = true;
        self.last[w] = Some(event);
    }

    /// What the router does on a gap: the worker's dump as of its latest event.
    fn resync(&mut self, index: &mut KvIndexer, w: usize, last_event_id: u64) {
        let mut blocks: Vec<(usize, CachedBlock)> = self.held[w]
            .iter()
            .map(|&h| {
                let (parent_hash, depth) = self.blocks[&h];
                let block = BlockHash {
                    block_hash: h,
                    tokens_hash: 0,
                };
                (depth, CachedBlock { parent_hash, block })
            })
            .collect();
        blocks.sort_by_key(|(depth, b)| (*depth, b.block.block_hash));
        let dump = KvDump {
            last_event_id: Some(last_event_id),
            blocks: blocks.into_iter().map(|(_, b)| b).collect(),
        };
        index.load_dump(self.ids[w], &dump);
        self.synced[w] = true;
        self.resyncs += 1;
    }

    fn step(&mut self, index: &mut KvIndexer, op: &Op) {
        match op.clone() {
            Op::Store {
                worker: w,
                seq,
                from,
                delivered,
            } => {
                let hashes = self.chain(&seq);
                let mut from = from.min(hashes.len());
                if from > 0 && !self.held[w].contains(&hashes[from - 1]) {
                    from = self.run(w, &hashes);
                }
                let parent = from.checked_sub(1).map(|p| hashes[p]);
                self.held[w].extend(&hashes[from..]);
                let blocks = hashes[from..]
                    .iter()
                    .map(|&h| BlockHash {
                        block_hash: h,
                        tokens_hash: 0,
                    })
                    .collect();
                let data = KvEventData::Stored {
                    parent_hash: parent,
                    blocks,
                };
                self.emit(index, w, data, delivered);
            }
            Op::Remove {
                worker: w,
                picks,
                unknown,
                delivered,
            } => {
                let mut held: Vec<u64> = self.held[w].iter().copied().collect();
                held.sort_unstable();
                let mut block_hashes: Vec<u64> = picks
                    .iter()
                    .filter_map(|&i| held.get(i % held.len().max(1)).copied())
                    .collect();
                if unknown {
                    block_hashes.push(0xDEAD_BEEF);
                }
                for h in &block_hashes {
                    self.held[w].remove(h);
                }
                self.emit(index, w, KvEventData::Removed { block_hashes }, delivered);
            }
            Op::Clear {
                worker: w,
                delivered,
            } => {
                self.held[w].clear();
                self.emit(index, w, KvEventData::Cleared, delivered);
            }
            Op::Lose(w) => {
                index.remove_worker(self.ids[w]);
                self.held[w].clear();
                self.next_id[w] = 0;
                self.synced[w] = true;
                self.known[w] = false;
                self.last[w] = None;
            }
            Op::Redeliver(w) => {
                if let Some(event) = self.last[w].clone() {
                    assert_eq!(index.apply(self.ids[w], &event), Ok(()));
                }
            }
        }
    }

    /// Every worker the index is in sync with matches the model on every query.
    fn check(&mut self, index: &KvIndexer, queries: &[Vec<u8>]) {
        for q in queries {
            let hashes = chain(q);
            let mut got: Vec<(u64, usize)> = index.find_matches(&hashes);
            got.retain(|(id, _)| self.synced[self.ids.iter().position(|i| i == id).unwrap()]);
            let want: Vec<(u64, usize)> = (0..self.ids.len())
                .filter(|&w| self.synced[w])
                .map(|w| (self.ids[w], self.run(w, &hashes)))
                .filter(|&(_, n)| n > 0)
                .collect();
            assert_eq!(sorted(got), sorted(want), "query {q:?}");
        }
        for w in (0..self.ids.len()).filter(|&w| self.synced[w]) {
            assert_eq!(index.worker_blocks(self.ids[w]), self.held[w].len());
            assert_eq!(index.next_event_id(self.ids[w]), self.next_id[w]);
        }
        let mut known: Vec<u64> = (0..self.ids.len())
            .filter(|&w| self.known[w])
            .map(|w| self.ids[w])
            .collect();
        known.sort_unstable();
        assert_eq!(sorted_ids(index.workers()), known);
    }

    /// Lets every worker emit one more (empty) event, so each lost one is noticed and resynced.
    fn flush(&mut self, index: &mut KvIndexer) {
        for w in 0..self.ids.len() {
            if !self.synced[w] {
                let data = KvEventData::Removed {
                    block_hashes: vec![],
                };
                self.emit(index, w, data, true);
            }
        }
    }
}

fn seq() -> impl Strategy<Value = Vec<u8>> {
    // Three letters, so prefixes collide and chains share and diverge often.
    prop::collection::vec(0u8..3, 1..6)
}

fn op(workers: impl Strategy<Value = usize> + Clone) -> impl Strategy<Value = Op> {
    let delivered = || prop::bool::weighted(0.85);
    prop_oneof![
        6 => (workers.clone(), seq(), 0usize..6, delivered())
            .prop_map(|(worker, seq, from, delivered)| Op::Store { worker, seq, from, delivered }),
        3 => (workers.clone(), prop::collection::vec(0usize..16, 0..4), prop::bool::weighted(0.2), delivered())
            .prop_map(|(worker, picks, unknown, delivered)| Op::Remove { worker, picks, unknown, delivered }),
        1 => (workers.clone(), delivered()).prop_map(|(worker, delivered)| Op::Clear { worker, delivered }),
        1 => workers.clone().prop_map(Op::Lose),
        1 => workers.prop_map(Op::Redeliver),
    ]
}

fn run_model(workers: usize, warm_up: bool, ops: &[Op], extra: &[Vec<u8>]) {
    let mut index = KvIndexer::new();
    let mut model = Model::new(workers);
    if warm_up {
        // Every worker stores one block first, so workers get slots in order 0..workers.
        for w in 0..workers {
            model.step(
                &mut index,
                &Op::Store {
                    worker: w,
                    seq: vec![(w % 3) as u8],
                    from: 0,
                    delivered: true,
                },
            );
        }
    }
    // Queries: every stored sequence with all its prefixes, plus unrelated ones.
    let mut queries: Vec<Vec<u8>> = extra.to_vec();
    for op in ops {
        if let Op::Store { seq, .. } = op {
            queries.extend((1..=seq.len()).map(|n| seq[..n].to_vec()));
        }
    }
    queries.sort();
    queries.dedup();
    for op in ops {
        model.step(&mut index, op);
        model.check(&index, &queries);
    }
    model.flush(&mut index);
    assert!(model.synced.iter().all(|&s| s));
    model.check(&index, &queries);
    let union: HashSet<u64> = model.held.iter().flatten().copied().collect();
    assert_eq!(index.total_blocks(), union.len());
    for w in 0..workers {
        model.step(&mut index, &Op::Lose(w));
    }
    assert_eq!(index.total_blocks(), 0);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn matches_reference_model(
        ops in prop::collection::vec(op(0usize..4), 1..40),
        extra in prop::collection::vec(seq(), 0..4),
    ) {
        run_model(4, false, &ops, &extra);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Slots past the first word: 70 workers, the ops concentrated on the ones above slot 63.
    #[test]
    fn matches_reference_model_past_64_slots(
        ops in prop::collection::vec(op(prop_oneof![0usize..70, 62usize..70]), 1..40),
        extra in prop::collection::vec(seq(), 0..4),
    ) {
        run_model(70, true, &ops, &extra);
    }
}

#[test]
fn model_sees_lost_events() {
    // The model itself must be able to fail: a lost Stored followed by a delivered event is a
    // gap, resynced by dump, after which the index matches the model again.
    let mut index = KvIndexer::new();
    let mut model = Model::new(2);
    let store = |worker, seq: &[u8], from, delivered| Op::Store {
        worker,
        seq: seq.to_vec(),
        from,
        delivered,
    };
    let ops = [
        store(0, &[0, 1, 2], 0, false),
        store(0, &[0, 1, 2, 1], 3, true),
        store(1, &[0, 1], 0, true),
    ];
    for op in &ops {
        model.step(&mut index, op);
    }
    assert_eq!(model.resyncs, 1);
    assert_eq!(
        matches(&index, &[0, 1, 2, 1]),
        sorted(vec![(model.ids[0], 4), (model.ids[1], 2)])
    );
}
