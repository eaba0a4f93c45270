//! The soak benchmark of the reliability issue: the distributed graph (frontend, 2 decode and 2
//! prefill workers on the mock engine, real NATS and etcd) under 256 concurrent streams for 10
//! minutes, then the same load with the faults of the tests struck one after another (each
//! killed or stalled worker replaced once it has left routing). Writes `soak-<run>.json` and
//! prints the rows of benches/README.md's reliability table.
//!
//! cargo run --release -p baton-benches --bin soak -- --streams 256 --minutes 10
//! (`make bench-soak`)

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use baton_benches::baseline::procs::stop_children_on_signal;
use baton_benches::soak::{self, Fault, SoakConfig, SoakReport};
use clap::Parser;

#[derive(Parser, Debug)]
#[command(about = "The distributed graph under load and faults, on the mock engine")]
struct Args {
    #[arg(long, default_value = "target/release/baton")]
    baton: PathBuf,
    #[arg(long, default_value = "target/soak")]
    work: PathBuf,
    #[arg(long, default_value = "benches/results")]
    output: PathBuf,
    #[arg(long, default_value_t = 256)]
    streams: usize,
    /// Length of each run.
    #[arg(long, default_value_t = 10.0)]
    minutes: f64,
    /// The frontend's --max-inflight in the `overload` run [default: 3/4 of --streams]; the
    /// other runs admit every stream.
    #[arg(long)]
    max_inflight: Option<usize>,
    /// Length of the `overload` run.
    #[arg(long, default_value_t = 3.0)]
    overload_minutes: f64,
    #[arg(long, default_value_t = 1)]
    migration_limit: u32,
    /// Every component's --stream-timeout: long enough that a first token late under a full
    /// queue (hundreds of prompts at once on a simulated 70B) is not taken for a dead worker.
    #[arg(long, default_value_t = 60)]
    stream_timeout: u64,
    /// Every component's --lease-ttl (Baton's default).
    #[arg(long, default_value_t = 10)]
    lease_ttl: u64,
    /// Runs: `plain` (no faults, every stream admitted), `overload` (past --max-inflight:
    /// 503s with Retry-After, which the clients honour), `faults` (the mix, spread over the run).
    #[arg(long, default_value = "plain,overload,faults", value_delimiter = ',')]
    runs: Vec<String>,
    /// The fault mix, in order, evenly spread over the run.
    #[arg(
        long,
        default_value = "kill-prefill,kill-decode,restart-nats,stop-decode,restart-etcd",
        value_delimiter = ','
    )]
    faults: Vec<String>,
}

fn main() -> Result<()> {
    stop_children_on_signal();
    let args = Args::parse();
    if !args.baton.is_file() {
        bail!(
            "{} is missing: build it first (`make build`)",
            args.baton.display()
        );
    }
    let faults: Vec<Fault> = args
        .faults
        .iter()
        .map(|f| Fault::parse(f).map_err(anyhow::Error::msg))
        .collect::<Result<_>>()?;
    for (flag, v) in [
        ("--minutes", args.minutes),
        ("--overload-minutes", args.overload_minutes),
    ] {
        if v.is_nan() || v <= 0.0 {
            bail!("`{flag}` must be positive, not {v}");
        }
    }
    std::fs::create_dir_all(&args.output)
        .with_context(|| format!("creating {}", args.output.display()))?;
    let mut rows = Vec::new();
    for run in &args.runs {
        let minutes = if run == "overload" {
            args.overload_minutes
        } else {
            args.minutes
        };
        let duration = Duration::from_secs_f64(minutes * 60.0);
        let mut c = SoakConfig::new(
            args.baton.clone(),
            args.work.join(run),
            args.streams,
            duration,
        );
        c.migration_limit = args.migration_limit;
        c.stream_timeout = args.stream_timeout;
        c.lease_ttl = args.lease_ttl;
        c.request_timeout = Duration::from_secs(300);
        match run.as_str() {
            "plain" => {}
            "overload" => {
                c.max_inflight = args.max_inflight.unwrap_or(args.streams * 3 / 4).max(1);
            }
            "faults" => {
                // Evenly spread, the first after warm-up, each with time to recover.
                let gap = duration / (faults.len() as u32 + 1);
                c.faults = faults
                    .iter()
                    .enumerate()
                    .map(|(i, f)| (gap * (i as u32 + 1), *f))
                    .collect();
                c.replace = true;
            }
            other => bail!("unknown run `{other}` (use plain or faults)"),
        }
        eprintln!(
            "soak `{run}`: {} streams for {:.1} min (logs in {})",
            c.streams,
            minutes,
            c.work.display()
        );
        let report = soak::run(&c).with_context(|| format!("soak run `{run}`"))?;
        let path = args.output.join(format!("soak-{run}.json"));
        std::fs::write(&path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
        rows.push(report.row(run));
        print_run(run, &report);
    }
    println!("\n{}", SoakReport::TABLE_HEAD);
    for r in rows {
        println!("{r}");
    }
    Ok(())
}

fn print_run(run: &str, r: &SoakReport) {
    println!("\n## soak `{run}` on {}", r.cpu);
    println!(
        "{} requests: {} completed, {} failed ({} with a clear error), {} hung, {} answered \
         twice; {} 503s ({} requests never admitted); {:.0} output tok/s; remote prefills {}",
        r.requests,
        r.completed,
        r.failed,
        r.failed_clearly,
        r.hung,
        r.answered_twice,
        r.rejected_503,
        r.gave_up,
        r.output_tok_s,
        r.remote_prefills
    );
    for (kind, n) in &r.failure_kinds {
        println!("failed {n}× {kind}");
    }
    for f in &r.faults {
        println!(
            "fault {:?} on {} at {:.0} s: left routing after {:?} s, replaced by {:?}",
            f.fault, f.target, f.at_s, f.left_routing_after_s, f.replaced_by
        );
    }
    for p in &r.processes {
        println!(
            "{}: RSS {:?} MiB after warm-up, {:?} max, {:?} at the end; KV blocks at stop {:?}",
            p.name, p.rss_warm_mib, p.rss_max_mib, p.rss_end_mib, p.kv_blocks_at_stop
        );
    }
}
