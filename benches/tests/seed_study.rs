//! The seed-reproduction report at a tiny size: every graph's sweep, the deviation tables,
//! the JSON and the two Pareto charts are written.

use std::path::PathBuf;
use std::process::Command;

#[test]
fn the_tiny_seed_study_writes_tables_json_and_charts() {
    let out_dir =
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("seed-{}", std::process::id()));
    let out = Command::new(env!("CARGO_BIN_EXE_seed-study"))
        .args([
            "--concurrency",
            "1,8",
            "--requests-per-concurrency",
            "1",
            "--output",
        ])
        .arg(&out_dir)
        .env_remove("LD_LIBRARY_PATH")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let md = std::fs::read_to_string(out_dir.join("seed-study-queue2.md")).unwrap();
    assert_eq!(
        md.matches("| published tok/s/GPU @ tok/s/user |").count(),
        4,
        "{md}"
    );
    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out_dir.join("seed-study-queue2.json")).unwrap(),
    )
    .unwrap();
    for g in [
        "aggregated_1_node",
        "disaggregated_1_node",
        "aggregated_2_nodes",
        "disaggregated_2_nodes",
    ] {
        let points = json["graphs"][g].as_array().unwrap();
        assert_eq!(points.len(), 2, "{g}");
        for p in points {
            assert_eq!(p["errors"], 0, "{g}: {p}");
            assert!(p["tok_s_gpu"].as_f64().unwrap() > 0.0, "{g}: {p}");
        }
    }
    for f in [
        "seed-study-queue2-1node.png",
        "seed-study-queue2-2nodes.svg",
    ] {
        assert!(out_dir.join(f).is_file(), "{f}");
    }
    std::fs::remove_dir_all(&out_dir).ok();
}
