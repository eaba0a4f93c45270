//! `baton bench` against a real `baton serve` (the mock engine at full speed, SmolLM2's
//! tokenizer): a two-level sweep and a trace replay write aiperf's files with exact prompt and
//! output lengths, `bench plot` draws the sweeps, and bad flags or an unreachable server are
//! refused naming the value.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use common::{once_server, Server};
use serde_json::Value;

fn mock() -> &'static Server {
    static S: OnceLock<Result<Server, String>> = OnceLock::new();
    once_server(
        &S,
        "bench-mock",
        &["--executor", "mock", "--mock-speedup", "inf"],
    )
}

fn out_dir(name: &str) -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("bench-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn bench(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_baton"))
        .arg("bench")
        .args(args)
        .env_remove("LD_LIBRARY_PATH")
        .env_remove("BATON_BENCH_URL")
        .output()
        .expect("baton runs")
}

fn ok(out: &std::process::Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "baton bench failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn jsonl(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn value(record: &Value, metric: &str) -> f64 {
    record["metrics"][metric]["value"]
        .as_f64()
        .unwrap_or_else(|| panic!("no {metric} in {record}"))
}

#[test]
fn a_sweep_writes_aiperf_files_with_exact_lengths_and_plots() {
    let s = mock();
    let dir = out_dir("sweep");
    let stdout = ok(&bench(&[
        "--url",
        &s.base,
        "--endpoint",
        "completions",
        "--isl",
        "300",
        "--osl",
        "12",
        "--concurrency",
        "1,4",
        "--requests-per-concurrency",
        "2",
        "--warmup",
        "1",
        "--slo",
        "ttft_ms:60000,itl_ms:60000",
        "--gpus",
        "4",
        "--quiet",
        "--output",
        dir.to_str().unwrap(),
    ]));
    assert!(stdout.contains("| 4 | 8 | 0 |"), "{stdout}");
    for (c, n) in [(1, 2), (4, 8)] {
        let run = dir.join(format!("concurrency{c}"));
        let records = jsonl(&run.join("profile_export.jsonl"));
        assert_eq!(records.len(), n);
        for r in &records {
            assert!(r["error"].is_null(), "{r}");
            // The prompt text is exactly ISL tokens in the server's tokenizer too.
            assert_eq!(value(r, "input_sequence_length"), 300.0);
            assert_eq!(value(r, "usage_prompt_tokens"), 300.0, "{r}");
            assert_eq!(value(r, "output_sequence_length"), 12.0);
            let (ttft, e2e) = (value(r, "time_to_first_token"), value(r, "request_latency"));
            assert!(ttft > 0.0 && ttft <= e2e, "{r}");
            let itl = value(r, "inter_token_latency");
            assert!((itl - (e2e - ttft) / 11.0).abs() < 1e-6, "{r}");
        }
        let summary: Value = serde_json::from_str(
            &std::fs::read_to_string(run.join("profile_export_aiperf.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(summary["request_count"]["avg"], n as f64);
        assert_eq!(summary["good_request_count"], n);
        assert_eq!(summary["total_osl"]["avg"], (12 * n) as f64);
        assert_eq!(summary["input_config"]["loadgen"]["concurrency"], c);
        let per_gpu = summary["output_token_throughput_per_gpu"]["avg"]
            .as_f64()
            .unwrap();
        let total = summary["output_token_throughput"]["avg"].as_f64().unwrap();
        assert!((per_gpu * 4.0 - total).abs() < 1e-6 * total);
        let csv = std::fs::read_to_string(run.join("profile_export_aiperf.csv")).unwrap();
        assert!(csv.starts_with("Metric,avg,min,max,sum,p1,"), "{csv}");
        assert!(csv.contains("\nTime to First Token (ms),"), "{csv}");
        assert!(csv.contains("\nRequest Count (requests),"), "{csv}");
    }
    // Warm-up and measured requests never share a prompt, so no request hits the cache of
    // another: the session numbers run on across levels.
    let sessions: Vec<u64> = jsonl(&dir.join("concurrency4/profile_export.jsonl"))
        .iter()
        .map(|r| r["metadata"]["session_num"].as_u64().unwrap())
        .collect();
    assert_eq!(sessions, (4..12).collect::<Vec<_>>());

    let stem = dir.join("pareto");
    let plotted = ok(&bench(&[
        "plot",
        &format!("mock={}", dir.display()),
        "--output",
        stem.to_str().unwrap(),
    ]));
    assert!(plotted.contains("pareto.png"), "{plotted}");
    let svg = std::fs::read_to_string(stem.with_extension("svg")).unwrap();
    assert!(svg.contains(">mock<") || svg.contains("mock"), "{svg:.300}");
    assert!(std::fs::metadata(stem.with_extension("png")).unwrap().len() > 1000);
}

#[test]
fn a_trace_replay_sends_each_request_with_its_lengths_and_shared_prefixes() {
    let s = mock();
    let dir = out_dir("trace");
    let trace = dir.with_extension("jsonl");
    // Two requests sharing their first 512-token block, the third its own.
    std::fs::write(
        &trace,
        concat!(
            "{\"timestamp\": 0, \"input_length\": 600, \"output_length\": 5, \"hash_ids\": [1, 2]}\n",
            "{\"timestamp\": 20, \"input_length\": 700, \"output_length\": 3, \"hash_ids\": [1, 3]}\n",
            "{\"timestamp\": 40, \"input_length\": 100, \"output_length\": 4, \"hash_ids\": [9]}\n",
        ),
    )
    .unwrap();
    ok(&bench(&[
        "--url",
        &s.base,
        "--trace",
        trace.to_str().unwrap(),
        "--trace-speedup",
        "2",
        "--quiet",
        "--output",
        dir.to_str().unwrap(),
    ]));
    let records = jsonl(&dir.join("trace/profile_export.jsonl"));
    let lengths: Vec<(f64, f64)> = records
        .iter()
        .map(|r| {
            (
                value(r, "input_sequence_length"),
                value(r, "output_sequence_length"),
            )
        })
        .collect();
    assert_eq!(lengths, [(600.0, 5.0), (700.0, 3.0), (100.0, 4.0)]);
    // The second finds the first's block 1 (and the chat template before it) in the cache;
    // the third shares only the template, less than one 128-token block.
    let cached: Vec<f64> = records
        .iter()
        .map(|r| value(r, "usage_prompt_cache_read_tokens"))
        .collect();
    assert!(cached[1] >= 512.0 && cached[2] == 0.0, "{cached:?}");
    // No request leaves before its timestamp / 2 after the schedule's start.
    let summary: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("trace/profile_export_aiperf.json")).unwrap(),
    )
    .unwrap();
    let t0 = summary["input_config"]["loadgen"]["schedule_start_ns"]
        .as_u64()
        .unwrap();
    for (r, at_ms) in records.iter().zip([0, 10, 20]) {
        let start = r["metadata"]["request_start_ns"].as_u64().unwrap();
        // 1 ms of slack: the two clocks are read a moment apart.
        assert!(start + 1_000_000 >= t0 + at_ms * 1_000_000, "{r}");
    }
    let sweep: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("sweep.json")).unwrap()).unwrap();
    assert!(sweep["points"][0]["concurrency"].is_null());
    assert_eq!(sweep["points"][0]["requests"], 3);
}

#[test]
fn bad_flags_and_an_unreachable_server_are_named() {
    let out = bench(&["--concurrency", "2,0", "--url", "http://127.0.0.1:9"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--concurrency"), "{err}");
    let out = bench(&["--url", "http://127.0.0.1:9", "--slo", "ttft:3"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("ttft:3"), "{err}");
    let out = bench(&["--url", "http://127.0.0.1:9", "--quiet"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("http://127.0.0.1:9/v1/models"),
        "{err}"
    );
    let out = bench(&["plot", "/nonexistent/run"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("/nonexistent/run"),
        "{err}"
    );
}

#[test]
fn a_simulated_trace_replay_needs_no_server_and_repeats_itself() {
    let trace = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../shared/traces/conversation_trace.jsonl"
    );
    let run = |name: &str| {
        let dir = out_dir(name);
        ok(&bench(&[
            "--trace",
            trace,
            "--trace-requests",
            "120",
            "--simulate",
            "--router",
            "round-robin",
            "--simulate-workers",
            "4",
            "--output",
            dir.to_str().unwrap(),
        ]));
        let detail: Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join("trace-simulated.json")).unwrap(),
        )
        .unwrap();
        detail["replay"].clone()
    };
    let a = run("sim-a");
    assert_eq!(
        (a["completed"].as_u64(), a["errors"].as_u64()),
        (Some(120), Some(0)),
        "{a}"
    );
    assert!(
        a["hit_rate"].as_f64().unwrap() <= a["ideal_hit_rate"].as_f64().unwrap(),
        "{a}"
    );
    assert_eq!(run("sim-b"), a);
    let out = bench(&["--simulate", "--url", "http://127.0.0.1:9"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--trace"));
}
