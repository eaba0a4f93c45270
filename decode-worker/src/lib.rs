//! The decode worker hosts an engine and serves it on the request plane: the router sends a
//! tokenized [`GenerateRequest`](runtime::protocol::GenerateRequest), the worker streams token
//! deltas back. The engine runs on its own thread ([`EngineHost`]); requests reach it as
//! commands between steps, so a cancelled stream frees its KV blocks before the next step.
//! It publishes its load and KV events, and answers routers that missed events from a ring
//! of recent ones or a dump of its cache (`kv_state`). Disaggregation (pushing long prefills
//! onto the JetStream queue) plugs in here later.

pub mod engine_host;
pub mod error;
pub mod kv_state;
pub mod service;

pub use engine_host::{EngineEvent, EngineHost};
pub use error::WorkerError;
pub use service::{worker_endpoint, DecodeWorker};
