//! The serving-overhead report at its tiny size, Baton's half (Dynamo's needs its own venv,
//! `make bench-overhead`): it serves the mock at zero step time, drives it with the bench
//! client and charges the server's CPU to the requests.

use std::path::PathBuf;
use std::process::Command;

#[test]
fn the_tiny_overhead_report_measures_every_level_without_errors() {
    let baton = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../target/release/baton"
    ));
    assert!(
        baton.is_file(),
        "{} is missing: build it first (`make build`, or cargo build --release -p baton)",
        baton.display()
    );
    let tmp =
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("overhead-{}", std::process::id()));
    let out = Command::new(env!("CARGO_BIN_EXE_overhead-report"))
        .args(["--tiny", "--skip-dynamo", "--baton"])
        .arg(&baton)
        .arg("--work")
        .arg(tmp.join("work"))
        .arg("--output")
        .arg(tmp.join("results"))
        .env_remove("LD_LIBRARY_PATH")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stacks: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(tmp.join("results/overhead-report.json")).unwrap(),
    )
    .unwrap();
    let levels = stacks[0]["levels"].as_array().unwrap();
    assert_eq!(stacks[0]["name"], "baton");
    assert_eq!(levels.len(), 2);
    for l in levels {
        assert_eq!(l["point"]["errors"], 0, "{l}");
        assert!(l["point"]["requests"].as_u64().unwrap() >= 20, "{l}");
        assert!(
            l["point"]["request_throughput"].as_f64().unwrap() > 0.0,
            "{l}"
        );
        // The frontend did work for the requests; the mock engine at zero step time little.
        let frontend = l["frontend_cpu_ms_per_request"].as_f64().unwrap();
        assert!(frontend > 0.0, "{l}");
    }
    for f in [
        "overhead-report.md",
        "overhead-report-rps.png",
        "overhead-report-cpu.svg",
    ] {
        assert!(tmp.join("results").join(f).is_file(), "{f}");
    }
    std::fs::remove_dir_all(&tmp).ok();
}
