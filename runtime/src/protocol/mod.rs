//! Types the components exchange: what a request asks of the engine.

pub mod sampling;

pub use sampling::{InvalidParameter, SamplingParams, GREEDY_TEMPERATURE, MAX_LOGPROBS};
