//! Predictive load accounting (DESIGN.md §5): the router counts, per worker, the requests it
//! sent there, their prompt tokens still waiting for prefill and their prompt blocks, moving
//! the counts at dispatch, first token and finish through a [`LoadGuard`] that every dispatch
//! path holds — so the load a policy sees is current between the workers' own reports, and a
//! request that ends any way (finished, failed, cancelled, moved) gives its load back.
//!
//! Several routers in one namespace (several frontends) share their books over the event
//! plane: after each change a router publishes its totals for that worker on
//! `{namespace}.router_load`, and every second all of them, so peers add them to their own
//! (dynamo#589: routers that see only their own load herd onto one worker). Totals rather than
//! deltas make a lost message harmless; a router silent for [`PEER_EXPIRY`] is dropped, so a
//! dead frontend's requests stop counting.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::policy::WorkerCounts;

/// How often a router repeats all its totals (so a router that starts late learns them).
pub const SHARE_HEARTBEAT: Duration = Duration::from_secs(1);
/// How much a routing decision's weight in the recent-load signal shrinks with each later
/// decision (memory of about ten decisions).
pub const RECENT_DECAY: f64 = 0.9;
/// A peer router not heard from for this long no longer counts.
pub const PEER_EXPIRY: Duration = Duration::from_secs(3);

/// One router's live totals for one worker, as published to its peers.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RouterLoadReport {
    pub router_id: u64,
    pub worker_id: u64,
    pub active_requests: usize,
    pub prefill_tokens: usize,
    pub active_blocks: usize,
}

#[derive(Default)]
struct Books {
    own: HashMap<u64, WorkerCounts>,
    /// By peer router: when it was last heard from, and its totals per worker.
    peers: HashMap<u64, (Instant, HashMap<u64, WorkerCounts>)>,
}

pub(crate) struct LoadBook {
    pub router_id: u64,
    books: Mutex<Books>,
    /// Per worker, the prompt blocks of this router's recent decisions, each decision's weight
    /// decaying by [`RECENT_DECAY`] with every later decision: a load signal that outlives the
    /// requests, for traffic paced so that nothing is in flight when the next one is routed.
    recent: Mutex<HashMap<u64, f64>>,
    outbox: mpsc::UnboundedSender<RouterLoadReport>,
}

impl LoadBook {
    /// A book whose changes go to `outbox` (the router's publisher task drains it).
    pub fn new(router_id: u64) -> (Self, mpsc::UnboundedReceiver<RouterLoadReport>) {
        let (outbox, rx) = mpsc::unbounded_channel();
        let book = Self {
            router_id,
            books: Mutex::default(),
            recent: Mutex::default(),
            outbox,
        };
        (book, rx)
    }

    fn lock(&self) -> MutexGuard<'_, Books> {
        self.books.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What every router of the namespace has in flight on `worker`.
    pub fn counts(&self, worker: u64) -> WorkerCounts {
        let books = self.lock();
        let mut total = books.own.get(&worker).copied().unwrap_or_default();
        let now = Instant::now();
        for (heard, workers) in books.peers.values() {
            if now.duration_since(*heard) < PEER_EXPIRY {
                if let Some(c) = workers.get(&worker) {
                    // Peer reports are untrusted input: saturate rather than wrap.
                    total.active_requests = total.active_requests.saturating_add(c.active_requests);
                    total.prefill_tokens = total.prefill_tokens.saturating_add(c.prefill_tokens);
                    total.active_blocks = total.active_blocks.saturating_add(c.active_blocks);
                }
            }
        }
        total
    }

    /// This router's own counts for `worker` (what it publishes).
    #[cfg(test)]
    pub fn own(&self, worker: u64) -> WorkerCounts {
        self.lock().own.get(&worker).copied().unwrap_or_default()
    }

    /// The recent-load signal of `worker` (see the field).
    pub fn recent(&self, worker: u64) -> f64 {
        let recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        recent.get(&worker).copied().unwrap_or(0.0)
    }

    /// Charges a request to `worker` until the guard drops.
    pub fn charge(
        self: &Arc<Self>,
        worker: u64,
        prefill_tokens: usize,
        blocks: usize,
    ) -> LoadGuard {
        self.change(worker, |c| {
            c.active_requests += 1;
            c.prefill_tokens += prefill_tokens;
            c.active_blocks += blocks;
        });
        {
            let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
            recent.retain(|_, r| {
                *r *= RECENT_DECAY;
                *r > 1e-3
            });
            *recent.entry(worker).or_default() += blocks as f64;
        }
        LoadGuard {
            book: self.clone(),
            worker,
            prefill_tokens,
            blocks,
        }
    }

    fn change(&self, worker: u64, f: impl FnOnce(&mut WorkerCounts)) {
        let counts = {
            let mut books = self.lock();
            let c = books.own.entry(worker).or_default();
            f(c);
            *c
        };
        let _ = self.outbox.send(self.report(worker, counts));
    }

    fn report(&self, worker: u64, c: WorkerCounts) -> RouterLoadReport {
        RouterLoadReport {
            router_id: self.router_id,
            worker_id: worker,
            active_requests: c.active_requests,
            prefill_tokens: c.prefill_tokens,
            active_blocks: c.active_blocks,
        }
    }

    /// Every worker's own totals, for the heartbeat.
    pub fn all_own(&self) -> Vec<RouterLoadReport> {
        let books = self.lock();
        books.own.iter().map(|(&w, &c)| self.report(w, c)).collect()
    }

    /// A peer's report (our own echo is ignored).
    pub fn record_peer(&self, report: RouterLoadReport) {
        if report.router_id == self.router_id {
            return;
        }
        let mut books = self.lock();
        let now = Instant::now();
        books
            .peers
            .retain(|_, (heard, _)| now.duration_since(*heard) < PEER_EXPIRY);
        let (heard, workers) = books
            .peers
            .entry(report.router_id)
            .or_insert_with(|| (now, HashMap::new()));
        *heard = now;
        workers.insert(
            report.worker_id,
            WorkerCounts {
                active_requests: report.active_requests,
                prefill_tokens: report.prefill_tokens,
                active_blocks: report.active_blocks,
            },
        );
    }

    /// The worker left discovery: nothing counts against it any more.
    pub fn forget(&self, worker: u64) {
        self.recent
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&worker);
        let mut books = self.lock();
        books.own.remove(&worker);
        for (_, workers) in books.peers.values_mut() {
            workers.remove(&worker);
        }
    }
}

/// One request's charge on a worker: its prefill tokens go at its first token, the rest when
/// it drops (however the request ended).
#[must_use = "the request is charged only while the guard lives"]
pub(crate) struct LoadGuard {
    book: Arc<LoadBook>,
    worker: u64,
    prefill_tokens: usize,
    blocks: usize,
}

impl LoadGuard {
    /// The request's prefill is over.
    pub fn first_token(&mut self) {
        let tokens = std::mem::take(&mut self.prefill_tokens);
        if tokens > 0 {
            self.release(0, tokens, 0);
        }
    }

    fn release(&self, requests: usize, tokens: usize, blocks: usize) {
        let worker = self.worker;
        let exists = self.book.lock().own.contains_key(&worker);
        // A worker that left was forgotten; its guards must not bring it back.
        if exists {
            self.book.change(worker, |c| {
                c.active_requests = c.active_requests.saturating_sub(requests);
                c.prefill_tokens = c.prefill_tokens.saturating_sub(tokens);
                c.active_blocks = c.active_blocks.saturating_sub(blocks);
            });
        }
    }
}

impl Drop for LoadGuard {
    fn drop(&mut self) {
        self.release(1, self.prefill_tokens, self.blocks);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guards_move_the_counts_and_peers_add_theirs() {
        let (book, mut outbox) = LoadBook::new(1);
        let book = Arc::new(book);
        let mut a = book.charge(7, 300, 3);
        let b = book.charge(7, 100, 1);
        assert_eq!(
            book.counts(7),
            WorkerCounts {
                active_requests: 2,
                prefill_tokens: 400,
                active_blocks: 4
            }
        );
        a.first_token();
        a.first_token();
        assert_eq!(book.counts(7).prefill_tokens, 100);
        drop(b);
        assert_eq!(
            book.counts(7),
            WorkerCounts {
                active_requests: 1,
                prefill_tokens: 0,
                active_blocks: 3
            }
        );
        // Each change was published as the router's new totals.
        let mut last = None;
        while let Ok(r) = outbox.try_recv() {
            last = Some(r);
        }
        assert_eq!(last.unwrap().active_blocks, 3);

        book.record_peer(RouterLoadReport {
            router_id: 2,
            worker_id: 7,
            active_requests: 5,
            prefill_tokens: 10,
            active_blocks: 6,
        });
        // Our own echo is not counted twice.
        book.record_peer(book.report(7, book.own(7)));
        assert_eq!(book.counts(7).active_requests, 6);
        assert_eq!(book.counts(7).active_blocks, 9);

        book.forget(7);
        drop(a);
        assert_eq!(book.counts(7), WorkerCounts::default());
    }
}
