//! Server-sent-event streams: reading `data:` events, and checking and assembling the chunks
//! of a chat or completion stream.

use serde_json::Value;

use super::{read_json, MODEL};

/// Reads `data:` events off a server-sent-event response.
pub struct Sse {
    resp: reqwest::Response,
    buf: Vec<u8>,
    ended: bool,
}

impl Sse {
    pub fn new(resp: reqwest::Response) -> Self {
        Self {
            resp,
            buf: Vec::new(),
            ended: false,
        }
    }

    /// The next event's data, or None at the end of the body.
    pub async fn next(&mut self) -> Option<String> {
        loop {
            if let Some(pos) = find(&self.buf, b"\n\n") {
                let event: Vec<u8> = self.buf.drain(..pos + 2).collect();
                let event = String::from_utf8(event).expect("SSE event is UTF-8");
                let data: Vec<&str> = event
                    .lines()
                    .filter_map(|l| l.strip_prefix("data:"))
                    .map(|d| d.strip_prefix(' ').unwrap_or(d))
                    .collect();
                if data.is_empty() {
                    continue; // a comment or keep-alive
                }
                return Some(data.join("\n"));
            }
            if self.ended {
                assert!(
                    self.buf.iter().all(|b| b.is_ascii_whitespace()),
                    "stream ended inside an event: {:?}",
                    String::from_utf8_lossy(&self.buf)
                );
                return None;
            }
            match self.resp.chunk().await.expect("reading the stream") {
                Some(bytes) => self.buf.extend_from_slice(&bytes),
                None => self.ended = true,
            }
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// A whole stream: its JSON chunks, in order, and whether `[DONE]` ended it.
pub struct Stream {
    pub chunks: Vec<Value>,
    pub done: bool,
}

impl Stream {
    /// Parses a stream's `data:` events, checking that nothing follows `[DONE]`.
    pub fn from_events<S: AsRef<str>>(events: impl IntoIterator<Item = S>) -> Stream {
        let mut chunks = Vec::new();
        let mut done = false;
        for data in events {
            let data = data.as_ref();
            assert!(!done, "event after [DONE]: {data}");
            if data == "[DONE]" {
                done = true;
                continue;
            }
            let v: Value =
                serde_json::from_str(data).unwrap_or_else(|e| panic!("bad chunk {data:?}: {e}"));
            chunks.push(v);
        }
        Stream { chunks, done }
    }
}

/// Reads a stream to its end, checking that `[DONE]` comes last and nothing follows it.
pub async fn collect_stream(resp: reqwest::Response) -> Stream {
    let status = resp.status().as_u16();
    let ctype = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    if status != 200 {
        let (_, body) = read_json(resp).await;
        panic!("stream request answered {status}: {body}");
    }
    assert!(
        ctype.starts_with("text/event-stream"),
        "stream content-type {ctype:?}"
    );
    let mut sse = Sse::new(resp);
    let mut events = Vec::new();
    while let Some(data) = sse.next().await {
        events.push(data);
    }
    Stream::from_events(events)
}

/// What a stream says about each choice.
#[derive(Debug, Default, Clone)]
pub struct StreamChoice {
    pub text: String,
    pub finish_reason: Option<String>,
    pub logprob_tokens: usize,
}

/// Checks a chat or completion stream's shape and assembles its choices (by index) and final
/// usage. `chat` selects the chunk shape; `include_usage` whether the request asked for usage.
pub fn assemble(
    stream: &Stream,
    chat: bool,
    include_usage: bool,
) -> (Vec<StreamChoice>, Option<Value>) {
    assert!(
        stream.done,
        "stream did not end with [DONE]: {:?}",
        stream.chunks
    );
    assert!(!stream.chunks.is_empty(), "empty stream");
    let (object, prefix) = if chat {
        ("chat.completion.chunk", "chatcmpl-")
    } else {
        ("text_completion", "cmpl-")
    };
    let id = stream.chunks[0]["id"]
        .as_str()
        .expect("chunk id")
        .to_string();
    assert!(id.starts_with(prefix), "id {id:?} lacks {prefix:?}");
    let mut choices: Vec<StreamChoice> = Vec::new();
    let mut role_seen: Vec<bool> = Vec::new();
    let mut usage = None;
    for (k, c) in stream.chunks.iter().enumerate() {
        assert!(c.get("error").is_none(), "error event in stream: {c}");
        assert_eq!(c["id"], id.as_str(), "chunk ids differ: {c}");
        assert_eq!(c["object"], object, "chunk object: {c}");
        assert_eq!(c["model"], MODEL, "chunk model: {c}");
        assert!(c["created"].is_u64(), "chunk created: {c}");
        let cs = c["choices"].as_array().expect("choices array");
        if include_usage {
            assert!(
                c.as_object().unwrap().contains_key("usage"),
                "include_usage: chunk without a usage field: {c}"
            );
            if cs.is_empty() {
                assert_eq!(
                    k,
                    stream.chunks.len() - 1,
                    "usage chunk is not the last: {c}"
                );
                assert!(c["usage"].is_object(), "last chunk without usage: {c}");
                usage = Some(c["usage"].clone());
                continue;
            }
            assert!(c["usage"].is_null(), "usage on a content chunk: {c}");
        } else {
            assert!(c["usage"].is_null(), "usage not asked for but sent: {c}");
            assert!(!cs.is_empty(), "chunk without choices: {c}");
        }
        for ch in cs {
            let i = ch["index"].as_u64().expect("choice index") as usize;
            if choices.len() <= i {
                choices.resize(i + 1, StreamChoice::default());
                role_seen.resize(i + 1, false);
            }
            let st = &mut choices[i];
            assert!(
                st.finish_reason.is_none(),
                "choice {i} continues after its finish_reason: {c}"
            );
            let text = if chat {
                let delta = &ch["delta"];
                assert!(delta.is_object(), "chat chunk without delta: {c}");
                if !role_seen[i] {
                    assert_eq!(
                        delta["role"], "assistant",
                        "first delta of {i} lacks the role: {c}"
                    );
                    assert_eq!(delta["content"], "", "first delta of {i} has content: {c}");
                    role_seen[i] = true;
                } else {
                    assert!(delta.get("role").is_none(), "role repeated: {c}");
                }
                delta["content"].as_str().unwrap_or("").to_string()
            } else {
                ch["text"]
                    .as_str()
                    .expect("completion chunk text")
                    .to_string()
            };
            st.text.push_str(&text);
            if chat {
                if let Some(content) = ch["logprobs"]["content"].as_array() {
                    st.logprob_tokens += content.len();
                }
            } else if let Some(tokens) = ch["logprobs"]["tokens"].as_array() {
                st.logprob_tokens += tokens.len();
            }
            if let Some(fr) = ch["finish_reason"].as_str() {
                st.finish_reason = Some(fr.to_string());
            }
        }
    }
    for (i, st) in choices.iter().enumerate() {
        assert!(
            st.finish_reason.is_some(),
            "choice {i} never finished: {:?}",
            stream.chunks
        );
    }
    if include_usage {
        assert!(usage.is_some(), "include_usage but no usage chunk");
    }
    (choices, usage)
}
