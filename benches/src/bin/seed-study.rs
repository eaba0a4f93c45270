//! The seed's study on the mock engine (issue 12's report): the aggregated baseline (2 × TP4
//! behind least-loaded routing) and the 1-node disaggregated graph (4 × TP1 prefill + TP4
//! decode), then the 2-node pair (2 × TP8; 8 × TP1 + TP8 over a NIC), at ISL 3000 / OSL 150,
//! concurrency 1…256, each point next to the published one.
//!
//!   cargo run --release -p baton-benches --bin seed-study
//!   cargo run --release -p baton-benches --bin seed-study -- --max-prefill-queue-size 8
//!   cargo run --release -p baton-benches --bin seed-study -- --calibrate
//!
//! Results go to `benches/results/seed-study-queue{N}.{md,json}`, with a Pareto chart per
//! node count (`…-1node.{png,svg}`, `…-2nodes.{png,svg}`): the simulated curves and the
//! published points.
//!
//! `--calibrate` searches the efficiencies on the aggregated points only (the disaggregated
//! points are the model's test) and prints the best set; `engine::mock::timing` keeps it.

use std::time::Instant;

use anyhow::{Context, Result};
use baton_benches::plot::{pareto, Curve};
use baton_benches::seed::{
    aggregated_1_node, aggregated_2_nodes, deviations, disaggregated_1_node, disaggregated_2_nodes,
    worst, Published, AGG_1_NODE, AGG_2_NODES, CONCURRENCY, DISAGG_1_NODE, DISAGG_2_NODES,
};
use baton_benches::sim::{run, Cluster, Point, Workload};
use clap::Parser;
use engine::mock::{Efficiency, CALIBRATED_EFFICIENCY};

#[derive(Parser)]
struct Args {
    /// Concurrency levels of the sweep.
    #[arg(long, value_delimiter = ',', default_values_t = CONCURRENCY.to_vec())]
    concurrency: Vec<usize>,
    /// Measured requests per point as a multiple of the concurrency (the seed: 10).
    #[arg(long, default_value_t = 10)]
    requests_per_concurrency: usize,
    /// Search the efficiencies against the aggregated points instead of reporting.
    #[arg(long)]
    calibrate: bool,
    /// The disaggregated graph's queue threshold (the seed's config: 2).
    #[arg(long, default_value_t = 2)]
    max_prefill_queue_size: usize,
    /// Where the markdown and JSON results go.
    #[arg(long, default_value = "benches/results")]
    output: std::path::PathBuf,
}

fn sweep(cluster: &Cluster, args: &Args) -> Result<Vec<Point>> {
    args.concurrency
        .iter()
        .map(|&c| {
            let work = Workload {
                requests: c * args.requests_per_concurrency,
                ..Workload::seed(c)
            };
            run(cluster, &work).with_context(|| format!("concurrency {c}"))
        })
        .collect()
}

fn calibrate(args: &Args) -> Result<()> {
    let mut best: Option<(f64, Efficiency)> = None;
    for bandwidth in [0.6, 0.7, 0.8] {
        for flops in [0.4, 0.45, 0.5, 0.55] {
            for overhead_ms in [4.0, 5.0, 6.0] {
                for allreduce_us in [2.5, 5.0, 10.0] {
                    let e = Efficiency {
                        bandwidth,
                        flops,
                        overhead_s: overhead_ms / 1e3,
                        allreduce_latency_s: allreduce_us / 1e6,
                    };
                    let points = sweep(&aggregated_1_node(e.clone()), args)?;
                    let w = worst(&deviations(&points, AGG_1_NODE));
                    if best.as_ref().is_none_or(|b| w < b.0) {
                        println!("worst {:+.1} % with {e:?}", w * 100.0);
                        best = Some((w, e));
                    }
                }
            }
        }
    }
    Ok(())
}

fn table(name: &str, points: &[Point], published: &[Published]) -> String {
    let mut s = format!(
        "### {name}\n\n| concurrency | TTFT mean (s) | ITL mean (ms) | tok/s/user | tok/s/GPU | remote / local prefills |\n|---|---|---|---|---|---|\n"
    );
    for p in points {
        s += &format!(
            "| {} | {:.2} | {:.1} | {:.1} | {:.1} | {} / {} |\n",
            p.concurrency,
            p.ttft_mean_s,
            p.itl_mean_s * 1e3,
            p.tok_s_user,
            p.tok_s_gpu,
            p.remote_prefills,
            p.local_prefills
        );
    }
    s += "\n| published tok/s/GPU @ tok/s/user | simulated tok/s/GPU there | deviation |\n|---|---|---|\n";
    for ((gpu, user), dev) in deviations(points, published) {
        match dev {
            Some(d) => {
                s += &format!(
                    "| {gpu:.0} @ {user:.0} | {:.1} | {:+.1} % |\n",
                    gpu * (1.0 + d),
                    d * 100.0
                )
            }
            None => s += &format!("| {gpu:.0} @ {user:.0} | outside the simulated curve | — |\n"),
        }
    }
    s
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.calibrate {
        return calibrate(&args);
    }
    let started = Instant::now();
    let with_queue = |mut c: Cluster| {
        if let Some(d) = c.disagg.as_mut() {
            d.max_prefill_queue_size = args.max_prefill_queue_size;
        }
        c
    };
    let q = args.max_prefill_queue_size;
    let graphs: [(String, Cluster, &[Published]); 4] = [
        (
            "1 node, aggregated: 2 × TP4, least-loaded (calibrated on these points)".into(),
            aggregated_1_node(CALIBRATED_EFFICIENCY),
            AGG_1_NODE,
        ),
        (
            format!("1 node, disaggregated: 4 × TP1 prefill + 1 × TP4 decode, NVLink, max-prefill-queue-size {q} (not fitted)"),
            with_queue(disaggregated_1_node(CALIBRATED_EFFICIENCY)),
            DISAGG_1_NODE,
        ),
        (
            "2 nodes, aggregated: 2 × TP8, least-loaded (not fitted)".into(),
            aggregated_2_nodes(CALIBRATED_EFFICIENCY),
            AGG_2_NODES,
        ),
        (
            format!("2 nodes, disaggregated: 8 × TP1 prefill + 1 × TP8 decode, 50 GB/s NIC, max-prefill-queue-size {q} (not fitted)"),
            with_queue(disaggregated_2_nodes(CALIBRATED_EFFICIENCY)),
            DISAGG_2_NODES,
        ),
    ];
    let mut results = serde_json::Map::new();
    let mut tables = String::new();
    let mut curves: Vec<Curve> = Vec::new();
    for (i, (name, cluster, published)) in graphs.iter().enumerate() {
        let points = sweep(cluster, &args)?;
        let kind = if i % 2 == 0 {
            "aggregated"
        } else {
            "disaggregated"
        };
        curves.push(Curve::line(
            format!("simulated {kind}"),
            points.iter().map(|p| (p.tok_s_user, p.tok_s_gpu)).collect(),
        ));
        curves.push(Curve::markers(
            format!("published {kind}"),
            published.iter().map(|&(gpu, user)| (user, gpu)).collect(),
        ));
        tables += &table(name, &points, published);
        tables += "\n";
        let key = [
            "aggregated_1_node",
            "disaggregated_1_node",
            "aggregated_2_nodes",
            "disaggregated_2_nodes",
        ][i];
        results.insert(key.into(), serde_json::to_value(&points)?);
    }
    let mut md = format!(
        "## Seed study on the mock engine (simulated H100 nodes, DeepSeek-R1-Distill-Llama-70B FP8, ISL 3000 / OSL 150)\n\nEfficiencies: {CALIBRATED_EFFICIENCY:?}. {} s of wall time for the four sweeps.\n\n",
        started.elapsed().as_secs()
    );
    md += &tables;
    print!("{md}");
    std::fs::create_dir_all(&args.output)?;
    let stem = format!("seed-study-queue{}", args.max_prefill_queue_size);
    std::fs::write(args.output.join(format!("{stem}.md")), &md)?;
    std::fs::write(
        args.output.join(format!("{stem}.json")),
        serde_json::to_string_pretty(&serde_json::json!({
            "efficiency": format!("{CALIBRATED_EFFICIENCY:?}"),
            "graphs": results,
        }))?,
    )?;
    for (nodes, chart) in curves.chunks(4).enumerate() {
        let suffix = if nodes == 0 { "1node" } else { "2nodes" };
        pareto(
            &args.output.join(format!("{stem}-{suffix}")),
            &format!(
                "{} node{}: simulated vs published (queue {q})",
                nodes + 1,
                if nodes == 0 { "" } else { "s" }
            ),
            chart,
        )?;
    }
    Ok(())
}
