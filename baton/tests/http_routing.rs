//! Routing policies over real HTTP: `baton serve --workers 2` with the SmolLM2 model, once
//! with `--router kv` and once with round-robin. A request that shares a 1 000-token prefix
//! with the one before it is served from the cache of the worker that holds it
//! (`cached_tokens` ≥ 896) under the KV router and not under round-robin; and 32 requests
//! that share one 500-token system prompt still spread over both workers. A frontend with
//! `--min-workers` and too few workers waits, then answers 503 naming the shortfall.

mod common;

use std::collections::HashMap;
use std::sync::OnceLock;

use common::*;
use serde_json::{json, Value};

fn kv_server() -> &'static Server {
    static S: OnceLock<Result<Server, String>> = OnceLock::new();
    once_server(
        &S,
        "kv",
        &["--workers", "2", "--router", "kv", "--num-kv-blocks", "96"],
    )
}

fn round_robin_server() -> &'static Server {
    static S: OnceLock<Result<Server, String>> = OnceLock::new();
    once_server(
        &S,
        "rr",
        &[
            "--workers",
            "2",
            "--router",
            "round-robin",
            "--num-kv-blocks",
            "96",
        ],
    )
}

/// The two servers share two cores: one test at a time.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// `n` token ids no other request of this run starts with.
fn fresh_tokens(n: usize) -> Vec<u32> {
    let mut x = nonce();
    (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            1000 + (x >> 40) as u32 % 40000
        })
        .collect()
}

/// A completion of token ids: its `cached_tokens`.
async fn cached_tokens(server: &Server, prompt: &[u32]) -> u64 {
    let body = json!({"model": "smollm2", "prompt": prompt, "max_tokens": 1, "temperature": 0});
    let (status, v) = post_json(&client(), &server.url("/v1/completions"), &body).await;
    assert_eq!(status, 200, "{v}");
    v["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap_or_else(|| panic!("usage without cached_tokens: {v}"))
}

/// Routing decisions per worker so far (`baton_router_requests_total`).
async fn decisions(server: &Server) -> HashMap<String, f64> {
    let (_, text) = get_text(&client(), &server.url("/metrics")).await;
    decisions_by_worker(&text)
}

#[tokio::test]
async fn pairs_sharing_a_long_prefix_reuse_the_cache_under_kv_routing_only() {
    let _one = ONE_AT_A_TIME.lock().await;
    for (server, kv) in [(kv_server(), true), (round_robin_server(), false)] {
        for _pair in 0..3 {
            let prefix = fresh_tokens(1000);
            let first = [prefix.clone(), fresh_tokens(8)].concat();
            let second = [prefix, fresh_tokens(12)].concat();
            assert_eq!(cached_tokens(server, &first).await, 0, "a fresh prefix");
            // The worker publishes its KV events after the step that answered: give the
            // router's index a moment, as a user's next turn would.
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            let cached = cached_tokens(server, &second).await;
            if kv {
                // 1 000 tokens hold 7 full 128-token blocks.
                assert!(cached >= 896, "kv: cached_tokens {cached}");
            } else {
                assert_eq!(cached, 0, "round-robin sent it to the other worker");
            }
        }
    }
    // The router's view is on /metrics: its index, the events that fed it, what it decided.
    let (_, text) = get_text(&client(), &kv_server().url("/metrics")).await;
    assert!(
        metric(&text, "baton_router_indexer_blocks").unwrap() >= 7.0,
        "{text}"
    );
    for line in [
        "baton_router_events_total{kind=\"stored\"}",
        "baton_router_overlap_blocks_count",
        "baton_router_requests_total{policy=\"kv\"",
        "baton_worker_kv_blocks_used{worker=",
        "baton_worker_active_requests{worker=",
        "baton_migrations_total 0",
        "baton_router_resyncs_total",
    ] {
        assert!(text.contains(line), "/metrics lacks {line}:\n{text}");
    }
}

#[tokio::test]
async fn a_shared_system_prompt_does_not_pile_every_request_on_one_worker() {
    let _one = ONE_AT_A_TIME.lock().await;
    let server = kv_server();
    let before = decisions(server).await;
    let system = fresh_tokens(500);
    let client = client();
    let url = server.url("/v1/completions");
    // 32 users at once, 8 in flight at a time: each a distinct question after the prompt.
    let mut pending = Vec::new();
    for chunk in 0..4 {
        for i in 0..8 {
            let prompt = [system.clone(), fresh_tokens(20 + chunk + i)].concat();
            let (client, url) = (client.clone(), url.clone());
            pending.push(tokio::spawn(async move {
                let body = json!({"model": "smollm2", "prompt": prompt, "max_tokens": 1});
                let (status, v): (u16, Value) = post_json(&client, &url, &body).await;
                assert_eq!(status, 200, "{v}");
            }));
        }
        for task in pending.drain(..) {
            task.await.unwrap();
        }
    }
    let after = decisions(server).await;
    let per_worker: Vec<f64> = after
        .iter()
        .map(|(w, n)| n - before.get(w).copied().unwrap_or(0.0))
        .collect();
    assert_eq!(per_worker.len(), 2, "{after:?}");
    assert_eq!(per_worker.iter().sum::<f64>(), 32.0);
    assert!(
        per_worker.iter().all(|&n| n >= 10.0),
        "both workers get at least 10 of 32: {per_worker:?}"
    );
}

#[tokio::test]
async fn min_workers_waits_then_answers_503_naming_the_shortfall() {
    static S: OnceLock<Result<Server, String>> = OnceLock::new();
    let server = once_server(
        &S,
        "minworkers",
        &[
            "--workers",
            "0",
            "--min-workers",
            "1",
            "--min-workers-wait",
            "1",
        ],
    );
    let started = std::time::Instant::now();
    let (status, body) = post_json(
        &client(),
        &server.url("/v1/completions"),
        &json!({"model": "smollm2", "prompt": "hi", "max_tokens": 1}),
    )
    .await;
    assert_eq!(status, 503, "{body}");
    assert_openai_error(&body, "too few workers");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("only 0 of the 1 workers"), "{message}");
    assert!(
        started.elapsed() >= std::time::Duration::from_millis(900),
        "it waited"
    );
}
