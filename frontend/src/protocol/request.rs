//! `/v1/chat/completions` and `/v1/completions` request bodies.

use runtime::protocol::SamplingParams;
use serde::Deserialize;

use crate::ApiError;

/// Most stop strings one request may give. OpenAI allows 4 and vLLM any number; Baton is
/// lenient but bounded.
pub const MAX_STOP_STRINGS: usize = 64;
/// Longest stop string, in bytes.
pub const MAX_STOP_BYTES: usize = 1024;

/// Fields both endpoints share: sampling, lengths, stop conditions, streaming.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct CommonParams {
    pub max_tokens: Option<u32>,
    /// OpenAI's newer name; wins over `max_tokens`.
    pub max_completion_tokens: Option<u32>,
    pub min_tokens: Option<u32>,
    pub ignore_eos: Option<bool>,
    /// NVIDIA's extension block (Dynamo, genai-perf send `nvext.ignore_eos`).
    pub nvext: Option<NvExt>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    /// vLLM's extension; -1 or 0 turn it off.
    pub top_k: Option<i64>,
    pub min_p: Option<f32>,
    pub seed: Option<u64>,
    pub stop: Option<StopStrings>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub n: Option<u32>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
}

impl CommonParams {
    pub fn max_tokens(&self) -> Option<u32> {
        self.max_completion_tokens.or(self.max_tokens)
    }

    /// The field [`Self::max_tokens`] came from, for errors to name what the client sent.
    pub fn max_tokens_field(&self) -> &'static str {
        if self.max_completion_tokens.is_some() {
            "max_completion_tokens"
        } else {
            "max_tokens"
        }
    }

    /// Top level or inside `nvext`; either one set to true counts.
    pub fn ignore_eos(&self) -> bool {
        self.ignore_eos.unwrap_or(false)
            || self
                .nvext
                .as_ref()
                .and_then(|n| n.ignore_eos)
                .unwrap_or(false)
    }

    pub fn include_usage(&self) -> bool {
        self.stream_options
            .as_ref()
            .is_some_and(|o| o.include_usage)
    }

    /// The engine's parameters for this request, checked with the engine's own ranges.
    /// `max_tokens` is resolved by the caller (it depends on the prompt and the context);
    /// `logprobs` is the number of alternatives, if any were asked for, and `logprobs_field`
    /// the request field that carried it (`logprobs` in completions, `top_logprobs` in chat),
    /// so an error names what the client sent.
    pub fn sampling_params(
        &self,
        max_tokens: usize,
        logprobs: Option<usize>,
        logprobs_field: &'static str,
    ) -> Result<SamplingParams, ApiError> {
        let top_k = match self.top_k {
            None | Some(-1) | Some(0) => 0,
            Some(k) if k > 0 => k as usize,
            Some(k) => {
                return Err(ApiError::bad_param(
                    "top_k",
                    format!("must be -1 (off) or positive, got {k}"),
                ))
            }
        };
        let defaults = SamplingParams::default();
        let params = SamplingParams {
            temperature: self.temperature.unwrap_or(1.0),
            top_p: self.top_p.unwrap_or(defaults.top_p),
            top_k,
            min_p: self.min_p.unwrap_or(defaults.min_p),
            seed: self.seed,
            presence_penalty: self.presence_penalty.unwrap_or(0.0),
            frequency_penalty: self.frequency_penalty.unwrap_or(0.0),
            repetition_penalty: self.repetition_penalty.unwrap_or(1.0),
            logprobs,
            max_tokens,
            min_tokens: self.min_tokens.unwrap_or(0) as usize,
            ignore_eos: self.ignore_eos(),
            stop_token_ids: Vec::new(),
        };
        params.validate().map_err(|e| {
            let param = match e.param {
                "logprobs" => logprobs_field,
                "max_tokens" => self.max_tokens_field(),
                other => other,
            };
            ApiError::bad_param(param, e.reason)
        })?;
        Ok(params)
    }

    /// The stop strings in force: none under `ignore_eos`, which asks for exactly
    /// `max_tokens` tokens (what benchmarks rely on). Over [`MAX_STOP_STRINGS`] strings, or one
    /// over [`MAX_STOP_BYTES`], is a 400 even then: every string is matched against every
    /// step's text, and the longest sets how much text is held back.
    pub fn stop_strings(&self) -> Result<Vec<String>, ApiError> {
        let stop = match &self.stop {
            None => Vec::new(),
            Some(StopStrings::One(s)) => vec![s.clone()],
            Some(StopStrings::Many(v)) => v.clone(),
        };
        if stop.len() > MAX_STOP_STRINGS {
            return Err(ApiError::bad_param(
                "stop",
                format!(
                    "has {} strings; at most {MAX_STOP_STRINGS} are allowed",
                    stop.len()
                ),
            ));
        }
        if let Some((i, s)) = stop
            .iter()
            .enumerate()
            .find(|(_, s)| s.len() > MAX_STOP_BYTES)
        {
            let param = match self.stop {
                Some(StopStrings::Many(_)) => format!("stop[{i}]"),
                _ => "stop".to_string(),
            };
            return Err(ApiError::bad_param(
                &param,
                format!(
                    "is {} bytes long; at most {MAX_STOP_BYTES} are allowed",
                    s.len()
                ),
            ));
        }
        Ok(if self.ignore_eos() { Vec::new() } else { stop })
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct NvExt {
    pub ignore_eos: Option<bool>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum StopStrings {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Clone, Deserialize)]
pub struct ChatCompletionRequest {
    pub model: String,
    pub messages: Vec<Message>,
    #[serde(default)]
    pub logprobs: bool,
    pub top_logprobs: Option<u32>,
    #[serde(flatten)]
    pub common: CommonParams,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: Option<MessageContent>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

impl MessageContent {
    /// The text the chat template sees: text parts joined by newlines (as vLLM joins them);
    /// other part types are not supported by a text-only model and are rejected by the caller.
    pub fn text(&self) -> String {
        match self {
            MessageContent::Text(t) => t.clone(),
            MessageContent::Parts(parts) => parts
                .iter()
                .filter_map(|p| match p {
                    ContentPart::Text { text } => Some(text.as_str()),
                    ContentPart::Other => None,
                })
                .collect::<Vec<_>>()
                .join("\n"),
        }
    }

    pub fn has_non_text_parts(&self) -> bool {
        matches!(self, MessageContent::Parts(p) if p.contains(&ContentPart::Other))
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ContentPart {
    Text {
        text: String,
    },
    #[serde(other)]
    Other,
}

#[derive(Debug, Clone, Deserialize)]
pub struct CompletionRequest {
    pub model: String,
    pub prompt: Prompt,
    /// Completions' logprobs is a count of alternatives, not a flag.
    pub logprobs: Option<u32>,
    #[serde(default)]
    pub echo: bool,
    #[serde(flatten)]
    pub common: CommonParams,
}

/// The four shapes OpenAI accepts for `prompt`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Tokens(Vec<u32>),
    Texts(Vec<String>),
    TokenBatches(Vec<Vec<u32>>),
}

impl Prompt {
    /// How many prompts it holds.
    pub fn count(&self) -> usize {
        match self {
            Prompt::Text(_) | Prompt::Tokens(_) => 1,
            Prompt::Texts(v) => v.len(),
            Prompt::TokenBatches(v) => v.len(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::parse;

    #[test]
    fn chat_content_as_string_or_text_parts() {
        let r: ChatCompletionRequest = parse(
            br#"{"model":"m","messages":[
                {"role":"system","content":"be brief"},
                {"role":"user","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]},
                {"role":"assistant","content":null}],
              "some_unknown_field": {"x": 1}}"#,
        )
        .unwrap();
        assert_eq!(r.messages[0].content.as_ref().unwrap().text(), "be brief");
        assert_eq!(r.messages[1].content.as_ref().unwrap().text(), "a\nb");
        assert!(r.messages[2].content.is_none());
        let img: ChatCompletionRequest = parse(
            br#"{"model":"m","messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"x"}}]}]}"#,
        )
        .unwrap();
        assert!(img.messages[0]
            .content
            .as_ref()
            .unwrap()
            .has_non_text_parts());
    }

    #[test]
    fn prompt_takes_all_four_shapes() {
        let shape = |p: &str| {
            parse::<CompletionRequest>(format!(r#"{{"model":"m","prompt":{p}}}"#).as_bytes())
                .unwrap()
                .prompt
        };
        assert_eq!(shape(r#""hi""#), Prompt::Text("hi".into()));
        assert_eq!(shape("[1,2]"), Prompt::Tokens(vec![1, 2]));
        assert_eq!(
            shape(r#"["a","b"]"#),
            Prompt::Texts(vec!["a".into(), "b".into()])
        );
        assert_eq!(
            shape("[[1],[2,3]]"),
            Prompt::TokenBatches(vec![vec![1], vec![2, 3]])
        );
    }

    #[test]
    fn length_and_eos_rules() {
        let r: CompletionRequest = parse(
            br#"{"model":"m","prompt":"x","max_tokens":5,"max_completion_tokens":9,
                 "nvext":{"ignore_eos":true},"stop":"END","stream":true,
                 "stream_options":{"include_usage":true}}"#,
        )
        .unwrap();
        assert_eq!(r.common.max_tokens(), Some(9), "max_completion_tokens wins");
        assert!(r.common.ignore_eos(), "nvext.ignore_eos counts");
        assert!(
            r.common.stop_strings().unwrap().is_empty(),
            "ignore_eos clears stop strings"
        );
        assert!(r.common.stream && r.common.include_usage());
        let plain: CompletionRequest =
            parse(br#"{"model":"m","prompt":"x","max_tokens":5,"stop":"END"}"#).unwrap();
        assert_eq!(
            plain.common.stop_strings().unwrap(),
            vec!["END".to_string()]
        );
        assert_eq!(plain.common.max_tokens(), Some(5));
        assert!(!plain.common.ignore_eos() && !plain.common.include_usage());
    }

    #[test]
    fn stop_strings_are_bounded_even_under_ignore_eos() {
        let stop = |v: serde_json::Value, ignore_eos: bool| {
            let body = serde_json::json!({"model": "m", "prompt": "x", "stop": v,
                                          "ignore_eos": ignore_eos});
            parse::<CompletionRequest>(body.to_string().as_bytes())
                .unwrap()
                .common
                .stop_strings()
        };
        let at_limit: Vec<String> = (0..MAX_STOP_STRINGS).map(|i| i.to_string()).collect();
        assert_eq!(stop(at_limit.clone().into(), false).unwrap(), at_limit);
        let long = "x".repeat(MAX_STOP_BYTES);
        assert_eq!(
            stop(long.clone().into(), false).unwrap(),
            vec![long.clone()]
        );
        let over_count: Vec<String> = (0..=MAX_STOP_STRINGS).map(|i| i.to_string()).collect();
        let over_len = format!("{long}y");
        for (v, param) in [
            (serde_json::json!(over_count), "stop"),
            (serde_json::json!(over_len), "stop"),
            (serde_json::json!(["a", over_len]), "stop[1]"),
        ] {
            for ignore_eos in [false, true] {
                let e = stop(v.clone(), ignore_eos).unwrap_err();
                assert_eq!((e.status, e.param.as_deref()), (400, Some(param)), "{e}");
            }
        }
    }

    #[test]
    fn sampling_params_follow_openai_defaults_and_engine_ranges() {
        let r: CompletionRequest = parse(
            br#"{"model":"m","prompt":"x","top_k":-1,"seed":3,"min_tokens":2,"ignore_eos":true}"#,
        )
        .unwrap();
        let p = r.common.sampling_params(10, Some(2), "logprobs").unwrap();
        assert_eq!(p.temperature, 1.0, "OpenAI's default temperature");
        assert_eq!(
            (p.top_k, p.seed, p.min_tokens, p.max_tokens),
            (0, Some(3), 2, 10)
        );
        assert!(p.ignore_eos);
        assert_eq!(p.logprobs, Some(2));
        for (body, param) in [
            (r#""top_p":1.5"#, "top_p"),
            (r#""temperature":-1"#, "temperature"),
            (r#""top_k":-3"#, "top_k"),
            (r#""min_tokens":11"#, "min_tokens"),
            (r#""presence_penalty":3"#, "presence_penalty"),
        ] {
            let r: CompletionRequest =
                parse(format!(r#"{{"model":"m","prompt":"x",{body}}}"#).as_bytes()).unwrap();
            let e = r.common.sampling_params(10, None, "logprobs").unwrap_err();
            assert_eq!((e.status, e.param.as_deref()), (400, Some(param)), "{body}");
        }
    }

    #[test]
    fn type_errors_name_the_field() {
        let e =
            parse::<ChatCompletionRequest>(br#"{"model":"m","messages":[],"temperature":"hot"}"#)
                .unwrap_err();
        assert_eq!(e.status, 400);
        assert!(e.message.contains("temperature"), "{}", e.message);
        let e = parse::<ChatCompletionRequest>(br#"{"model":"m","messages":[{"content":"x"}]}"#)
            .unwrap_err();
        assert!(e.message.contains("messages"), "{}", e.message);
        let e = parse::<ChatCompletionRequest>(b"{not json").unwrap_err();
        assert_eq!(e.status, 400);
        assert!(e.message.starts_with("invalid JSON body"), "{}", e.message);
    }
}
