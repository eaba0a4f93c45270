//! Routing policies: one trait, one file per policy (SGLang's gateway layout).

mod random;
mod round_robin;

pub use random::Random;
pub use round_robin::RoundRobin;

use runtime::discovery::Instance;

use crate::error::RouterError;

/// What a policy may look at besides the instances.
pub struct RouteContext<'a> {
    pub request_id: &'a str,
    pub token_ids: &'a [u32],
}

pub trait RoutingPolicy: Send + Sync {
    fn name(&self) -> &'static str;

    /// The index into `instances` (never empty) to send the request to.
    fn select(&self, instances: &[Instance], request: &RouteContext<'_>) -> usize;
}

/// The policy for a config or CLI name.
pub fn policy_from_name(name: &str) -> Result<Box<dyn RoutingPolicy>, RouterError> {
    match name {
        "round-robin" | "round_robin" => Ok(Box::new(RoundRobin::default())),
        "random" => Ok(Box::new(Random)),
        other => Err(RouterError::UnknownPolicy(other.to_string())),
    }
}
