//! The frontend is where a request enters Baton: an OpenAI-compatible HTTP API whose requests
//! go to the processor (tokenize, template) and the router, and whose responses stream back as
//! OpenAI chunks. Today it holds the wire protocol — request parsing with OpenAI's and vLLM's
//! field rules, and the error shape; the axum server comes with the rest of the serving path.

pub mod error;
pub mod protocol;

pub use error::ApiError;
