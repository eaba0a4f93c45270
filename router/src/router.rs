//! The live instance list of one endpoint, and dispatch to the instance a policy picks.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};

use runtime::discovery::{Discovery, DiscoveryEvent, EndpointId, Instance};
use runtime::protocol::GenerateRequest;
use runtime::request_plane::{RequestPlane, ResponseStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::error::RouterError;
use crate::policy::{RouteContext, RoutingPolicy};

/// A dispatched request: where it went, its response, and a token that fires when that
/// instance leaves discovery (its lease expired: the worker died), so the caller need not wait
/// for the silence timeout.
pub struct Dispatch {
    pub instance_id: u64,
    pub stream: ResponseStream,
    pub gone: CancellationToken,
}

pub struct Router {
    endpoint: EndpointId,
    instances: Arc<RwLock<Vec<Instance>>>,
    alive: Arc<Mutex<HashMap<u64, CancellationToken>>>,
    policy: Box<dyn RoutingPolicy>,
    plane: Arc<dyn RequestPlane>,
    watcher: JoinHandle<()>,
}

impl Router {
    /// Starts watching `endpoint`; instances join and leave routing as discovery reports them.
    pub async fn new(
        discovery: &dyn Discovery,
        plane: Arc<dyn RequestPlane>,
        endpoint: EndpointId,
        policy: Box<dyn RoutingPolicy>,
    ) -> Result<Self, RouterError> {
        let (current, mut events) = discovery.watch(&endpoint).await?;
        let alive: Arc<Mutex<HashMap<u64, CancellationToken>>> = Arc::new(Mutex::new(
            current
                .iter()
                .map(|i| (i.instance_id, CancellationToken::new()))
                .collect(),
        ));
        let instances = Arc::new(RwLock::new(current));
        let (list, tokens) = (instances.clone(), alive.clone());
        let watcher = tokio::spawn(async move {
            while let Some(event) = events.recv().await {
                let mut list = list.write().unwrap_or_else(|e| e.into_inner());
                let mut tokens = tokens.lock().unwrap_or_else(|e| e.into_inner());
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
                        tracing::info!(instance = instance_id, "worker left");
                    }
                }
            }
        });
        Ok(Self {
            endpoint,
            instances,
            alive,
            policy,
            plane,
            watcher,
        })
    }

    pub fn instances(&self) -> Vec<Instance> {
        self.instances
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Sends `request` to the instance the policy picks (dropping the returned stream cancels
    /// the request at the worker).
    pub async fn generate(&self, request: &GenerateRequest) -> Result<Dispatch, RouterError> {
        let (instance_id, address) = {
            let list = self.instances.read().unwrap_or_else(|e| e.into_inner());
            if list.is_empty() {
                return Err(RouterError::NoInstances(self.endpoint.prefix()));
            }
            let ctx = RouteContext {
                request_id: &request.request_id,
                token_ids: &request.token_ids,
            };
            let i = self.policy.select(&list, &ctx).min(list.len() - 1);
            (list[i].instance_id, list[i].address.clone())
        };
        let gone = self
            .alive
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(instance_id)
            .or_default()
            .clone();
        let payload = serde_json::to_vec(request).expect("protocol types serialize");
        let stream = self.plane.request(&address, payload).await?;
        Ok(Dispatch {
            instance_id,
            stream,
            gone,
        })
    }
}

impl Drop for Router {
    fn drop(&mut self) {
        self.watcher.abort();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use runtime::discovery::{InstanceSpec, MemoryDiscovery};
    use runtime::protocol::SamplingParams;
    use runtime::request_plane::MemoryRequestPlane;

    use super::*;
    use crate::policy::RoundRobin;

    fn request() -> GenerateRequest {
        GenerateRequest {
            request_id: "r".into(),
            token_ids: vec![1, 2],
            sampling: SamplingParams::greedy(1),
        }
    }

    #[tokio::test]
    async fn round_robin_spreads_and_deleted_instances_leave_routing() {
        let discovery = MemoryDiscovery::default();
        let plane = Arc::new(MemoryRequestPlane::new(Duration::from_secs(1)));
        let endpoint = EndpointId::new("t", "decode-worker", "generate");
        let router = Router::new(
            &discovery,
            plane.clone(),
            endpoint.clone(),
            Box::new(RoundRobin::default()),
        )
        .await
        .unwrap();
        assert!(matches!(
            router.generate(&request()).await,
            Err(RouterError::NoInstances(_))
        ));
        let mut regs = Vec::new();
        let mut served = Vec::new();
        for name in ["a", "b"] {
            served.push(plane.serve(name).await.unwrap());
            regs.push(
                discovery
                    .register(InstanceSpec {
                        endpoint: endpoint.clone(),
                        address: name.into(),
                        model: None,
                        metadata: serde_json::Value::Null,
                    })
                    .await
                    .unwrap(),
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        let mut picked = Vec::new();
        for _ in 0..4 {
            picked.push(router.generate(&request()).await.unwrap().instance_id);
        }
        let ids: Vec<u64> = regs.iter().map(|r| r.instance.instance_id).collect();
        assert_eq!(picked.iter().filter(|&&p| p == ids[0]).count(), 2);
        assert_eq!(picked.iter().filter(|&&p| p == ids[1]).count(), 2);

        let first = router.generate(&request()).await.unwrap();
        let on_first = if first.instance_id == ids[0] {
            first
        } else {
            router.generate(&request()).await.unwrap()
        };
        assert_eq!(on_first.instance_id, ids[0]);
        assert!(!on_first.gone.is_cancelled());
        drop(regs.remove(0));
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(
            on_first.gone.is_cancelled(),
            "a deleted instance's dispatches learn it is gone"
        );
        for _ in 0..3 {
            assert_eq!(
                router.generate(&request()).await.unwrap().instance_id,
                ids[1]
            );
        }
        assert_eq!(router.instances().len(), 1);
    }
}
