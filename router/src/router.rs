//! The live instance list of one endpoint, the workers' reported load, the KV view and the
//! load book, and dispatch to the instance a policy picks.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use runtime::block_hash::block_hashes;
use runtime::discovery::{DiscoveryEvent, EndpointId, Instance};
use runtime::dropped::{self, DropWarnings};
use runtime::kv_event::WorkerKvEvent;
use runtime::protocol::{GenerateRequest, WorkerLoad};
use runtime::request_plane::{RequestPlane, RequestPlaneError, ResponseStream};
use runtime::Planes;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::error::RouterError;
use crate::kv_view::{KvMode, KvView};
use crate::load_book::{LoadBook, LoadGuard, RouterLoadReport, SHARE_HEARTBEAT};
use crate::metrics::{RouterMetrics, WorkerLabels};
use crate::policy::{Candidate, RouteContext, RoutingPolicy, Selection};
use crate::stream::RoutedStream;

/// Event-plane messages that do not parse: anyone who reaches NATS can publish on these
/// subjects, so each is dropped with a rate-limited warning.
static MALFORMED_LOAD: DropWarnings = DropWarnings::new("a malformed load report");
static MALFORMED_KV_EVENT: DropWarnings = DropWarnings::new("a malformed KV event");
static MALFORMED_ROUTER_LOAD: DropWarnings = DropWarnings::new("a malformed router load report");

/// How the router hashes prompts, learns the workers' caches, waits for workers and moves
/// requests that lost theirs.
#[derive(Debug, Clone)]
pub struct RouterOptions {
    /// Tokens per KV block, as the workers use (block hashes cover full blocks only).
    pub block_size: usize,
    /// Times a request is sent to another worker when its worker failed before sending a
    /// token (it died, or left discovery): the client has seen nothing, so nothing is lost.
    pub retries: u32,
    /// Times a request whose worker died mid-stream is moved, with the tokens generated so
    /// far, to another worker (`--migration-limit`; 0: the stream ends with an error).
    pub migration_limit: u32,
    /// Requests wait (up to `min_workers_wait`) until this many workers are registered
    /// (`Router.min-workers`); 0 and 1 answer at once when none is.
    pub min_workers: usize,
    pub min_workers_wait: Duration,
    pub kv_mode: KvMode,
}

impl Default for RouterOptions {
    fn default() -> Self {
        Self {
            block_size: 128,
            retries: 1,
            migration_limit: 0,
            min_workers: 0,
            min_workers_wait: Duration::from_secs(30),
            kv_mode: KvMode::Events,
        }
    }
}

/// One dispatch: where it went, its response, its charge on the worker's load, and a token
/// that fires when that instance leaves discovery (its lease expired: the worker died), so the
/// caller need not wait for the silence timeout.
pub(crate) struct Dispatch {
    pub selection: Selection,
    pub stream: ResponseStream,
    pub gone: CancellationToken,
    pub load: LoadGuard,
}

pub(crate) struct Shared {
    pub endpoint: EndpointId,
    pub options: RouterOptions,
    pub policy: Box<dyn RoutingPolicy>,
    pub metrics: Arc<RouterMetrics>,
    plane: Arc<dyn RequestPlane>,
    instances: RwLock<Vec<Instance>>,
    /// The number of live instances, for requests waiting for `min_workers`.
    count: watch::Sender<usize>,
    alive: Mutex<HashMap<u64, CancellationToken>>,
    loads: Mutex<HashMap<u64, WorkerLoad>>,
    book: Arc<LoadBook>,
    kv: Arc<KvView>,
}

pub struct Router {
    shared: Arc<Shared>,
    tasks: Vec<JoinHandle<()>>,
}

impl Router {
    /// Starts watching `endpoint` in discovery (instances join and leave routing as it reports
    /// them), the workers' load reports and KV events, and the other routers' load books on
    /// the event plane.
    pub async fn new(
        planes: &Planes,
        endpoint: EndpointId,
        policy: Box<dyn RoutingPolicy>,
        options: RouterOptions,
    ) -> Result<Self, RouterError> {
        if options.block_size == 0 {
            return Err(RouterError::InvalidOption {
                name: "block-size",
                value: "0".into(),
                reason: "must be at least 1",
            });
        }
        let mut load_reports = planes.events.subscribe(&planes.load_subject()).await?;
        let share_subject = router_load_subject(&planes.settings.namespace);
        let mut peer_reports = planes.events.subscribe(&share_subject).await?;
        let mut kv_events = match options.kv_mode {
            KvMode::Events => Some(planes.events.subscribe(&planes.kv_events_subject()).await?),
            KvMode::Approximate { .. } => None,
        };
        let (current, mut events) = planes.discovery.watch(&endpoint).await?;
        let metrics = Arc::new(RouterMetrics::default());
        let kv = Arc::new(KvView::new(
            options.kv_mode,
            planes.requests.clone(),
            metrics.clone(),
        ));
        let (book, mut outbox) = LoadBook::new(rand::random());
        let shared = Arc::new(Shared {
            endpoint,
            options,
            policy,
            metrics,
            plane: planes.requests.clone(),
            // Filled by applying `current` below, as later discovery events are.
            alive: Mutex::default(),
            count: watch::Sender::new(0),
            instances: RwLock::new(Vec::new()),
            loads: Mutex::default(),
            book: Arc::new(book),
            kv,
        });
        for instance in current {
            shared.apply(DiscoveryEvent::Put(instance));
        }
        let mut tasks = Vec::new();
        tasks.push({
            let shared = shared.clone();
            tokio::spawn(async move {
                while let Some(event) = events.recv().await {
                    shared.apply(event);
                }
            })
        });
        tasks.push({
            let shared = shared.clone();
            tokio::spawn(async move {
                while let Some(bytes) = load_reports.recv().await {
                    match dropped::decode::<WorkerLoad>(&bytes) {
                        Ok(load) => shared.record_load(load),
                        Err(e) => {
                            MALFORMED_LOAD.warn(e);
                        }
                    }
                }
            })
        });
        if let Some(mut kv_events) = kv_events.take() {
            let kv = shared.kv.clone();
            tasks.push(tokio::spawn(async move {
                while let Some(bytes) = kv_events.recv().await {
                    match dropped::decode::<WorkerKvEvent>(&bytes) {
                        Ok(event) => kv.on_event(event),
                        Err(e) => {
                            MALFORMED_KV_EVENT.warn(e);
                        }
                    }
                }
            }));
        }
        tasks.push({
            let book = shared.book.clone();
            tokio::spawn(async move {
                while let Some(bytes) = peer_reports.recv().await {
                    match dropped::decode::<RouterLoadReport>(&bytes) {
                        Ok(report) => book.record_peer(report),
                        Err(e) => {
                            MALFORMED_ROUTER_LOAD.warn(e);
                        }
                    }
                }
            })
        });
        tasks.push({
            let book = shared.book.clone();
            let events = planes.events.clone();
            tokio::spawn(async move {
                let mut heartbeat = tokio::time::interval(SHARE_HEARTBEAT);
                loop {
                    let reports = tokio::select! {
                        r = outbox.recv() => match r {
                            Some(r) => vec![r],
                            None => return,
                        },
                        _ = heartbeat.tick() => book.all_own(),
                    };
                    for report in reports {
                        let bytes = serde_json::to_vec(&report).expect("serializable");
                        if let Err(e) = events.publish(&share_subject, bytes).await {
                            tracing::debug!("cannot share the router's load: {e}");
                        }
                    }
                }
            })
        });
        Ok(Self { shared, tasks })
    }

    pub fn instances(&self) -> Vec<Instance> {
        self.shared.instances()
    }

    /// The latest load each live worker reported.
    pub fn loads(&self) -> Vec<WorkerLoad> {
        let mut loads: Vec<WorkerLoad> = self.shared.lock_loads().values().cloned().collect();
        loads.sort_by_key(|l| l.instance_id);
        loads
    }

    /// Requests every router of the namespace has in flight on `worker`, by the routers' own
    /// accounting.
    pub fn active_requests(&self, worker: u64) -> usize {
        self.shared.book.counts(worker).active_requests
    }

    pub fn policy_name(&self) -> &'static str {
        self.shared.policy.name()
    }

    /// Distinct KV blocks the router's index holds.
    pub fn indexed_blocks(&self) -> usize {
        self.shared.kv.total_blocks()
    }

    /// Leading blocks of `token_ids` each worker caches, as the router's index has it.
    pub fn overlaps(&self, token_ids: &[u32]) -> HashMap<u64, usize> {
        let hashes: Vec<u64> = block_hashes(token_ids, self.shared.options.block_size)
            .iter()
            .map(|h| h.block_hash)
            .collect();
        self.shared.kv.lookup(&hashes, &[]).0
    }

    pub fn metrics(&self) -> &RouterMetrics {
        &self.shared.metrics
    }

    /// Brings the gauges that mirror live state up to date (call before rendering).
    pub fn refresh_metrics(&self) {
        let m = &self.shared.metrics;
        m.indexer_blocks.set(self.indexed_blocks() as i64);
        m.worker_kv_blocks_used.clear();
        m.worker_active_requests.clear();
        for load in self.loads() {
            m.worker_kv_blocks_used
                .get_or_create(&WorkerLabels::of(load.instance_id))
                .set(load.kv_blocks_used as i64);
        }
        for instance in self.instances() {
            m.worker_active_requests
                .get_or_create(&WorkerLabels::of(instance.instance_id))
                .set(self.active_requests(instance.instance_id) as i64);
        }
    }

    /// Sends `request` to the instance the policy picks and returns its response stream, which
    /// moves the request to another instance if its worker fails before the first token (or,
    /// within the migration limit, after it). Dropping the stream cancels it at the worker.
    pub async fn generate(&self, request: GenerateRequest) -> Result<RoutedStream, RouterError> {
        RoutedStream::start(self.shared.clone(), request).await
    }
}

impl Drop for Router {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Where the routers of `namespace` share their load books.
pub fn router_load_subject(namespace: &str) -> String {
    format!("{namespace}.router_load")
}

impl Shared {
    fn apply(&self, event: DiscoveryEvent) {
        let mut list = self.instances.write().unwrap_or_else(|e| e.into_inner());
        let mut tokens = self.alive.lock().unwrap_or_else(|e| e.into_inner());
        match event {
            DiscoveryEvent::Put(instance) => {
                list.retain(|i| i.instance_id != instance.instance_id);
                tracing::info!(instance = instance.instance_id, "worker joined");
                tokens.entry(instance.instance_id).or_default();
                self.kv.on_join(&instance);
                list.push(instance);
            }
            DiscoveryEvent::Delete { instance_id } => {
                list.retain(|i| i.instance_id != instance_id);
                if let Some(token) = tokens.remove(&instance_id) {
                    token.cancel();
                }
                self.lock_loads().remove(&instance_id);
                self.kv.on_leave(instance_id);
                self.book.forget(instance_id);
                tracing::info!(instance = instance_id, "worker left");
            }
        }
        self.count.send_replace(list.len());
    }

    fn lock_loads(&self) -> std::sync::MutexGuard<'_, HashMap<u64, WorkerLoad>> {
        self.loads.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Keeps reports of live instances only: a late report must not resurrect a dead worker.
    fn record_load(&self, load: WorkerLoad) {
        let live = self
            .instances
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .any(|i| i.instance_id == load.instance_id);
        if live {
            self.lock_loads().insert(load.instance_id, load);
        }
    }

    pub fn instances(&self) -> Vec<Instance> {
        self.instances
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Waits, up to the configured bound, until `min_workers` instances are registered.
    async fn await_min_workers(&self) -> Result<(), RouterError> {
        let want = self.options.min_workers;
        let mut count = self.count.subscribe();
        if *count.borrow() >= want.max(1) {
            return Ok(());
        }
        if want == 0 {
            return Err(RouterError::NoInstances(self.endpoint.prefix()));
        }
        let waited = tokio::time::timeout(
            self.options.min_workers_wait,
            count.wait_for(|&n| n >= want.max(1)),
        )
        .await;
        let ok = matches!(waited, Ok(Ok(_)));
        drop(waited);
        match ok {
            true => Ok(()),
            false => Err(RouterError::TooFewWorkers {
                have: *self.count.borrow(),
                want,
                waited: self.options.min_workers_wait,
            }),
        }
    }

    /// Asks the policy for an instance other than those in `avoid` (unless they are all that
    /// is left) and opens the request's stream there, charged to that worker's load.
    pub async fn dispatch(
        &self,
        request: &GenerateRequest,
        avoid: &[u64],
    ) -> Result<Dispatch, RouterError> {
        self.await_min_workers().await?;
        let hashes = block_hashes(&request.token_ids, self.options.block_size);
        let chained: Vec<u64> = hashes.iter().map(|h| h.block_hash).collect();
        let (selection, address, prompt_blocks) = {
            // The instance list is held only while the (synchronous) policy chooses; the
            // candidates borrow from it, nothing is copied per instance but the counts.
            let list = self.instances.read().unwrap_or_else(|e| e.into_inner());
            if list.is_empty() {
                return Err(RouterError::NoInstances(self.endpoint.prefix()));
            }
            let mut offered: Vec<&Instance> = list
                .iter()
                .filter(|i| !avoid.contains(&i.instance_id))
                .collect();
            if offered.is_empty() {
                offered = list.iter().collect();
            }
            let ids: Vec<u64> = offered.iter().map(|i| i.instance_id).collect();
            let (overlaps, sizes) = self.kv.lookup(&chained, &ids);
            let loads = self.lock_loads();
            let candidates: Vec<Candidate<'_>> = offered
                .iter()
                .zip(sizes)
                .map(|(instance, cached_blocks)| Candidate {
                    instance,
                    overlap_blocks: overlaps.get(&instance.instance_id).copied().unwrap_or(0),
                    cached_blocks,
                    counts: self.book.counts(instance.instance_id),
                    recent_blocks: self.book.recent(instance.instance_id),
                    reported: loads.get(&instance.instance_id),
                })
                .collect();
            let ctx = RouteContext {
                request_id: &request.request_id,
                token_ids: &request.token_ids,
                block_hashes: &hashes,
                block_size: self.options.block_size,
                candidates: &candidates,
            };
            let selection = self.policy.select(&ctx)?;
            let Some(chosen) = candidates.iter().find(|c| c.id() == selection.instance_id) else {
                return Err(RouterError::UnknownSelection {
                    policy: self.policy.name(),
                    instance_id: selection.instance_id,
                });
            };
            self.policy
                .on_dispatch(&request.request_id, &selection, &ctx);
            (
                selection,
                chosen.instance.address.clone(),
                ctx.prompt_blocks(),
            )
        };
        let worker = selection.instance_id;
        let cached_tokens =
            (selection.overlap_blocks * self.options.block_size).min(request.token_ids.len());
        let load = self.book.charge(
            worker,
            request.token_ids.len() - cached_tokens,
            prompt_blocks,
        );
        self.kv.on_dispatch(worker, &chained);
        self.metrics
            .decision(self.policy.name(), worker, selection.overlap_blocks);
        let gone = self
            .alive
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(worker)
            .or_default()
            .clone();
        let payload = serde_json::to_vec(&GenerateRequest {
            router_overlap_blocks: selection.overlap_blocks,
            ..request.clone()
        })
        .expect("protocol types serialize");
        // A stalled worker never accepts: waiting for it must end when its lease does, not
        // only after the plane's silence timeout. (The plane cancels a late acceptance.)
        let requested = tokio::select! {
            r = self.plane.request(&address, payload) => r,
            _ = gone.cancelled() => Err(RequestPlaneError::Cancelled),
        };
        match requested {
            Ok(stream) => Ok(Dispatch {
                selection,
                stream,
                gone,
                load,
            }),
            Err(e) => {
                self.policy.on_finish(&request.request_id, worker);
                let vanished = |reason: &str| RouterError::Vanished {
                    instance_id: worker,
                    address: address.clone(),
                    reason: reason.to_string(),
                };
                Err(match e {
                    RequestPlaneError::NoSuchAddress(_) => vanished("nothing serves it"),
                    RequestPlaneError::Cancelled => {
                        vanished("it left discovery before accepting it")
                    }
                    e @ RequestPlaneError::Silent(_) => vanished(&e.to_string()),
                    e => RouterError::RequestPlane(e),
                })
            }
        }
    }
}
