//! Routing policies on the Mooncake conversation trace (issue 13, report 2): the trace replayed
//! open loop on 8 simulated aggregated workers (one H200 each, the seed's 70B FP8, the mock
//! engine's calibrated roofline), once per policy, with TTFT, E2E, throughput and the prefix-hit
//! rate each policy gets next to the ideal one unbounded cache would give.
//!
//!   cargo run --release -p baton-benches --bin routing-study
//!   cargo run --release -p baton-benches --bin routing-study -- --time-scale 2 --policies kv,round-robin
//!   cargo run --release -p baton-benches --bin routing-study -- --requests 300 --output /tmp/r
//!
//! Results go to `benches/results/routing-study.{md,json}`, with bar charts beside them:
//! `routing-study-ttft-scale{S}.{svg,png}` (TTFT p50/p90 per policy at each time scale: their
//! ranges differ by orders of magnitude, so one chart each) and `routing-study-hit.{svg,png}`
//! (hit rates, with the ideal and pooled-LRU references).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use baton_benches::plot;
use baton_benches::sim::{replay, routing_graph, Replay, ReplayPoint};
use baton_benches::trace;
use clap::Parser;
use router::{policy_from_name, KvCostConfig};

const POLICIES: [&str; 5] = [
    "round-robin",
    "random",
    "least-loaded",
    "power-of-two",
    "kv",
];

#[derive(Parser)]
struct Args {
    /// The Mooncake JSONL trace.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/traces/conversation_trace.jsonl"))]
    trace: PathBuf,
    /// Replay only the trace's first N requests.
    #[arg(long)]
    requests: Option<usize>,
    /// Factors on the trace's arrival times, one run of every policy each (2: half the rate,
    /// where 8 workers keep up; at 1 and 1.5 they fall behind).
    #[arg(long, value_delimiter = ',', default_value = "2,1.5,1")]
    time_scale: Vec<f64>,
    /// Simulated workers (one H200, TP1, each).
    #[arg(long, default_value_t = 8)]
    workers: usize,
    /// Routing policies to compare.
    #[arg(long, value_delimiter = ',', default_values_t = POLICIES.map(String::from))]
    policies: Vec<String>,
    /// Where the markdown, JSON and plot go.
    #[arg(long, default_value = "benches/results")]
    output: PathBuf,
    /// Seed of the synthetic prompt tokens.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[derive(Debug, thiserror::Error)]
enum FlagError {
    #[error("`--time-scale` {0} must be a finite number above 0")]
    TimeScale(f64),
    #[error("`--workers` {0} must be at least 1")]
    Workers(usize),
    #[error("`--requests` {0} must be at least 1")]
    Requests(usize),
    #[error("`--policies` is empty")]
    NoPolicies,
}

/// Every flag checked before the first (long) run.
fn check(args: &Args) -> Result<()> {
    if let Some(&s) = args
        .time_scale
        .iter()
        .find(|s| !s.is_finite() || **s <= 0.0)
    {
        return Err(FlagError::TimeScale(s).into());
    }
    if args.workers == 0 {
        return Err(FlagError::Workers(0).into());
    }
    if args.requests == Some(0) {
        return Err(FlagError::Requests(0).into());
    }
    if args.policies.is_empty() {
        return Err(FlagError::NoPolicies.into());
    }
    for p in &args.policies {
        policy_from_name(p, KvCostConfig::default()).context("`--policies`")?;
    }
    Ok(())
}

/// One replay and the wall time it took.
struct Run {
    point: ReplayPoint,
    wall_s: f64,
}

/// A time scale as a file-name part: `1.5` → `1_5` (a dot would read as an extension).
fn scale_tag(scale: f64) -> String {
    scale.to_string().replace('.', "_")
}

/// Grouped bars by policy, with one empty group on the right where `plot::bars` puts the
/// legend, so that it covers no bar.
fn bars(
    stem: PathBuf,
    title: &str,
    y_label: &str,
    policies: &[String],
    mut series: Vec<(String, Vec<f64>)>,
) -> Result<Vec<PathBuf>> {
    let mut categories = policies.to_vec();
    categories.push(String::new());
    for (_, values) in &mut series {
        values.push(0.0);
    }
    Ok(plot::bars(&stem, title, y_label, &categories, &series)?)
}

/// The charts of every run: per time scale, TTFT p50 and p90 by policy; then the hit rates by
/// policy at each scale beside the two references. Returns the files written.
fn charts(dir: &Path, policies: &[String], runs: &[(f64, Vec<Run>)]) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    let of = |runs: &[Run], f: fn(&ReplayPoint) -> f64| -> Vec<f64> {
        runs.iter().map(|r| f(&r.point)).collect()
    };
    for (scale, runs) in runs {
        files.extend(bars(
            dir.join(format!("routing-study-ttft-scale{}", scale_tag(*scale))),
            &format!("TTFT by routing policy, Mooncake conversation trace, time scale {scale}"),
            "seconds (simulated)",
            policies,
            vec![
                ("TTFT p50".into(), of(runs, |p| p.ttft_p50_s)),
                ("TTFT p90".into(), of(runs, |p| p.ttft_p90_s)),
            ],
        )?);
    }
    let percent = |runs: &[Run], f: fn(&ReplayPoint) -> f64| -> Vec<f64> {
        of(runs, f).into_iter().map(|v| v * 100.0).collect()
    };
    let mut series: Vec<(String, Vec<f64>)> = runs
        .iter()
        .map(|(scale, runs)| {
            let label = format!("hits, scale {scale}");
            (label, percent(runs, |p| p.hit_rate))
        })
        .collect();
    if let Some((_, first)) = runs.first() {
        series.push((
            "pooled LRU".into(),
            percent(first, |p| p.pooled_lru_hit_rate),
        ));
        series.push(("ideal".into(), percent(first, |p| p.ideal_hit_rate)));
    }
    files.extend(bars(
        dir.join("routing-study-hit"),
        "Prefix-hit rate by routing policy (prompt tokens cached on the chosen worker at arrival)",
        "% of prompt tokens",
        policies,
        series,
    )?);
    Ok(files)
}

fn table(runs: &[Run]) -> String {
    let mut s = String::from(
        "| policy | TTFT p50 (s) | TTFT p90 (s) | TTFT mean (s) | E2E mean (s) | E2E p50 (s) | E2E p90 (s) | ITL mean (ms) | output tok/s | req/s | hit rate | ideal hit rate | pooled LRU hit rate | prefill imbalance | preemptions | rejected / errors |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for Run { point: p, .. } in runs {
        s += &format!(
            "| {} | {:.2} | {:.2} | {:.2} | {:.1} | {:.1} | {:.1} | {:.1} | {:.0} | {:.2} | {:.1} % | {:.1} % | {:.1} % | {:.2} | {} | {} / {} |\n",
            p.policy,
            p.ttft_p50_s,
            p.ttft_p90_s,
            p.ttft_mean_s,
            p.e2e_mean_s,
            p.e2e_p50_s,
            p.e2e_p90_s,
            p.itl_mean_s * 1e3,
            p.output_tok_s,
            p.requests_per_s,
            p.hit_rate * 100.0,
            p.ideal_hit_rate * 100.0,
            p.pooled_lru_hit_rate * 100.0,
            p.prefill_imbalance,
            p.preemptions,
            p.rejected,
            p.errors,
        );
    }
    s
}

fn main() -> Result<()> {
    let args = Args::parse();
    check(&args)?;
    let mut requests = trace::load(&args.trace)?;
    if let Some(n) = args.requests {
        requests.truncate(n);
    }
    let span_s = requests.last().map_or(0, |r| r.timestamp_ms) as f64 / 1e3;
    let mut md = format!(
        "## Routing policies on the Mooncake conversation trace (simulated)\n\n\
         {} requests of `{}` ({span_s:.0} s of arrivals), open loop; {} aggregated workers, \
         one H200 each (TP1), DeepSeek-R1-Distill-Llama-70B FP8 on the calibrated mock engine, \
         chunked prefill at 2 048 tokens a step, 128-token KV blocks, prefix caching on; \
         token seed {}. Hit rate: prompt tokens the chosen worker cached at arrival / prompt \
         tokens; ideal: one unbounded cache of every earlier prompt; pooled LRU: one LRU \
         cache of every earlier prompt as large as all the workers' KV caches together. \
         Prefill imbalance: the busiest worker's uncached prompt tokens over the mean. \
         Times are simulated; every policy but round-robin breaks ties (or draws) with an \
         unseeded generator, so their rows move a little from run to run.\n\n",
        requests.len(),
        args.trace
            .file_name()
            .map_or("?".into(), |n| n.to_string_lossy()),
        args.workers,
        args.seed,
    );
    let mut json_runs = Vec::new();
    let mut all_runs = Vec::new();
    for &time_scale in &args.time_scale {
        let mut runs = Vec::new();
        for policy in &args.policies {
            let started = Instant::now();
            let opts = Replay {
                time_scale,
                seed: args.seed,
            };
            let point = replay(&routing_graph(args.workers, policy), &requests, &opts)
                .with_context(|| format!("policy {policy}, time scale {time_scale}"))?;
            let wall_s = started.elapsed().as_secs_f64();
            eprintln!(
                "{policy} at time scale {time_scale}: {wall_s:.1} s of wall time, TTFT p50 {:.2} s, hit rate {:.1} %",
                point.ttft_p50_s,
                point.hit_rate * 100.0
            );
            runs.push(Run { point, wall_s });
        }
        md += &format!(
            "### Time scale {time_scale} ({:.2} requests/s offered)\n\n",
            requests.len() as f64 / (span_s * time_scale).max(1e-9)
        );
        md += &table(&runs);
        md += &format!(
            "\nWall time per policy (s): {}.\n\n",
            runs.iter()
                .map(|r| format!("{} {:.0}", r.point.policy, r.wall_s))
                .collect::<Vec<_>>()
                .join(", ")
        );
        json_runs.extend(
            runs.iter()
                .map(|r| serde_json::json!({ "wall_s": r.wall_s, "result": r.point })),
        );
        all_runs.push((time_scale, runs));
    }
    print!("{md}");
    std::fs::create_dir_all(&args.output)
        .with_context(|| format!("creating {}", args.output.display()))?;
    std::fs::write(args.output.join("routing-study.md"), &md)?;
    std::fs::write(
        args.output.join("routing-study.json"),
        serde_json::to_string_pretty(&serde_json::json!({
            "trace": args.trace.display().to_string(),
            "requests": requests.len(),
            "workers": args.workers,
            "gpu": "h200",
            "tensor_parallel": 1,
            "seed": args.seed,
            "runs": json_runs,
        }))?,
    )?;
    // The table and JSON are written first: a machine without the chart font still gets them.
    for f in charts(&args.output, &args.policies, &all_runs)? {
        eprintln!("wrote {}", f.display());
    }
    Ok(())
}
