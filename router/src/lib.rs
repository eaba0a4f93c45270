//! The router picks the worker instance for each tokenized request and opens its response
//! stream on the request plane. It runs inside the frontend process, after the processor. It
//! keeps the live instance list from discovery (a deleted instance leaves routing at once) and
//! the load each worker reports on the event plane, asks a [`RoutingPolicy`] to choose, and
//! moves a request whose worker fails before its first token to another worker
//! ([`RoutedStream`]). Load-based and KV-aware policies plug in behind the same trait.

pub mod error;
pub mod policy;
pub mod router;
pub mod stream;

pub use error::RouterError;
pub use policy::{
    policy_from_name, NoCapacity, Random, RoundRobin, RouteContext, RoutingPolicy, Selection,
};
pub use router::{Router, RouterOptions};
pub use stream::RoutedStream;
