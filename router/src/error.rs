//! Router errors: what failed on the way to a worker and back.

use runtime::request_plane::RequestPlaneError;

#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    #[error("no worker instance is available for `{0}`")]
    NoInstances(String),
    #[error(transparent)]
    NoCapacity(#[from] crate::policy::NoCapacity),
    /// A policy bug, not the client's: it named an instance it was not offered.
    #[error("routing policy `{policy}` chose instance {instance_id:x}, which is not a candidate")]
    UnknownSelection {
        policy: &'static str,
        instance_id: u64,
    },
    #[error("unknown routing policy `{0}` (use {names})", names = crate::policy::POLICY_NAMES)]
    UnknownPolicy(String),
    #[error("`--{name}` {value} is invalid: {reason}")]
    InvalidOption {
        name: &'static str,
        value: String,
        reason: &'static str,
    },
    #[error("only {have} of the {want} workers `Router.min-workers` asks for registered within {waited:?}")]
    TooFewWorkers {
        have: usize,
        want: usize,
        waited: std::time::Duration,
    },
    /// The worker reported an error for this request (its engine failed it).
    #[error("generation failed: the worker sent an error: {0}")]
    Worker(String),
    /// The worker went away before the request finished (and it could not be moved).
    #[error("generation failed: {0}")]
    Lost(String),
    #[error("malformed worker response: {0}")]
    Malformed(String),
    /// The chosen worker did not take the request: its address had no server (it died, or
    /// has not re-subscribed yet), it left discovery while the request waited to be accepted
    /// (a stalled process), or it never accepted it. The stream retries elsewhere, avoiding it.
    #[error("worker {instance_id:x} did not take the request at `{address}`: {reason}")]
    Vanished {
        instance_id: u64,
        address: String,
        reason: String,
    },
    #[error(transparent)]
    RequestPlane(RequestPlaneError),
    #[error(transparent)]
    Discovery(#[from] runtime::discovery::DiscoveryError),
    #[error(transparent)]
    EventPlane(#[from] runtime::event_plane::EventPlaneError),
}
