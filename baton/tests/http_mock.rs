//! `baton serve --executor mock`: a simulated 70B on TP4 H100s behind the real frontend,
//! router and scheduler, with SmolLM2's tokenizer; its outputs have exact lengths and are the
//! same on a replay; the seed's disaggregated config runs on it with remote prefills through a
//! simulated KV link and the same text; bad mock settings are refused naming the value.

mod common;

use std::process::Command;
use std::sync::OnceLock;

use common::{client, get_text, metric, mock_server, once_server, post_json, Server};
use serde_json::json;

/// `configs/disagg.yaml` on the mock: one TP4 decode worker, four TP1 prefill workers.
fn mock_disagg() -> &'static Server {
    static S: OnceLock<Result<Server, String>> = OnceLock::new();
    once_server(
        &S,
        "mock-disagg",
        &[
            "-f",
            concat!(env!("CARGO_MANIFEST_DIR"), "/../configs/disagg.yaml"),
            "--model",
            "smollm2",
            "--served-model-name",
            "smollm2",
            "--executor",
            "mock",
            "--mock-speedup",
            "inf",
        ],
    )
}

#[tokio::test]
async fn the_seed_disagg_config_prefills_remotely_over_the_simulated_link_with_the_same_text() {
    let prompt: Vec<u32> = (0..300).map(|i| 1000 + i * 7).collect();
    let body = json!({"model": "smollm2", "prompt": prompt, "max_tokens": 12,
                      "ignore_eos": true, "temperature": 0});
    let (status, agg) = post_json(&client(), &mock_server().url("/v1/completions"), &body).await;
    assert_eq!(status, 200, "{agg}");
    let s = mock_disagg();
    let (status, disagg) = post_json(&client(), &s.url("/v1/completions"), &body).await;
    assert_eq!(status, 200, "{disagg}");
    assert_eq!(disagg["usage"]["completion_tokens"], 12);
    // The first token comes from a prefill worker's mock, the rest from the decode worker's.
    assert_eq!(disagg["choices"][0]["text"], agg["choices"][0]["text"]);
    // Three blocks of 128 tokens (the last partial) of the 70B's FP8 KV: 80 layers × 2 × 128
    // positions × 8 heads × 128 dims = 20 MiB each, which no byte of this machine's memory holds.
    let want = 3.0 * 80.0 * 2.0 * 128.0 * 8.0 * 128.0;
    let mut last = String::new();
    for _ in 0..100 {
        let (_, m) = get_text(&client(), &s.url("/metrics")).await;
        let remote = metric(&m, "baton_prefill_total{where=\"remote\"}").unwrap_or(0.0);
        let bytes =
            metric(&m, "baton_kv_transfer_bytes_total{backend=\"simulated\"}").unwrap_or(0.0);
        // The placement is counted when it is made, the bytes when the transfer is done: a
        // load report may carry the first without the second.
        if remote >= 1.0 && bytes > 0.0 {
            assert_eq!(
                metric(&m, "baton_prefill_total{where=\"local\"}"),
                Some(0.0),
                "{m}"
            );
            assert_eq!(bytes, want, "{m}");
            return;
        }
        last = m;
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("no finished remote prefill on /metrics after 10 s:\n{last}");
}

#[tokio::test]
async fn the_mock_serves_exact_lengths_and_replays_the_same_text() {
    let s = mock_server();
    let body = json!({"model": "smollm2", "prompt": "Tell me about GPUs", "max_tokens": 40,
                      "ignore_eos": true, "temperature": 0});
    let (status, first) = post_json(&client(), &s.url("/v1/completions"), &body).await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(first["usage"]["completion_tokens"], 40);
    let (_, again) = post_json(&client(), &s.url("/v1/completions"), &body).await;
    assert_eq!(again["choices"][0]["text"], first["choices"][0]["text"]);
    let chat = json!({"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}],
                      "max_tokens": 7, "ignore_eos": true});
    let (status, v) = post_json(&client(), &s.url("/v1/chat/completions"), &chat).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 7);
    // What fits beside 70.6 GB of FP8 weights in 90 % of 4 × 80 GB, in 128-token blocks. The
    // figure comes from the worker's load reports, so it may lag the requests by a report.
    let mut last = String::new();
    for _ in 0..100 {
        let (_, m) = get_text(&client(), &s.url("/metrics")).await;
        let total = metric(&m, "baton_kv_blocks_total").unwrap_or(0.0);
        if total > 0.0 {
            assert!((10_000.0..11_000.0).contains(&total), "{total}\n{m}");
            return;
        }
        last = m;
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("no KV block total on /metrics after 10 s:\n{last}");
}

#[test]
fn bad_mock_settings_are_refused_naming_the_value() {
    for (args, needle) in [
        (&["--executor", "simulated"][..], "\"simulated\""),
        (
            &["--executor", "mock", "--mock-gpu", "a100"][..],
            "\"a100\"",
        ),
        (
            &["--executor", "mock", "--mock-model", "gpt-9"][..],
            "\"gpt-9\"",
        ),
        (
            &["--executor", "mock", "--tensor-parallel-size", "0"][..],
            "tensor-parallel-size",
        ),
        (&["--executor", "mock", "--mock-speedup", "-2"][..], "-2"),
        (
            &["--executor", "mock", "--mock-kv-link-gbs", "0"][..],
            "mock-kv-link-gbs",
        ),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_baton"))
            .args(["serve", "--port", "0"])
            .args(args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} was accepted");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}
