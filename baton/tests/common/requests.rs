//! The request bodies the HTTP tests send and the checks they make of the answers, shared by
//! every test binary so that each one builds and checks requests the same way.

use reqwest::Client;
use serde_json::{json, Value};

use super::{assemble, assert_openai_error, collect_stream, read_json, Sse, Stream, MODEL};

/// A greedy chat request of one user message.
pub fn chat_body(content: &str, max_tokens: u32) -> Value {
    json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
    })
}

/// A greedy completions request; `prompt` is any of the shapes the endpoint takes.
pub fn completion_body(prompt: Value, max_tokens: u32) -> Value {
    json!({"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
}

/// `body` with the fields of `extra` set (replacing those it had).
pub fn with(mut body: Value, extra: Value) -> Value {
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

/// `body` streamed, with the final usage chunk asked for.
pub fn streamed_with_usage(body: Value) -> Value {
    with(
        body,
        json!({"stream": true, "stream_options": {"include_usage": true}}),
    )
}

/// POSTs `body` as JSON, with `key` as the bearer token if given.
pub async fn send_json(
    client: &Client,
    url: &str,
    key: Option<&str>,
    body: &Value,
) -> reqwest::Response {
    let mut request = client.post(url).json(body);
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    request
        .send()
        .await
        .unwrap_or_else(|e| panic!("POST {url} failed: {e}"))
}

/// POSTs JSON with an API key; returns the status and the body as [`read_json`] reads it.
pub async fn post_json_with_key(
    client: &Client,
    url: &str,
    key: &str,
    body: &Value,
) -> (u16, Value) {
    read_json(send_json(client, url, Some(key), body).await).await
}

/// POSTs raw bytes with the given content type; returns what [`read_json`] reads.
pub async fn post_raw(client: &Client, url: &str, ctype: &str, body: &[u8]) -> (u16, Value) {
    let resp = client
        .post(url)
        .header("content-type", ctype)
        .body(body.to_vec())
        .send()
        .await
        .unwrap_or_else(|e| panic!("POST {url} failed: {e}"));
    read_json(resp).await
}

/// POSTs JSON and expects a 200; returns the body.
pub async fn ok_json(client: &Client, url: &str, body: &Value) -> Value {
    let (status, v) = read_json(send_json(client, url, None, body).await).await;
    assert_eq!(status, 200, "POST {url} {body} answered {status}: {v}");
    v
}

/// POSTs a streaming request and reads the whole stream (which must answer 200).
pub async fn stream(client: &Client, url: &str, body: &Value) -> Stream {
    collect_stream(send_json(client, url, None, body).await).await
}

/// Reads events until the first one with content, so the request is surely being served;
/// returns the events read, in order.
pub async fn read_until_content(sse: &mut Sse) -> Vec<String> {
    let mut events = Vec::new();
    loop {
        let data = sse.next().await.expect("stream ended before any content");
        let v: Value = serde_json::from_str(&data)
            .unwrap_or_else(|e| panic!("bad chunk before any content {data:?}: {e}"));
        let started = v["choices"][0]["delta"]["content"]
            .as_str()
            .is_some_and(|t| !t.is_empty());
        events.push(data);
        if started {
            return events;
        }
    }
}

/// Checks the usage object: totals add up; returns (prompt, completion, cached).
pub fn check_usage(u: &Value) -> (u64, u64, u64) {
    let p = u["prompt_tokens"].as_u64().expect("prompt_tokens");
    let c = u["completion_tokens"].as_u64().expect("completion_tokens");
    let t = u["total_tokens"].as_u64().expect("total_tokens");
    assert_eq!(t, p + c, "total_tokens != prompt + completion: {u}");
    let cached = u["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap_or_else(|| panic!("no prompt_tokens_details.cached_tokens: {u}"));
    assert!(cached <= p, "cached_tokens over prompt_tokens: {u}");
    (p, c, cached)
}

/// Checks what chat completions and completions share: object, id, model, created, choices
/// numbered from 0 that each finished, and usage; returns the choices.
fn check_response<'v>(v: &'v Value, object: &str, id_prefix: &str) -> &'v [Value] {
    assert_eq!(v["object"], object, "{v}");
    assert!(
        v["id"].as_str().is_some_and(|id| id.starts_with(id_prefix)),
        "id without {id_prefix:?}: {v}"
    );
    assert_eq!(v["model"], MODEL, "{v}");
    assert!(v["created"].is_u64(), "{v}");
    let choices = v["choices"].as_array().expect("choices");
    assert!(!choices.is_empty(), "{v}");
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], i as u64, "{v}");
        let fr = c["finish_reason"].as_str().expect("finish_reason");
        assert!(fr == "stop" || fr == "length", "{v}");
    }
    check_usage(&v["usage"]);
    choices
}

/// Checks a non-streamed chat completion's shape; returns its first choice's text.
pub fn check_chat(v: &Value) -> String {
    let choices = check_response(v, "chat.completion", "chatcmpl-");
    for c in choices {
        assert_eq!(c["message"]["role"], "assistant", "{v}");
        assert!(c["message"]["content"].is_string(), "{v}");
    }
    choices[0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Checks a non-streamed text completion's shape; returns its first choice's text.
pub fn check_completion(v: &Value) -> String {
    let choices = check_response(v, "text_completion", "cmpl-");
    for c in choices {
        assert!(c["text"].is_string(), "{v}");
    }
    choices[0]["text"].as_str().unwrap().to_string()
}

/// Checks a non-streamed chat completion (`chat`) or text completion; returns its first
/// choice's text.
pub fn check_answer(v: &Value, chat: bool) -> String {
    if chat {
        check_chat(v)
    } else {
        check_completion(v)
    }
}

/// Checks a non-streamed answer made exactly `n` tokens and finished on `length`.
pub fn assert_length(v: &Value, n: u64, what: &str) {
    assert_eq!(v["usage"]["completion_tokens"], n, "{what}: {v}");
    assert_eq!(v["choices"][0]["finish_reason"], "length", "{what}: {v}");
}

/// Checks a stream that asked for usage made exactly `n` tokens and finished on `length`.
pub fn assert_stream_length(s: &Stream, chat: bool, n: u64, what: &str) {
    let (choices, usage) = assemble(s, chat, true);
    assert_eq!(
        usage.unwrap()["completion_tokens"],
        n,
        "{what}: {:?}",
        s.chunks
    );
    assert_eq!(
        choices[0].finish_reason.as_deref(),
        Some("length"),
        "{what}: {:?}",
        s.chunks
    );
}

/// Checks an error answer: the status, OpenAI's error body, and `param` (null when None).
pub fn assert_error(status: u16, body: &Value, want: u16, param: Option<&str>, what: &str) {
    assert_eq!(status, want, "{what}: {body}");
    assert_openai_error(body, what);
    assert_eq!(
        body["error"]["param"],
        param.map_or(Value::Null, Value::from),
        "{what}: param: {body}"
    );
}

/// The strings of a JSON array (logprobs' `tokens`).
pub fn strings(v: &Value) -> Vec<&str> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an array: {v}"))
        .iter()
        .map(|t| t.as_str().unwrap_or_else(|| panic!("not a string: {t}")))
        .collect()
}
