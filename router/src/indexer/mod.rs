//! TEMPORARY stand-in with the indexer's API (replaced by the real radix indexer).
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use runtime::kv_event::{KvDump, KvEvent, KvEventData};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IndexGap {
    #[error("worker {worker:x}: expected event {expected}, got {got}")]
    Missing {
        worker: u64,
        expected: u64,
        got: u64,
    },
    #[error("worker {worker:x}: event {event_id} names unknown parent {parent:x}")]
    UnknownParent {
        worker: u64,
        parent: u64,
        event_id: u64,
    },
}

#[derive(Default)]
pub struct KvIndexer {
    workers: HashMap<u64, (HashSet<u64>, u64)>,
}

impl KvIndexer {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn apply(&mut self, worker: u64, event: &KvEvent) -> Result<(), IndexGap> {
        let (set, next) = self.workers.entry(worker).or_default();
        if event.event_id < *next {
            return Ok(());
        }
        if event.event_id > *next {
            return Err(IndexGap::Missing {
                worker,
                expected: *next,
                got: event.event_id,
            });
        }
        match &event.data {
            KvEventData::Stored {
                parent_hash,
                blocks,
            } => {
                if let Some(p) = parent_hash {
                    if !set.contains(p) {
                        return Err(IndexGap::UnknownParent {
                            worker,
                            parent: *p,
                            event_id: event.event_id,
                        });
                    }
                }
                set.extend(blocks.iter().map(|b| b.block_hash));
            }
            KvEventData::Removed { block_hashes } => {
                for h in block_hashes {
                    set.remove(h);
                }
            }
            KvEventData::Cleared => set.clear(),
        }
        *next += 1;
        Ok(())
    }
    pub fn load_dump(&mut self, worker: u64, dump: &KvDump) {
        let set = dump.blocks.iter().map(|b| b.block.block_hash).collect();
        self.workers
            .insert(worker, (set, dump.last_event_id.map_or(0, |i| i + 1)));
    }
    pub fn remove_worker(&mut self, worker: u64) {
        self.workers.remove(&worker);
    }
    pub fn find_matches(&self, block_hashes: &[u64]) -> Vec<(u64, usize)> {
        self.workers
            .iter()
            .map(|(w, (set, _))| {
                (
                    *w,
                    block_hashes.iter().take_while(|h| set.contains(h)).count(),
                )
            })
            .filter(|(_, n)| *n > 0)
            .collect()
    }
    pub fn store(&mut self, worker: u64, _parent: Option<u64>, blocks: &[u64]) {
        self.workers
            .entry(worker)
            .or_default()
            .0
            .extend(blocks.iter().copied());
    }
    pub fn remove(&mut self, worker: u64, block_hashes: &[u64]) {
        if let Some((set, _)) = self.workers.get_mut(&worker) {
            for h in block_hashes {
                set.remove(h);
            }
        }
    }
    pub fn worker_blocks(&self, worker: u64) -> usize {
        self.workers.get(&worker).map_or(0, |(s, _)| s.len())
    }
    pub fn total_blocks(&self) -> usize {
        self.workers
            .values()
            .flat_map(|(s, _)| s.iter())
            .collect::<HashSet<_>>()
            .len()
    }
    pub fn workers(&self) -> Vec<u64> {
        self.workers.keys().copied().collect()
    }
    pub fn next_event_id(&self, worker: u64) -> u64 {
        self.workers.get(&worker).map_or(0, |(_, n)| *n)
    }
}

pub struct ApproxIndexer {
    tree: KvIndexer,
    ttl: Duration,
    expiry: HashMap<(u64, u64), Instant>,
}

impl ApproxIndexer {
    pub fn new(ttl: Duration) -> Self {
        Self {
            tree: KvIndexer::new(),
            ttl,
            expiry: HashMap::new(),
        }
    }
    pub fn record(&mut self, worker: u64, block_hashes: &[u64], now: Instant) {
        self.tree.store(worker, None, block_hashes);
        for h in block_hashes {
            self.expiry.insert((worker, *h), now + self.ttl);
        }
    }
    pub fn find_matches(&mut self, block_hashes: &[u64], now: Instant) -> Vec<(u64, usize)> {
        let stale: Vec<(u64, u64)> = self
            .expiry
            .iter()
            .filter(|(_, t)| **t <= now)
            .map(|(k, _)| *k)
            .collect();
        for (w, h) in stale {
            self.expiry.remove(&(w, h));
            self.tree.remove(w, &[h]);
        }
        self.tree.find_matches(block_hashes)
    }
    pub fn remove_worker(&mut self, worker: u64) {
        self.tree.remove_worker(worker);
        self.expiry.retain(|(w, _), _| *w != worker);
    }
    pub fn total_blocks(&self) -> usize {
        self.tree.total_blocks()
    }
}
