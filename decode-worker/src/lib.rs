//! The decode worker hosts an engine and serves it on the request plane: the router sends a
//! tokenized [`GenerateRequest`](runtime::protocol::GenerateRequest), the worker streams token
//! deltas back. The engine runs on its own thread ([`EngineHost`]); requests reach it as
//! commands between steps, so a cancelled stream frees its KV blocks before the next step.
//! It publishes its load and KV events, and answers routers that missed events from a ring
//! of recent ones or a dump of its cache (`kv_state`). With disaggregation, the seed's rule
//! (`disagg`) sends long uncached prompts to the prefill queue: their blocks are reserved, a
//! prefill worker claims the job, writes the KV into this worker's cache (a kv-transfer sink)
//! and reports done, and the request decodes on in the batch (`remote_prefill`: the claims,
//! completions and fallbacks).

pub mod disagg;
pub mod engine_host;
pub mod error;
pub mod kv_state;
pub mod remote_prefill;
pub mod service;

pub use disagg::{disagg_setting_key, DisaggConfig, DisaggState, DisaggThresholds, Placement};
pub use engine_host::{EngineEvent, EngineHost, HostDisagg};
pub use error::WorkerError;
pub use service::{worker_endpoint, DecodeWorker, Disaggregation, KV_TRANSFER_KEY};
