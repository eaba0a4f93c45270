//! `vllm-report --tiny` end to end: the report's Baton half (export, serve at both dtypes, every
//! point, the kv router's routing workloads) at sizes that take seconds, into a temp folder.
//! vLLM and nginx are left to `make bench-vllm`. Checks what was measured, never how fast.

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

/// The `baton` binary `make build` made: beside this package's binaries (one target folder),
/// else the workspace's `target/release`.
fn baton() -> PathBuf {
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_vllm-report"));
    let candidates = [
        bin.with_file_name("baton"),
        PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../target/release/baton"
        )),
    ];
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .unwrap_or_else(|| {
            panic!(
                "no baton binary at {candidates:?}: build it first (`make build`, or \
                 `cargo build --release -p baton`)"
            )
        })
}

#[test]
fn the_tiny_report_measures_every_baton_point_without_errors() {
    let work = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("vllm-report-tiny-{}", std::process::id()));
    let out = Command::new(env!("CARGO_BIN_EXE_vllm-report"))
        .arg("--tiny")
        .arg("--baton")
        .arg(baton())
        .arg("--work")
        .arg(&work)
        .output()
        .expect("vllm-report runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "vllm-report --tiny failed:\n{stderr}");

    let results = work.join("results");
    let report: Value = serde_json::from_str(
        &std::fs::read_to_string(results.join("vllm-report.json")).expect("the JSON report"),
    )
    .expect("valid JSON");
    assert!(results.join("vllm-report.md").is_file());
    assert_eq!(report["tiny"], true);
    assert!(report["error"].is_null(), "{}", report["error"]);

    // Both dtypes were probed and one was chosen.
    let probe = report["probe"].as_array().expect("probe rows");
    let dtypes: Vec<&str> = probe.iter().filter_map(|r| r["dtype"].as_str()).collect();
    assert_eq!(dtypes, ["f32", "bf16"], "{probe:?}");
    assert_eq!(probe.iter().filter(|r| r["chosen"] == true).count(), 1);
    let best = report["best"]["baton"].as_str().expect("a chosen dtype");
    assert!(
        report["best"].get("vllm").is_none(),
        "no vLLM half in --tiny"
    );

    let points = report["points"].as_array().expect("points");
    for spec in report["plan"]["points"].as_array().expect("plan") {
        let key = spec["key"].as_str().unwrap();
        let m = points
            .iter()
            .find(|m| m["engine"] == "baton" && m["dtype"] == best && m["key"] == key)
            .unwrap_or_else(|| panic!("no baton {best} point {key} in {points:?}"));
        let p = &m["point"];
        assert_eq!(p["errors"], 0, "{key}: {p}");
        assert_eq!(p["requests"], spec["requests"], "{key}: {p}");
        let value = m["value"].as_f64().unwrap_or(f64::NAN);
        assert!(value.is_finite() && value > 0.0, "{key}: figure {value}");
        for f in ["ttft_ms_p50", "e2e_ms_mean", "output_token_throughput"] {
            let x = p[f].as_f64().unwrap_or(f64::NAN);
            assert!(x.is_finite() && x > 0.0, "{key}: {f} = {x}");
        }
        if spec["osl"].as_u64() > Some(1) {
            let itl = p["itl_ms_mean"].as_f64().unwrap_or(f64::NAN);
            assert!(itl.is_finite() && itl > 0.0, "{key}: ITL {itl}");
        }
    }
    assert!(points.iter().all(|m| m["engine"] == "baton"));

    // The kv router's half of the routing comparison (nginx is not started when tiny).
    let routing = report["routing"].as_array().expect("routing rows");
    assert_eq!(routing.len(), 2, "{routing:?}");
    for r in routing {
        assert_eq!(r["point"]["errors"], 0, "{r}");
        assert!(
            r["point"]["output_token_throughput"]
                .as_f64()
                .unwrap_or(0.0)
                > 0.0
        );
        assert!(r["prompt_tokens"].as_u64().unwrap_or(0) > 0, "{r}");
    }
    // Shared prompts start with a whole cached block once the first has been served.
    let shared = routing
        .iter()
        .find(|r| r["workload"] == "shared-prefix")
        .unwrap();
    assert!(
        shared["cached_tokens"].as_u64().unwrap_or(0) > 0,
        "{shared}"
    );
    std::fs::remove_dir_all(&work).ok();
}
