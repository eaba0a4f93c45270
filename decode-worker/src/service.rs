//! Serves an [`EngineHost`] on the request plane, registers it in discovery, and publishes on
//! the event plane what the router needs: its load (on every change, at most every
//! [`LOAD_MIN_GAP`], and at least every [`LOAD_HEARTBEAT`]) and its block manager's KV events,
//! tagged with its instance id. Each request gets its own task that forwards engine events as
//! frames; a cancelled stream aborts the request in the engine.

use std::sync::Arc;
use std::time::Duration;

use runtime::discovery::{EndpointId, InstanceSpec, Registration};
use runtime::event_plane::EventPlane;
use runtime::kv_event::{KvEvent, WorkerKvEvent};
use runtime::protocol::{GenerateRequest, GenerateResponse, WorkerLoad};
use runtime::request_plane::IncomingRequest;
use runtime::Planes;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::engine_host::{EngineEvent, EngineHost};
use crate::error::WorkerError;

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
        let server = tokio::spawn(serve(host.clone(), incoming));
        let registration = planes
            .discovery
            .register(InstanceSpec {
                endpoint,
                address,
                model: Some(model.to_string()),
                metadata: serde_json::Value::Null,
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
        if let Some(events) = host.take_kv_events() {
            tasks.push(tokio::spawn(publish_kv_events(
                events,
                planes.events.clone(),
                planes.kv_events_subject(),
                id,
            )));
        }
        Ok(Self {
            host,
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
    events: Arc<dyn EventPlane>,
    subject: String,
    worker_id: u64,
) {
    while let Some(event) = kv.recv().await {
        let bytes = serde_json::to_vec(&WorkerKvEvent { worker_id, event })
            .expect("protocol types serialize");
        if let Err(e) = events.publish(&subject, bytes).await {
            // Best effort by design: the KV router resyncs from event-id gaps.
            tracing::warn!("cannot publish a KV event: {e}");
        }
    }
}

async fn serve(host: Arc<EngineHost>, mut incoming: mpsc::Receiver<IncomingRequest>) {
    while let Some(request) = incoming.recv().await {
        tokio::spawn(handle(host.clone(), request));
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
