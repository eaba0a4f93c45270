//! Serves an [`EngineHost`] on the request plane and registers it in discovery. Each request
//! gets its own task that forwards engine events as frames; a cancelled stream aborts the
//! request in the engine.

use std::sync::Arc;

use runtime::discovery::{Discovery, EndpointId, InstanceSpec, Registration};
use runtime::protocol::{GenerateRequest, GenerateResponse};
use runtime::request_plane::{IncomingRequest, RequestPlane};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::engine_host::{EngineEvent, EngineHost};
use crate::error::WorkerError;

/// Where decode workers of `namespace` register (DESIGN.md §2).
pub fn worker_endpoint(namespace: &str) -> EndpointId {
    EndpointId::new(namespace, "decode-worker", "generate")
}

/// A running decode worker: registered, serving, and withdrawn when dropped.
pub struct DecodeWorker {
    host: Arc<EngineHost>,
    registration: Registration,
    server: JoinHandle<()>,
}

impl DecodeWorker {
    pub async fn start(
        host: EngineHost,
        discovery: &dyn Discovery,
        plane: Arc<dyn RequestPlane>,
        endpoint: EndpointId,
        model: &str,
    ) -> Result<Self, WorkerError> {
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
        let registration = discovery
            .register(InstanceSpec {
                endpoint,
                address,
                model: Some(model.to_string()),
                metadata: serde_json::Value::Null,
            })
            .await?;
        Ok(Self {
            host,
            registration,
            server,
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
        self.server.abort();
        self.host.shutdown();
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
