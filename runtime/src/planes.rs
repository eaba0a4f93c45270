//! The planes of one graph, bundled: discovery, request plane, event plane and the prefill
//! work queue. Components take a [`Planes`] and never ask which kind it is, so the graph is
//! wired once: `baton serve` builds [`Planes::in_process`] and starts every component on it;
//! `baton run X` builds [`Planes::connect`] (NATS + etcd) and starts component X alone.

use std::sync::Arc;
use std::time::Duration;

use crate::discovery::{Discovery, MemoryDiscovery};
use crate::event_plane::{EventPlane, MemoryEventPlane};
use crate::request_plane::{MemoryRequestPlane, RequestPlane};
use crate::work_queue::{MemoryWorkQueue, WorkQueue};

/// What the planes need to know about the graph they serve.
#[derive(Debug, Clone)]
pub struct PlaneSettings {
    /// Prefix of every discovery key and subject.
    pub namespace: String,
    /// The served model: names the prefill queue's subject.
    pub model: String,
    /// How long a response stream may stay silent before the caller gives up on it.
    pub stream_timeout: Duration,
    /// Discovery lease TTL (etcd); a dead component leaves discovery within it.
    pub lease_ttl: Duration,
    /// How long a pulled prefill job may go unacknowledged before it is delivered again.
    pub prefill_ack_wait: Duration,
}

impl PlaneSettings {
    pub fn new(namespace: &str, model: &str) -> Self {
        Self {
            namespace: namespace.to_string(),
            model: model.to_string(),
            stream_timeout: Duration::from_secs(600),
            lease_ttl: Duration::from_secs(10),
            prefill_ack_wait: Duration::from_secs(300),
        }
    }
}

#[derive(Clone)]
pub struct Planes {
    pub discovery: Arc<dyn Discovery>,
    pub requests: Arc<dyn RequestPlane>,
    pub events: Arc<dyn EventPlane>,
    pub prefill_queue: Arc<dyn WorkQueue>,
    pub settings: PlaneSettings,
}

/// Event-plane subjects, in one place (DESIGN.md §2).
impl Planes {
    /// `{namespace}.load`: each decode worker's load, about once a second.
    pub fn load_subject(&self) -> String {
        format!("{}.load", self.settings.namespace)
    }

    /// `{namespace}.kv_events`: the workers' prefix-cache changes, for the KV router.
    pub fn kv_events_subject(&self) -> String {
        format!("{}.kv_events", self.settings.namespace)
    }
}

impl Planes {
    /// Every plane in this process: the whole graph runs in one `baton serve`.
    pub fn in_process(settings: PlaneSettings) -> Self {
        Self {
            discovery: Arc::new(MemoryDiscovery::new()),
            requests: Arc::new(MemoryRequestPlane::new(settings.stream_timeout)),
            events: Arc::new(MemoryEventPlane::new()),
            prefill_queue: Arc::new(MemoryWorkQueue::new(settings.prefill_ack_wait)),
            settings,
        }
    }

    /// NATS (request and event planes, JetStream queue) and etcd (discovery): each component
    /// its own process, as the seed runs Dynamo.
    #[cfg(feature = "network")]
    pub async fn connect(
        settings: PlaneSettings,
        nats_url: &str,
        etcd_endpoints: &[String],
    ) -> Result<Self, PlanesError> {
        use crate::discovery::EtcdDiscovery;
        use crate::event_plane::NatsEventPlane;
        use crate::request_plane::NatsRequestPlane;
        use crate::work_queue::JetStreamWorkQueue;

        let discovery = EtcdDiscovery::connect(etcd_endpoints, settings.lease_ttl).await?;
        let requests = NatsRequestPlane::connect(nats_url, settings.stream_timeout).await?;
        let events = NatsEventPlane::connect(nats_url).await?;
        let prefill_queue = JetStreamWorkQueue::connect(
            nats_url,
            &settings.namespace,
            &settings.model,
            settings.prefill_ack_wait,
        )
        .await?;
        Ok(Self {
            discovery: Arc::new(discovery),
            requests: Arc::new(requests),
            events: Arc::new(events),
            prefill_queue: Arc::new(prefill_queue),
            settings,
        })
    }
}

/// A plane that could not be reached; the message names which and where.
#[derive(Debug, thiserror::Error)]
pub enum PlanesError {
    #[error(transparent)]
    Discovery(#[from] crate::discovery::DiscoveryError),
    #[error(transparent)]
    RequestPlane(#[from] crate::request_plane::RequestPlaneError),
    #[error(transparent)]
    EventPlane(#[from] crate::event_plane::EventPlaneError),
    #[error(transparent)]
    WorkQueue(#[from] crate::work_queue::WorkQueueError),
}
