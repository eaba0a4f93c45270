//! The live instance list of one endpoint, the workers' reported load, and dispatch to the
//! instance a policy picks.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};

use runtime::block_hash::block_hashes;
use runtime::discovery::{DiscoveryEvent, EndpointId, Instance};
use runtime::protocol::{GenerateRequest, WorkerLoad};
use runtime::request_plane::{RequestPlane, ResponseStream};
use runtime::Planes;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::error::RouterError;
use crate::policy::{RouteContext, RoutingPolicy, Selection};
use crate::stream::RoutedStream;

/// How the router hashes prompts and how often it moves a request that lost its worker.
#[derive(Debug, Clone)]
pub struct RouterOptions {
    /// Tokens per KV block, as the workers use (block hashes cover full blocks only).
    pub block_size: usize,
    /// Times a request is sent to another worker when its worker failed before sending a
    /// token (it died, or left discovery): the client has seen nothing, so nothing is lost.
    pub retries: u32,
}

impl Default for RouterOptions {
    fn default() -> Self {
        Self {
            block_size: 128,
            retries: 1,
        }
    }
}

/// One dispatch: where it went, its response, and a token that fires when that instance
/// leaves discovery (its lease expired: the worker died), so the caller need not wait for the
/// silence timeout.
pub(crate) struct Dispatch {
    pub selection: Selection,
    pub stream: ResponseStream,
    pub gone: CancellationToken,
}

pub(crate) struct Shared {
    pub endpoint: EndpointId,
    pub options: RouterOptions,
    pub policy: Box<dyn RoutingPolicy>,
    plane: Arc<dyn RequestPlane>,
    instances: RwLock<Vec<Instance>>,
    alive: Mutex<HashMap<u64, CancellationToken>>,
    loads: Mutex<HashMap<u64, WorkerLoad>>,
}

pub struct Router {
    shared: Arc<Shared>,
    tasks: Vec<JoinHandle<()>>,
}

impl Router {
    /// Starts watching `endpoint` in discovery (instances join and leave routing as it reports
    /// them) and the workers' load reports on the event plane.
    pub async fn new(
        planes: &Planes,
        endpoint: EndpointId,
        policy: Box<dyn RoutingPolicy>,
        options: RouterOptions,
    ) -> Result<Self, RouterError> {
        let mut load_reports = planes.events.subscribe(&planes.load_subject()).await?;
        let (current, mut events) = planes.discovery.watch(&endpoint).await?;
        let shared = Arc::new(Shared {
            endpoint,
            options,
            policy,
            plane: planes.requests.clone(),
            alive: Mutex::new(
                current
                    .iter()
                    .map(|i| (i.instance_id, CancellationToken::new()))
                    .collect(),
            ),
            instances: RwLock::new(current),
            loads: Mutex::default(),
        });
        let watcher = {
            let shared = shared.clone();
            tokio::spawn(async move {
                while let Some(event) = events.recv().await {
                    shared.apply(event);
                }
            })
        };
        let loads = {
            let shared = shared.clone();
            tokio::spawn(async move {
                while let Some(bytes) = load_reports.recv().await {
                    match serde_json::from_slice::<WorkerLoad>(&bytes) {
                        Ok(load) => shared.record_load(load),
                        Err(e) => tracing::warn!("dropping a malformed load report: {e}"),
                    }
                }
            })
        };
        Ok(Self {
            shared,
            tasks: vec![watcher, loads],
        })
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

    pub fn policy_name(&self) -> &'static str {
        self.shared.policy.name()
    }

    /// Sends `request` to the instance the policy picks and returns its response stream, which
    /// moves the request to another instance if its worker fails before the first token.
    /// Dropping the stream cancels the request at the worker.
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

impl Shared {
    fn apply(&self, event: DiscoveryEvent) {
        let mut list = self.instances.write().unwrap_or_else(|e| e.into_inner());
        let mut tokens = self.alive.lock().unwrap_or_else(|e| e.into_inner());
        match event {
            DiscoveryEvent::Put(instance) => {
                list.retain(|i| i.instance_id != instance.instance_id);
                tracing::info!(instance = instance.instance_id, "worker joined");
                tokens.entry(instance.instance_id).or_default();
                list.push(instance);
            }
            DiscoveryEvent::Delete { instance_id } => {
                list.retain(|i| i.instance_id != instance_id);
                if let Some(token) = tokens.remove(&instance_id) {
                    token.cancel();
                }
                self.lock_loads().remove(&instance_id);
                tracing::info!(instance = instance_id, "worker left");
            }
        }
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

    /// Asks the policy for an instance other than those in `avoid` (unless they are all that
    /// is left) and opens the request's stream there.
    pub async fn dispatch(
        &self,
        request: &GenerateRequest,
        avoid: &[u64],
    ) -> Result<Dispatch, RouterError> {
        let (selection, address) = {
            // Both locks are held only while the (synchronous) policy chooses, in the order
            // the watcher and the load task take them; nothing is copied per request.
            let list = self.instances.read().unwrap_or_else(|e| e.into_inner());
            if list.is_empty() {
                return Err(RouterError::NoInstances(self.endpoint.prefix()));
            }
            let fresh: Vec<Instance>;
            let candidates: &[Instance] = if avoid.is_empty() {
                &list
            } else {
                fresh = list
                    .iter()
                    .filter(|i| !avoid.contains(&i.instance_id))
                    .cloned()
                    .collect();
                if fresh.is_empty() {
                    &list
                } else {
                    &fresh
                }
            };
            let hashes = block_hashes(&request.token_ids, self.options.block_size);
            let loads = self.lock_loads();
            let ctx = RouteContext {
                request_id: &request.request_id,
                token_ids: &request.token_ids,
                block_hashes: &hashes,
                instances: candidates,
                loads: &loads,
            };
            let selection = self.policy.select(&ctx)?;
            let Some(chosen) = candidates
                .iter()
                .find(|i| i.instance_id == selection.instance_id)
            else {
                return Err(RouterError::UnknownSelection {
                    policy: self.policy.name(),
                    instance_id: selection.instance_id,
                });
            };
            self.policy
                .on_dispatch(&request.request_id, &selection, &ctx);
            (selection, chosen.address.clone())
        };
        let gone = self
            .alive
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(selection.instance_id)
            .or_default()
            .clone();
        let payload = serde_json::to_vec(request).expect("protocol types serialize");
        match self.plane.request(&address, payload).await {
            Ok(stream) => Ok(Dispatch {
                selection,
                stream,
                gone,
            }),
            Err(e) => {
                self.policy
                    .on_finish(&request.request_id, selection.instance_id);
                Err(RouterError::RequestPlane(e))
            }
        }
    }
}
