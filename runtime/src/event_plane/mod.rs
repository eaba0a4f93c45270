//! The event plane: fire-and-forget pub/sub beside the request plane (DESIGN.md §2). Workers
//! publish KV cache events on `{namespace}.kv_events` and their load on `{namespace}.load`; the
//! router and frontend subscribe to pick a worker for the next request (KV-aware routing, load
//! balancing). Nothing on a request's path waits for an event, so delivery is best effort: a
//! subscriber sees what is published after it subscribed, while it is connected. In-process
//! (`memory.rs`) for `baton serve`, NATS core subjects (`nats.rs`) for `baton run`.

pub mod memory;
#[cfg(feature = "network")]
pub mod nats;

use async_trait::async_trait;
use tokio::sync::mpsc;

pub use memory::MemoryEventPlane;
#[cfg(feature = "network")]
pub use nats::NatsEventPlane;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EventPlaneError {
    #[error("cannot connect to the event plane at `{url}`: {reason}")]
    Connect { url: String, reason: String },
    #[error("cannot publish on `{subject}`: {reason}")]
    Publish { subject: String, reason: String },
    #[error("cannot subscribe to `{subject}`: {reason}")]
    Subscribe { subject: String, reason: String },
}

#[async_trait]
pub trait EventPlane: Send + Sync {
    async fn publish(&self, subject: &str, payload: Vec<u8>) -> Result<(), EventPlaneError>;

    /// Every message published on `subject` after this call, until the receiver is dropped.
    /// Subjects are matched exactly: the in-process plane has no wildcards.
    async fn subscribe(
        &self,
        subject: &str,
    ) -> Result<mpsc::UnboundedReceiver<Vec<u8>>, EventPlaneError>;
}
