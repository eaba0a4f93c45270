//! The prefill worker: the far end of disaggregation (DESIGN.md §4). It pulls
//! `RemotePrefillRequest`s from the shared prefill queue (JetStream's durable pull consumer, or
//! the in-process queue of `baton serve`), claims each from its decode worker (a job whose
//! request was cancelled, timed out or served is dropped here), prefills the prompt in its own
//! engine (its own prefix cache saves repeated prefixes), writes the new KV blocks into the
//! decode worker's reserved blocks through kv-transfer, reports done with the first token, and
//! only then acks. Dying before the ack gets the job delivered again; the decode worker accepts
//! one completion per request.

mod host;
mod worker;

pub use host::{PrefillHost, Prefilled};
pub use worker::{PrefillOptions, PrefillWorker};

#[derive(Debug, thiserror::Error)]
pub enum PrefillError {
    #[error("the prefill engine stopped")]
    EngineStopped,
    #[error("cannot start the prefill engine thread: {0}")]
    Spawn(std::io::Error),
    #[error("prefill refused: {0}")]
    Refused(String),
    #[error("prefill failed: {0}")]
    Failed(String),
}
