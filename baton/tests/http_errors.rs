//! `baton serve` over real HTTP, its error answers: 400s that name the parameter at fault, the
//! API key's 401, the body limit's 413, and 503 over `--max-inflight` and without a worker.
//!
//! The servers are real child processes (see `common`): (A) the shared main server, (B) one
//! with an API key, a small body limit and one request in flight (its tests hold `LIMITED`),
//! and (C) one without a worker.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};

#[tokio::test]
async fn bad_requests_get_400() {
    let Api {
        client, chat, cmpl, ..
    } = api(main_server());

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
        let (status, v) = post_raw(&client, url, "application/json", b"{\"model\": ").await;
        assert_error(status, &v, 400, None, &format!("{url}: malformed JSON"));
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
    let Api {
        server: a, client, ..
    } = api(main_server());
    let body = with(
        chat_body("hi", 2),
        json!({"logprobs": true, "top_logprobs": 1000}),
    );
    let (status, v) = post_json(&client, &a.url("/v1/chat/completions"), &body).await;
    assert_error(status, &v, 400, Some("top_logprobs"), "top_logprobs 1000");
}

#[tokio::test]
async fn api_key_401_and_body_limit_413() {
    let (_held, b, client, chat) = limited().await;
    let body = chat_body("hi", 2);

    let (status, v) = post_json(&client, &chat, &body).await;
    assert_error(status, &v, 401, None, "no key");
    let (status, v) = post_json_with_key(&client, &chat, "wrong", &body).await;
    assert_error(status, &v, 401, None, "wrong key");
    let resp = client.get(b.url("/v1/models")).send().await.unwrap();
    let (status, v) = read_json(resp).await;
    assert_error(status, &v, 401, None, "models without a key");

    let (status, v) = post_json_with_key(&client, &chat, "secret", &body).await;
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
    let (status, v) = post_json_with_key(&client, &chat, "secret", &big).await;
    assert_error(status, &v, 413, None, "10 KB body");
    let fits = chat_body(&"a ".repeat(1500), 2);
    let (status, v) = post_json_with_key(&client, &chat, "secret", &fits).await;
    assert_eq!(status, 200, "3 KB body: {v}");
    check_chat(&v);
}

#[tokio::test]
async fn over_max_inflight_gets_503() {
    let (_held, b, client, chat) = limited().await;

    let long = with(
        chat_body("Tell me a long story.", 300),
        json!({"ignore_eos": true, "stream": true}),
    );
    let resp = send_json(&client, &chat, Some("secret"), &long).await;
    assert_eq!(resp.status().as_u16(), 200);
    let mut sse = Sse::new(resp);
    // Wait for the first content, so the request is surely being served.
    read_until_content(&mut sse).await;
    for (url, body) in [
        (chat.clone(), chat_body("hi", 2)),
        (b.url("/v1/completions"), completion_body(json!("hi"), 2)),
    ] {
        let (status, v) = post_json_with_key(&client, &url, "secret", &body).await;
        let what = format!("{url}: a second request while one is in flight");
        assert_error(status, &v, 503, None, &what);
    }
    drop(sse);

    // Dropping the stream frees its place.
    let (ok, last) = wait_for(Duration::from_secs(60), || async {
        let (status, v) = post_json_with_key(&client, &chat, "secret", &chat_body("hi", 2)).await;
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
    let Api {
        server: c, client, ..
    } = api(workerless_server());
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
