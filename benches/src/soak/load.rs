//! The soak's clients: `streams` closed-loop streaming completions of token-id prompts, each
//! read event by event so that what a client could be hurt by is counted, not guessed: a stream
//! that ends without `[DONE]`, an error event, a second finish (a request answered twice), more
//! tokens than asked, a 503 and whether it said when to come back.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use serde_json::{json, Value};

/// What the clients send.
#[derive(Clone, Debug)]
pub struct LoadShape {
    /// `http://127.0.0.1:PORT`
    pub url: String,
    pub model: String,
    pub streams: usize,
    /// No request starts after this; those running finish.
    pub duration: Duration,
    pub isl: usize,
    /// Every `long_every`-th request has `long_isl` prompt tokens (0: none), so that with
    /// conditional disaggregation some prefills go to the prefill workers.
    pub long_isl: usize,
    pub long_every: usize,
    pub osl: usize,
    /// A request not finished by then counts as hung.
    pub request_timeout: Duration,
    /// Longest wait a 503's `Retry-After` may ask for before the client retries.
    pub max_retry_after: Duration,
}

/// How a request ended, from the client's side.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Ending {
    /// One finish, `[DONE]`, exactly `max_tokens` tokens by `usage`.
    Completed,
    /// An error event in the stream, then `[DONE]`: the failure a client can act on.
    ErrorEvent,
    /// A non-200 answer (other than a 503 with `Retry-After`, which is retried).
    HttpError,
    /// The connection broke, or the body was not an event stream.
    Transport,
    /// The stream ended without `[DONE]` or without a finish and no error said why.
    Incomplete,
    /// Admitted, and nothing ended it within `request_timeout`.
    Hung,
    /// Answered 503 with `Retry-After` for `request_timeout` and never admitted: the client
    /// gave up (admission answers at once and keeps no queue, so this is not a hang).
    GaveUp,
}

/// One request's life, times in seconds since the load began.
#[derive(Clone, Debug, Serialize)]
pub struct RequestLog {
    pub stream: usize,
    pub isl: usize,
    pub start_s: f64,
    pub end_s: f64,
    pub ttft_s: Option<f64>,
    /// 503 answers with `Retry-After` before this attempt was admitted.
    pub rejected: u32,
    pub content_chunks: usize,
    pub usage_completion_tokens: Option<u64>,
    pub finishes: usize,
    pub done_markers: usize,
    pub ending: Ending,
    pub error: Option<String>,
}

impl RequestLog {
    /// More than one finish or `[DONE]`, or more tokens than asked: the request was answered
    /// twice (e.g. a migrated stream that repeated what it had already sent).
    pub fn answered_twice(&self, osl: usize) -> bool {
        self.finishes > 1
            || self.done_markers > 1
            || self.content_chunks > osl
            || self
                .usage_completion_tokens
                .is_some_and(|n| n as usize > osl)
    }

    /// A failure the client was told about: an error event closed by `[DONE]`, or an error
    /// answer.
    pub fn failed_clearly(&self) -> bool {
        match self.ending {
            Ending::ErrorEvent => self.done_markers == 1 && self.error.is_some(),
            Ending::HttpError => self.error.is_some(),
            _ => false,
        }
    }
}

/// Runs the clients to the end of `shape.duration`, then waits for what is in flight.
pub async fn run(shape: LoadShape, t0: Instant, logs: Arc<Mutex<Vec<RequestLog>>>) {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(shape.streams)
        .build()
        .expect("a default reqwest client builds");
    let mut tasks = Vec::new();
    for stream in 0..shape.streams {
        let (shape, client, logs) = (shape.clone(), client.clone(), logs.clone());
        tasks.push(tokio::spawn(async move {
            // Staggered so the first wave does not arrive as one burst.
            tokio::time::sleep(Duration::from_millis(5 * stream as u64)).await;
            let mut rng = ChaCha8Rng::seed_from_u64(stream as u64);
            let mut k = 0usize;
            while t0.elapsed() < shape.duration {
                // Offset by stream, so the long prompts do not all arrive in the first wave.
                let long = shape.long_isl > 0
                    && shape.long_every > 0
                    && (k + stream).is_multiple_of(shape.long_every);
                let isl = if long { shape.long_isl } else { shape.isl };
                let prompt: Vec<u32> = (0..isl).map(|_| rng.random_range(100..30_000)).collect();
                let log = request(&client, &shape, stream, &prompt, t0).await;
                let failed = log.ending != Ending::Completed;
                logs.lock().unwrap_or_else(|e| e.into_inner()).push(log);
                if failed {
                    // As a real client backs off: a failure that comes back at once would
                    // otherwise be counted thousands of times a second.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                k += 1;
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
}

/// One request, retried after each 503 that says when to come back.
async fn request(
    client: &reqwest::Client,
    shape: &LoadShape,
    stream: usize,
    prompt: &[u32],
    t0: Instant,
) -> RequestLog {
    let start = Instant::now();
    let mut log = RequestLog {
        stream,
        isl: prompt.len(),
        start_s: (start - t0).as_secs_f64(),
        end_s: 0.0,
        ttft_s: None,
        rejected: 0,
        content_chunks: 0,
        usage_completion_tokens: None,
        finishes: 0,
        done_markers: 0,
        ending: Ending::Hung,
        error: None,
    };
    let body = json!({
        "model": shape.model, "prompt": prompt, "max_tokens": shape.osl, "stream": true,
        "stream_options": {"include_usage": true}, "ignore_eos": true, "temperature": 0,
    });
    let url = format!("{}/v1/completions", shape.url);
    // Rejections have their own budget, and an admitted attempt the whole timeout.
    let give_up = start + shape.request_timeout;
    loop {
        let attempt = tokio::time::timeout(
            shape.request_timeout,
            exchange(client, &url, &body, start, &mut log),
        );
        match attempt.await {
            Err(_) => {
                log.ending = Ending::Hung;
                log.error = Some(format!("not finished within {:?}", shape.request_timeout));
                break;
            }
            Ok(Attempt::Ended(ending)) => {
                log.ending = ending;
                break;
            }
            Ok(Attempt::RetryAfter(wait)) => {
                log.rejected += 1;
                let wait = wait.min(shape.max_retry_after);
                if Instant::now() + wait >= give_up {
                    log.ending = Ending::GaveUp;
                    log.error = Some(format!("still rejected after {} tries", log.rejected));
                    break;
                }
                tokio::time::sleep(wait).await;
            }
        }
    }
    if log.ending == Ending::Completed && log.usage_completion_tokens != Some(shape.osl as u64) {
        log.ending = Ending::Incomplete;
        log.error = Some(format!(
            "usage says {:?} tokens, {} asked",
            log.usage_completion_tokens, shape.osl
        ));
    }
    log.end_s = t0.elapsed().as_secs_f64();
    log
}

enum Attempt {
    Ended(Ending),
    RetryAfter(Duration),
}

async fn exchange(
    client: &reqwest::Client,
    url: &str,
    body: &Value,
    start: Instant,
    log: &mut RequestLog,
) -> Attempt {
    let resp = match client.post(url).json(body).send().await {
        Ok(r) => r,
        Err(e) => {
            log.error = Some(format!("{url}: {e}"));
            return Attempt::Ended(Ending::Transport);
        }
    };
    let status = resp.status().as_u16();
    if status != 200 {
        let retry_after = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        let text = resp.text().await.unwrap_or_default();
        if let (503, Some(secs)) = (status, retry_after) {
            return Attempt::RetryAfter(Duration::from_secs(secs));
        }
        let message = serde_json::from_str::<Value>(&text)
            .ok()
            .and_then(|v| v["error"]["message"].as_str().map(str::to_string));
        log.error = Some(match message {
            Some(m) => format!("{status}: {m}"),
            None => format!("{status} without OpenAI's error body: {text:.200}"),
        });
        return Attempt::Ended(if message_is_clear(&text) {
            Ending::HttpError
        } else {
            Ending::Transport
        });
    }
    let mut bytes = resp.bytes_stream();
    let mut pending = Vec::<u8>::new();
    let mut error_event = false;
    while let Some(chunk) = bytes.next().await {
        let chunk = match chunk {
            Ok(c) => c,
            Err(e) => {
                log.error = Some(format!("the stream broke: {e}"));
                return Attempt::Ended(Ending::Transport);
            }
        };
        pending.extend_from_slice(&chunk);
        while let Some(end) = find(&pending, b"\n\n") {
            let event: Vec<u8> = pending.drain(..end + 2).collect();
            for line in String::from_utf8_lossy(&event).lines() {
                let Some(data) = line.strip_prefix("data:") else {
                    continue;
                };
                let data = data.trim();
                if data == "[DONE]" {
                    log.done_markers += 1;
                    continue;
                }
                let Ok(v) = serde_json::from_str::<Value>(data) else {
                    log.error = Some(format!("an event that is not JSON: {data:.200}"));
                    return Attempt::Ended(Ending::Transport);
                };
                if let Some(e) = v.get("error") {
                    error_event = true;
                    log.error = Some(e["message"].as_str().unwrap_or("(no message)").to_string());
                    continue;
                }
                if let Some(choice) = v["choices"].get(0) {
                    if choice["text"].as_str().is_some_and(|t| !t.is_empty()) {
                        log.content_chunks += 1;
                        log.ttft_s.get_or_insert(start.elapsed().as_secs_f64());
                    }
                    if !choice["finish_reason"].is_null() {
                        log.finishes += 1;
                    }
                }
                if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
                    log.usage_completion_tokens = Some(n);
                }
            }
        }
    }
    Attempt::Ended(if error_event {
        Ending::ErrorEvent
    } else if log.done_markers >= 1 && log.finishes >= 1 {
        Ending::Completed
    } else {
        log.error = Some(format!(
            "the stream ended after {} chunks without {}",
            log.content_chunks,
            if log.done_markers == 0 {
                "[DONE]"
            } else {
                "a finish"
            }
        ));
        Ending::Incomplete
    })
}

fn message_is_clear(text: &str) -> bool {
    serde_json::from_str::<Value>(text)
        .ok()
        .is_some_and(|v| v["error"]["message"].is_string())
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log(ending: Ending) -> RequestLog {
        RequestLog {
            stream: 0,
            isl: 8,
            start_s: 0.0,
            end_s: 1.0,
            ttft_s: Some(0.1),
            rejected: 0,
            content_chunks: 4,
            usage_completion_tokens: Some(4),
            finishes: 1,
            done_markers: 1,
            ending,
            error: None,
        }
    }

    #[test]
    fn a_second_finish_or_extra_tokens_is_answered_twice() {
        let ok = log(Ending::Completed);
        assert!(!ok.answered_twice(4));
        assert!(RequestLog {
            finishes: 2,
            ..ok.clone()
        }
        .answered_twice(4));
        assert!(RequestLog {
            done_markers: 2,
            ..ok.clone()
        }
        .answered_twice(4));
        assert!(RequestLog {
            content_chunks: 5,
            ..ok.clone()
        }
        .answered_twice(4));
        assert!(RequestLog {
            usage_completion_tokens: Some(5),
            ..ok
        }
        .answered_twice(4));
    }

    #[test]
    fn only_an_error_event_closed_by_done_is_a_clear_failure() {
        let mut e = log(Ending::ErrorEvent);
        assert!(!e.failed_clearly(), "no message");
        e.error = Some("worker died".into());
        assert!(e.failed_clearly());
        e.done_markers = 0;
        assert!(!e.failed_clearly(), "no [DONE]");
        let mut t = log(Ending::Transport);
        t.error = Some("broke".into());
        assert!(!t.failed_clearly());
    }
}
