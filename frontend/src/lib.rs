//! The frontend is where a request enters Baton: an OpenAI-compatible HTTP API (axum) whose
//! requests go through the processor (tokenize, chat template) to the router, which picks a
//! worker; the worker's token stream comes back through the processor (detokenize, stop
//! strings) and leaves as OpenAI JSON or server-sent-event chunks. Metrics, health, auth and
//! admission limits live here too.

pub mod admission;
pub mod error;
pub mod generation;
pub mod metrics;
mod prefill_metrics;
pub mod protocol;
mod routes;
pub mod server;
pub mod state;

pub use error::ApiError;
pub use metrics::Metrics;
pub use routes::app;
pub use server::{bind, serve, ServeError};
pub use state::{AdminSettings, AppState, FrontendConfig};
