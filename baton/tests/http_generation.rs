//! `baton serve` over real HTTP, what generation gives: streaming equals non-streaming (greedy),
//! whole UTF-8 characters in streams, stop strings, and the exact lengths `ignore_eos` and
//! `min_tokens` ask for.
//!
//! The servers are real child processes (see `common`): (A) the shared main server and (D) the
//! quiet one, for the tests that need the engine to themselves (they hold `QUIET`).

mod common;

use common::*;
use serde_json::{json, Value};

// ---------------------------------------------------------------------------------------------
// Streaming equals non-streaming (greedy)

/// Sends `body` as it is and streamed with usage; both must give the same text, finish reason
/// and token counts.
async fn assert_stream_matches(client: &reqwest::Client, url: &str, body: Value, chat: bool) {
    let what = format!("{url} {body}");
    let v = ok_json(client, url, &body).await;
    let text = check_answer(&v, chat);
    let s = stream(client, url, &streamed_with_usage(body)).await;
    let (choices, usage) = assemble(&s, chat, true);
    assert_eq!(choices.len(), 1, "{what}");
    assert_eq!(choices[0].text, text, "{what}: stream text differs");
    assert_eq!(
        choices[0].finish_reason.as_deref(),
        v["choices"][0]["finish_reason"].as_str(),
        "{what}"
    );
    let usage = usage.unwrap();
    check_usage(&usage);
    for key in ["completion_tokens", "prompt_tokens"] {
        assert_eq!(usage[key], v["usage"][key], "{what}: {key}");
    }
}

#[tokio::test]
async fn greedy_stream_equals_non_stream() {
    let _quiet = QUIET.lock().await;
    let Api {
        client, chat, cmpl, ..
    } = api(quiet_server());

    for prompt in [
        "Write a haiku about autumn leaves.",
        "Explain what a CPU does.",
    ] {
        assert_stream_matches(&client, &chat, chat_body(prompt, 32), true).await;
    }
    for prompt in ["The three laws of thermodynamics are", "def fibonacci(n):"] {
        let body = completion_body(json!(prompt), 32);
        assert_stream_matches(&client, &cmpl, body, false).await;
    }

    // Without include_usage the chunks carry no usage at all.
    let body = with(chat_body("Say hello.", 8), json!({"stream": true}));
    let s = stream(&client, &chat, &body).await;
    assemble(&s, true, false);
}

/// Multi-byte characters whose bytes span tokens come out whole, in the stream as well.
#[tokio::test]
async fn streamed_utf8_is_never_broken() {
    let _quiet = QUIET.lock().await;
    let Api {
        client, chat: url, ..
    } = api(quiet_server());
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
// Stop strings

/// Sends `body`, which has a stop string, as it is and streamed: both must end on `stop` with
/// `want`, the text up to the stop string.
async fn assert_stops_at(
    client: &reqwest::Client,
    url: &str,
    body: Value,
    chat: bool,
    want: &str,
    what: &str,
) {
    let v = ok_json(client, url, &body).await;
    assert_eq!(check_answer(&v, chat), want, "{what}: {v}");
    assert_eq!(v["choices"][0]["finish_reason"], "stop", "{what}: {v}");

    let s = stream(client, url, &with(body, json!({"stream": true}))).await;
    let (choices, _) = assemble(&s, chat, false);
    assert_eq!(choices[0].text, want, "streamed, {what}: {:?}", s.chunks);
    assert_eq!(
        choices[0].finish_reason.as_deref(),
        Some("stop"),
        "streamed, {what}: {:?}",
        s.chunks
    );
}

/// A stop string that starts inside one token and ends inside a later one.
#[tokio::test]
async fn stop_string_spanning_tokens_completions() {
    let _quiet = QUIET.lock().await;
    let Api {
        server: d, client, ..
    } = api(quiet_server());
    let url = d.url("/v1/completions");
    let base = completion_body(json!("The history of the Roman Empire began"), 32);

    let v = ok_json(&client, &url, &with(base.clone(), json!({"logprobs": 1}))).await;
    let text = check_completion(&v);
    let lp = &v["choices"][0]["logprobs"];
    let tokens = strings(&lp["tokens"]);
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
    let what = format!("stop {stop:?} in {text:?}");
    assert_stops_at(&client, &url, body, false, want, &what).await;
}

#[tokio::test]
async fn stop_string_of_words_chat() {
    let _quiet = QUIET.lock().await;
    let Api {
        client, chat: url, ..
    } = api(quiet_server());
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
    let what = format!("stop {stop:?} in {text:?}");
    assert_stops_at(&client, &url, body, true, want, &what).await;
}

// ---------------------------------------------------------------------------------------------
// Exact lengths

#[tokio::test]
async fn ignore_eos_and_min_tokens_give_exact_lengths() {
    let Api {
        client, chat, cmpl, ..
    } = api(main_server());
    let short = chat_body("Say only: yes", 20);

    // Without them, the answer ends early on EOS.
    let v = ok_json(&client, &chat, &short).await;
    check_chat(&v);
    assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");
    assert!(
        v["usage"]["completion_tokens"].as_u64().unwrap() < 12,
        "{v}"
    );

    let exact: [(&String, Value, u64, &str); 4] = [
        (
            &chat,
            with(short.clone(), json!({"ignore_eos": true})),
            20,
            "ignore_eos",
        ),
        (
            &chat,
            with(short.clone(), json!({"nvext": {"ignore_eos": true}})),
            20,
            "nvext.ignore_eos",
        ),
        (
            &cmpl,
            with(
                completion_body(json!("The end."), 20),
                json!({"nvext": {"ignore_eos": true}}),
            ),
            20,
            "completions nvext.ignore_eos",
        ),
        (
            &chat,
            with(chat_body("Say only: yes", 12), json!({"min_tokens": 12})),
            12,
            "min_tokens 12, max_tokens 12",
        ),
    ];
    for (url, body, n, what) in exact {
        let v = ok_json(&client, url, &body).await;
        if url == &chat {
            check_chat(&v);
        } else {
            check_completion(&v);
        }
        assert_length(&v, n, what);
    }

    let v = ok_json(
        &client,
        &chat,
        &with(chat_body("Say only: yes", 64), json!({"min_tokens": 12})),
    )
    .await;
    check_chat(&v);
    assert!(
        v["usage"]["completion_tokens"].as_u64().unwrap() >= 12,
        "min_tokens 12: {v}"
    );

    // The same in a stream.
    let body = streamed_with_usage(with(short, json!({"ignore_eos": true})));
    let s = stream(&client, &chat, &body).await;
    assert_stream_length(&s, true, 20, "streamed ignore_eos");
}

/// `ignore_eos` clears stop strings as well as EOS: benchmarks depend on exact lengths.
#[tokio::test]
async fn ignore_eos_also_clears_stop_strings() {
    let Api { client, chat, .. } = api(main_server());
    let body = with(
        chat_body("Say only: yes", 20),
        json!({"ignore_eos": true, "stop": ["Yes", "yes", "."]}),
    );
    let v = ok_json(&client, &chat, &body).await;
    check_chat(&v);
    assert_length(&v, 20, "ignore_eos with stop strings");
    let s = stream(&client, &chat, &streamed_with_usage(body)).await;
    assert_stream_length(&s, true, 20, "streamed ignore_eos with stop strings");
}
