//! `baton serve` over real HTTP, endpoint by endpoint: `/v1/models`, `/health`, `/live` and
//! `/metrics`, well-formed chat completions and completions of every accepted shape, and an
//! unknown model.
//!
//! The servers are real child processes (see `common`): (A) the shared main server and (C) one
//! without a worker.

mod common;

use common::*;
use serde_json::{json, Value};

#[tokio::test]
async fn models_health_live_and_metrics() {
    let Api {
        server: a, client, ..
    } = api(main_server());

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
    let Api {
        client, chat, cmpl, ..
    } = api(main_server());

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

#[tokio::test]
async fn unknown_model_gets_404() {
    let Api {
        server: a, client, ..
    } = api(main_server());
    let mut body = chat_body("hi", 4);
    body["model"] = json!("no-such-model");
    let (status, v) = post_json(&client, &a.url("/v1/chat/completions"), &body).await;
    assert_error(status, &v, 404, Some("model"), "chat, unknown model");
    let mut body = completion_body(json!("hi"), 4);
    body["model"] = json!("no-such-model");
    let (status, v) = post_json(&client, &a.url("/v1/completions"), &body).await;
    assert_error(status, &v, 404, Some("model"), "completions, unknown model");
}
