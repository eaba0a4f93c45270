//! The router picks the worker instance for each tokenized request and opens its response
//! stream on the request plane. It runs inside the frontend process, after the processor. It
//! keeps the live instance list from discovery (a deleted instance leaves routing at once),
//! the load each worker reports, its own live accounting of what it sent where (shared with
//! the other routers of the namespace: `load_book`), and an index of which worker caches which
//! prompt blocks, fed by the workers' KV events (`kv_view`, `indexer`). A [`RoutingPolicy`]
//! chooses; [`RoutedStream`] moves a request whose worker fails before its first token to
//! another worker, and — within `--migration-limit` — one whose worker dies mid-stream, with
//! the tokens generated so far.

pub mod error;
pub mod indexer;
mod kv_view;
mod load_book;
pub mod metrics;
pub mod policy;
pub mod router;
pub mod stream;

pub use error::RouterError;
pub use kv_view::KvMode;
pub use load_book::RouterLoadReport;
pub use metrics::RouterMetrics;
pub use policy::{
    policy_from_name, Candidate, KvCostConfig, KvRouting, LeastLoaded, NoCapacity, PowerOfTwo,
    Random, RoundRobin, RouteContext, RoutingPolicy, Selection, WorkerCounts, POLICY_NAMES,
};
pub use router::{router_load_subject, Router, RouterOptions};
pub use stream::RoutedStream;
