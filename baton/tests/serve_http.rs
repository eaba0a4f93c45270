//! `baton serve` over real HTTP: each endpoint, streaming against non-streaming, stop strings,
//! exact lengths, `n`, logprobs, usage and prefix-cache hits, every error code, many
//! concurrent streams, and aborted streams giving their KV blocks back.
//!
//! The servers are real child processes (see `common`): (A) a shared main server, (B) one with
//! an API key, a small body limit and one request in flight, (C) one without a worker, and (D)
//! a quiet one for the tests that need the engine to themselves.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};

fn chat_body(content: &str, max_tokens: u32) -> Value {
    json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
    })
}

fn completion_body(prompt: Value, max_tokens: u32) -> Value {
    json!({"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
}

fn with(mut body: Value, extra: Value) -> Value {
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

/// Checks the usage object: totals add up; returns (prompt, completion, cached).
fn check_usage(u: &Value) -> (u64, u64, u64) {
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

/// Checks a non-streamed chat completion's shape; returns its first choice's text.
fn check_chat(v: &Value) -> String {
    assert_eq!(v["object"], "chat.completion", "{v}");
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"), "{v}");
    assert_eq!(v["model"], MODEL, "{v}");
    assert!(v["created"].is_u64(), "{v}");
    let choices = v["choices"].as_array().expect("choices");
    assert!(!choices.is_empty(), "{v}");
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], i as u64, "{v}");
        assert_eq!(c["message"]["role"], "assistant", "{v}");
        assert!(c["message"]["content"].is_string(), "{v}");
        let fr = c["finish_reason"].as_str().expect("finish_reason");
        assert!(fr == "stop" || fr == "length", "{v}");
    }
    check_usage(&v["usage"]);
    choices[0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Checks a non-streamed text completion's shape; returns its first choice's text.
fn check_completion(v: &Value) -> String {
    assert_eq!(v["object"], "text_completion", "{v}");
    assert!(v["id"].as_str().unwrap().starts_with("cmpl-"), "{v}");
    assert_eq!(v["model"], MODEL, "{v}");
    assert!(v["created"].is_u64(), "{v}");
    let choices = v["choices"].as_array().expect("choices");
    assert!(!choices.is_empty(), "{v}");
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], i as u64, "{v}");
        assert!(c["text"].is_string(), "{v}");
        let fr = c["finish_reason"].as_str().expect("finish_reason");
        assert!(fr == "stop" || fr == "length", "{v}");
    }
    check_usage(&v["usage"]);
    choices[0]["text"].as_str().unwrap().to_string()
}

async fn ok_json(client: &reqwest::Client, url: &str, body: &Value) -> Value {
    let (status, v) = post_json(client, url, body).await;
    assert_eq!(status, 200, "POST {url} {body} answered {status}: {v}");
    v
}

async fn stream(client: &reqwest::Client, url: &str, body: &Value) -> Stream {
    let resp = client
        .post(url)
        .json(body)
        .send()
        .await
        .unwrap_or_else(|e| panic!("POST {url} failed: {e}"));
    collect_stream(resp).await
}

// ---------------------------------------------------------------------------------------------
// 1. Each endpoint

#[tokio::test]
async fn models_health_live_and_metrics() {
    let a = main_server();
    let client = client();

    let (status, body) = get_text(&client, &a.url("/v1/models")).await;
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["object"], "list", "{v}");
    let data = v["data"].as_array().expect("data");
    let m = data
        .iter()
        .find(|m| m["id"] == MODEL)
        .unwrap_or_else(|| panic!("{MODEL} not listed: {v}"));
    assert_eq!(m["object"], "model", "{v}");

    let (status, body) = get_text(&client, &a.url("/health")).await;
    assert_eq!(status, 200, "/health on a server with a worker: {body}");
    let (status, _) = get_text(&client, &a.url("/live")).await;
    assert_eq!(status, 200);

    // A request, so that the counters have something to show.
    ok_json(
        &client,
        &a.url("/v1/completions"),
        &completion_body(json!("Hello"), 2),
    )
    .await;
    let (status, metrics) = get_text(&client, &a.url("/metrics")).await;
    assert_eq!(status, 200);
    assert_eq!(
        metric(&metrics, "baton_kv_blocks_total"),
        Some(128.0),
        "{metrics}"
    );
    for name in [
        "baton_kv_blocks_used",
        "baton_running_sequences",
        "baton_waiting_sequences",
        "baton_inflight_requests",
    ] {
        assert!(metric(&metrics, name).is_some(), "no {name}: {metrics}");
    }
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("baton_requests_total{")
                && l.contains("endpoint=\"completions\"")
                && l.contains("status=\"200\"")),
        "no completions request counted: {metrics}"
    );
    assert!(
        metrics.contains("baton_time_to_first_token_seconds_bucket"),
        "{metrics}"
    );

    let c = workerless_server();
    let (status, body) = get_text(&client, &c.url("/health")).await;
    assert_eq!(status, 503, "/health without a worker: {body}");
    assert_openai_error(
        &serde_json::from_str(&body).unwrap(),
        "/health without a worker",
    );
    let (status, _) = get_text(&client, &c.url("/live")).await;
    assert_eq!(status, 200, "/live without a worker");
}

#[tokio::test]
async fn chat_and_completions_are_well_formed() {
    let a = main_server();
    let client = client();
    let chat = a.url("/v1/chat/completions");
    let cmpl = a.url("/v1/completions");

    let v = ok_json(
        &client,
        &chat,
        &chat_body("What is the capital of France?", 16),
    )
    .await;
    let text = check_chat(&v);
    assert!(!text.is_empty(), "{v}");
    assert!(
        v["usage"]["completion_tokens"].as_u64().unwrap() <= 16,
        "{v}"
    );
    assert!(
        v["choices"][0]["logprobs"].is_null(),
        "logprobs not asked for: {v}"
    );

    // Content as a list of text parts, a system message and an earlier assistant turn.
    let body = json!({
        "model": MODEL,
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": [{"type": "text", "text": "Name a colour."}]},
            {"role": "assistant", "content": "Blue."},
            {"role": "user", "content": [{"type": "text", "text": "Another"}, {"type": "text", "text": " one."}]},
        ],
        "max_tokens": 8,
        "temperature": 0,
    });
    check_chat(&ok_json(&client, &chat, &body).await);

    // max_completion_tokens wins over max_tokens.
    let body = with(
        chat_body("Count from one to fifty in words.", 30),
        json!({"max_completion_tokens": 5, "ignore_eos": true}),
    );
    let v = ok_json(&client, &chat, &body).await;
    check_chat(&v);
    assert_eq!(
        v["usage"]["completion_tokens"], 5,
        "max_completion_tokens 5: {v}"
    );

    // Completions: a string, token ids, echo.
    let v = ok_json(&client, &cmpl, &completion_body(json!("The sky is"), 8)).await;
    check_completion(&v);
    assert!(v["choices"][0]["logprobs"].is_null(), "{v}");

    let ids = json!([504, 3458, 282, 4649, 314]);
    let v = ok_json(
        &client,
        &cmpl,
        &with(completion_body(ids, 4), json!({"ignore_eos": true})),
    )
    .await;
    check_completion(&v);
    assert_eq!(v["usage"]["prompt_tokens"], 5, "a 5-token prompt: {v}");
    assert_eq!(v["usage"]["completion_tokens"], 4, "{v}");

    let v = ok_json(
        &client,
        &cmpl,
        &with(
            completion_body(json!([[504, 3458], [19556]]), 3),
            json!({"ignore_eos": true}),
        ),
    )
    .await;
    check_completion(&v);
    assert_eq!(
        v["choices"].as_array().unwrap().len(),
        2,
        "two token-id prompts: {v}"
    );

    let prompt = "Once upon a time";
    let v = ok_json(
        &client,
        &cmpl,
        &with(completion_body(json!(prompt), 6), json!({"echo": true})),
    )
    .await;
    let text = check_completion(&v);
    assert!(
        text.starts_with(prompt),
        "echo: text does not start with the prompt: {v}"
    );
    assert!(
        text.len() > prompt.len(),
        "echo: nothing generated after the prompt: {v}"
    );
}

// ---------------------------------------------------------------------------------------------
// 2. Streaming equals non-streaming (greedy)

#[tokio::test]
async fn greedy_stream_equals_non_stream() {
    let _quiet = QUIET.lock().await;
    let d = quiet_server();
    let client = client();
    let stream_opts = json!({"stream": true, "stream_options": {"include_usage": true}});

    for prompt in [
        "Write a haiku about autumn leaves.",
        "Explain what a CPU does.",
    ] {
        let body = chat_body(prompt, 32);
        let url = d.url("/v1/chat/completions");
        let v = ok_json(&client, &url, &body).await;
        let text = check_chat(&v);
        let s = stream(&client, &url, &with(body.clone(), stream_opts.clone())).await;
        let (choices, usage) = assemble(&s, true, true);
        assert_eq!(choices.len(), 1);
        assert_eq!(
            choices[0].text, text,
            "chat {prompt:?}: stream text differs"
        );
        assert_eq!(
            choices[0].finish_reason.as_deref(),
            v["choices"][0]["finish_reason"].as_str(),
            "chat {prompt:?}"
        );
        let usage = usage.unwrap();
        check_usage(&usage);
        assert_eq!(
            usage["completion_tokens"], v["usage"]["completion_tokens"],
            "chat {prompt:?}"
        );
        assert_eq!(
            usage["prompt_tokens"], v["usage"]["prompt_tokens"],
            "chat {prompt:?}"
        );
    }

    for prompt in ["The three laws of thermodynamics are", "def fibonacci(n):"] {
        let body = completion_body(json!(prompt), 32);
        let url = d.url("/v1/completions");
        let v = ok_json(&client, &url, &body).await;
        let text = check_completion(&v);
        let s = stream(&client, &url, &with(body.clone(), stream_opts.clone())).await;
        let (choices, usage) = assemble(&s, false, true);
        assert_eq!(choices.len(), 1);
        assert_eq!(
            choices[0].text, text,
            "completion {prompt:?}: stream text differs"
        );
        assert_eq!(
            choices[0].finish_reason.as_deref(),
            v["choices"][0]["finish_reason"].as_str(),
            "completion {prompt:?}"
        );
        let usage = usage.unwrap();
        check_usage(&usage);
        assert_eq!(
            usage["completion_tokens"], v["usage"]["completion_tokens"],
            "{prompt:?}"
        );
    }

    // Without include_usage the chunks carry no usage at all.
    let body = with(chat_body("Say hello.", 8), json!({"stream": true}));
    let s = stream(&client, &d.url("/v1/chat/completions"), &body).await;
    assemble(&s, true, false);
}

/// Multi-byte characters whose bytes span tokens come out whole, in the stream as well.
#[tokio::test]
async fn streamed_utf8_is_never_broken() {
    let _quiet = QUIET.lock().await;
    let d = quiet_server();
    let client = client();
    let url = d.url("/v1/chat/completions");
    let body = chat_body("Write a short poem in Chinese with emoji.", 40);
    let v = ok_json(&client, &url, &body).await;
    let text = check_chat(&v);
    assert!(
        !text.is_ascii(),
        "the prompt was meant to give non-ASCII text: {text:?}"
    );
    let s = stream(&client, &url, &with(body, json!({"stream": true}))).await;
    for c in &s.chunks {
        let t = c["choices"][0]["delta"]["content"].as_str().unwrap_or("");
        assert!(
            !t.contains('\u{FFFD}'),
            "a broken character in a chunk: {c}"
        );
    }
    let (choices, _) = assemble(&s, true, false);
    assert_eq!(choices[0].text, text);
}

// ---------------------------------------------------------------------------------------------
// 3. Stop strings

/// A stop string that starts inside one token and ends inside a later one.
#[tokio::test]
async fn stop_string_spanning_tokens_completions() {
    let _quiet = QUIET.lock().await;
    let d = quiet_server();
    let client = client();
    let url = d.url("/v1/completions");
    let base = completion_body(json!("The history of the Roman Empire began"), 32);

    let v = ok_json(&client, &url, &with(base.clone(), json!({"logprobs": 1}))).await;
    let text = check_completion(&v);
    let lp = &v["choices"][0]["logprobs"];
    let tokens: Vec<&str> = lp["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    let offsets: Vec<usize> = lp["text_offset"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o.as_u64().unwrap() as usize)
        .collect();
    assert_eq!(tokens.concat(), text, "tokens do not make up the text: {v}");

    // Start one byte into a token of ≥ 2 bytes, end half-way through the next non-empty one.
    let mut stop = None;
    for i in 2..tokens.len().saturating_sub(1) {
        let (a, b) = (tokens[i], tokens[i + 1]);
        if a.len() < 2 || b.len() < 2 || !a.is_ascii() || !b.is_ascii() {
            continue;
        }
        let start = offsets[i] + 1;
        let end = offsets[i + 1] + b.len() / 2;
        let s = &text[start..end];
        if text.find(s) == Some(start) && !s.trim().is_empty() {
            stop = Some((start, s.to_string()));
            break;
        }
    }
    let (start, stop) =
        stop.unwrap_or_else(|| panic!("no token-spanning stop string in {tokens:?}"));
    let want = &text[..start];

    let body = with(
        base.clone(),
        json!({"stop": ["NEVER-SEEN-STOP", stop.clone()]}),
    );
    let v = ok_json(&client, &url, &body).await;
    assert_eq!(
        v["choices"][0]["text"], want,
        "stop {stop:?} in {text:?}: {v}"
    );
    assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");

    let s = stream(&client, &url, &with(body, json!({"stream": true}))).await;
    let (choices, _) = assemble(&s, false, false);
    assert_eq!(
        choices[0].text, want,
        "streamed with stop {stop:?}: {:?}",
        s.chunks
    );
    assert_eq!(choices[0].finish_reason.as_deref(), Some("stop"));
}

#[tokio::test]
async fn stop_string_of_words_chat() {
    let _quiet = QUIET.lock().await;
    let d = quiet_server();
    let client = client();
    let url = d.url("/v1/chat/completions");
    let base = chat_body("Describe the ocean in two sentences.", 32);
    let text = check_chat(&ok_json(&client, &url, &base).await);
    let words: Vec<&str> = text.split(' ').filter(|w| !w.is_empty()).collect();
    assert!(
        words.len() >= 6,
        "too short to pick a stop string: {text:?}"
    );
    let stop = format!("{} {}", words[3], words[4]);
    let at = text.find(&stop).unwrap();
    let want = &text[..at];

    let body = with(base, json!({"stop": stop}));
    let v = ok_json(&client, &url, &body).await;
    assert_eq!(
        v["choices"][0]["message"]["content"], want,
        "stop {stop:?} in {text:?}: {v}"
    );
    assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");

    let s = stream(&client, &url, &with(body, json!({"stream": true}))).await;
    let (choices, _) = assemble(&s, true, false);
    assert_eq!(
        choices[0].text, want,
        "streamed with stop {stop:?}: {:?}",
        s.chunks
    );
    assert_eq!(choices[0].finish_reason.as_deref(), Some("stop"));
}

// ---------------------------------------------------------------------------------------------
// 4. Exact lengths

#[tokio::test]
async fn ignore_eos_and_min_tokens_give_exact_lengths() {
    let a = main_server();
    let client = client();
    let chat = a.url("/v1/chat/completions");
    let cmpl = a.url("/v1/completions");
    let short = chat_body("Say only: yes", 20);

    // Without them, the answer ends early on EOS.
    let v = ok_json(&client, &chat, &short).await;
    check_chat(&v);
    assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");
    assert!(
        v["usage"]["completion_tokens"].as_u64().unwrap() < 12,
        "{v}"
    );

    let v = ok_json(
        &client,
        &chat,
        &with(short.clone(), json!({"ignore_eos": true})),
    )
    .await;
    check_chat(&v);
    assert_eq!(v["usage"]["completion_tokens"], 20, "ignore_eos: {v}");
    assert_eq!(v["choices"][0]["finish_reason"], "length", "{v}");

    let v = ok_json(
        &client,
        &chat,
        &with(short.clone(), json!({"nvext": {"ignore_eos": true}})),
    )
    .await;
    assert_eq!(v["usage"]["completion_tokens"], 20, "nvext.ignore_eos: {v}");
    assert_eq!(v["choices"][0]["finish_reason"], "length", "{v}");

    let v = ok_json(
        &client,
        &cmpl,
        &with(
            completion_body(json!("The end."), 20),
            json!({"nvext": {"ignore_eos": true}}),
        ),
    )
    .await;
    assert_eq!(
        v["usage"]["completion_tokens"], 20,
        "completions nvext.ignore_eos: {v}"
    );
    assert_eq!(v["choices"][0]["finish_reason"], "length", "{v}");

    let v = ok_json(
        &client,
        &chat,
        &with(chat_body("Say only: yes", 12), json!({"min_tokens": 12})),
    )
    .await;
    check_chat(&v);
    assert_eq!(
        v["usage"]["completion_tokens"], 12,
        "min_tokens 12, max_tokens 12: {v}"
    );
    assert_eq!(v["choices"][0]["finish_reason"], "length", "{v}");

    let v = ok_json(
        &client,
        &chat,
        &with(chat_body("Say only: yes", 64), json!({"min_tokens": 12})),
    )
    .await;
    assert!(
        v["usage"]["completion_tokens"].as_u64().unwrap() >= 12,
        "min_tokens 12: {v}"
    );

    // The same in a stream.
    let body = with(
        short,
        json!({"ignore_eos": true, "stream": true, "stream_options": {"include_usage": true}}),
    );
    let s = stream(&client, &chat, &body).await;
    let (choices, usage) = assemble(&s, true, true);
    assert_eq!(
        usage.unwrap()["completion_tokens"],
        20,
        "streamed ignore_eos"
    );
    assert_eq!(choices[0].finish_reason.as_deref(), Some("length"));
}

/// `ignore_eos` clears stop strings as well as EOS: benchmarks depend on exact lengths.
#[tokio::test]
async fn ignore_eos_also_clears_stop_strings() {
    let a = main_server();
    let client = client();
    let chat = a.url("/v1/chat/completions");
    let body = with(
        chat_body("Say only: yes", 20),
        json!({"ignore_eos": true, "stop": ["Yes", "yes", "."]}),
    );
    let v = ok_json(&client, &chat, &body).await;
    assert_eq!(
        v["usage"]["completion_tokens"], 20,
        "ignore_eos with stop strings: {v}"
    );
    assert_eq!(v["choices"][0]["finish_reason"], "length", "{v}");
    let body = with(
        body,
        json!({"stream": true, "stream_options": {"include_usage": true}}),
    );
    let s = stream(&client, &chat, &body).await;
    let (choices, usage) = assemble(&s, true, true);
    assert_eq!(
        usage.unwrap()["completion_tokens"],
        20,
        "streamed: {:?}",
        s.chunks
    );
    assert_eq!(choices[0].finish_reason.as_deref(), Some("length"));
}

// ---------------------------------------------------------------------------------------------
// 5. n

#[tokio::test]
async fn n_choices() {
    let a = main_server();
    let client = client();
    let cmpl = a.url("/v1/completions");

    let body = json!({"model": MODEL, "prompt": "My favourite animal is", "max_tokens": 8,
                      "temperature": 0.8, "seed": 1234, "n": 2});
    let v = ok_json(&client, &cmpl, &body).await;
    check_completion(&v);
    assert_eq!(v["choices"].as_array().unwrap().len(), 2, "{v}");

    let body = with(
        chat_body("Tell me a random word.", 8),
        json!({"n": 2, "temperature": 0.8}),
    );
    let v = ok_json(&client, &a.url("/v1/chat/completions"), &body).await;
    check_chat(&v);
    assert_eq!(v["choices"].as_array().unwrap().len(), 2, "{v}");

    // Two prompts × n 2: index = prompt_index * n + i; echo shows which prompt each one had.
    let prompts = ["Red, green and", "One, two, three,"];
    let body = json!({"model": MODEL, "prompt": prompts, "max_tokens": 4, "temperature": 0.8,
                      "seed": 7, "n": 2, "echo": true});
    let v = ok_json(&client, &cmpl, &body).await;
    check_completion(&v);
    let choices = v["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 4, "{v}");
    for (k, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], k as u64, "{v}");
        let t = c["text"].as_str().unwrap();
        assert!(
            t.starts_with(prompts[k / 2]),
            "choice {k} is not of prompt {}: {v}",
            k / 2
        );
    }

    // Streamed n 2: both choices finish, each starting with its role delta.
    let body = with(
        chat_body("Name a fruit.", 6),
        json!({"n": 2, "temperature": 0.8, "stream": true}),
    );
    let s = stream(&client, &a.url("/v1/chat/completions"), &body).await;
    let (choices, _) = assemble(&s, true, false);
    assert_eq!(choices.len(), 2, "{:?}", s.chunks);
}

// ---------------------------------------------------------------------------------------------
// 6. Logprobs

#[tokio::test]
async fn logprobs_shapes() {
    let a = main_server();
    let client = client();

    let body = with(
        chat_body("List three planets.", 10),
        json!({"logprobs": true, "top_logprobs": 3}),
    );
    let v = ok_json(&client, &a.url("/v1/chat/completions"), &body).await;
    let text = check_chat(&v);
    let content = v["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap_or_else(|| panic!("{v}"));
    assert_eq!(
        content.len() as u64,
        v["usage"]["completion_tokens"].as_u64().unwrap(),
        "{v}"
    );
    let mut joined = String::new();
    for e in content {
        let token = e["token"].as_str().expect("token");
        joined.push_str(token);
        let lp = e["logprob"].as_f64().expect("logprob");
        assert!(lp <= 0.0, "{e}");
        let bytes: Vec<u8> = e["bytes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b.as_u64().unwrap() as u8)
            .collect();
        assert_eq!(bytes, token.as_bytes(), "{e}");
        let top = e["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 3, "{e}");
        let tops: Vec<f64> = top.iter().map(|t| t["logprob"].as_f64().unwrap()).collect();
        assert!(tops.iter().all(|&l| l <= 0.0), "{e}");
        assert!(
            tops.windows(2).all(|w| w[0] >= w[1]),
            "top_logprobs not sorted: {e}"
        );
        assert!(
            (lp - tops[0]).abs() < 1e-4,
            "greedy token is not the most likely: {e}"
        );
        assert!(
            top.iter()
                .any(|t| t["token"] == token && (t["logprob"].as_f64().unwrap() - lp).abs() < 1e-4),
            "the chosen token is not among the top: {e}"
        );
        assert!(
            top.iter()
                .all(|t| t["token"].is_string() && t["bytes"].is_array()),
            "{e}"
        );
    }
    assert_eq!(joined, text, "logprob tokens do not make up the text");

    // Streamed: one logprob entry per token, across the chunks.
    let body = with(
        body,
        json!({"stream": true, "stream_options": {"include_usage": true}}),
    );
    let s = stream(&client, &a.url("/v1/chat/completions"), &body).await;
    let (choices, usage) = assemble(&s, true, true);
    assert_eq!(
        choices[0].logprob_tokens as u64,
        usage.unwrap()["completion_tokens"].as_u64().unwrap()
    );

    let body = with(
        completion_body(json!("The capital of Italy is"), 10),
        json!({"logprobs": 3}),
    );
    let v = ok_json(&client, &a.url("/v1/completions"), &body).await;
    let text = check_completion(&v);
    let n = v["usage"]["completion_tokens"].as_u64().unwrap() as usize;
    let lp = &v["choices"][0]["logprobs"];
    for key in ["tokens", "token_logprobs", "top_logprobs", "text_offset"] {
        assert_eq!(
            lp[key]
                .as_array()
                .unwrap_or_else(|| panic!("{key}: {v}"))
                .len(),
            n,
            "{key}: {v}"
        );
    }
    let tokens: Vec<&str> = lp["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert_eq!(tokens.concat(), text, "{v}");
    let mut expect_offset = 0;
    for k in 0..n {
        assert_eq!(
            lp["text_offset"][k], expect_offset as u64,
            "text_offset {k}: {v}"
        );
        expect_offset += tokens[k].len();
        let l = lp["token_logprobs"][k].as_f64().unwrap();
        assert!(l <= 0.0, "{v}");
        let top = lp["top_logprobs"][k].as_object().unwrap();
        assert!((1..=3).contains(&top.len()), "{v}");
        let best = top
            .values()
            .map(|x| x.as_f64().unwrap())
            .fold(f64::MIN, f64::max);
        assert!(
            (l - best).abs() < 1e-4,
            "greedy token is not the most likely at {k}: {v}"
        );
        assert!(
            top.contains_key(tokens[k]),
            "token {k} not in its top_logprobs: {v}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 7. Usage and cached tokens

#[tokio::test]
async fn repeated_prompt_hits_the_prefix_cache() {
    let _quiet = QUIET.lock().await;
    let d = quiet_server();
    let client = client();
    let url = d.url("/v1/completions");
    let mut prompt = format!("Record {} follows. ", nonce());
    for i in 0..40 {
        prompt.push_str(&format!(
            "The quick brown fox jumps over lazy dog number {i}. "
        ));
    }
    let body = completion_body(json!(prompt), 4);

    let v = ok_json(&client, &url, &body).await;
    check_completion(&v);
    let (p, _, cached) = check_usage(&v["usage"]);
    assert!(p > 300, "the prompt was meant to be over 300 tokens: {v}");
    assert_eq!(cached, 0, "a fresh prompt reported cached tokens: {v}");

    let v = ok_json(&client, &url, &body).await;
    let (p2, _, cached) = check_usage(&v["usage"]);
    assert_eq!(p2, p, "{v}");
    assert!(
        cached >= 256,
        "repeated {p}-token prompt: cached_tokens {cached}: {v}"
    );
    assert!(cached < p, "{v}");
    assert_eq!(
        cached % 128,
        0,
        "only whole 128-token blocks are cached: {v}"
    );

    let s = stream(
        &client,
        &url,
        &with(
            body,
            json!({"stream": true, "stream_options": {"include_usage": true}}),
        ),
    )
    .await;
    let (_, usage) = assemble(&s, false, true);
    let (_, _, cached) = check_usage(&usage.unwrap());
    assert!(cached >= 256, "streamed repeat: cached_tokens {cached}");
}

// ---------------------------------------------------------------------------------------------
// 8. Errors

fn assert_error(status: u16, body: &Value, want: u16, param: Option<&str>, what: &str) {
    assert_eq!(status, want, "{what}: {body}");
    assert_openai_error(body, what);
    if let Some(p) = param {
        assert_eq!(body["error"]["param"], p, "{what}: {body}");
    }
}

#[tokio::test]
async fn bad_requests_get_400() {
    let a = main_server();
    let client = client();
    let chat = a.url("/v1/chat/completions");
    let cmpl = a.url("/v1/completions");

    let cases: Vec<(&str, &String, Value, &str)> = vec![
        (
            "temperature -1",
            &chat,
            with(chat_body("hi", 4), json!({"temperature": -1})),
            "temperature",
        ),
        ("n 0", &chat, with(chat_body("hi", 4), json!({"n": 0})), "n"),
        (
            "n 0 (completions)",
            &cmpl,
            with(completion_body(json!("hi"), 4), json!({"n": 0})),
            "n",
        ),
        (
            "top_logprobs without logprobs",
            &chat,
            with(chat_body("hi", 4), json!({"top_logprobs": 3})),
            "top_logprobs",
        ),
        (
            "chat max_tokens 9000",
            &chat,
            chat_body("hi", 9000),
            "max_tokens",
        ),
        (
            "completions max_tokens 9000",
            &cmpl,
            completion_body(json!("hi"), 9000),
            "max_tokens",
        ),
    ];
    for (what, url, body, param) in cases {
        let (status, v) = post_json(&client, url, &body).await;
        assert_error(status, &v, 400, Some(param), what);
    }

    for url in [&chat, &cmpl] {
        let resp = client
            .post(url.as_str())
            .header("content-type", "application/json")
            .body("{\"model\": ")
            .send()
            .await
            .unwrap();
        let (status, v) = read_json(resp).await;
        assert_error(status, &v, 400, None, "malformed JSON");
    }

    // A prompt of 8000 tokens plus 300 more is over the 8192-token context.
    let long: Vec<u32> = (0..8000).map(|i| 1000 + (i % 5000)).collect();
    let (status, v) = post_json(&client, &cmpl, &completion_body(json!(long), 300)).await;
    assert_error(
        status,
        &v,
        400,
        Some("max_tokens"),
        "prompt + max_tokens over the context",
    );
}

/// Over the limit, chat's `top_logprobs` is the parameter at fault, and the error says so.
#[tokio::test]
async fn top_logprobs_over_the_limit_names_top_logprobs() {
    let a = main_server();
    let client = client();
    let body = with(
        chat_body("hi", 2),
        json!({"logprobs": true, "top_logprobs": 1000}),
    );
    let (status, v) = post_json(&client, &a.url("/v1/chat/completions"), &body).await;
    assert_error(status, &v, 400, Some("top_logprobs"), "top_logprobs 1000");
}

#[tokio::test]
async fn unknown_model_gets_404() {
    let a = main_server();
    let client = client();
    let mut body = chat_body("hi", 4);
    body["model"] = json!("no-such-model");
    let (status, v) = post_json(&client, &a.url("/v1/chat/completions"), &body).await;
    assert_error(status, &v, 404, Some("model"), "chat, unknown model");
    let mut body = completion_body(json!("hi"), 4);
    body["model"] = json!("no-such-model");
    let (status, v) = post_json(&client, &a.url("/v1/completions"), &body).await;
    assert_error(status, &v, 404, Some("model"), "completions, unknown model");
}

/// Odd bodies of every kind get a 4xx with an OpenAI error (or a 200), never a 5xx, and the
/// server still serves afterwards.
#[tokio::test]
async fn user_errors_never_give_5xx() {
    let a = main_server();
    let client = client();
    let chat = a.url("/v1/chat/completions");
    let cmpl = a.url("/v1/completions");
    let c = |extra: Value| with(chat_body("hi", 2), extra);
    let p = |extra: Value| with(completion_body(json!("hi"), 2), extra);
    let cases: Vec<(&String, Value)> = vec![
        (&chat, json!({"model": MODEL, "messages": []})),
        (&chat, json!({"model": MODEL})),
        (
            &chat,
            json!({"messages": [{"role": "user", "content": "hi"}]}),
        ),
        (
            &chat,
            json!({"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}], "max_tokens": 2}),
        ),
        (
            &chat,
            json!({"model": MODEL, "messages": [{"role": "user"}], "max_tokens": 2}),
        ),
        (
            &chat,
            json!({"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "max_tokens": 2}),
        ),
        (&chat, json!({"model": MODEL, "messages": "hi"})),
        (&chat, json!([])),
        (&chat, json!(null)),
        (&chat, json!("string")),
        (&chat, c(json!({"max_tokens": -1}))),
        (&chat, c(json!({"max_tokens": 0}))),
        (&chat, c(json!({"max_tokens": "ten"}))),
        (&chat, c(json!({"temperature": "hot"}))),
        (&chat, c(json!({"temperature": 1e300}))),
        (&chat, c(json!({"top_p": 2.0}))),
        (&chat, c(json!({"top_p": 0.0}))),
        (&chat, c(json!({"top_k": -5}))),
        (&chat, c(json!({"min_p": 2.0}))),
        (&chat, c(json!({"repetition_penalty": 0.0}))),
        (&chat, c(json!({"presence_penalty": 5.0}))),
        (&chat, c(json!({"frequency_penalty": -5.0}))),
        (&chat, c(json!({"stop": 5}))),
        (&chat, c(json!({"stop": ["", "x"]}))),
        (&chat, c(json!({"seed": -1}))),
        (&chat, c(json!({"n": -1}))),
        (&chat, c(json!({"logprobs": true, "top_logprobs": 1000}))),
        (&chat, c(json!({"logprobs": true, "top_logprobs": -1}))),
        (&chat, c(json!({"min_tokens": 10}))),
        (&chat, c(json!({"stream": "yes"}))),
        (&chat, c(json!({"stream_options": {"include_usage": true}}))),
        (&chat, c(json!({"nvext": "x"}))),
        (&cmpl, json!({"model": MODEL})),
        (&cmpl, p(json!({"prompt": ""}))),
        (&cmpl, p(json!({"prompt": []}))),
        (&cmpl, p(json!({"prompt": [[]]}))),
        (&cmpl, p(json!({"prompt": [-1]}))),
        (&cmpl, p(json!({"prompt": [999999999]}))),
        (&cmpl, p(json!({"prompt": [1.5]}))),
        (&cmpl, p(json!({"prompt": [["a"]]}))),
        (&cmpl, p(json!({"prompt": {"a": 1}}))),
        (&cmpl, p(json!({"logprobs": 1000}))),
        (&cmpl, p(json!({"logprobs": -1}))),
        (&cmpl, p(json!({"echo": "yes"}))),
        (&cmpl, p(json!({"prompt": "\u{0}\u{FFFF}"}))),
    ];
    for (url, body) in cases {
        let (status, v) = post_json(&client, url, &body).await;
        assert!(status < 500, "{url} {body} answered {status}: {v}");
        if status != 200 {
            assert!((400..500).contains(&status), "{url} {body}: {status} {v}");
            assert_openai_error(&v, &format!("{url} {body} -> {status}"));
        }
    }
    for (ctype, raw) in [
        ("application/json", &b""[..]),
        ("text/plain", b"{}"),
        ("application/json", b"\xff\xfe{"),
    ] {
        let resp = client
            .post(chat.as_str())
            .header("content-type", ctype)
            .body(raw)
            .send()
            .await
            .unwrap();
        let (status, v) = read_json(resp).await;
        assert!(
            (400..500).contains(&status),
            "{ctype} {raw:?} answered {status}: {v}"
        );
        assert_openai_error(&v, &format!("{ctype} body {raw:?} -> {status}"));
    }
    let (status, _) = get_text(&client, &a.url("/v1/no-such-route")).await;
    assert_eq!(status, 404);
    // Still healthy and serving.
    let (status, body) = get_text(&client, &a.url("/health")).await;
    assert_eq!(status, 200, "{body}\n{}", a.log_tail());
    check_chat(&ok_json(&client, &chat, &chat_body("hi", 2)).await);
}

#[tokio::test]
async fn api_key_401_and_body_limit_413() {
    let _b = LIMITED.lock().await;
    let b = limited_server();
    let client = client();
    let chat = b.url("/v1/chat/completions");
    let body = chat_body("hi", 2);

    let (status, v) = read_json(client.post(&chat).json(&body).send().await.unwrap()).await;
    assert_error(status, &v, 401, None, "no key");
    let resp = client
        .post(&chat)
        .bearer_auth("wrong")
        .json(&body)
        .send()
        .await
        .unwrap();
    let (status, v) = read_json(resp).await;
    assert_error(status, &v, 401, None, "wrong key");
    let resp = client.get(b.url("/v1/models")).send().await.unwrap();
    let (status, v) = read_json(resp).await;
    assert_error(status, &v, 401, None, "models without a key");

    let resp = client
        .post(&chat)
        .bearer_auth("secret")
        .json(&body)
        .send()
        .await
        .unwrap();
    let (status, v) = read_json(resp).await;
    assert_eq!(status, 200, "right key: {v}");
    check_chat(&v);
    let resp = client
        .get(b.url("/v1/models"))
        .bearer_auth("secret")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);

    // Health and liveness are for the orchestrator, not behind the key.
    for path in ["/health", "/live"] {
        let (status, body) = get_text(&client, &b.url(path)).await;
        assert_eq!(status, 200, "{path} without a key: {body}");
    }

    // A 10 KB body is over the 4 KiB limit; a 3 KB one is not.
    let big = chat_body(&"a ".repeat(5000), 2);
    let resp = client
        .post(&chat)
        .bearer_auth("secret")
        .json(&big)
        .send()
        .await
        .unwrap();
    let (status, v) = read_json(resp).await;
    assert_error(status, &v, 413, None, "10 KB body");
    let fits = chat_body(&"a ".repeat(1500), 2);
    let resp = client
        .post(&chat)
        .bearer_auth("secret")
        .json(&fits)
        .send()
        .await
        .unwrap();
    let (status, v) = read_json(resp).await;
    assert_eq!(status, 200, "3 KB body: {v}");
}

#[tokio::test]
async fn over_max_inflight_gets_503() {
    let _b = LIMITED.lock().await;
    let b = limited_server();
    let client = client();
    let chat = b.url("/v1/chat/completions");

    let long = with(
        chat_body("Tell me a long story.", 300),
        json!({"ignore_eos": true, "stream": true}),
    );
    let resp = client
        .post(&chat)
        .bearer_auth("secret")
        .json(&long)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let mut sse = Sse::new(resp);
    // Wait for the first content, so the request is surely being served.
    loop {
        let data = sse.next().await.expect("the long stream ended early");
        let v: Value = serde_json::from_str(&data).unwrap();
        if v["choices"][0]["delta"]["content"]
            .as_str()
            .is_some_and(|t| !t.is_empty())
        {
            break;
        }
    }
    for url in [chat.clone(), b.url("/v1/completions")] {
        let body = if url.ends_with("chat/completions") {
            chat_body("hi", 2)
        } else {
            completion_body(json!("hi"), 2)
        };
        let resp = client
            .post(&url)
            .bearer_auth("secret")
            .json(&body)
            .send()
            .await
            .unwrap();
        let (status, v) = read_json(resp).await;
        assert_error(
            status,
            &v,
            503,
            None,
            "second request while one is in flight",
        );
    }
    drop(sse);

    // Dropping the stream frees its place.
    let (ok, last) = wait_for(Duration::from_secs(60), || async {
        let resp = client
            .post(&chat)
            .bearer_auth("secret")
            .json(&chat_body("hi", 2))
            .send()
            .await
            .unwrap();
        let (status, v) = read_json(resp).await;
        (status == 200, (status, v))
    })
    .await;
    assert!(
        ok,
        "still refused 60 s after the in-flight stream was dropped: {last:?}"
    );
}

#[tokio::test]
async fn no_worker_gets_503() {
    let c = workerless_server();
    let client = client();
    let (status, v) = post_json(&client, &c.url("/v1/chat/completions"), &chat_body("hi", 2)).await;
    assert_error(status, &v, 503, None, "chat without a worker");
    let (status, v) = post_json(
        &client,
        &c.url("/v1/completions"),
        &completion_body(json!("hi"), 2),
    )
    .await;
    assert_error(status, &v, 503, None, "completions without a worker");
    let body = with(chat_body("hi", 2), json!({"stream": true}));
    let (status, v) = post_json(&client, &c.url("/v1/chat/completions"), &body).await;
    assert_error(status, &v, 503, None, "streamed chat without a worker");
}

// ---------------------------------------------------------------------------------------------
// 9. Many concurrent streams

#[tokio::test]
async fn sixty_four_concurrent_streams() {
    let a = main_server();
    let client = client();
    let url = a.url("/v1/chat/completions");
    let tasks: Vec<_> = (0..64)
        .map(|i| {
            let client = client.clone();
            let url = url.clone();
            tokio::spawn(async move {
                let body = with(
                    chat_body(&format!("Write a sentence about the number {i}."), 16),
                    json!({"stream": true, "stream_options": {"include_usage": true}}),
                );
                let s = stream(&client, &url, &body).await;
                let (choices, usage) = assemble(&s, true, true);
                let usage = usage.unwrap();
                check_usage(&usage);
                assert!(usage["completion_tokens"].as_u64().unwrap() <= 16);
                choices[0].finish_reason.clone().unwrap()
            })
        })
        .collect();
    for t in tasks {
        let fr = t.await.expect("a stream failed");
        assert!(fr == "stop" || fr == "length", "{fr}");
    }
}

// ---------------------------------------------------------------------------------------------
// 10. Aborted streams give their KV blocks back

#[tokio::test]
async fn aborted_streams_free_their_kv_blocks() {
    let _quiet = QUIET.lock().await;
    let d = quiet_server();
    let client = client();
    let url = d.url("/v1/chat/completions");

    for wave in 0..4 {
        let tasks: Vec<_> = (0..50)
            .map(|i| {
                let client = client.clone();
                let url = url.clone();
                tokio::spawn(async move {
                    // Long enough that, were they not cancelled, they would run for minutes.
                    let body = with(
                        chat_body(&format!("Tell a long story about ship {wave}-{i}."), 1000),
                        json!({"ignore_eos": true, "stream": true}),
                    );
                    let resp = client.post(&url).json(&body).send().await.unwrap();
                    assert_eq!(resp.status().as_u16(), 200);
                    let mut sse = Sse::new(resp);
                    loop {
                        let data = sse.next().await.expect("stream ended before any content");
                        let v: Value = serde_json::from_str(&data).unwrap();
                        if v["choices"][0]["delta"]["content"]
                            .as_str()
                            .is_some_and(|t| !t.is_empty())
                        {
                            break;
                        }
                    }
                    drop(sse); // the client goes away mid-stream
                })
            })
            .collect();
        for t in tasks {
            t.await.expect("an aborted stream failed");
        }
    }

    let metrics_url = d.url("/metrics");
    let (ok, last) = wait_for(Duration::from_secs(60), || async {
        let (_, m) = get_text(&client, &metrics_url).await;
        let zero = |name| metric(&m, name) == Some(0.0);
        (
            zero("baton_kv_blocks_used")
                && zero("baton_running_sequences")
                && zero("baton_waiting_sequences")
                && zero("baton_inflight_requests"),
            m,
        )
    })
    .await;
    assert!(
        ok,
        "60 s after 200 aborted streams, KV blocks or sequences are still held:\n{}",
        last.lines()
            .filter(|l| l.starts_with("baton_") && !l.contains("_bucket"))
            .collect::<Vec<_>>()
            .join("\n")
    );

    // And the server still serves.
    check_chat(&ok_json(&client, &url, &chat_body("hi", 4)).await);
}

// ---------------------------------------------------------------------------------------------
// Shutdown

/// SIGTERM lets an in-flight stream finish, then the server exits 0.
#[tokio::test]
async fn sigterm_drains_in_flight_streams_and_exits_0() {
    let (e, exited) = spawn_server("drain", &["--num-kv-blocks", "32", "--drain-timeout", "60"])
        .unwrap_or_else(|err| panic!("server drain failed to start: {err}"));
    let client = client();
    let body = with(
        chat_body("Tell me a story.", 48),
        json!({"ignore_eos": true, "stream": true, "stream_options": {"include_usage": true}}),
    );
    let resp = client
        .post(e.url("/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let mut sse = Sse::new(resp);
    let mut events = Vec::new();
    loop {
        let data = sse.next().await.expect("stream ended before any content");
        let v: Value = serde_json::from_str(&data).unwrap();
        let started = v["choices"][0]["delta"]["content"]
            .as_str()
            .is_some_and(|t| !t.is_empty());
        events.push(data);
        if started {
            break;
        }
    }
    // SAFETY: a plain kill(2) of our own child.
    assert_eq!(unsafe { libc::kill(e.pid as i32, libc::SIGTERM) }, 0);
    while let Some(data) = sse.next().await {
        events.push(data);
    }
    let mut chunks = Vec::new();
    let mut done = false;
    for d in &events {
        if d == "[DONE]" {
            done = true;
        } else {
            chunks.push(serde_json::from_str::<Value>(d).unwrap());
        }
    }
    let s = Stream { chunks, done };
    let (choices, usage) = assemble(&s, true, true);
    assert_eq!(
        choices[0].finish_reason.as_deref(),
        Some("length"),
        "the in-flight stream did not finish"
    );
    assert_eq!(usage.unwrap()["completion_tokens"], 48);
    let status = tokio::task::spawn_blocking(move || exited.recv_timeout(Duration::from_secs(60)))
        .await
        .unwrap()
        .unwrap_or_else(|_| panic!("still running 60 s after SIGTERM\n{}", e.log_tail()));
    assert!(
        status.success(),
        "exit after SIGTERM: {status:?}\n{}",
        e.log_tail()
    );
}
