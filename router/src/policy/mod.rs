//! Routing policies: one trait, one file per policy (SGLang's gateway layout). A policy sees
//! each candidate worker with what the router knows of it — the prompt blocks it caches (from
//! the KV indexer), the router's own live accounting of the requests it sent there (shared by
//! every router of the namespace), and the load the worker last reported — and returns a typed
//! [`Selection`]; the router calls its hooks as the request is dispatched, sends its first
//! token and finishes, so stateful policies keep their books without the router knowing how.

mod kv;
mod least_loaded;
mod power_of_two;
mod random;
mod round_robin;

pub use kv::{KvCostConfig, KvRouting};
pub use least_loaded::LeastLoaded;
pub use power_of_two::PowerOfTwo;
pub use random::Random;
pub use round_robin::RoundRobin;

use runtime::block_hash::BlockHash;
use runtime::discovery::Instance;
use runtime::protocol::WorkerLoad;

use crate::error::RouterError;

/// The router's live accounting of one worker (DESIGN.md §5 "predictive accounting"): what
/// every router of the namespace has sent there and not yet seen finish.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct WorkerCounts {
    pub active_requests: usize,
    /// Prompt tokens of requests that have not sent their first token yet (prefill pending).
    pub prefill_tokens: usize,
    /// KV blocks of the active requests' prompts.
    pub active_blocks: usize,
}

/// One worker the request may go to, with what the router knows of it.
#[derive(Debug, Clone)]
pub struct Candidate<'a> {
    pub instance: &'a Instance,
    /// Leading prompt blocks the KV indexer says the worker caches.
    pub overlap_blocks: usize,
    /// Blocks the KV indexer holds for the worker (its cache's size as the router sees it).
    pub cached_blocks: usize,
    pub counts: WorkerCounts,
    /// Prompt blocks of this router's recent decisions for it, each decision's weight decaying
    /// by 0.9 per later decision (a load signal that outlives the requests).
    pub recent_blocks: f64,
    /// The load it last reported (`None`: not heard from yet).
    pub reported: Option<&'a WorkerLoad>,
}

impl Candidate<'_> {
    pub fn id(&self) -> u64 {
        self.instance.instance_id
    }
}

/// What a policy may look at to choose.
pub struct RouteContext<'a> {
    pub request_id: &'a str,
    pub token_ids: &'a [u32],
    /// Chained hashes of the prompt's full blocks (DESIGN.md §5).
    pub block_hashes: &'a [BlockHash],
    /// Tokens per KV block.
    pub block_size: usize,
    /// The workers the request may go to (never empty; a retry leaves out the failed one).
    pub candidates: &'a [Candidate<'a>],
}

impl RouteContext<'_> {
    /// KV blocks the prompt will occupy (a partial last block counts).
    pub fn prompt_blocks(&self) -> usize {
        self.token_ids.len().div_ceil(self.block_size.max(1))
    }
}

/// The instance a policy chose, with what it learned on the way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selection {
    pub instance_id: u64,
    /// Leading prompt blocks the router believes the instance already caches.
    pub overlap_blocks: usize,
}

impl Selection {
    pub fn of(candidate: &Candidate<'_>) -> Self {
        Self {
            instance_id: candidate.id(),
            overlap_blocks: candidate.overlap_blocks,
        }
    }
}

/// Every instance is full by the policy's measure: the caller should answer "busy".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("every worker is at capacity")]
pub struct NoCapacity;

pub trait RoutingPolicy: Send + Sync {
    fn name(&self) -> &'static str;

    /// The instance (one of `ctx.candidates`) to send the request to.
    fn select(&self, ctx: &RouteContext<'_>) -> Result<Selection, NoCapacity>;

    /// The request was sent to `selection`.
    fn on_dispatch(&self, _request_id: &str, _selection: &Selection, _ctx: &RouteContext<'_>) {}

    /// Its first token came back: its prefill is over.
    fn on_first_token(&self, _request_id: &str, _instance_id: u64) {}

    /// It ended on that instance (finished, failed, cancelled, or moved to another instance).
    fn on_finish(&self, _request_id: &str, _instance_id: u64) {}
}

/// The policy names `--router` accepts.
pub const POLICY_NAMES: &str = "round-robin, random, least-loaded, power-of-two or kv";

/// The policy for a config or CLI name; `kv` is configured by `kv`.
pub fn policy_from_name(
    name: &str,
    kv: KvCostConfig,
) -> Result<Box<dyn RoutingPolicy>, RouterError> {
    match name {
        "round-robin" | "round_robin" => Ok(Box::new(RoundRobin::default())),
        "random" => Ok(Box::new(Random)),
        "least-loaded" | "least_loaded" => Ok(Box::new(LeastLoaded)),
        "power-of-two" | "power_of_two" => Ok(Box::new(PowerOfTwo)),
        "kv" => Ok(Box::new(KvRouting::new(kv)?)),
        other => Err(RouterError::UnknownPolicy(other.to_string())),
    }
}

/// A uniformly random index among `0..n` for which `keep` holds (`n` > 0 and one must hold).
pub(crate) fn random_among(n: usize, keep: impl Fn(usize) -> bool) -> usize {
    let tied: Vec<usize> = (0..n).filter(|&i| keep(i)).collect();
    tied[rand::random_range(0..tied.len())]
}
