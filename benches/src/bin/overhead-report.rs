//! Report 4 of the benchmark issue: serving overhead. Both stacks serve a mock engine with
//! (near) zero step time, so what is measured is the frontend, router and planes: Baton's
//! `baton serve --executor mock --mock-speedup inf --workers 2 --router kv`, and NVIDIA Dynamo
//! 1.6.1's frontend (`--router-mode kv`) over its `mocker` (2 workers, speed-up 10⁶, the
//! anchor's recipe), driven by the same client (`baton_benches::client`) in the same run:
//! streaming chat, ISL 128, OSL 20, concurrency 1…256. Per level: requests/s, and the
//! server's CPU per request and per streamed token — Baton's threads other than `engine-*`
//! (HTTP, processor, router, planes), Dynamo's frontend process (its router included).
//!
//!   make bench-overhead                      # both stacks; Dynamo from scripts/setup-dynamo
//!   cargo run --release -p baton-benches --bin overhead-report -- --skip-dynamo --tiny
//!
//! Results: `benches/results/overhead-report.{md,json}` and charts beside them.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use baton_benches::client::{profile_blocking, profile_with, Phase, ProfileArgs, SweepPoint};
use baton_benches::plot::bars;
use baton_benches::procstat::{clock_tick, cpu_delta, self_cpu, snapshot, CpuSnap};
use clap::Parser;
use serde::Serialize;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "target/release/baton")]
    baton: PathBuf,
    /// Dynamo's venv (scripts/setup-dynamo makes it).
    #[arg(long, default_value = ".venv-dynamo")]
    dynamo_venv: PathBuf,
    /// Baton only (what `make test` runs).
    #[arg(long)]
    skip_dynamo: bool,
    /// A tiny sweep: concurrency 1 and 4, 20 requests each.
    #[arg(long)]
    tiny: bool,
    #[arg(long, value_delimiter = ',', default_value = "1,4,16,64,256")]
    concurrency: Vec<usize>,
    /// Measured requests per level: at least this many, and at least 8 × the level.
    #[arg(long, default_value_t = 400)]
    requests: usize,
    #[arg(long, default_value_t = 128)]
    isl: usize,
    #[arg(long, default_value_t = 20)]
    osl: usize,
    /// Connections: kept alive (as aiperf and most clients), a new one per request (as the
    /// anchor's wrk runs: Dynamo's frontend leaves Nagle on, and on a kept-alive connection a
    /// stream can stall on the client's delayed ACK), or both.
    #[arg(long, value_enum, default_value = "both")]
    connections: Connections,
    /// Scratch space: the model folder, logs, Dynamo's state.
    #[arg(long, default_value = "target/overhead-report")]
    work: PathBuf,
    /// Where the markdown, JSON and charts go.
    #[arg(long, default_value = "benches/results")]
    output: PathBuf,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Connections {
    KeepAlive,
    New,
    Both,
}

impl Connections {
    /// (label, extra client flags) of each mode to run.
    fn modes(self) -> Vec<(&'static str, Vec<&'static str>)> {
        let keep = ("keep-alive", vec![]);
        let new = ("new per request", vec!["--header", "Connection: close"]);
        match self {
            Connections::KeepAlive => vec![keep],
            Connections::New => vec![new],
            Connections::Both => vec![keep, new],
        }
    }
}

/// A child process (group) killed when dropped, and with the report if it dies.
struct Proc {
    child: Child,
    name: String,
    log: PathBuf,
}

impl Proc {
    fn spawn(name: &str, mut cmd: Command, log: &Path) -> Result<Proc> {
        let file =
            std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(file)
            .process_group(0);
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().with_context(|| format!("starting {name}"))?;
        Ok(Proc {
            child,
            name: name.to_string(),
            log: log.to_path_buf(),
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("{} exited ({status}):\n{}", self.name, self.tail());
        }
        Ok(())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // SAFETY: signalling our own child's process group.
        unsafe {
            libc::kill(-(self.child.id() as i32), libc::SIGKILL);
        }
        let _ = self.child.wait();
    }
}

/// Polls `{base}/v1/models` until it lists `model`.
fn wait_ready(p: &mut Proc, base: &str, model: &str, within: Duration) -> Result<()> {
    let deadline = Instant::now() + within;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let client = reqwest::Client::new();
    let url = format!("{base}/v1/models");
    while Instant::now() < deadline {
        p.check_alive()?;
        let listed = rt.block_on(async {
            match client.get(&url).send().await {
                Ok(r) => r.text().await.is_ok_and(|t| t.contains(model)),
                Err(_) => false,
            }
        });
        if listed {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    bail!(
        "{} did not serve {model} within {within:?}:\n{}",
        p.name,
        p.tail()
    )
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// One stack's figures at one concurrency.
#[derive(Clone, Debug, Serialize)]
struct Level {
    concurrency: usize,
    point: SweepPoint,
    /// CPU seconds over the measured requests.
    frontend_cpu_s: f64,
    engine_cpu_s: f64,
    client_cpu_s: f64,
    frontend_cpu_ms_per_request: f64,
    frontend_cpu_us_per_token: f64,
}

#[derive(Clone, Debug, Serialize)]
struct Stack {
    name: String,
    connections: String,
    levels: Vec<Level>,
}

/// How to read one stack's CPU: Baton's process split by thread, or Dynamo's two processes.
enum Cpu {
    Threads(u32),
    Processes { frontend: u32, engine: u32 },
}

/// Every connection mode's sweep of one stack.
fn sweeps(args: &Args, name: &str, base: &str, tokenizer: &Path, cpu: &Cpu) -> Result<Vec<Stack>> {
    args.connections
        .modes()
        .into_iter()
        .map(|(mode, extra)| sweep(args, name, base, tokenizer, cpu, mode, &extra))
        .collect()
}

fn sweep(
    args: &Args,
    name: &str,
    base: &str,
    tokenizer: &Path,
    cpu: &Cpu,
    mode: &str,
    extra: &[&str],
) -> Result<Stack> {
    let tick = clock_tick();
    let mut levels = Vec::new();
    for &c in &args.concurrency {
        let n = args.requests.max(8 * c);
        let flags = |count: usize, dir: &str| -> Vec<String> {
            [
                "--url",
                base,
                "--model",
                "smollm2",
                "--tokenizer",
                tokenizer.to_str().expect("a UTF-8 path"),
                "--isl",
                &args.isl.to_string(),
                "--osl",
                &args.osl.to_string(),
                "--concurrency",
                &c.to_string(),
                "--request-count",
                &count.to_string(),
                "--warmup",
                "0",
                "--quiet",
                "--output",
                &args
                    .work
                    .join(format!("runs/{name}-{}/{dir}", mode.replace(' ', "-")))
                    .to_string_lossy(),
                "--label",
                name,
            ]
            .iter()
            .chain(extra)
            .map(|s| s.to_string())
            .collect()
        };
        profile_blocking(&ProfileArgs::from_flags(&flags(c.max(n / 10), "warmup"))?)?;
        let measured = ProfileArgs::from_flags(&flags(n, &format!("c{c}")))?;
        // CPU read at the edges of the measured requests only (prompts are built before);
        // per thread from schedstat (ns), not the process's 10 ms ticks.
        let read = || -> Result<Vec<CpuSnap>> {
            Ok(match cpu {
                Cpu::Threads(pid) => vec![snapshot(*pid)?],
                Cpu::Processes { frontend, engine } => {
                    vec![snapshot(*frontend)?, snapshot(*engine)?]
                }
            })
        };
        let mut edges = Vec::new();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?;
        let run = rt.block_on(profile_with(&measured, &mut |phase| {
            if matches!(phase, Phase::Measuring(_) | Phase::Measured(_)) {
                edges.push((read(), self_cpu()));
            }
        }))?;
        let [(a, client_a), (b, client_b)] = <[_; 2]>::try_from(edges)
            .map_err(|_| anyhow::anyhow!("the run did not report its measured window"))?;
        let (a, b) = (a?, b?);
        let (frontend_cpu_s, engine_cpu_s) = match cpu {
            Cpu::Threads(_) => {
                let d = cpu_delta(&a[0], &b[0], tick);
                (d.frontend, d.engine)
            }
            Cpu::Processes { .. } => (
                cpu_delta(&a[0], &b[0], tick).total(),
                cpu_delta(&a[1], &b[1], tick).total(),
            ),
        };
        let client_cpu_s = client_b - client_a;
        let point = run.sweep.points[0].clone();
        let tokens = (point.requests * args.osl).max(1) as f64;
        let level = Level {
            concurrency: c,
            frontend_cpu_ms_per_request: frontend_cpu_s * 1e3 / point.requests.max(1) as f64,
            frontend_cpu_us_per_token: frontend_cpu_s * 1e6 / tokens,
            frontend_cpu_s,
            engine_cpu_s,
            client_cpu_s,
            point,
        };
        eprintln!(
            "{name} ({mode}) c={c}: {:.0} req/s, {} errors, frontend {:.3} ms CPU/request",
            level.point.request_throughput, level.point.errors, level.frontend_cpu_ms_per_request
        );
        levels.push(level);
    }
    Ok(Stack {
        name: name.to_string(),
        connections: mode.to_string(),
        levels,
    })
}

fn baton(args: &Args, tokenizer: &Path) -> Result<Vec<Stack>> {
    let mut cmd = Command::new(&args.baton);
    cmd.args([
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--executor",
        "mock",
        "--mock-speedup",
        "inf",
        "--workers",
        "2",
        "--router",
        "kv",
        "--served-model-name",
        "smollm2",
        "--max-inflight",
        "4096",
    ]);
    let mut p = Proc::spawn("baton serve", cmd, &args.work.join("baton.log"))?;
    let stdout = p.child.stdout.take().expect("piped");
    let mut base = None;
    for line in BufReader::new(stdout).lines() {
        if let Some(url) = line?.strip_prefix("baton: listening on ") {
            base = Some(url.trim().to_string());
            break;
        }
    }
    let Some(base) = base else {
        bail!("baton serve ended before listening:\n{}", p.tail());
    };
    wait_ready(&mut p, &base, "smollm2", Duration::from_secs(60))?;
    let stack = sweeps(args, "baton", &base, tokenizer, &Cpu::Threads(p.pid()))?;
    p.check_alive()?;
    Ok(stack)
}

/// Dynamo's event plane in broker mode binds its publishers to this proxy on loopback.
const ZMQ_PROXY: &str = "import sys, zmq\nctx = zmq.Context()\nxsub = ctx.socket(zmq.XSUB)\n\
xsub.bind('tcp://127.0.0.1:' + sys.argv[1])\nxpub = ctx.socket(zmq.XPUB)\n\
xpub.bind('tcp://127.0.0.1:' + sys.argv[2])\nzmq.proxy(xsub, xpub)\n";

fn dynamo(args: &Args, model_dir: &Path) -> Result<Vec<Stack>> {
    let python = args.dynamo_venv.join("bin/python");
    if !python.exists() {
        bail!(
            "no Dynamo at {} (run ./scripts/setup-dynamo, or pass --skip-dynamo)",
            python.display()
        );
    }
    let state = args.work.join("dynamo");
    let _ = std::fs::remove_dir_all(&state);
    std::fs::create_dir_all(state.join("kvstore"))?;
    std::fs::create_dir_all(state.join("home"))?;
    let (xsub, xpub, http) = (free_port()?, free_port()?, free_port()?);
    let proxy_py = state.join("zmq_proxy.py");
    std::fs::write(&proxy_py, ZMQ_PROXY)?;
    let env = |cmd: &mut Command| {
        cmd.env("DYN_DISCOVERY_BACKEND", "file")
            .env("DYN_FILE_KV", state.join("kvstore"))
            .env("DYN_REQUEST_PLANE", "tcp")
            .env("DYN_EVENT_PLANE", "zmq")
            .env(
                "DYN_ZMQ_BROKER_URL",
                format!("xsub=tcp://127.0.0.1:{xsub} , xpub=tcp://127.0.0.1:{xpub}"),
            )
            .env("DYN_TCP_RPC_HOST", "127.0.0.1")
            .env("DYN_TCP_RESPONSE_STREAM_HOST", "127.0.0.1")
            .env("DYN_EVENT_PLANE_HOST", "127.0.0.1")
            .env("DYN_SYSTEM_HOST", "127.0.0.1")
            .env("DYN_HTTP_HOST", "127.0.0.1")
            .env("HF_HUB_OFFLINE", "1")
            .env("TRANSFORMERS_OFFLINE", "1")
            .env("HOME", state.join("home"));
    };
    let mut cmd = Command::new(&python);
    cmd.arg(&proxy_py)
        .args([xsub.to_string(), xpub.to_string()]);
    let _proxy = Proc::spawn("zmq proxy", cmd, &state.join("proxy.log"))?;
    let mut cmd = Command::new(&python);
    cmd.args(["-m", "dynamo.mocker", "--model-path"])
        .arg(model_dir)
        .args([
            "--model-name",
            "smollm2",
            "--block-size",
            "128",
            "--speedup-ratio",
            "1000000",
            "--num-workers",
            "2",
        ]);
    env(&mut cmd);
    let mocker = Proc::spawn("dynamo.mocker", cmd, &state.join("mocker.log"))?;
    let mut cmd = Command::new(&python);
    cmd.args([
        "-m",
        "dynamo.frontend",
        "--http-host",
        "127.0.0.1",
        "--http-port",
    ])
    .arg(http.to_string())
    .args(["--router-mode", "kv"]);
    env(&mut cmd);
    let mut frontend = Proc::spawn("dynamo.frontend", cmd, &state.join("frontend.log"))?;
    let base = format!("http://127.0.0.1:{http}");
    wait_ready(&mut frontend, &base, "smollm2", Duration::from_secs(180))?;
    let cpu = Cpu::Processes {
        frontend: frontend.pid(),
        engine: mocker.pid(),
    };
    let stack = sweeps(args, "dynamo", &base, model_dir, &cpu)?;
    frontend.check_alive()?;
    Ok(stack)
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

fn table(stacks: &[Stack], args: &Args) -> String {
    let mut out = format!(
        "## Serving overhead: Baton against Dynamo 1.6.1 (mock engines at zero step time)\n\n\
         {} ({} cores), {}. Streaming chat, ISL {}, OSL {}; each level measured after its own \
         warm-up; the client (`baton bench`'s, in this process) shares the cores. Frontend CPU: \
         Baton's threads other than `engine-*`; Dynamo's frontend process (router included).\n\n",
        cpu_model(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        chrono::Local::now().format("%Y-%m-%d"),
        args.isl,
        args.osl,
    );
    out.push_str(
        "| stack | connections | concurrency | requests | errors | req/s | TTFT p50 ms | ITL mean ms | \
         frontend CPU ms/request | frontend CPU µs/token | engine CPU ms/request | client CPU \
         ms/request |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for s in stacks {
        for l in &s.levels {
            let n = l.point.requests.max(1) as f64;
            out.push_str(&format!(
                "| {} | {} | {} | {} | {} | {:.0} | {:.2} | {:.3} | {:.3} | {:.1} | {:.3} | {:.3} |\n",
                s.name,
                s.connections,
                l.concurrency,
                l.point.requests,
                l.point.errors,
                l.point.request_throughput,
                l.point.ttft_ms_p50,
                l.point.itl_ms_mean,
                l.frontend_cpu_ms_per_request,
                l.frontend_cpu_us_per_token,
                l.engine_cpu_s * 1e3 / n,
                l.client_cpu_s * 1e3 / n,
            ));
        }
    }
    let (batons, dynamos): (Vec<&Stack>, Vec<&Stack>) =
        stacks.iter().partition(|s| s.name == "baton");
    if !dynamos.is_empty() {
        out.push_str(
            "\n| connections | concurrency | req/s Baton / Dynamo | frontend CPU per request \
             Baton / Dynamo |\n|---|---|---|---|\n",
        );
    }
    for d in &dynamos {
        let Some(b) = batons.iter().find(|b| b.connections == d.connections) else {
            continue;
        };
        for (lb, ld) in b.levels.iter().zip(&d.levels) {
            out.push_str(&format!(
                "| {} | {} | {:.2}× | {:.2}× |\n",
                d.connections,
                lb.concurrency,
                lb.point.request_throughput / ld.point.request_throughput,
                lb.frontend_cpu_ms_per_request / ld.frontend_cpu_ms_per_request,
            ));
        }
    }
    out
}

fn main() -> Result<()> {
    let mut args = Args::parse();
    if args.tiny {
        args.concurrency = vec![1, 4];
        args.requests = 20;
    }
    std::fs::create_dir_all(&args.work)?;
    // Dynamo resolves its cache under $HOME from its own working directory: absolute paths.
    args.work = std::fs::canonicalize(&args.work)?;
    let model_dir = args.work.join("smollm2-hf");
    let out = Command::new(&args.baton)
        .args(["export-hf", "--no-weights", "--output"])
        .arg(&model_dir)
        .output()
        .with_context(|| format!("running {}", args.baton.display()))?;
    if !out.status.success() {
        bail!(
            "baton export-hf failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut stacks = baton(&args, &model_dir)?;
    if !args.skip_dynamo {
        stacks.extend(dynamo(&args, &model_dir)?);
    }
    let md = table(&stacks, &args);
    print!("{md}");
    std::fs::create_dir_all(&args.output)?;
    std::fs::write(args.output.join("overhead-report.md"), &md)?;
    std::fs::write(
        args.output.join("overhead-report.json"),
        serde_json::to_string_pretty(&stacks)?,
    )?;
    let cats: Vec<String> = args.concurrency.iter().map(|c| format!("c={c}")).collect();
    let series = |f: fn(&Level) -> f64| -> Vec<(String, Vec<f64>)> {
        stacks
            .iter()
            .map(|s| {
                (
                    format!("{} ({})", s.name, s.connections),
                    s.levels.iter().map(f).collect(),
                )
            })
            .collect()
    };
    bars(
        &args.output.join("overhead-report-rps"),
        "requests/s, mock engines at zero step time",
        "requests/s",
        &cats,
        &series(|l| l.point.request_throughput),
    )?;
    bars(
        &args.output.join("overhead-report-cpu"),
        "frontend CPU per request",
        "ms",
        &cats,
        &series(|l| l.frontend_cpu_ms_per_request),
    )?;
    Ok(())
}
