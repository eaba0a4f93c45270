//! What the router sends a worker and what the worker streams back over the request plane,
//! one JSON message per data frame. Tokens travel as ids; the frontend's processor turns them
//! into text, so workers never need a tokenizer.

use serde::{Deserialize, Serialize};

use super::SamplingParams;

/// A tokenized request, ready for an engine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerateRequest {
    pub request_id: String,
    pub token_ids: Vec<u32>,
    pub sampling: SamplingParams,
    /// Leading prompt blocks the router believed this worker caches when it chose it (the KV
    /// index's overlap); the worker's own prefix cache decides what is actually reused.
    #[serde(default)]
    pub router_overlap_blocks: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// EOS, a stop token, or (set by the processor) a stop string.
    Stop,
    /// `max_tokens` or the context limit.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// One sampled token's log-probability and, when asked for, the likeliest alternatives.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenLogprob {
    pub logprob: f32,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub top: Vec<(u32, f32)>,
}

/// New tokens of one request since the last message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenDelta {
    pub token_ids: Vec<u32>,
    /// Parallel to `token_ids` when the request asked for logprobs; empty otherwise.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub logprobs: Vec<TokenLogprob>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finish_reason: Option<FinishReason>,
    pub prompt_tokens: usize,
    /// Prompt tokens served from the prefix cache.
    pub cached_tokens: usize,
}

/// One data frame of a worker's response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum GenerateResponse {
    Tokens(TokenDelta),
    /// The worker refused the request before running it (too long for its context or KV
    /// cache, a bad parameter): the client's fault, so the frontend answers 4xx.
    Rejected {
        message: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        param: Option<String>,
    },
}

/// A worker's load as it reports it (the `{namespace}.load` event of DESIGN.md §2).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WorkerLoad {
    pub instance_id: u64,
    pub kv_blocks_used: usize,
    pub kv_blocks_total: usize,
    pub running: usize,
    pub waiting: usize,
    /// Prompt tokens found in the prefix cache, and prompt tokens looked up, since start.
    pub prefix_hit_tokens: u64,
    pub prefix_query_tokens: u64,
    /// Where its prefills ran, since start (zero when it never disaggregates).
    #[serde(default)]
    pub prefill: crate::protocol::prefill::PrefillCounters,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_round_trip_as_tagged_json() {
        let msgs = [
            GenerateResponse::Tokens(TokenDelta {
                token_ids: vec![5, 6],
                logprobs: vec![
                    TokenLogprob {
                        logprob: -0.5,
                        top: vec![(5, -0.5), (9, -1.0)],
                    },
                    TokenLogprob {
                        logprob: -0.1,
                        top: vec![],
                    },
                ],
                finish_reason: Some(FinishReason::Length),
                prompt_tokens: 3,
                cached_tokens: 0,
            }),
            GenerateResponse::Rejected {
                message: "too long".into(),
                param: Some("max_tokens".into()),
            },
        ];
        for m in msgs {
            let json = serde_json::to_string(&m).unwrap();
            assert_eq!(serde_json::from_str::<GenerateResponse>(&json).unwrap(), m);
        }
        let json = serde_json::to_value(GenerateResponse::Rejected {
            message: "x".into(),
            param: None,
        })
        .unwrap();
        assert_eq!(
            json,
            serde_json::json!({"type": "rejected", "message": "x"})
        );
    }
}
