//! The engine: what a decode or prefill worker runs. A worker hands it token ids with sampling
//! parameters; the scheduler batches running sequences step by step (continuous batching,
//! chunked prefill, preemption), the block manager gives each sequence 128-token KV blocks from a
//! paged cache with prefix reuse and reports Stored/Removed events for the KV router, and the
//! executor runs the Llama model on tch (CPU or CUDA), or `mock` simulates a 70B on H100/H200s
//! with a roofline step time. Tokens go back to the worker as they are
//! sampled; text is the processor's business, not the engine's.

pub mod block_manager;
pub mod builder;
pub mod card;
pub mod config;
pub mod engine;
pub mod error;
pub mod executor;
pub mod export;
pub mod host_memory;
pub mod host_threads;
pub mod kv_cache;
pub mod loader;
pub mod mock;
pub mod model;
pub mod sampler;
pub mod scheduler;
pub mod sequence;
pub mod weights;

#[cfg(test)]
mod test_child;

pub use builder::{
    auto_kind, build_engine, mock_engine, parse_device, parse_kind, resolve_kind, EngineOptions,
    SharedModel,
};
pub use card::ModelCard;
pub use config::{LlamaConfig, RopeScaling};
pub use engine::{
    Engine, EngineConfig, EngineStats, FinishReason, PromptUsage, RemotePrefillSlot, Request,
    RequestOutput,
};
pub use error::{AdmissionError, EngineError, Result};
pub use executor::{Executor, ModelExecutor, StepOutput};
pub use sampler::{SampledToken, SamplingParams};
