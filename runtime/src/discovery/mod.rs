//! Discovery: which worker instances exist and how to reach them (DESIGN.md §2). Instances
//! register under a lease; watchers see puts and deletes, and a deleted instance leaves
//! routing at once. The in-memory implementation serves `baton serve` in one process; the
//! etcd one (the distributed-runtime issue) keeps the same keys and semantics.

#[cfg(feature = "network")]
pub mod etcd;
pub mod memory;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};

#[cfg(feature = "network")]
pub use etcd::EtcdDiscovery;
pub use memory::MemoryDiscovery;

#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("discovery backend unavailable at `{url}`: {reason}")]
    Unavailable { url: String, reason: String },
    #[error("discovery backend failed: {0}")]
    Backend(String),
    #[error("etcd `{op}` at `{url}` failed: {reason}")]
    Etcd {
        op: &'static str,
        url: String,
        reason: String,
    },
    /// `EtcdDiscovery::shutdown` was called; the handle takes no more registrations or watches.
    #[error("discovery was shut down")]
    ShutDown,
}

pub type Result<T> = std::result::Result<T, DiscoveryError>;

/// Where an instance lives in the namespace: `{component}/{endpoint}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct EndpointId {
    pub namespace: String,
    pub component: String,
    pub endpoint: String,
}

impl EndpointId {
    pub fn new(namespace: &str, component: &str, endpoint: &str) -> Self {
        Self {
            namespace: namespace.into(),
            component: component.into(),
            endpoint: endpoint.into(),
        }
    }

    /// Key prefix of every instance of this endpoint.
    pub fn prefix(&self) -> String {
        format!(
            "baton/{}/instances/{}/{}/",
            self.namespace, self.component, self.endpoint
        )
    }

    /// `baton/{namespace}/instances/{component}/{endpoint}/{instance_id:x}`.
    pub fn key(&self, instance_id: u64) -> String {
        format!("{}{instance_id:x}", self.prefix())
    }
}

/// What a registered instance publishes about itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Instance {
    pub endpoint: EndpointId,
    /// The lease id in etcd; unique per live registration.
    pub instance_id: u64,
    /// Request-plane address (a NATS subject, or the in-process registry name).
    pub address: String,
    pub model: Option<String>,
    /// Backend-specific extras (a decode worker's KV-transfer descriptor).
    #[serde(default)]
    pub metadata: serde_json::Value,
}

/// What a registering component supplies; discovery assigns the instance id.
#[derive(Debug, Clone)]
pub struct InstanceSpec {
    pub endpoint: EndpointId,
    pub address: String,
    pub model: Option<String>,
    pub metadata: serde_json::Value,
}

#[derive(Debug, Clone, PartialEq)]
pub enum DiscoveryEvent {
    Put(Instance),
    Delete { instance_id: u64 },
}

/// A live registration. Dropping it withdraws the instance (revokes the lease).
pub struct Registration {
    pub instance: Instance,
    _guard: Box<dyn Send + Sync>,
}

impl Registration {
    pub fn new(instance: Instance, guard: impl Send + Sync + 'static) -> Self {
        Self {
            instance,
            _guard: Box::new(guard),
        }
    }
}

#[async_trait]
pub trait Discovery: Send + Sync {
    async fn register(&self, spec: InstanceSpec) -> Result<Registration>;

    /// The endpoint's instances now, and every later change to them.
    async fn watch(
        &self,
        endpoint: &EndpointId,
    ) -> Result<(Vec<Instance>, mpsc::UnboundedReceiver<DiscoveryEvent>)>;

    /// Stores a graph-wide setting (no lease: it outlives whoever wrote it) under `key`
    /// ([`setting_key`]).
    async fn put_setting(&self, key: &str, value: serde_json::Value) -> Result<()>;

    /// The setting's value now (`None` when unset).
    async fn get_setting(&self, key: &str) -> Result<Option<serde_json::Value>>;

    /// The setting's value now (`None` when unset) and, through the receiver, every later put;
    /// the watch resumes by itself after the backend reconnects.
    async fn watch_setting(&self, key: &str) -> Result<watch::Receiver<Option<serde_json::Value>>>;
}

/// Where decode workers of `namespace` register (DESIGN.md §2); prefill workers find their
/// KV descriptors there.
pub fn decode_worker_endpoint(namespace: &str) -> EndpointId {
    EndpointId::new(namespace, "decode-worker", "generate")
}

/// Where graph-wide settings live: `baton/{namespace}/settings/{name}`.
pub fn setting_key(namespace: &str, name: &str) -> String {
    format!("baton/{namespace}/settings/{name}")
}
