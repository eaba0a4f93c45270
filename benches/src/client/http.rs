//! One request against an OpenAI-compatible server, timed as aiperf times it: the request's
//! start, the arrival of every chunk that carries output text (the first is TTFT), and the
//! end of the response. Output tokens come from the server's `usage` when it sends one
//! (`stream_options.include_usage`), else from tokenizing the text received.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use serde_json::{json, Map, Value};

use super::prompts::Prompt;

/// Which OpenAI route a run drives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Endpoint {
    Chat,
    Completions,
}

impl Endpoint {
    pub fn path(self) -> &'static str {
        match self {
            Endpoint::Chat => "/v1/chat/completions",
            Endpoint::Completions => "/v1/completions",
        }
    }
}

/// What every request of a run shares.
#[derive(Clone, Debug)]
pub struct RequestShape {
    pub url: String,
    pub model: String,
    pub endpoint: Endpoint,
    pub streaming: bool,
    /// Merged into every body last, so they may override the defaults.
    pub extra: Map<String, Value>,
    pub headers: Vec<(String, String)>,
    pub timeout: Duration,
}

/// Why a request failed, in aiperf's `error` shape.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct ErrorDetails {
    pub code: Option<u16>,
    #[serde(rename = "type")]
    pub kind: String,
    pub message: String,
}

/// The timeline of one request.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub start_epoch_ns: u128,
    pub start: Instant,
    /// When the response's headers arrived.
    pub ack: Option<Instant>,
    /// Each chunk with output text.
    pub chunks: Vec<Instant>,
    pub end: Instant,
    pub text: String,
    pub usage_prompt_tokens: Option<usize>,
    pub usage_completion_tokens: Option<usize>,
    /// `usage.prompt_tokens_details.cached_tokens`: the server's prefix-cache hit.
    pub usage_cached_tokens: Option<usize>,
    pub error: Option<ErrorDetails>,
}

pub fn body(shape: &RequestShape, prompt: &Prompt) -> Value {
    let mut body = json!({
        "model": shape.model,
        "max_tokens": prompt.output_tokens,
        // vLLM's extensions, which Baton, vLLM and Dynamo read: the output is exactly OSL long.
        "min_tokens": prompt.output_tokens,
        "ignore_eos": true,
        "stream": shape.streaming,
    });
    let map = body.as_object_mut().expect("an object literal");
    match shape.endpoint {
        Endpoint::Chat => {
            map.insert(
                "messages".into(),
                json!([{"role": "user", "content": prompt.text}]),
            );
        }
        Endpoint::Completions => {
            map.insert("prompt".into(), Value::String(prompt.text.clone()));
        }
    }
    if shape.streaming {
        map.insert("stream_options".into(), json!({"include_usage": true}));
    }
    for (k, v) in &shape.extra {
        map.insert(k.clone(), v.clone());
    }
    body
}

fn epoch_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

fn failure(code: Option<u16>, kind: &str, message: impl Into<String>) -> ErrorDetails {
    ErrorDetails {
        code,
        kind: kind.to_string(),
        message: message.into(),
    }
}

/// The error message of an OpenAI error body, or the body itself.
fn error_message(body: &str) -> String {
    serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
        .unwrap_or_else(|| body.chars().take(300).collect())
}

/// The output text of one streamed or whole choice.
fn choice_text(v: &Value) -> Option<&str> {
    let c = &v["choices"][0];
    c["delta"]["content"]
        .as_str()
        .or_else(|| c["message"]["content"].as_str())
        .or_else(|| c["text"].as_str())
}

fn take_usage(out: &mut Outcome, v: &Value) {
    if let Some(u) = v.get("usage").filter(|u| u.is_object()) {
        out.usage_prompt_tokens = u["prompt_tokens"].as_u64().map(|n| n as usize);
        out.usage_completion_tokens = u["completion_tokens"].as_u64().map(|n| n as usize);
        out.usage_cached_tokens = u["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .map(|n| n as usize);
    }
}

pub async fn send(client: &reqwest::Client, shape: &RequestShape, prompt: &Prompt) -> Outcome {
    let start = Instant::now();
    let mut out = Outcome {
        start_epoch_ns: epoch_ns(),
        start,
        ack: None,
        chunks: Vec::new(),
        end: start,
        text: String::new(),
        usage_prompt_tokens: None,
        usage_completion_tokens: None,
        usage_cached_tokens: None,
        error: None,
    };
    let result = tokio::time::timeout(shape.timeout, exchange(client, shape, prompt, &mut out))
        .await
        .unwrap_or_else(|_| {
            Err(failure(
                None,
                "Timeout",
                format!("no complete response within {:?}", shape.timeout),
            ))
        });
    out.end = Instant::now();
    if let Err(e) = result {
        out.error = Some(e);
    } else if out.chunks.is_empty() {
        out.error = Some(failure(
            None,
            "EmptyResponse",
            "the response held no output text",
        ));
    }
    out
}

async fn exchange(
    client: &reqwest::Client,
    shape: &RequestShape,
    prompt: &Prompt,
    out: &mut Outcome,
) -> Result<(), ErrorDetails> {
    let url = format!(
        "{}{}",
        shape.url.trim_end_matches('/'),
        shape.endpoint.path()
    );
    let mut req = client.post(&url).json(&body(shape, prompt));
    for (k, v) in &shape.headers {
        req = req.header(k, v);
    }
    let resp = req
        .send()
        .await
        .map_err(|e| failure(None, "ConnectionError", format!("{url}: {e}")))?;
    out.ack = Some(Instant::now());
    let status = resp.status();
    if !status.is_success() {
        let text = resp.text().await.unwrap_or_default();
        return Err(failure(
            Some(status.as_u16()),
            "HTTPError",
            error_message(&text),
        ));
    }
    if !shape.streaming {
        let text = resp
            .text()
            .await
            .map_err(|e| failure(None, "ReadError", e.to_string()))?;
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| failure(None, "InvalidResponse", e.to_string()))?;
        if let Some(t) = choice_text(&v) {
            out.chunks.push(Instant::now());
            out.text.push_str(t);
        }
        take_usage(out, &v);
        return Ok(());
    }
    let mut stream = resp.bytes_stream();
    let mut buf: Vec<u8> = Vec::new();
    while let Some(piece) = stream.next().await {
        let piece = piece.map_err(|e| failure(None, "ReadError", e.to_string()))?;
        let at = Instant::now();
        buf.extend_from_slice(&piece);
        // SSE events end with a blank line; an event may span reads.
        while let Some(end) = find_event_end(&buf) {
            let event: Vec<u8> = buf.drain(..end.1).collect();
            let event = String::from_utf8_lossy(&event[..end.0]);
            for line in event.lines() {
                let Some(data) = line.strip_prefix("data:") else {
                    continue;
                };
                let data = data.trim();
                if data == "[DONE]" {
                    return Ok(());
                }
                let v: Value = serde_json::from_str(data)
                    .map_err(|e| failure(None, "InvalidResponse", format!("{e}: {data}")))?;
                if let Some(err) = v.get("error").filter(|e| !e.is_null()) {
                    return Err(failure(
                        err["code"].as_u64().map(|c| c as u16),
                        "StreamError",
                        err["message"].as_str().unwrap_or("error event").to_string(),
                    ));
                }
                if let Some(t) = choice_text(&v).filter(|t| !t.is_empty()) {
                    out.chunks.push(at);
                    out.text.push_str(t);
                }
                take_usage(out, &v);
            }
        }
    }
    Err(failure(
        None,
        "IncompleteStream",
        "the stream ended without [DONE]",
    ))
}

/// (end of the event's text, end of its separator) of the first complete event in `buf`.
fn find_event_end(buf: &[u8]) -> Option<(usize, usize)> {
    let lf = buf
        .windows(2)
        .position(|w| w == b"\n\n")
        .map(|i| (i, i + 2));
    let crlf = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| (i, i + 4));
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_ask_for_exact_lengths_and_extras_override() {
        let mut shape = RequestShape {
            url: "http://x".into(),
            model: "m".into(),
            endpoint: Endpoint::Chat,
            streaming: true,
            extra: Map::new(),
            headers: vec![],
            timeout: Duration::from_secs(1),
        };
        shape.extra.insert("ignore_eos".into(), Value::Bool(false));
        let p = Prompt {
            text: " a b".into(),
            input_tokens: 2,
            output_tokens: 7,
        };
        let b = body(&shape, &p);
        assert_eq!(b["messages"][0]["content"], " a b");
        assert_eq!(
            (b["max_tokens"].as_u64(), b["min_tokens"].as_u64()),
            (Some(7), Some(7))
        );
        assert_eq!(b["ignore_eos"], false);
        assert_eq!(b["stream_options"]["include_usage"], true);
        shape.endpoint = Endpoint::Completions;
        shape.streaming = false;
        let b = body(&shape, &p);
        assert_eq!(b["prompt"], " a b");
        assert!(b.get("stream_options").is_none() && b.get("messages").is_none());
    }

    #[test]
    fn events_split_at_blank_lines_of_either_ending() {
        assert_eq!(find_event_end(b"data: 1\n\ndata: 2"), Some((7, 9)));
        assert_eq!(find_event_end(b"data: 1\r\n\r\n"), Some((7, 11)));
        assert_eq!(find_event_end(b"data: 1\n"), None);
    }
}
