//! Per-request sampling parameters, with the OpenAI/vLLM names, defaults and ranges. They live
//! in the runtime because the frontend validates them and the engine samples with them: one
//! definition of each range for both.

use serde::{Deserialize, Serialize};

/// A sampling parameter out of its range; the message names it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("invalid parameter `{param}`: {reason}")]
pub struct InvalidParameter {
    pub param: &'static str,
    pub reason: String,
}

/// Below this temperature a request is greedy; vLLM's `_SAMPLING_EPS`. Dividing logits by a
/// smaller number only overflows towards what argmax already gives.
pub const GREEDY_TEMPERATURE: f32 = 1e-5;

/// The most `logprobs` alternatives a request may ask for (the OpenAI limit).
pub const MAX_LOGPROBS: usize = 20;

/// How one request's next tokens are chosen, and when it stops.
///
/// Missing fields deserialize to their [`Default`], so a request names only what it changes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SamplingParams {
    /// Softmax temperature; below [`GREEDY_TEMPERATURE`] the argmax is taken.
    pub temperature: f32,
    /// Nucleus sampling: keep the smallest set of likeliest tokens whose probability reaches
    /// `top_p`. 1.0 turns it off; range (0, 1].
    pub top_p: f32,
    /// Keep only the `top_k` likeliest tokens; 0 turns it off.
    pub top_k: usize,
    /// Drop tokens less likely than `min_p` times the likeliest one; 0 turns it off; range [0, 1].
    pub min_p: f32,
    /// Seeds the sequence's own random stream, so its samples do not depend on the batch.
    pub seed: Option<u64>,
    /// Subtracted once from the logit of every token already in the output; range [-2, 2].
    pub presence_penalty: f32,
    /// Subtracted from a token's logit once per occurrence in the output; range [-2, 2].
    pub frequency_penalty: f32,
    /// Divides positive (multiplies negative) logits of tokens seen in the prompt or output;
    /// 1.0 turns it off; must be > 0.
    pub repetition_penalty: f32,
    /// `Some(n)`: return the sampled token's logprob and the `n` likeliest alternatives
    /// (`n` ≤ [`MAX_LOGPROBS`]).
    pub logprobs: Option<usize>,
    /// Most tokens to generate; at least 1.
    pub max_tokens: usize,
    /// EOS and stop tokens are suppressed until this many tokens are generated.
    pub min_tokens: usize,
    /// Keep generating past EOS (benchmarks use it to fix the output length).
    pub ignore_eos: bool,
    /// Token ids that end generation besides EOS.
    pub stop_token_ids: Vec<u32>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            seed: None,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
            logprobs: None,
            max_tokens: 16,
            min_tokens: 0,
            ignore_eos: false,
            stop_token_ids: Vec::new(),
        }
    }
}

impl SamplingParams {
    /// Argmax decoding of up to `max_tokens` tokens, every other knob off.
    pub fn greedy(max_tokens: usize) -> Self {
        Self {
            max_tokens,
            ..Self::default()
        }
    }

    /// Checks every field, naming the first bad one.
    pub fn validate(&self) -> Result<(), InvalidParameter> {
        let invalid = |param: &'static str, reason: String| Err(InvalidParameter { param, reason });
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return invalid(
                "temperature",
                format!("must be a finite number >= 0, got {}", self.temperature),
            );
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return invalid("top_p", format!("must be in (0, 1], got {}", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return invalid("min_p", format!("must be in [0, 1], got {}", self.min_p));
        }
        if !(-2.0..=2.0).contains(&self.presence_penalty) {
            return invalid(
                "presence_penalty",
                format!("must be in [-2, 2], got {}", self.presence_penalty),
            );
        }
        if !(-2.0..=2.0).contains(&self.frequency_penalty) {
            return invalid(
                "frequency_penalty",
                format!("must be in [-2, 2], got {}", self.frequency_penalty),
            );
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return invalid(
                "repetition_penalty",
                format!(
                    "must be a finite number > 0, got {}",
                    self.repetition_penalty
                ),
            );
        }
        if let Some(n) = self.logprobs {
            if n > MAX_LOGPROBS {
                return invalid(
                    "logprobs",
                    format!("must be at most {MAX_LOGPROBS}, got {n}"),
                );
            }
        }
        if self.max_tokens == 0 {
            return invalid("max_tokens", "must be at least 1".to_string());
        }
        if self.min_tokens > self.max_tokens {
            return invalid(
                "min_tokens",
                format!(
                    "must not exceed `max_tokens` {}, got {}",
                    self.max_tokens, self.min_tokens
                ),
            );
        }
        Ok(())
    }

    /// Whether the next token is the argmax (no random draw, no rng advance).
    pub fn is_greedy(&self) -> bool {
        self.temperature < GREEDY_TEMPERATURE
    }

    /// Whether the presence or frequency penalty is on; both count the output tokens.
    pub fn has_output_penalties(&self) -> bool {
        self.presence_penalty != 0.0 || self.frequency_penalty != 0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rejected_param(params: SamplingParams) -> &'static str {
        match params.validate() {
            Err(InvalidParameter { param, .. }) => param,
            other => panic!("expected InvalidParameter, got {other:?}"),
        }
    }

    #[test]
    fn defaults_are_greedy_and_valid() {
        let params = SamplingParams::default();
        assert!(params.is_greedy());
        assert!(!params.has_output_penalties());
        assert_eq!(params.max_tokens, 16);
        params.validate().unwrap();
        assert_eq!(SamplingParams::greedy(7).max_tokens, 7);
        SamplingParams::greedy(1).validate().unwrap();
    }

    #[test]
    fn edge_values_are_accepted() {
        SamplingParams {
            temperature: 2.0,
            top_p: 1.0,
            top_k: 1,
            min_p: 1.0,
            presence_penalty: -2.0,
            frequency_penalty: 2.0,
            repetition_penalty: 0.01,
            logprobs: Some(MAX_LOGPROBS),
            min_tokens: 16,
            ..SamplingParams::default()
        }
        .validate()
        .unwrap();
        SamplingParams {
            logprobs: Some(0),
            ..SamplingParams::default()
        }
        .validate()
        .unwrap();
    }

    #[test]
    fn validate_names_each_bad_field() {
        let base = SamplingParams::default;
        let cases: Vec<(SamplingParams, &str)> = vec![
            (
                SamplingParams {
                    temperature: -0.1,
                    ..base()
                },
                "temperature",
            ),
            (
                SamplingParams {
                    temperature: f32::NAN,
                    ..base()
                },
                "temperature",
            ),
            (
                SamplingParams {
                    temperature: f32::INFINITY,
                    ..base()
                },
                "temperature",
            ),
            (
                SamplingParams {
                    top_p: 0.0,
                    ..base()
                },
                "top_p",
            ),
            (
                SamplingParams {
                    top_p: 1.01,
                    ..base()
                },
                "top_p",
            ),
            (
                SamplingParams {
                    top_p: f32::NAN,
                    ..base()
                },
                "top_p",
            ),
            (
                SamplingParams {
                    min_p: -0.01,
                    ..base()
                },
                "min_p",
            ),
            (
                SamplingParams {
                    min_p: 1.5,
                    ..base()
                },
                "min_p",
            ),
            (
                SamplingParams {
                    min_p: f32::NAN,
                    ..base()
                },
                "min_p",
            ),
            (
                SamplingParams {
                    presence_penalty: 2.5,
                    ..base()
                },
                "presence_penalty",
            ),
            (
                SamplingParams {
                    presence_penalty: f32::NAN,
                    ..base()
                },
                "presence_penalty",
            ),
            (
                SamplingParams {
                    frequency_penalty: -2.5,
                    ..base()
                },
                "frequency_penalty",
            ),
            (
                SamplingParams {
                    repetition_penalty: 0.0,
                    ..base()
                },
                "repetition_penalty",
            ),
            (
                SamplingParams {
                    repetition_penalty: -1.0,
                    ..base()
                },
                "repetition_penalty",
            ),
            (
                SamplingParams {
                    repetition_penalty: f32::NAN,
                    ..base()
                },
                "repetition_penalty",
            ),
            (
                SamplingParams {
                    logprobs: Some(21),
                    ..base()
                },
                "logprobs",
            ),
            (
                SamplingParams {
                    max_tokens: 0,
                    min_tokens: 0,
                    ..base()
                },
                "max_tokens",
            ),
            (
                SamplingParams {
                    max_tokens: 4,
                    min_tokens: 5,
                    ..base()
                },
                "min_tokens",
            ),
        ];
        for (params, field) in cases {
            assert_eq!(rejected_param(params.clone()), field, "{params:?}");
        }
    }

    #[test]
    fn error_message_names_the_parameter() {
        let err = SamplingParams {
            top_p: 0.0,
            ..SamplingParams::default()
        }
        .validate()
        .unwrap_err();
        let message = err.to_string();
        assert!(message.contains("`top_p`"), "{message}");
        assert!(message.contains("(0, 1]"), "{message}");
    }

    #[test]
    fn missing_fields_deserialize_to_defaults() {
        let params: SamplingParams =
            serde_json::from_str(r#"{"temperature": 0.7, "seed": 3}"#).unwrap();
        assert_eq!(
            params,
            SamplingParams {
                temperature: 0.7,
                seed: Some(3),
                ..SamplingParams::default()
            }
        );
        assert!(!params.is_greedy());
    }
}
