//! Types the components exchange: what a request asks of the engine, and what comes back.

pub mod generate;
pub mod sampling;

pub use generate::{
    FinishReason, GenerateRequest, GenerateResponse, TokenDelta, TokenLogprob, WorkerLoad,
};
pub use sampling::{InvalidParameter, SamplingParams, GREEDY_TEMPERATURE, MAX_LOGPROBS};
