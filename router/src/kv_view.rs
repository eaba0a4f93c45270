//! The router's view of every worker's prefix cache: the [`KvIndexer`] fed by the workers' KV
//! events on `{namespace}.kv_events`, kept consistent with them, or — for engines that
//! publish no events (`--no-kv-events`) — an [`ApproxIndexer`] that learns from the router's
//! own decisions and forgets them after a TTL.
//!
//! Consistency (DESIGN.md §5): each worker's events carry ids that rise by one. A gap, or a
//! Stored event under a parent the index lacks, puts the worker into resync: its later events
//! are held back while the router asks the worker (on the request-plane address the worker
//! publishes in its discovery metadata as `kv_state`) for the missing events from its ring of
//! recent ones, or for a dump of its whole cache when the ring no longer has them; then the
//! held events are applied on top (those the answer already covered are duplicates and
//! skipped). A worker that joins is loaded from a dump; one that leaves discovery is purged.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use runtime::discovery::Instance;
use runtime::kv_event::{
    KvEvent, KvEventData, KvStateQuery, KvStateReply, WorkerKvEvent, KV_STATE_KEY,
};
use runtime::request_plane::RequestPlane;

use crate::indexer::{ApproxIndexer, IndexGap, KvIndexer};
use crate::metrics::RouterMetrics;

/// How long the router waits for a worker's KV-state answer before asking again.
const RESYNC_TIMEOUT: Duration = Duration::from_secs(5);
/// Attempts at a resync before the worker is left as the index has it (until its next gap).
const RESYNC_ATTEMPTS: usize = 3;

/// Where the router's idea of the workers' caches comes from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum KvMode {
    /// The workers' KV events (the default).
    Events,
    /// The router's own decisions, each remembered for `ttl` (`--no-kv-events`).
    Approximate { ttl: Duration },
}

struct Inner {
    index: KvIndexer,
    approx: Option<ApproxIndexer>,
    /// Workers being resynced, with the events that arrived meanwhile.
    resyncing: HashMap<u64, Vec<KvEvent>>,
    /// Live workers' KV-state addresses (`None`: the worker serves none).
    addresses: HashMap<u64, Option<String>>,
}

pub(crate) struct KvView {
    inner: Mutex<Inner>,
    plane: Arc<dyn RequestPlane>,
    metrics: Arc<RouterMetrics>,
}

impl KvView {
    pub fn new(mode: KvMode, plane: Arc<dyn RequestPlane>, metrics: Arc<RouterMetrics>) -> Self {
        Self {
            inner: Mutex::new(Inner {
                index: KvIndexer::new(),
                approx: match mode {
                    KvMode::Events => None,
                    KvMode::Approximate { ttl } => Some(ApproxIndexer::new(ttl)),
                },
                resyncing: HashMap::new(),
                addresses: HashMap::new(),
            }),
            plane,
            metrics,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Leading cached blocks of `hashes` per worker, and each worker's cached block count.
    pub fn lookup(&self, hashes: &[u64], workers: &[u64]) -> (HashMap<u64, usize>, Vec<usize>) {
        let mut inner = self.lock();
        let matches = match &mut inner.approx {
            Some(approx) => approx.find_matches(hashes, Instant::now()),
            None => inner.index.find_matches(hashes),
        };
        let sizes = workers
            .iter()
            .map(|&w| match &inner.approx {
                // The approximate tree does not count per worker; every cache looks alike.
                Some(_) => 0,
                None => inner.index.worker_blocks(w),
            })
            .collect();
        (matches.into_iter().collect(), sizes)
    }

    /// Distinct blocks in the index.
    pub fn total_blocks(&self) -> usize {
        let inner = self.lock();
        match &inner.approx {
            Some(approx) => approx.total_blocks(),
            None => inner.index.total_blocks(),
        }
    }

    /// The request went to `worker`: in approximate mode, it will hold the prompt's blocks.
    pub fn on_dispatch(&self, worker: u64, hashes: &[u64]) {
        if let Some(approx) = &mut self.lock().approx {
            approx.record(worker, hashes, Instant::now());
        }
    }

    /// A worker joined discovery: load its cache from a dump.
    pub fn on_join(self: &Arc<Self>, instance: &Instance) {
        let address = instance
            .metadata
            .get(KV_STATE_KEY)
            .and_then(|a| a.as_str())
            .map(str::to_string);
        let id = instance.instance_id;
        let mut inner = self.lock();
        if inner.approx.is_some() {
            return;
        }
        let known = inner.addresses.insert(id, address.clone()).is_some();
        if !known && address.is_some() && !inner.resyncing.contains_key(&id) {
            inner.resyncing.insert(id, Vec::new());
            drop(inner);
            tokio::spawn(self.clone().resync(id, None));
        }
    }

    /// A worker left discovery: forget its cache at once.
    pub fn on_leave(&self, worker: u64) {
        let mut inner = self.lock();
        inner.index.remove_worker(worker);
        if let Some(approx) = &mut inner.approx {
            approx.remove_worker(worker);
        }
        inner.resyncing.remove(&worker);
        inner.addresses.remove(&worker);
    }

    /// One event from the event plane.
    pub fn on_event(self: &Arc<Self>, event: WorkerKvEvent) {
        self.metrics.kv_event(kind(&event.event.data));
        let WorkerKvEvent { worker_id, event } = event;
        let mut inner = self.lock();
        if inner.approx.is_some() {
            return;
        }
        // Events of a worker discovery has not shown (or no longer shows) are dropped: a
        // late event must not resurrect a worker that left.
        let Some(address) = inner.addresses.get(&worker_id).cloned() else {
            return;
        };
        if let Some(held) = inner.resyncing.get_mut(&worker_id) {
            held.push(event);
            return;
        }
        match inner.index.apply(worker_id, &event) {
            Ok(()) => {}
            Err(gap) if address.is_some() => {
                tracing::info!(
                    worker = worker_id,
                    "KV index out of step ({gap}); resyncing"
                );
                inner.resyncing.insert(worker_id, vec![event]);
                drop(inner);
                tokio::spawn(self.clone().resync(worker_id, since(&gap)));
            }
            Err(gap) => {
                // Nobody to ask: take the worker's word from here on.
                tracing::warn!(worker = worker_id, "KV index out of step ({gap}); the worker serves no KV state, starting over from its events");
                inner.index.load_dump(
                    worker_id,
                    &runtime::kv_event::KvDump {
                        last_event_id: event.event_id.checked_sub(1),
                        blocks: Vec::new(),
                    },
                );
                let _ = inner.index.apply(worker_id, &event);
            }
        }
    }

    /// Brings `worker`'s index up to date, then applies what was held back meanwhile.
    async fn resync(self: Arc<Self>, worker: u64, mut since: Option<u64>) {
        let mut attempts = 0;
        loop {
            let Some(Some(address)) = self.lock().addresses.get(&worker).cloned() else {
                return;
            };
            self.metrics.resync();
            let reply =
                match tokio::time::timeout(RESYNC_TIMEOUT, self.query(&address, since)).await {
                    Ok(Ok(reply)) => Ok(reply),
                    Ok(Err(e)) => Err(e),
                    Err(_) => Err("no answer in time".to_string()),
                };
            let reply = match reply {
                Ok(reply) => reply,
                Err(why) => {
                    attempts += 1;
                    tracing::warn!(
                        worker,
                        attempt = attempts,
                        "cannot resync the KV index: {why}"
                    );
                    if attempts >= RESYNC_ATTEMPTS {
                        // Apply what arrived; the next gap tries again.
                        let mut inner = self.lock();
                        let held = inner.resyncing.remove(&worker).unwrap_or_default();
                        for e in held {
                            let _ = inner.index.apply(worker, &e);
                        }
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            let mut inner = self.lock();
            if !inner.resyncing.contains_key(&worker) {
                return; // it left meanwhile
            }
            let mut gap = None;
            match reply {
                KvStateReply::Dump(dump) => inner.index.load_dump(worker, &dump),
                KvStateReply::Events(events) => {
                    for e in &events {
                        if let Err(g) = inner.index.apply(worker, e) {
                            gap = Some(g);
                            break;
                        }
                    }
                }
            }
            if gap.is_none() {
                let held = std::mem::take(inner.resyncing.get_mut(&worker).expect("checked"));
                for (i, e) in held.iter().enumerate() {
                    if let Err(g) = inner.index.apply(worker, e) {
                        gap = Some(g);
                        // Keep what is not applied yet for the next round.
                        *inner.resyncing.get_mut(&worker).expect("checked") = held[i..].to_vec();
                        break;
                    }
                }
            }
            match gap {
                None => {
                    inner.resyncing.remove(&worker);
                    return;
                }
                Some(g) if attempts + 1 >= RESYNC_ATTEMPTS => {
                    // Events the worker's own answers cannot place (a dump did not cover
                    // them): drop them; the worker's next real event resyncs again if needed.
                    tracing::warn!(
                        worker,
                        "dropping KV events that do not follow the worker's state ({g})"
                    );
                    inner.resyncing.remove(&worker);
                    return;
                }
                // The ring could not fill it (or a parent is missing): a dump, then.
                Some(g) => {
                    attempts += 1;
                    since = match (&g, since) {
                        (IndexGap::Missing { expected, .. }, Some(s)) if *expected > s => {
                            Some(*expected)
                        }
                        _ => None,
                    };
                }
            }
        }
    }

    async fn query(&self, address: &str, since: Option<u64>) -> Result<KvStateReply, String> {
        runtime::request_plane::query(self.plane.as_ref(), address, &KvStateQuery { since }).await
    }
}

/// Where to ask from after `gap`: the missing ids, or a dump for an unknown parent.
fn since(gap: &IndexGap) -> Option<u64> {
    match gap {
        IndexGap::Missing { expected, .. } => Some(*expected),
        IndexGap::UnknownParent { .. } => None,
    }
}

fn kind(data: &KvEventData) -> &'static str {
    match data {
        KvEventData::Stored { .. } => "stored",
        KvEventData::Removed { .. } => "removed",
        KvEventData::Cleared => "cleared",
    }
}
