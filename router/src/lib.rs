//! The router picks the worker instance for each tokenized request and opens its response
//! stream on the request plane. It keeps the live instance list from discovery (a deleted
//! instance leaves routing at once) and asks a [`RoutingPolicy`] to choose. It runs inside the
//! frontend process, after the processor. KV-aware and load-based policies plug in behind the
//! same trait.

pub mod error;
pub mod policy;
pub mod router;

pub use error::RouterError;
pub use policy::{policy_from_name, Random, RoundRobin, RouteContext, RoutingPolicy};
pub use router::{Dispatch, Router};
