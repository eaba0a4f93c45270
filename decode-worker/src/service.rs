//! Serves an [`EngineHost`] on the request plane, registers it in discovery, and publishes on
//! the event plane what the router needs: its load (on every change, at most every
//! [`LOAD_MIN_GAP`], and at least every [`LOAD_HEARTBEAT`]) and its block manager's KV events,
//! tagged with its instance id. Each request gets its own task that forwards engine events as
//! frames; a cancelled stream aborts the request in the engine.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use kv_transfer::{KvFences, KvSink};
use runtime::discovery::{EndpointId, InstanceSpec, Registration};
use runtime::dropped::{self, DropWarnings};
use runtime::event_plane::EventPlane;
use runtime::kv_event::{KvEvent, KvStateQuery, WorkerKvEvent, KV_STATE_KEY};
use runtime::protocol::{
    GenerateRequest, GenerateResponse, NoticeReply, PrefillCounters, PrefillNotice,
    RemotePrefillRequest, WorkerLoad,
};
use runtime::request_plane::{IncomingRequest, ResponseSender};
use runtime::work_queue::WorkQueue;
use runtime::Planes;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::disagg::{follow_thresholds, DisaggState};
use crate::engine_host::{EngineEvent, EngineHost};
use crate::error::WorkerError;
use crate::kv_state::{KvState, KV_RING_EVENTS};
use crate::remote_prefill::{record, Expiry, Outcome, RemotePrefills};

pub use runtime::protocol::KV_TRANSFER_KEY;

/// Requests that do not parse are answered with an error frame and logged, rate-limited: any
/// NATS client can send them.
static MALFORMED_REQUEST: DropWarnings = DropWarnings::new("a malformed generate request");
static MALFORMED_KV_QUERY: DropWarnings = DropWarnings::new("a malformed KV state query");
static MALFORMED_NOTICE: DropWarnings = DropWarnings::new("a malformed prefill notice");

/// How often the prefill queue's length is read for the disaggregation rule.
pub const QUEUE_POLL: Duration = Duration::from_millis(100);

/// A decode worker's disaggregation: the live rule (the host was started with the same
/// state) and the sink its KV cache lives in, which prefill workers write into.
pub struct Disaggregation {
    pub state: Arc<DisaggState>,
    pub sink: KvSink,
}

/// What each request's task needs to run a remote prefill.
struct RemoteContext {
    state: Arc<DisaggState>,
    table: Arc<RemotePrefills>,
    queue: Arc<dyn WorkQueue>,
    counters: Arc<Mutex<PrefillCounters>>,
    instance_id: std::sync::OnceLock<u64>,
    notice_address: String,
}

/// Where decode workers of `namespace` register (DESIGN.md §2).
pub fn worker_endpoint(namespace: &str) -> EndpointId {
    runtime::discovery::decode_worker_endpoint(namespace)
}

/// A load report goes out at least this often, so a frontend that starts late learns it.
pub const LOAD_HEARTBEAT: Duration = Duration::from_secs(1);
/// Reports of a busy engine (its load changes every step) are coalesced to this rate.
pub const LOAD_MIN_GAP: Duration = Duration::from_millis(50);

/// A running decode worker: registered, serving, publishing, and withdrawn when stopped.
pub struct DecodeWorker {
    host: Arc<EngineHost>,
    /// Taken (and so withdrawn from discovery) by `stop`, or at once when the engine dies.
    registration: Arc<Mutex<Option<Registration>>>,
    /// Keeps the KV cache's memory and its endpoints alive as long as the worker.
    _sink: Option<KvSink>,
    /// Fires when the worker is abandoned: open responses are dropped without a word.
    abandoned: CancellationToken,
    instance_id: u64,
    /// Serves the generate address; stopped first when draining.
    server: JoinHandle<()>,
    /// Requests whose task still runs (a drain waits for them).
    in_flight: Arc<std::sync::atomic::AtomicUsize>,
    tasks: Vec<JoinHandle<()>>,
}

/// While quiet this long, a request's stream carries a heartbeat: the caller's silence
/// timeout (`--stream-timeout`) then fires only for a worker that is stalled or gone, never
/// for one whose request waits in its queue or for a prefill worker.
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);

impl DecodeWorker {
    /// Serves `host` at a fresh address of `planes`' decode endpoint for `model`.
    pub async fn start(
        host: EngineHost,
        planes: &Planes,
        model: &str,
    ) -> Result<Self, WorkerError> {
        Self::start_with(host, planes, model, None).await
    }

    /// As [`DecodeWorker::start`]; with `disagg`, long prompts go to the prefill queue as
    /// its rule says (the host must have been started with the same state), notices are served
    /// at `{address}.prefill` and the KV descriptor is published in discovery.
    pub async fn start_with(
        host: EngineHost,
        planes: &Planes,
        model: &str,
        disagg: Option<Disaggregation>,
    ) -> Result<Self, WorkerError> {
        let endpoint = worker_endpoint(&planes.settings.namespace);
        let plane = planes.requests.clone();
        // The address must exist before the instance is visible, so it cannot be the lease
        // id that registration hands out; a random suffix keeps it unique.
        let address = format!(
            "{}.{}.{}.{:x}",
            endpoint.namespace,
            endpoint.component,
            endpoint.endpoint,
            rand::random::<u64>()
        );
        let incoming = plane.serve(&address).await?;
        let host = Arc::new(host);
        let abandoned = CancellationToken::new();
        let mut metadata = serde_json::Map::new();
        let mut tasks = Vec::new();
        let (remote, sink) = match disagg {
            Some(Disaggregation { state, sink }) => {
                let notice_address = format!("{address}.prefill");
                let table = RemotePrefills::new(sink.fences(), host.vocab_size());
                let notices = plane.serve(&notice_address).await?;
                tasks.push(tokio::spawn(serve_notices(table.clone(), notices)));
                tasks.push(tokio::spawn(poll_queue(
                    state.clone(),
                    planes.prefill_queue.clone(),
                    host.prefill_counters(),
                    sink.fences(),
                )));
                tasks.push(tokio::spawn(follow_thresholds(
                    state.clone(),
                    planes.discovery.clone(),
                    planes.settings.namespace.clone(),
                )));
                metadata.insert(
                    KV_TRANSFER_KEY.into(),
                    serde_json::to_value(sink.descriptor()).expect("descriptors serialize"),
                );
                let ctx = RemoteContext {
                    state,
                    table,
                    queue: planes.prefill_queue.clone(),
                    counters: host.prefill_counters(),
                    instance_id: std::sync::OnceLock::new(),
                    notice_address,
                };
                (Some(Arc::new(ctx)), Some(sink))
            }
            None => (None, None),
        };
        let in_flight = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let server = tokio::spawn(serve(
            host.clone(),
            incoming,
            abandoned.clone(),
            remote.clone(),
            in_flight.clone(),
        ));
        let kv_events = host.take_kv_events();
        let kv_state = Arc::new(Mutex::new(KvState::new(KV_RING_EVENTS)));
        // Routers that missed events ask here for them, or for a dump of the cache.
        let kv_address = format!("{address}.kv");
        let mut kv_server = None;
        if kv_events.is_some() {
            let queries = plane.serve(&kv_address).await?;
            kv_server = Some(tokio::spawn(serve_kv_state(kv_state.clone(), queries)));
            metadata.insert(KV_STATE_KEY.into(), kv_address.into());
        }
        let registration = planes
            .discovery
            .register(InstanceSpec {
                endpoint,
                address,
                model: Some(model.to_string()),
                metadata: metadata.into(),
            })
            .await?;
        let id = registration.instance.instance_id;
        if let Some(remote) = &remote {
            let _ = remote.instance_id.set(id);
        }
        tasks.push(tokio::spawn(publish_load(
            host.load_watch(),
            host.prefill_counters(),
            planes.events.clone(),
            planes.load_subject(),
            id,
        )));
        tasks.extend(kv_server);
        if let Some(events) = kv_events {
            tasks.push(tokio::spawn(publish_kv_events(
                events,
                kv_state,
                planes.events.clone(),
                planes.kv_events_subject(),
                id,
            )));
        }
        let registration = Arc::new(Mutex::new(Some(registration)));
        // A dead engine thread must not stay routable: withdraw the instance at once (the
        // lease is revoked, not left to expire) and let the process decide what to do next.
        tasks.push(tokio::spawn({
            let (host, registration) = (host.clone(), registration.clone());
            async move {
                let reason = host.failed().await;
                let withdrawn = registration
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .take();
                drop(withdrawn);
                tracing::error!(
                    instance = format!("{id:x}"),
                    "withdrawn from discovery: its engine died ({reason})"
                );
            }
        }));
        Ok(Self {
            host,
            registration,
            _sink: sink,
            abandoned,
            instance_id: id,
            server,
            in_flight,
            tasks,
        })
    }

    pub fn instance_id(&self) -> u64 {
        self.instance_id
    }

    /// Resolves with the reason once the worker's engine thread has died: it has already left
    /// discovery; the caller should exit non-zero so a supervisor restarts it.
    pub async fn failed(&self) -> String {
        self.host.failed().await
    }

    pub fn host(&self) -> &Arc<EngineHost> {
        &self.host
    }

    /// Goes silent as a killed process would: withdrawn from discovery, every open response
    /// dropped without a final frame, the engine stopped. For fault tests of what calls it.
    pub fn abandon(self) {
        self.abandoned.cancel();
        self.stop();
    }

    /// A graceful stop (SIGTERM): stops taking requests — its address goes unserved, so a
    /// router sends new ones elsewhere — lets those it has finish for up to `timeout`, then
    /// falls silent on the rest (the router migrates them, within its `--migration-limit`) and
    /// withdraws. Returns the KV blocks its engine held just before it stopped (0 unless
    /// requests were still running at the deadline, or blocks leaked).
    pub async fn drain(self, timeout: Duration) -> usize {
        self.server.abort();
        let deadline = tokio::time::Instant::now() + timeout;
        let left = loop {
            let left = self.in_flight.load(std::sync::atomic::Ordering::Acquire);
            if left == 0 || tokio::time::Instant::now() >= deadline {
                break left;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        if left > 0 {
            tracing::warn!(left, ?timeout, "drain timed out; the rest migrate or fail");
        }
        // The engine publishes its load after each turn: let the last release show.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let in_use = self.host.load().kv_blocks_used;
        self.abandon();
        in_use
    }

    /// Withdraws the instance (no new requests are routed here), then fails what still runs.
    pub fn stop(self) {
        self.server.abort();
        let withdrawn = self
            .registration
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        drop(withdrawn);
        for task in &self.tasks {
            task.abort();
        }
        self.host.shutdown();
    }
}

async fn publish_load(
    mut load: watch::Receiver<WorkerLoad>,
    counters: Arc<Mutex<PrefillCounters>>,
    events: Arc<dyn EventPlane>,
    subject: String,
    instance_id: u64,
) {
    loop {
        let report = WorkerLoad {
            instance_id,
            prefill: counters.lock().unwrap_or_else(|e| e.into_inner()).clone(),
            ..load.borrow_and_update().clone()
        };
        let bytes = serde_json::to_vec(&report).expect("protocol types serialize");
        if let Err(e) = events.publish(&subject, bytes).await {
            tracing::warn!("cannot publish load: {e}");
        }
        tokio::time::sleep(LOAD_MIN_GAP).await;
        tokio::select! {
            changed = load.changed() => if changed.is_err() { return },
            _ = tokio::time::sleep(LOAD_HEARTBEAT) => {}
        }
    }
}

async fn publish_kv_events(
    mut kv: mpsc::UnboundedReceiver<KvEvent>,
    state: Arc<Mutex<KvState>>,
    events: Arc<dyn EventPlane>,
    subject: String,
    worker_id: u64,
) {
    while let Some(event) = kv.recv().await {
        state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .record(&event);
        let bytes = serde_json::to_vec(&WorkerKvEvent { worker_id, event })
            .expect("protocol types serialize");
        if let Err(e) = events.publish(&subject, bytes).await {
            // Best effort by design: the KV router resyncs from event-id gaps.
            tracing::warn!("cannot publish a KV event: {e}");
        }
    }
}

/// Answers routers' [`KvStateQuery`]s with one frame: the missed events, or a dump.
async fn serve_kv_state(state: Arc<Mutex<KvState>>, mut queries: mpsc::Receiver<IncomingRequest>) {
    while let Some(IncomingRequest {
        payload,
        mut response,
    }) = queries.recv().await
    {
        let query: KvStateQuery = match dropped::decode(&payload) {
            Ok(q) => q,
            Err(e) => {
                MALFORMED_KV_QUERY.warn(&e);
                let _ = response
                    .error(format!("malformed KV state query: {e}"))
                    .await;
                continue;
            }
        };
        let reply = state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .answer(&query);
        let bytes = serde_json::to_vec(&reply).expect("protocol types serialize");
        if response.data(bytes).await.is_ok() {
            let _ = response.end().await;
        }
    }
}

/// Reads the prefill queue's length for the rule (and the metrics), and the writes the KV
/// fence refused, every [`QUEUE_POLL`].
async fn poll_queue(
    state: Arc<DisaggState>,
    queue: Arc<dyn WorkQueue>,
    counters: Arc<Mutex<PrefillCounters>>,
    fences: KvFences,
) {
    loop {
        record(&counters, |c| c.refused_writes = fences.refused());
        match queue.pending().await {
            Ok(n) => {
                state.set_queue_len(n);
                record(&counters, |c| c.queue_length = n);
            }
            Err(e) => tracing::debug!("cannot read the prefill queue's length: {e}"),
        }
        tokio::time::sleep(QUEUE_POLL).await;
    }
}

/// Answers prefill workers' notices, one frame each.
async fn serve_notices(table: Arc<RemotePrefills>, mut notices: mpsc::Receiver<IncomingRequest>) {
    while let Some(IncomingRequest {
        payload,
        mut response,
    }) = notices.recv().await
    {
        let reply = match dropped::decode::<PrefillNotice>(&payload) {
            Ok(notice) => table.notice(notice),
            Err(e) => {
                MALFORMED_NOTICE.warn(&e);
                NoticeReply::refused(format!("malformed prefill notice: {e}"))
            }
        };
        let bytes = serde_json::to_vec(&reply).expect("protocol types serialize");
        if response.data(bytes).await.is_ok() {
            let _ = response.end().await;
        }
    }
}

/// Counts a request's task while it runs.
struct InFlight(Arc<std::sync::atomic::AtomicUsize>);

impl InFlight {
    fn enter(count: &Arc<std::sync::atomic::AtomicUsize>) -> InFlight {
        count.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        InFlight(count.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

async fn serve(
    host: Arc<EngineHost>,
    mut incoming: mpsc::Receiver<IncomingRequest>,
    abandoned: CancellationToken,
    remote: Option<Arc<RemoteContext>>,
    in_flight: Arc<std::sync::atomic::AtomicUsize>,
) {
    while let Some(request) = incoming.recv().await {
        let (host, abandoned, remote) = (host.clone(), abandoned.clone(), remote.clone());
        let counted = InFlight::enter(&in_flight);
        tokio::spawn(async move {
            let _counted = counted;
            tokio::select! {
                biased;
                _ = abandoned.cancelled() => {}
                _ = handle(host, request, remote) => {}
            }
        });
    }
}

/// How a request's remote prefill ended for its task.
enum RemoteEnd {
    /// Tokens follow on the engine events (remote first token, or a local prefill).
    Resume,
    /// The client went away; the request is aborted and its blocks are free.
    Cancelled,
}

/// Queues `job`, the prefill of a request whose blocks the engine reserved, and waits for it.
/// Whichever way it ends, the engine thread closes the claimant's grant before it frees or
/// reuses the blocks (`EngineHost`), so this task may give up at any moment.
async fn await_remote(
    ctx: &RemoteContext,
    host: &EngineHost,
    job: RemotePrefillRequest,
    cancelled: &CancellationToken,
    response: &mut ResponseSender,
) -> RemoteEnd {
    let id = job.request_id.as_str();
    let timeout = ctx.state.config().remote_prefill_timeout;
    let writable = job
        .dst_block_ids
        .get(job.cached_block_count..)
        .unwrap_or_default()
        .to_vec();
    let mut outcome = ctx.table.open(id, writable);
    // Dropped with this task (its caller was abandoned): the job leaves the table, so no
    // claim is granted on blocks the engine is about to free.
    let _entry = TableEntry(&ctx.table, id);
    let bytes = serde_json::to_vec(&job).expect("protocol types serialize");
    let give_up = |reason: &str| {
        record(&ctx.counters, |c| c.fallback(reason));
    };
    if let Err(e) = ctx.queue.enqueue(bytes).await {
        tracing::warn!(
            request = id,
            "cannot queue the prefill, prefilling locally: {e}"
        );
        ctx.table.remove(id);
        give_up("failed");
        host.prefill_locally(id);
        return RemoteEnd::Resume;
    }
    let mut deadline = tokio::time::Instant::now() + timeout;
    let mut heartbeat = tokio::time::interval(HEARTBEAT_EVERY);
    heartbeat.reset();
    loop {
        tokio::select! {
            biased;
            _ = cancelled.cancelled() => {
                ctx.table.remove(id);
                host.abort(id);
                return RemoteEnd::Cancelled;
            }
            _ = heartbeat.tick() => {
                // A failed send means the caller is gone: its cancel arrives next.
                let _ = response.heartbeat().await;
            }
            got = &mut outcome => {
                match got {
                    Ok(Outcome::Done { first, backend, bytes, seconds }) => {
                        record(&ctx.counters, |c| c.record_transfer(&backend, bytes, seconds));
                        host.complete_remote(id, first);
                    }
                    Ok(Outcome::Failed(reason)) => {
                        tracing::warn!(request = id, "remote prefill failed, prefilling locally: {reason}");
                        give_up("failed");
                        host.prefill_locally(id);
                    }
                    Err(_) => {
                        give_up("failed");
                        host.prefill_locally(id);
                    }
                }
                return RemoteEnd::Resume;
            }
            _ = tokio::time::sleep_until(deadline) => {
                match ctx.table.expire(id, timeout) {
                    Expiry::Expired => {
                        tracing::warn!(request = id, ?timeout, "no remote prefill in time, prefilling locally");
                        give_up("timeout");
                        host.prefill_locally(id);
                        return RemoteEnd::Resume;
                    }
                    Expiry::WaitUntil(at) => deadline = at.into(),
                    // Settled by a notice just now: the outcome is ready.
                    Expiry::Settled => deadline = tokio::time::Instant::now() + timeout,
                }
            }
        }
    }
}

/// Removes a request from the table when its task ends, however it ends.
struct TableEntry<'a>(&'a RemotePrefills, &'a str);

impl Drop for TableEntry<'_> {
    fn drop(&mut self) {
        self.0.remove(self.1);
    }
}

async fn handle(
    host: Arc<EngineHost>,
    incoming: IncomingRequest,
    remote: Option<Arc<RemoteContext>>,
) {
    let IncomingRequest {
        payload,
        mut response,
    } = incoming;
    let request: GenerateRequest = match dropped::decode(&payload) {
        Ok(r) => r,
        Err(e) => {
            MALFORMED_REQUEST.warn(&e);
            let _ = response
                .error(format!("malformed generate request: {e}"))
                .await;
            return;
        }
    };
    let id = request.request_id.clone();
    let (tx, mut events) = mpsc::unbounded_channel();
    if let Err(e) = host.add(request, tx) {
        let _ = response.error(e.to_string()).await;
        return;
    }
    let cancelled = response.cancel_token();
    let mut heartbeat = tokio::time::interval(HEARTBEAT_EVERY);
    heartbeat.reset();
    loop {
        let event = tokio::select! {
            biased;
            _ = cancelled.cancelled() => {
                host.abort(&id);
                return;
            }
            event = events.recv() => event,
            _ = heartbeat.tick() => {
                if response.heartbeat().await.is_err() {
                    host.abort(&id);
                    return;
                }
                continue;
            }
        };
        // Anything sent below is a sign of life too.
        heartbeat.reset();
        let sent = match event {
            Some(EngineEvent::RemotePrefill {
                block_ids,
                cached_blocks,
                token_ids,
                sampling,
            }) => {
                let Some(ctx) = &remote else {
                    // Only a host started with a rule reports these; prefill here instead.
                    host.prefill_locally(&id);
                    continue;
                };
                let job = RemotePrefillRequest {
                    request_id: id.clone(),
                    decode_instance: ctx.instance_id.get().copied().unwrap_or(0),
                    notice_address: ctx.notice_address.clone(),
                    token_ids,
                    cached_block_count: cached_blocks,
                    dst_block_ids: block_ids,
                    sampling,
                };
                let end = await_remote(ctx, &host, job, &cancelled, &mut response).await;
                match end {
                    RemoteEnd::Resume => continue,
                    RemoteEnd::Cancelled => return,
                }
            }
            None => {
                // The engine thread is gone without a word for this request (it died: an
                // orderly stop fails each request first). Fall silent as a killed process
                // would, so the router migrates the stream (its worker has left discovery)
                // instead of reporting an engine error that would fail it.
                drop(response);
                return;
            }
            Some(EngineEvent::Failed(message)) => {
                let _ = response.error(message).await;
                return;
            }
            Some(EngineEvent::Rejected { message, param }) => {
                let msg = GenerateResponse::Rejected { message, param };
                if response.data(encode(&msg)).await.is_ok() {
                    let _ = response.end().await;
                }
                return;
            }
            Some(EngineEvent::Tokens(delta)) => {
                let finished = delta.finish_reason.is_some();
                let sent = response
                    .data(encode(&GenerateResponse::Tokens(delta)))
                    .await;
                if sent.is_ok() && finished {
                    let _ = response.end().await;
                    return;
                }
                sent
            }
        };
        if sent.is_err() {
            host.abort(&id);
            return;
        }
    }
}

fn encode(msg: &GenerateResponse) -> Vec<u8> {
    serde_json::to_vec(msg).expect("protocol types serialize")
}
