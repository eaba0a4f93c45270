//! Types the components exchange: what a request asks of the engine, and what comes back.

pub mod generate;
pub mod prefill;
pub mod sampling;

pub use generate::{
    FinishReason, GenerateRequest, GenerateResponse, TokenDelta, TokenLogprob, WorkerLoad,
};
pub use prefill::{
    ClaimGrant, DisaggThresholds, NoticeReply, PrefillCounters, PrefillNotice,
    RemotePrefillRequest, KV_TRANSFER_KEY, TRANSFER_SECONDS_BUCKETS,
};
pub use sampling::{InvalidParameter, SamplingParams, GREEDY_TEMPERATURE, MAX_LOGPROBS};
