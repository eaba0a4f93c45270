//! Approximate KV indexing for engines that publish no KV events: the router assumes a worker
//! caches a request's blocks once it has routed the request there, and forgets that after a
//! TTL, since it never hears about evictions. Built on [`KvIndexer`]'s low-level store/remove.

use std::collections::{HashMap as StdHashMap, VecDeque};
use std::time::{Duration, Instant};

use super::slots::HashMap;
use super::KvIndexer;

/// See the module doc.
pub struct ApproxIndexer {
    ttl: Duration,
    index: KvIndexer,
    /// Per worker, when each block it is assumed to hold expires.
    expiry: StdHashMap<u64, HashMap<Instant>>,
    /// `(expires, worker, hash)` in the order recorded. A refresh adds a new entry and leaves the
    /// old one, which is skipped when it comes up because the map holds a later time.
    queue: VecDeque<(Instant, u64, u64)>,
}

impl ApproxIndexer {
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            index: KvIndexer::new(),
            expiry: StdHashMap::new(),
            queue: VecDeque::new(),
        }
    }

    /// `worker` will hold these blocks (a request's chained hashes, in order) after the request
    /// routed to it at `now`; their expiry is refreshed to `now + ttl`.
    ///
    /// `now` should not go backwards between calls: an earlier one only delays expiries.
    pub fn record(&mut self, worker: u64, block_hashes: &[u64], now: Instant) {
        let expires = now + self.ttl;
        self.index.store(worker, None, block_hashes);
        let held = self.expiry.entry(worker).or_default();
        for &h in block_hashes {
            held.insert(h, expires);
            self.queue.push_back((expires, worker, h));
        }
    }

    /// As [`KvIndexer::find_matches`], after forgetting every block whose TTL ran out by `now`.
    pub fn find_matches(&mut self, block_hashes: &[u64], now: Instant) -> Vec<(u64, usize)> {
        self.expire(now);
        self.index.find_matches(block_hashes)
    }

    /// Forgets `worker` entirely.
    pub fn remove_worker(&mut self, worker: u64) {
        self.index.remove_worker(worker);
        // Its queue entries find no map entry and are skipped.
        self.expiry.remove(&worker);
    }

    /// Distinct blocks believed cached by some worker (expired ones may linger until the next
    /// [`find_matches`](Self::find_matches)).
    pub fn total_blocks(&self) -> usize {
        self.index.total_blocks()
    }

    /// Blocks `worker` is believed to hold (as [`total_blocks`](Self::total_blocks), lazily).
    pub fn worker_blocks(&self, worker: u64) -> usize {
        self.index.worker_blocks(worker)
    }

    fn expire(&mut self, now: Instant) {
        while let Some(&(expires, worker, h)) = self.queue.front() {
            if expires > now {
                break;
            }
            self.queue.pop_front();
            let Some(held) = self.expiry.get_mut(&worker) else {
                continue;
            };
            // A later time in the map: refreshed since this entry was queued.
            if held.get(&h).is_some_and(|&current| current <= now) {
                held.remove(&h);
                self.index.remove(worker, &[h]);
            }
        }
    }
}
