//! Routing policies: one trait, one file per policy (SGLang's gateway layout). A policy sees
//! the live instances, the request's tokens and block hashes and the router's view of each
//! worker's load, and returns a typed [`Selection`]; the router calls its hooks as the request
//! is dispatched, sends its first token and finishes, so stateful policies (load counts, a KV
//! index learning from its own decisions) keep their books without the router knowing how.

mod random;
mod round_robin;

use std::collections::HashMap;

pub use random::Random;
pub use round_robin::RoundRobin;

use runtime::block_hash::BlockHash;
use runtime::discovery::Instance;
use runtime::protocol::WorkerLoad;

use crate::error::RouterError;

/// What a policy may look at to choose.
pub struct RouteContext<'a> {
    pub request_id: &'a str,
    pub token_ids: &'a [u32],
    /// Chained hashes of the prompt's full blocks (DESIGN.md §5), for KV-aware policies.
    pub block_hashes: &'a [BlockHash],
    /// The instances the request may go to (never empty; a retry leaves out the failed one).
    pub instances: &'a [Instance],
    /// The latest load each worker reported, by instance id (missing: not heard from yet).
    pub loads: &'a HashMap<u64, WorkerLoad>,
}

/// The instance a policy chose, with what it learned on the way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selection {
    pub instance_id: u64,
    /// Leading prompt blocks the policy believes the instance already caches.
    pub overlap_blocks: usize,
}

impl Selection {
    pub fn of(instance: &Instance) -> Self {
        Self {
            instance_id: instance.instance_id,
            overlap_blocks: 0,
        }
    }
}

/// Every instance is full by the policy's measure: the caller should answer "busy".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("every worker is at capacity")]
pub struct NoCapacity;

pub trait RoutingPolicy: Send + Sync {
    fn name(&self) -> &'static str;

    /// The instance (one of `ctx.instances`) to send the request to.
    fn select(&self, ctx: &RouteContext<'_>) -> Result<Selection, NoCapacity>;

    /// The request was sent to `selection`.
    fn on_dispatch(&self, _request_id: &str, _selection: &Selection, _ctx: &RouteContext<'_>) {}

    /// Its first token came back: its prefill is over.
    fn on_first_token(&self, _request_id: &str, _instance_id: u64) {}

    /// It ended on that instance (finished, failed, cancelled, or moved to another instance).
    fn on_finish(&self, _request_id: &str, _instance_id: u64) {}
}

/// The policy for a config or CLI name.
pub fn policy_from_name(name: &str) -> Result<Box<dyn RoutingPolicy>, RouterError> {
    match name {
        "round-robin" | "round_robin" => Ok(Box::new(RoundRobin::default())),
        "random" => Ok(Box::new(Random)),
        other => Err(RouterError::UnknownPolicy(other.to_string())),
    }
}
