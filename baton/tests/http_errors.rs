//! `baton serve` over real HTTP, its error answers: 400s that name the parameter at fault, the
//! API key's 401 on every route but `/health` and `/live` (a near-miss key included), the body
//! limit's 413, and 503 with `Retry-After` over `--max-inflight` and without a worker.
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

    // A prefix of the key, the key with more after it, another case: all wrong.
    let wrong = [
        None,
        Some("wrong"),
        Some("secre"),
        Some("secrets"),
        Some("SECRET"),
    ];
    for key in wrong {
        let resp = send_json(&client, &chat, key, &body).await;
        let (status, v) = read_json(resp).await;
        assert_error(status, &v, 401, None, &format!("chat with key {key:?}"));
    }
    let (status, v) = post_json_with_key(&client, &chat, "secret", &body).await;
    assert_eq!(status, 200, "right key: {v}");
    check_chat(&v);

    // Every GET route but the orchestrator's two probes is behind the key, an unknown path too
    // (a 404 without the key would tell which paths exist).
    for (path, with_key) in [
        ("/v1/models", 200),
        ("/metrics", 200),
        ("/admin/disagg", 200),
        ("/v1/no-such-route", 404),
    ] {
        for key in wrong {
            let mut request = client.get(b.url(path));
            if let Some(key) = key {
                request = request.bearer_auth(key);
            }
            let (status, v) = read_json(request.send().await.unwrap()).await;
            assert_error(
                status,
                &v,
                401,
                None,
                &format!("GET {path} with key {key:?}"),
            );
        }
        let resp = client.get(b.url(path)).bearer_auth("secret").send().await;
        let resp = resp.unwrap();
        assert_eq!(resp.status().as_u16(), with_key, "GET {path} with the key");
    }
    let resp = client.get(b.url("/metrics")).bearer_auth("secret").send();
    let text = resp.await.unwrap().text().await.unwrap();
    assert!(text.contains("baton_"), "{text}");

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
        let resp = send_json(&client, &url, Some("secret"), &body).await;
        let retry_after = resp.headers().get("retry-after").cloned();
        let (status, v) = read_json(resp).await;
        let what = format!("{url}: a second request while one is in flight");
        assert_error(status, &v, 503, None, &what);
        // Seconds from the measured drain rate, within the documented 1..=60.
        let secs = retry_after
            .as_ref()
            .and_then(|h| h.to_str().ok()?.parse::<u64>().ok());
        assert!(
            secs.is_some_and(|s| (1..=60).contains(&s)),
            "{what}: Retry-After {retry_after:?}"
        );
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
    let resp = send_json(
        &client,
        &c.url("/v1/chat/completions"),
        None,
        &chat_body("hi", 2),
    )
    .await;
    assert_eq!(resp.headers()["retry-after"], "1", "chat without a worker");
    let (status, v) = read_json(resp).await;
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
