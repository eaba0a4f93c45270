//! In-process discovery: a map guarded by a mutex, watchers fed through channels. Dropping a
//! `Registration` plays the part of a lost lease.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use tokio::sync::{mpsc, watch};

use super::{Discovery, DiscoveryEvent, EndpointId, Instance, InstanceSpec, Registration, Result};

#[derive(Default)]
struct State {
    next_id: u64,
    instances: BTreeMap<String, Instance>,
    watchers: Vec<(EndpointId, mpsc::UnboundedSender<DiscoveryEvent>)>,
    settings: HashMap<String, watch::Sender<Option<serde_json::Value>>>,
}

impl State {
    fn notify(&mut self, endpoint: &EndpointId, event: DiscoveryEvent) {
        // A watcher whose receiver is gone is dropped here.
        self.watchers
            .retain(|(e, tx)| e != endpoint || tx.send(event.clone()).is_ok());
    }
}

#[derive(Clone, Default)]
pub struct MemoryDiscovery {
    state: Arc<Mutex<State>>,
}

impl MemoryDiscovery {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the map half-updated (single inserts
        // and removes), so a poisoned lock is still consistent.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Withdraws the instance when the registration is dropped.
struct Lease {
    state: Arc<Mutex<State>>,
    key: String,
    endpoint: EndpointId,
    instance_id: u64,
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.instances.remove(&self.key).is_some() {
            let event = DiscoveryEvent::Delete {
                instance_id: self.instance_id,
            };
            state.notify(&self.endpoint, event);
        }
    }
}

#[async_trait]
impl Discovery for MemoryDiscovery {
    async fn register(&self, spec: InstanceSpec) -> Result<Registration> {
        let mut state = self.lock();
        state.next_id += 1;
        let instance = Instance {
            endpoint: spec.endpoint.clone(),
            instance_id: state.next_id,
            address: spec.address,
            model: spec.model,
            metadata: spec.metadata,
        };
        let key = spec.endpoint.key(instance.instance_id);
        state.instances.insert(key.clone(), instance.clone());
        state.notify(&spec.endpoint, DiscoveryEvent::Put(instance.clone()));
        let lease = Lease {
            state: self.state.clone(),
            key,
            endpoint: spec.endpoint,
            instance_id: instance.instance_id,
        };
        Ok(Registration::new(instance, lease))
    }

    async fn watch(
        &self,
        endpoint: &EndpointId,
    ) -> Result<(Vec<Instance>, mpsc::UnboundedReceiver<DiscoveryEvent>)> {
        let mut state = self.lock();
        let prefix = endpoint.prefix();
        let now = state
            .instances
            .range(prefix.clone()..)
            .take_while(|(k, _)| k.starts_with(&prefix))
            .map(|(_, i)| i.clone())
            .collect();
        let (tx, rx) = mpsc::unbounded_channel();
        state.watchers.push((endpoint.clone(), tx));
        Ok((now, rx))
    }

    async fn put_setting(&self, key: &str, value: serde_json::Value) -> Result<()> {
        let mut state = self.lock();
        let setting = state
            .settings
            .entry(key.to_string())
            .or_insert_with(|| watch::channel(None).0);
        setting.send_replace(Some(value));
        Ok(())
    }

    async fn get_setting(&self, key: &str) -> Result<Option<serde_json::Value>> {
        Ok(self
            .lock()
            .settings
            .get(key)
            .and_then(|s| s.borrow().clone()))
    }

    async fn watch_setting(&self, key: &str) -> Result<watch::Receiver<Option<serde_json::Value>>> {
        let mut state = self.lock();
        let setting = state
            .settings
            .entry(key.to_string())
            .or_insert_with(|| watch::channel(None).0);
        Ok(setting.subscribe())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_follow_the_design_layout() {
        let e = EndpointId::new("dynamo", "VllmWorker", "generate");
        assert_eq!(e.key(0x1f), "baton/dynamo/instances/VllmWorker/generate/1f");
        assert!(e.key(7).starts_with(&e.prefix()));
    }
}
