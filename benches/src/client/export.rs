//! A run's files in aiperf's `profile_export` shapes, so tools that read aiperf's artifacts
//! read ours: `profile_export.jsonl` (one record per request: metadata, metrics with units,
//! error), `profile_export_aiperf.json` (each metric's distribution, the run's totals, the
//! error summary, the input config) and `profile_export_aiperf.csv` (the same, in aiperf's
//! two CSV sections).

use std::io::Write;
use std::path::Path;
use std::time::{Duration, SystemTime};

use serde_json::{json, Map, Value};

use super::metrics::{Record, Summary};

/// aiperf's display names of the distribution metrics, in its CSV order.
const CSV_ORDER: &[(&str, &str)] = &[
    ("time_to_first_token", "Time to First Token"),
    ("request_latency", "Request Latency"),
    ("inter_token_latency", "Inter Token Latency"),
    (
        "output_token_throughput_per_user",
        "Output Token Throughput Per User",
    ),
    ("output_sequence_length", "Output Sequence Length"),
    ("input_sequence_length", "Input Sequence Length"),
];

fn metric(value: Value, unit: &str) -> Value {
    json!({"value": value, "unit": unit})
}

fn epoch(ns: u128, plus: Duration) -> u128 {
    ns + plus.as_nanos()
}

/// One line of `profile_export.jsonl`.
pub fn record_json(r: &Record) -> Value {
    let o = &r.outcome;
    let rel = |t: std::time::Instant| epoch(o.start_epoch_ns, t.saturating_duration_since(o.start));
    let metadata = json!({
        "session_num": r.session_num,
        "x_request_id": format!("baton-bench-{}", r.session_num),
        "turn_index": 0,
        "request_start_ns": o.start_epoch_ns,
        "request_ack_ns": o.ack.map(rel),
        "request_end_ns": rel(o.end),
        "benchmark_phase": "profiling",
        "was_cancelled": false,
    });
    let mut metrics = Map::new();
    match &r.metrics {
        Some(m) => {
            metrics.insert(
                "input_sequence_length".into(),
                metric(json!(m.input_tokens), "tokens"),
            );
            metrics.insert("time_to_first_token".into(), metric(json!(m.ttft_ms), "ms"));
            metrics.insert("request_latency".into(), metric(json!(m.latency_ms), "ms"));
            metrics.insert(
                "inter_chunk_latency".into(),
                metric(json!(m.inter_chunk_ms), "ms"),
            );
            metrics.insert(
                "output_sequence_length".into(),
                metric(json!(m.output_tokens), "tokens"),
            );
            if let Some(itl) = m.itl_ms {
                metrics.insert("inter_token_latency".into(), metric(json!(itl), "ms"));
                if itl > 0.0 {
                    metrics.insert(
                        "output_token_throughput_per_user".into(),
                        metric(json!(1e3 / itl), "tokens/sec/user"),
                    );
                }
            }
        }
        None => {
            metrics.insert("error_isl".into(), metric(json!(r.input_tokens), "tokens"));
        }
    }
    // The server's own counts, beside the client's (aiperf's `usage_*` record metrics).
    if let Some(n) = o.usage_prompt_tokens {
        metrics.insert("usage_prompt_tokens".into(), metric(json!(n), "tokens"));
    }
    if let Some(n) = o.usage_completion_tokens {
        metrics.insert("usage_completion_tokens".into(), metric(json!(n), "tokens"));
    }
    if let Some(n) = o.usage_cached_tokens {
        metrics.insert(
            "usage_prompt_cache_read_tokens".into(),
            metric(json!(n), "tokens"),
        );
    }
    json!({"metadata": metadata, "metrics": metrics, "error": o.error})
}

fn single(value: f64, unit: &str) -> Value {
    json!({"unit": unit, "avg": value})
}

/// `profile_export_aiperf.json`.
pub fn summary_json(
    s: &Summary,
    input_config: &Value,
    started: SystemTime,
    ended: SystemTime,
) -> Value {
    let mut out = Map::new();
    for (name, stats) in &s.metrics {
        out.insert(
            (*name).into(),
            serde_json::to_value(stats).expect("plain numbers"),
        );
    }
    out.insert(
        "request_throughput".into(),
        single(s.request_throughput, "requests/sec"),
    );
    out.insert(
        "output_token_throughput".into(),
        single(s.output_token_throughput, "tokens/sec"),
    );
    out.insert(
        "output_token_throughput_per_gpu".into(),
        single(s.output_token_throughput_per_gpu, "tokens/sec/gpu"),
    );
    out.insert(
        "benchmark_duration".into(),
        single(s.benchmark_duration_s, "sec"),
    );
    out.insert(
        "request_count".into(),
        single(s.request_count as f64, "requests"),
    );
    out.insert("total_isl".into(), single(s.total_isl as f64, "tokens"));
    out.insert("total_osl".into(), single(s.total_osl as f64, "tokens"));
    out.insert(
        "goodput".into(),
        s.goodput.map_or(Value::Null, |g| single(g, "requests/sec")),
    );
    out.insert("good_request_count".into(), json!(s.good_request_count));
    out.insert(
        "error_request_count".into(),
        if s.error_request_count > 0 {
            single(s.error_request_count as f64, "requests")
        } else {
            Value::Null
        },
    );
    out.insert(
        "error_summary".into(),
        s.error_summary
            .iter()
            .map(|(d, n)| json!({"error_details": d, "count": n}))
            .collect(),
    );
    let iso = |t: SystemTime| {
        chrono::DateTime::<chrono::Local>::from(t)
            .format("%Y-%m-%dT%H:%M:%S%.6f")
            .to_string()
    };
    out.insert("was_cancelled".into(), json!(false));
    out.insert("start_time".into(), json!(iso(started)));
    out.insert("end_time".into(), json!(iso(ended)));
    out.insert("input_config".into(), input_config.clone());
    Value::Object(out)
}

fn fmt(v: f64) -> String {
    format!("{v:.2}")
}

/// `profile_export_aiperf.csv`, with aiperf 0.13's columns.
pub fn summary_csv(s: &Summary) -> String {
    let mut out = String::from("Metric,avg,min,max,sum,p1,p5,p10,p25,p50,p75,p90,p95,p99,std\n");
    for (name, label) in CSV_ORDER {
        if let Some(st) = s.metrics.get(name) {
            let cols = [
                st.avg, st.min, st.max, st.sum, st.p1, st.p5, st.p10, st.p25, st.p50, st.p75,
                st.p90, st.p95, st.p99, st.std,
            ];
            out.push_str(&format!(
                "{label} ({}),{}\n",
                st.unit,
                cols.map(fmt).join(",")
            ));
        }
    }
    out.push_str("\nMetric,Value\n");
    let mut row = |label: &str, v: f64| out.push_str(&format!("{label},{}\n", fmt(v)));
    row("Request Throughput (requests/sec)", s.request_throughput);
    row(
        "Output Token Throughput (tokens/sec)",
        s.output_token_throughput,
    );
    row(
        "Output Token Throughput Per GPU (tokens/sec/gpu)",
        s.output_token_throughput_per_gpu,
    );
    row("Request Count (requests)", s.request_count as f64);
    row(
        "Error Request Count (requests)",
        s.error_request_count as f64,
    );
    if let Some(g) = s.goodput {
        row("Goodput (requests/sec)", g);
    }
    row("Benchmark Duration (sec)", s.benchmark_duration_s);
    row("Total Input Sequence Length (tokens)", s.total_isl as f64);
    row("Total Output Sequence Length (tokens)", s.total_osl as f64);
    out
}

/// Writes the three files into `dir`.
pub fn write_run(
    dir: &Path,
    records: &[Record],
    summary: &Summary,
    input_config: &Value,
    started: SystemTime,
    ended: SystemTime,
) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut jsonl =
        std::io::BufWriter::new(std::fs::File::create(dir.join("profile_export.jsonl"))?);
    for r in records {
        serde_json::to_writer(&mut jsonl, &record_json(r))?;
        jsonl.write_all(b"\n")?;
    }
    jsonl.flush()?;
    let json = summary_json(summary, input_config, started, ended);
    std::fs::write(
        dir.join("profile_export_aiperf.json"),
        serde_json::to_string_pretty(&json)?,
    )?;
    std::fs::write(dir.join("profile_export_aiperf.csv"), summary_csv(summary))
}
