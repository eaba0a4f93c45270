//! Work queue for remote prefills (DESIGN.md §2, §4), after Dynamo's JetStream prefill queue.
//! When the disaggregation rule sends a prefill remote, the decode worker enqueues it; prefill
//! workers share the queue, take one job at a time and ack it only after the KV blocks reached
//! the decode worker and it was notified. A job nobody acks (its worker died or stalled) goes
//! back to the queue after `ack_wait` and is delivered again with `delivery + 1`.
//! `MemoryWorkQueue` serves `baton serve` in one process; `JetStreamWorkQueue` is the same
//! contract over NATS JetStream for separate processes.

#[cfg(feature = "network")]
pub mod jetstream;
pub mod memory;

use async_trait::async_trait;

#[cfg(feature = "network")]
pub use jetstream::JetStreamWorkQueue;
pub use memory::MemoryWorkQueue;

#[derive(Debug, thiserror::Error)]
pub enum WorkQueueError {
    #[error("work queue unavailable at `{url}`: {reason}")]
    Unavailable { url: String, reason: String },
    #[error("JetStream `{op}` on `{target}` failed: {reason}")]
    JetStream {
        op: &'static str,
        target: String,
        reason: String,
    },
    #[error("work queue is closed")]
    Closed,
}

/// Settles one delivery of a job; each queue implementation supplies its own.
#[async_trait]
pub trait Acker: Send + Sync {
    async fn ack(self: Box<Self>) -> Result<(), WorkQueueError>;
    async fn nak(self: Box<Self>) -> Result<(), WorkQueueError>;
}

/// One delivery of a queued job. Dropping it without `ack` or `nak` leaves it in flight
/// until `ack_wait` passes, then it is delivered again — as when a worker dies mid-job.
pub struct Job {
    pub payload: Vec<u8>,
    /// 1 on first delivery.
    pub delivery: u64,
    acker: Box<dyn Acker>,
}

impl Job {
    pub fn new(payload: Vec<u8>, delivery: u64, acker: impl Acker + 'static) -> Self {
        Self {
            payload,
            delivery,
            acker: Box::new(acker),
        }
    }

    /// Done: the job leaves the queue for good.
    pub async fn ack(self) -> Result<(), WorkQueueError> {
        self.acker.ack().await
    }

    /// Give it back now for redelivery.
    pub async fn nak(self) -> Result<(), WorkQueueError> {
        self.acker.nak().await
    }
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job")
            .field("payload_len", &self.payload.len())
            .field("delivery", &self.delivery)
            .finish_non_exhaustive()
    }
}

#[async_trait]
pub trait WorkQueue: Send + Sync {
    async fn enqueue(&self, payload: Vec<u8>) -> Result<(), WorkQueueError>;

    /// Waits for the next job (None if the queue is closed).
    async fn next(&self) -> Result<Option<Job>, WorkQueueError>;

    /// Jobs waiting to be handed out (JetStream consumer num_pending); excludes in-flight.
    async fn pending(&self) -> Result<u64, WorkQueueError>;
}
