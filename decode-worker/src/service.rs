//! Serves an [`EngineHost`] on the request plane, registers it in discovery, and publishes on
//! the event plane what the router needs: its load (on every change, at most every
//! [`LOAD_MIN_GAP`], and at least every [`LOAD_HEARTBEAT`]) and its block manager's KV events,
//! tagged with its instance id. Each request gets its own task that forwards engine events as
//! frames; a cancelled stream aborts the request in the engine.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use runtime::discovery::{EndpointId, InstanceSpec, Registration};
use runtime::event_plane::EventPlane;
use runtime::kv_event::{KvEvent, KvStateQuery, WorkerKvEvent, KV_STATE_KEY};
use runtime::protocol::{GenerateRequest, GenerateResponse, WorkerLoad};
use runtime::request_plane::IncomingRequest;
use runtime::Planes;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::engine_host::{EngineEvent, EngineHost};
use crate::error::WorkerError;
use crate::kv_state::{KvState, KV_RING_EVENTS};

/// Where decode workers of `namespace` register (DESIGN.md §2).
pub fn worker_endpoint(namespace: &str) -> EndpointId {
    EndpointId::new(namespace, "decode-worker", "generate")
}

/// A load report goes out at least this often, so a frontend that starts late learns it.
pub const LOAD_HEARTBEAT: Duration = Duration::from_secs(1);
/// Reports of a busy engine (its load changes every step) are coalesced to this rate.
pub const LOAD_MIN_GAP: Duration = Duration::from_millis(50);

/// A running decode worker: registered, serving, publishing, and withdrawn when stopped.
pub struct DecodeWorker {
    host: Arc<EngineHost>,
    /// Fires when the worker is abandoned: open responses are dropped without a word.
    abandoned: CancellationToken,
    registration: Registration,
    tasks: Vec<JoinHandle<()>>,
}

impl DecodeWorker {
    /// Serves `host` at a fresh address of `planes`' decode endpoint for `model`.
    pub async fn start(
        host: EngineHost,
        planes: &Planes,
        model: &str,
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
        let server = tokio::spawn(serve(host.clone(), incoming, abandoned.clone()));
        let kv_events = host.take_kv_events();
        let kv_state = Arc::new(Mutex::new(KvState::new(KV_RING_EVENTS)));
        // Routers that missed events ask here for them, or for a dump of the cache.
        let kv_address = format!("{address}.kv");
        let mut metadata = serde_json::Map::new();
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
        let mut tasks = vec![
            server,
            tokio::spawn(publish_load(
                host.load_watch(),
                planes.events.clone(),
                planes.load_subject(),
                id,
            )),
        ];
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
        Ok(Self {
            host,
            abandoned,
            registration,
            tasks,
        })
    }

    pub fn instance_id(&self) -> u64 {
        self.registration.instance.instance_id
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

    /// Withdraws the instance (no new requests are routed here), then fails what still runs.
    pub fn stop(self) {
        drop(self.registration);
        for task in &self.tasks {
            task.abort();
        }
        self.host.shutdown();
    }
}

async fn publish_load(
    mut load: watch::Receiver<WorkerLoad>,
    events: Arc<dyn EventPlane>,
    subject: String,
    instance_id: u64,
) {
    loop {
        let report = WorkerLoad {
            instance_id,
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
        let query: KvStateQuery = match serde_json::from_slice(&payload) {
            Ok(q) => q,
            Err(e) => {
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

async fn serve(
    host: Arc<EngineHost>,
    mut incoming: mpsc::Receiver<IncomingRequest>,
    abandoned: CancellationToken,
) {
    while let Some(request) = incoming.recv().await {
        let (host, abandoned) = (host.clone(), abandoned.clone());
        tokio::spawn(async move {
            tokio::select! {
                biased;
                _ = abandoned.cancelled() => {}
                _ = handle(host, request) => {}
            }
        });
    }
}

async fn handle(host: Arc<EngineHost>, incoming: IncomingRequest) {
    let IncomingRequest {
        payload,
        mut response,
    } = incoming;
    let request: GenerateRequest = match serde_json::from_slice(&payload) {
        Ok(r) => r,
        Err(e) => {
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
    loop {
        let event = tokio::select! {
            biased;
            _ = cancelled.cancelled() => {
                host.abort(&id);
                return;
            }
            event = events.recv() => event,
        };
        let sent = match event {
            None => {
                let _ = response.error("the engine stopped".into()).await;
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
