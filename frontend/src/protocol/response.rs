//! OpenAI response bodies as the server sends them: chat completions and their stream chunks,
//! text completions and theirs, usage, logprobs in both endpoints' shapes, and the model list.
//! Serialize-only; field names, nulls and omissions follow what OpenAI's and vLLM's servers
//! send, so that clients (the `openai` SDKs, benchmark tools) parse them unchanged.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::ser::{SerializeMap, Serializer};
use serde::Serialize;

/// `object` of a non-streamed chat completion.
pub const CHAT_COMPLETION_OBJECT: &str = "chat.completion";
/// `object` of a chat completion stream chunk.
pub const CHAT_COMPLETION_CHUNK_OBJECT: &str = "chat.completion.chunk";
/// `object` of a text completion, streamed or not.
pub const TEXT_COMPLETION_OBJECT: &str = "text_completion";
/// The role of every generated message.
pub const ASSISTANT: &str = "assistant";

/// Seconds since the Unix epoch, for `created`.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The JSON of one server-sent event's data (the caller adds the `data: ` framing).
pub fn sse_data<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_else(|e| {
        // Not reachable for the types of this module (all map keys are strings); a client
        // still gets a parseable event rather than a torn stream.
        serde_json::json!({
            "error": {
                "message": format!("failed to serialize a response: {e}"),
                "type": "internal_error",
                "param": null,
                "code": null,
            }
        })
        .to_string()
    })
}

// ---------------------------------------------------------------------------------------------
// Usage

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub total_tokens: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_tokens_details: Option<PromptTokensDetails>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct PromptTokensDetails {
    pub cached_tokens: u32,
}

impl Usage {
    /// `cached`: prompt tokens served from the prefix cache, when known.
    pub fn new(prompt: u32, completion: u32, cached: Option<u32>) -> Self {
        Self {
            prompt_tokens: prompt,
            completion_tokens: completion,
            total_tokens: prompt.saturating_add(completion),
            prompt_tokens_details: cached
                .map(|cached_tokens| PromptTokensDetails { cached_tokens }),
        }
    }
}

/// The `usage` field of a stream chunk: absent unless the request set
/// `stream_options.include_usage`; when it did, `null` on every chunk but the last, which
/// carries the usage (and no choices).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UsageField {
    #[default]
    Omit,
    Null,
    Some(Usage),
}

impl UsageField {
    /// The field on the content chunks of a stream: `Null` when usage was asked for.
    pub fn for_stream(include_usage: bool) -> Self {
        if include_usage {
            Self::Null
        } else {
            Self::Omit
        }
    }

    pub fn is_omit(&self) -> bool {
        matches!(self, Self::Omit)
    }
}

impl Serialize for UsageField {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            // `Omit` is skipped by the containing struct; should it be serialized alone, null.
            Self::Omit | Self::Null => serializer.serialize_none(),
            Self::Some(usage) => usage.serialize(serializer),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Chat completions

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatCompletion {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChoice>,
    pub usage: Usage,
}

impl ChatCompletion {
    pub fn new(
        id: impl Into<String>,
        created: u64,
        model: impl Into<String>,
        choices: Vec<ChatChoice>,
        usage: Usage,
    ) -> Self {
        Self {
            id: id.into(),
            object: CHAT_COMPLETION_OBJECT,
            created,
            model: model.into(),
            choices,
            usage,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatChoice {
    pub index: u32,
    pub message: ChatMessageOut,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<&'static str>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChatMessageOut {
    pub role: &'static str,
    pub content: String,
}

impl ChatMessageOut {
    pub fn assistant(content: impl Into<String>) -> Self {
        Self {
            role: ASSISTANT,
            content: content.into(),
        }
    }
}

/// A streamed chunk of either endpoint; they differ only in their choice type and `object`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Chunk<C> {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<C>,
    #[serde(skip_serializing_if = "UsageField::is_omit")]
    pub usage: UsageField,
}

/// A choice type that streams, and the `object` name of its chunks.
pub trait ChunkChoice {
    const OBJECT: &'static str;
}

impl<C: ChunkChoice> Chunk<C> {
    /// A chunk with choices; `usage` is `UsageField::for_stream(include_usage)`.
    pub fn new(
        id: impl Into<String>,
        created: u64,
        model: impl Into<String>,
        choices: Vec<C>,
        usage: UsageField,
    ) -> Self {
        Self {
            id: id.into(),
            object: C::OBJECT,
            created,
            model: model.into(),
            choices,
            usage,
        }
    }

    /// The last chunk of a stream that asked for usage: `"choices": []` and the usage.
    pub fn usage_only(
        id: impl Into<String>,
        created: u64,
        model: impl Into<String>,
        usage: Usage,
    ) -> Self {
        Self::new(id, created, model, Vec::new(), UsageField::Some(usage))
    }
}

pub type ChatCompletionChunk = Chunk<ChatChunkChoice>;

impl ChunkChoice for ChatChunkChoice {
    const OBJECT: &'static str = CHAT_COMPLETION_CHUNK_OBJECT;
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatChunkChoice {
    pub index: u32,
    pub delta: ChatDelta,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<&'static str>,
}

impl ChatChunkChoice {
    pub fn new(index: u32, delta: ChatDelta) -> Self {
        Self {
            index,
            delta,
            logprobs: None,
            finish_reason: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct ChatDelta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

impl ChatDelta {
    /// The first delta of a stream, as OpenAI and vLLM send it: `{"role": "assistant",
    /// "content": ""}`.
    pub fn assistant_role() -> Self {
        Self {
            role: Some(ASSISTANT),
            content: Some(String::new()),
        }
    }

    pub fn content(text: impl Into<String>) -> Self {
        Self {
            role: None,
            content: Some(text.into()),
        }
    }

    /// `{}`: the delta of the chunk that carries only a `finish_reason`.
    pub fn empty() -> Self {
        Self::default()
    }
}

/// Chat logprobs: `{"content": [{token, logprob, bytes, top_logprobs}]}`.
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct ChatLogprobs {
    pub content: Vec<ChatTokenLogprob>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatTokenLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
    pub top_logprobs: Vec<TopLogprob>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TopLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
}

impl TopLogprob {
    /// `bytes` are the token text's UTF-8 bytes.
    pub fn new(token: impl Into<String>, logprob: f32) -> Self {
        let token = token.into();
        Self {
            bytes: token.as_bytes().to_vec(),
            token,
            logprob,
        }
    }
}

impl ChatTokenLogprob {
    /// `bytes` are the token text's UTF-8 bytes.
    pub fn new(token: impl Into<String>, logprob: f32, top_logprobs: Vec<TopLogprob>) -> Self {
        let token = token.into();
        Self {
            bytes: token.as_bytes().to_vec(),
            token,
            logprob,
            top_logprobs,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Text completions

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Completion {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<CompletionChoice>,
    pub usage: Usage,
}

impl Completion {
    pub fn new(
        id: impl Into<String>,
        created: u64,
        model: impl Into<String>,
        choices: Vec<CompletionChoice>,
        usage: Usage,
    ) -> Self {
        Self {
            id: id.into(),
            object: TEXT_COMPLETION_OBJECT,
            created,
            model: model.into(),
            choices,
            usage,
        }
    }
}

/// A choice of a completion or of a completion chunk (the two have the same shape).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CompletionChoice {
    pub index: u32,
    pub text: String,
    pub logprobs: Option<CompletionLogprobs>,
    pub finish_reason: Option<&'static str>,
}

impl CompletionChoice {
    pub fn new(index: u32, text: impl Into<String>) -> Self {
        Self {
            index,
            text: text.into(),
            logprobs: None,
            finish_reason: None,
        }
    }
}

pub type CompletionChunk = Chunk<CompletionChoice>;

impl ChunkChoice for CompletionChoice {
    const OBJECT: &'static str = TEXT_COMPLETION_OBJECT;
}

/// Legacy completions logprobs: parallel arrays, one entry per generated token.
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct CompletionLogprobs {
    pub tokens: Vec<String>,
    pub token_logprobs: Vec<f32>,
    pub top_logprobs: Vec<TopLogprobMap>,
    pub text_offset: Vec<u32>,
}

impl CompletionLogprobs {
    /// Appends one token; `top` in the order it should appear (most likely first).
    pub fn push(&mut self, token: String, logprob: f32, top: Vec<(String, f32)>, text_offset: u32) {
        self.tokens.push(token);
        self.token_logprobs.push(logprob);
        self.top_logprobs.push(TopLogprobMap::new(top));
        self.text_offset.push(text_offset);
    }

    pub fn extend(&mut self, other: CompletionLogprobs) {
        self.tokens.extend(other.tokens);
        self.token_logprobs.extend(other.token_logprobs);
        self.top_logprobs.extend(other.top_logprobs);
        self.text_offset.extend(other.text_offset);
    }

    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }
}

/// One `top_logprobs` entry of the completions shape: a JSON object token → logprob that keeps
/// the order it was built in. Two candidates may decode to the same text; a JSON object can
/// hold the key once, so the first (the more likely) is kept.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TopLogprobMap(Vec<(String, f32)>);

impl TopLogprobMap {
    pub fn new(entries: Vec<(String, f32)>) -> Self {
        let mut kept: Vec<(String, f32)> = Vec::with_capacity(entries.len());
        for (token, logprob) in entries {
            if !kept.iter().any(|(t, _)| *t == token) {
                kept.push((token, logprob));
            }
        }
        Self(kept)
    }

    pub fn entries(&self) -> &[(String, f32)] {
        &self.0
    }
}

impl Serialize for TopLogprobMap {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (token, logprob) in &self.0 {
            map.serialize_entry(token, logprob)?;
        }
        map.end()
    }
}

// ---------------------------------------------------------------------------------------------
// Models

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ModelList {
    pub object: &'static str,
    pub data: Vec<ModelObject>,
}

impl ModelList {
    pub fn new(data: Vec<ModelObject>) -> Self {
        Self {
            object: "list",
            data,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ModelObject {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub owned_by: &'static str,
}

impl ModelObject {
    pub fn new(id: impl Into<String>, created: u64) -> Self {
        Self {
            id: id.into(),
            object: "model",
            created,
            owned_by: "baton",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, to_value};

    fn chat_chunk(choices: Vec<ChatChunkChoice>, usage: UsageField) -> ChatCompletionChunk {
        ChatCompletionChunk::new("chatcmpl-1", 1700000000, "m", choices, usage)
    }

    #[test]
    fn usage_with_and_without_cached_tokens() {
        assert_eq!(
            to_value(Usage::new(10, 5, None)).unwrap(),
            json!({"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15})
        );
        assert_eq!(
            to_value(Usage::new(10, 5, Some(8))).unwrap(),
            json!({
                "prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15,
                "prompt_tokens_details": {"cached_tokens": 8}
            })
        );
    }

    #[test]
    fn chat_completion_shape() {
        let c = ChatCompletion::new(
            "chatcmpl-1",
            1700000000,
            "m",
            vec![ChatChoice {
                index: 0,
                message: ChatMessageOut::assistant("Hello!"),
                logprobs: None,
                finish_reason: Some("stop"),
            }],
            Usage::new(3, 2, None),
        );
        assert_eq!(
            to_value(&c).unwrap(),
            json!({
                "id": "chatcmpl-1",
                "object": "chat.completion",
                "created": 1700000000,
                "model": "m",
                "choices": [{
                    "index": 0,
                    "message": {"role": "assistant", "content": "Hello!"},
                    "logprobs": null,
                    "finish_reason": "stop"
                }],
                "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
            })
        );
    }

    #[test]
    fn chat_chunk_with_role_delta() {
        let c = chat_chunk(
            vec![ChatChunkChoice::new(0, ChatDelta::assistant_role())],
            UsageField::Omit,
        );
        assert_eq!(
            to_value(&c).unwrap(),
            json!({
                "id": "chatcmpl-1",
                "object": "chat.completion.chunk",
                "created": 1700000000,
                "model": "m",
                "choices": [{
                    "index": 0,
                    "delta": {"role": "assistant", "content": ""},
                    "logprobs": null,
                    "finish_reason": null
                }]
            })
        );
    }

    #[test]
    fn chat_chunk_with_content_and_usage_null() {
        let c = chat_chunk(
            vec![ChatChunkChoice::new(0, ChatDelta::content("Hi"))],
            UsageField::for_stream(true),
        );
        assert_eq!(
            to_value(&c).unwrap(),
            json!({
                "id": "chatcmpl-1",
                "object": "chat.completion.chunk",
                "created": 1700000000,
                "model": "m",
                "choices": [{
                    "index": 0,
                    "delta": {"content": "Hi"},
                    "logprobs": null,
                    "finish_reason": null
                }],
                "usage": null
            })
        );
    }

    #[test]
    fn usage_omitted_unless_asked() {
        let c = chat_chunk(
            vec![ChatChunkChoice::new(0, ChatDelta::content("Hi"))],
            UsageField::for_stream(false),
        );
        let v = to_value(&c).unwrap();
        assert!(v.get("usage").is_none(), "{v}");
        let c = CompletionChunk::new(
            "cmpl-1",
            1,
            "m",
            vec![CompletionChoice::new(0, "x")],
            UsageField::Omit,
        );
        let v = to_value(&c).unwrap();
        assert!(v.get("usage").is_none(), "{v}");
    }

    #[test]
    fn chat_final_chunk_with_finish_reason_and_empty_delta() {
        let mut choice = ChatChunkChoice::new(0, ChatDelta::empty());
        choice.finish_reason = Some("length");
        let c = chat_chunk(vec![choice], UsageField::Omit);
        assert_eq!(
            to_value(&c).unwrap(),
            json!({
                "id": "chatcmpl-1",
                "object": "chat.completion.chunk",
                "created": 1700000000,
                "model": "m",
                "choices": [{
                    "index": 0,
                    "delta": {},
                    "logprobs": null,
                    "finish_reason": "length"
                }]
            })
        );
    }

    #[test]
    fn chat_usage_chunk_has_no_choices() {
        let c = ChatCompletionChunk::usage_only(
            "chatcmpl-1",
            1700000000,
            "m",
            Usage::new(4, 6, Some(0)),
        );
        assert_eq!(
            to_value(&c).unwrap(),
            json!({
                "id": "chatcmpl-1",
                "object": "chat.completion.chunk",
                "created": 1700000000,
                "model": "m",
                "choices": [],
                "usage": {
                    "prompt_tokens": 4, "completion_tokens": 6, "total_tokens": 10,
                    "prompt_tokens_details": {"cached_tokens": 0}
                }
            })
        );
    }

    #[test]
    fn chat_logprobs_shape() {
        let mut choice = ChatChunkChoice::new(0, ChatDelta::content("é"));
        choice.logprobs = Some(ChatLogprobs {
            content: vec![ChatTokenLogprob::new(
                "é",
                -0.5,
                vec![TopLogprob::new("é", -0.5), TopLogprob::new("e", -1.25)],
            )],
        });
        let v = to_value(chat_chunk(vec![choice], UsageField::Omit)).unwrap();
        assert_eq!(
            v["choices"][0]["logprobs"],
            json!({
                "content": [{
                    "token": "é",
                    "logprob": -0.5,
                    "bytes": [195, 169],
                    "top_logprobs": [
                        {"token": "é", "logprob": -0.5, "bytes": [195, 169]},
                        {"token": "e", "logprob": -1.25, "bytes": [101]}
                    ]
                }]
            })
        );
    }

    #[test]
    fn completion_shape() {
        let mut choice = CompletionChoice::new(0, " world");
        choice.finish_reason = Some("length");
        let c = Completion::new(
            "cmpl-1",
            1700000000,
            "m",
            vec![choice],
            Usage::new(1, 2, None),
        );
        assert_eq!(
            to_value(&c).unwrap(),
            json!({
                "id": "cmpl-1",
                "object": "text_completion",
                "created": 1700000000,
                "model": "m",
                "choices": [{
                    "index": 0,
                    "text": " world",
                    "logprobs": null,
                    "finish_reason": "length"
                }],
                "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}
            })
        );
    }

    #[test]
    fn completion_chunks_content_and_usage() {
        let c = CompletionChunk::new(
            "cmpl-1",
            1700000000,
            "m",
            vec![CompletionChoice::new(0, "Hi")],
            UsageField::for_stream(true),
        );
        assert_eq!(
            to_value(&c).unwrap(),
            json!({
                "id": "cmpl-1",
                "object": "text_completion",
                "created": 1700000000,
                "model": "m",
                "choices": [{"index": 0, "text": "Hi", "logprobs": null, "finish_reason": null}],
                "usage": null
            })
        );
        let c = CompletionChunk::usage_only("cmpl-1", 1700000000, "m", Usage::new(1, 1, None));
        assert_eq!(
            to_value(&c).unwrap(),
            json!({
                "id": "cmpl-1",
                "object": "text_completion",
                "created": 1700000000,
                "model": "m",
                "choices": [],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
            })
        );
    }

    #[test]
    fn completion_logprobs_shape() {
        let mut lp = CompletionLogprobs::default();
        lp.push(
            " a".into(),
            -0.5,
            vec![(" a".into(), -0.5), (" b".into(), -1.5)],
            5,
        );
        let mut more = CompletionLogprobs::default();
        more.push("!".into(), -0.25, vec![("!".into(), -0.25)], 7);
        lp.extend(more);
        assert_eq!(lp.len(), 2);
        let mut choice = CompletionChoice::new(0, " a!");
        choice.logprobs = Some(lp);
        assert_eq!(
            to_value(&choice).unwrap(),
            json!({
                "index": 0,
                "text": " a!",
                "logprobs": {
                    "tokens": [" a", "!"],
                    "token_logprobs": [-0.5, -0.25],
                    "top_logprobs": [{" a": -0.5, " b": -1.5}, {"!": -0.25}],
                    "text_offset": [5, 7]
                },
                "finish_reason": null
            })
        );
    }

    #[test]
    fn top_logprob_map_keeps_order_and_first_duplicate() {
        let m = TopLogprobMap::new(vec![
            ("z".into(), -0.5),
            ("a".into(), -1.0),
            ("z".into(), -2.0),
        ]);
        assert_eq!(sse_data(&m), r#"{"z":-0.5,"a":-1.0}"#);
    }

    #[test]
    fn model_list_shape() {
        let l = ModelList::new(vec![ModelObject::new("llama", 1700000000)]);
        assert_eq!(
            to_value(&l).unwrap(),
            json!({
                "object": "list",
                "data": [{"id": "llama", "object": "model", "created": 1700000000, "owned_by": "baton"}]
            })
        );
    }

    #[test]
    fn sse_data_is_bare_json() {
        let c = chat_chunk(vec![], UsageField::Omit);
        let s = sse_data(&c);
        assert!(s.starts_with('{') && !s.contains('\n'), "{s}");
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&s).unwrap(),
            to_value(&c).unwrap()
        );
        assert!(unix_now() > 1_600_000_000);
    }
}
