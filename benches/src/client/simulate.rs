//! `baton bench --trace F --simulate`: the trace replayed against an embedded graph of
//! mock-engine workers on virtual clocks (`crate::sim`) instead of a server, so a 59-minute
//! trace on eight simulated H200s takes seconds and the same command gives the same figures
//! (round-robin exactly; policies that draw at random move a little).

use serde_json::json;

use super::sweep::{SweepFile, SweepPoint};
use super::{BenchError, ProfileArgs, Run};
use crate::sim::{replay, routing_graph, Replay, ReplayPoint};

fn sim_err(e: crate::sim::SimError) -> BenchError {
    BenchError::Runtime(format!("simulation: {e}"))
}

/// The replay as one sweep point, in ms like a measured run.
fn point(p: &ReplayPoint, gpus: usize) -> SweepPoint {
    SweepPoint {
        concurrency: None,
        requests: p.completed,
        errors: p.rejected + p.errors,
        ttft_ms_mean: p.ttft_mean_s * 1e3,
        ttft_ms_p50: p.ttft_p50_s * 1e3,
        ttft_ms_p90: p.ttft_p90_s * 1e3,
        ttft_ms_p99: f64::NAN,
        itl_ms_mean: p.itl_mean_s * 1e3,
        itl_ms_p50: f64::NAN,
        itl_ms_p99: f64::NAN,
        e2e_ms_mean: p.e2e_mean_s * 1e3,
        e2e_ms_p50: p.e2e_p50_s * 1e3,
        e2e_ms_p90: p.e2e_p90_s * 1e3,
        e2e_ms_p99: f64::NAN,
        request_throughput: p.requests_per_s,
        output_token_throughput: p.output_tok_s,
        tok_s_gpu: p.output_tok_s / gpus.max(1) as f64,
        tok_s_user: if p.itl_mean_s > 0.0 {
            1.0 / p.itl_mean_s
        } else {
            f64::NAN
        },
        goodput: None,
    }
}

pub fn simulate(args: &ProfileArgs) -> Result<Run, BenchError> {
    let path = args.trace.as_ref().ok_or_else(|| BenchError::Flag {
        name: "simulate",
        value: "(no --trace)".into(),
        reason: "the simulation replays a trace: give --trace".into(),
    })?;
    if args.simulate_workers == 0 {
        return Err(BenchError::Flag {
            name: "simulate-workers",
            value: "0".into(),
            reason: "at least one worker".into(),
        });
    }
    let mut trace = crate::trace::load(path)?;
    if let Some(n) = args.trace_requests {
        trace.truncate(n.max(1));
    }
    let cluster = routing_graph(args.simulate_workers, &args.router);
    let opts = Replay {
        time_scale: 1.0 / args.trace_speedup,
        seed: args.seed,
    };
    let p = replay(&cluster, &trace, &opts).map_err(sim_err)?;
    let dir = args
        .output
        .clone()
        .unwrap_or_else(|| std::path::PathBuf::from("artifacts").join("simulated-trace"));
    let detail = dir.join("trace-simulated.json");
    std::fs::create_dir_all(&dir)
        .and_then(|_| {
            std::fs::write(
                &detail,
                serde_json::to_string_pretty(&json!({
                    "graph": format!("{} × H200 TP1, DeepSeek-R1-Distill-Llama-70B FP8 (mock)",
                                     args.simulate_workers),
                    "router": args.router,
                    "replay": p,
                }))
                .expect("plain numbers"),
            )
        })
        .map_err(|source| BenchError::Write {
            path: detail.clone(),
            source,
        })?;
    let gpus = args.simulate_workers;
    let sweep = SweepFile {
        label: args
            .label
            .clone()
            .unwrap_or_else(|| format!("simulated {} × H200, {}", gpus, args.router)),
        gpus,
        points: vec![point(&p, gpus)],
    };
    sweep.write(&dir)?;
    eprintln!(
        "simulated: {} completed, {} refused, prefix-hit rate {:.1} % (ideal {:.1} %)",
        p.completed,
        p.rejected,
        p.hit_rate * 100.0,
        p.ideal_hit_rate * 100.0
    );
    Ok(Run { dir, sweep })
}
