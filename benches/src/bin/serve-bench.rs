//! Serving overhead of `baton serve`: what the HTTP frontend, processor, router and request
//! plane cost on top of the engine.
//!
//! Starts `baton serve --port 0` itself, then measures over HTTP:
//! - phase A: `/v1/completions` with a short token-id prompt and `max_tokens` 1, non-streaming,
//!   at each concurrency, with keep-alive and with a new connection per request: requests/s,
//!   latency, and the server's CPU per request split by thread into the engine (every thread
//!   named `engine-*`: the engine loop and the libtorch/OpenMP threads it starts) and the rest
//!   (tokio workers and the main thread: HTTP, processor, router, request plane);
//! - phase B: streaming chat with `ignore_eos`, at `--stream-tokens` and at 1 output token,
//!   at each concurrency: output tok/s and the non-engine CPU per streamed token.
//!
//! CPU comes from `/proc/PID/task/TID/schedstat` (nanoseconds on CPU per thread); threads
//! that exit during a run are caught by the process's utime+stime in `/proc/PID/stat`. The
//! client runs in this process on one thread and shares the machine's cores with the server.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use baton_benches::procstat::{clock_tick, cpu_delta, self_cpu, snapshot, CpuDelta};
use clap::Parser;
use futures::StreamExt;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

#[derive(Parser)]
struct Args {
    /// The `baton` binary to serve with.
    #[arg(long, default_value = "target/release/baton")]
    baton: PathBuf,
    /// Extra `baton serve` flag (repeatable), e.g. `--server-arg=--max-num-seqs=32`.
    #[arg(long = "server-arg", allow_hyphen_values = true)]
    server_args: Vec<String>,
    /// Where the server's stderr goes.
    #[arg(long, default_value = "target/serve-bench.log")]
    log: PathBuf,
    /// Requests per phase-A run.
    #[arg(long, default_value_t = 500)]
    requests: usize,
    /// Phase-A concurrencies.
    #[arg(long, value_delimiter = ',', default_value = "1,16")]
    concurrency: Vec<usize>,
    /// Prompt length of phase A: random token ids, and as many random words for the text
    /// prompt (a word is one or two tokens).
    #[arg(long, default_value_t = 8)]
    prompt_len: usize,
    /// Streams per phase-B run.
    #[arg(long, default_value_t = 16)]
    stream_requests: usize,
    /// Phase-B concurrencies.
    #[arg(long, value_delimiter = ',', default_value = "1,8")]
    stream_concurrency: Vec<usize>,
    /// Output tokens per stream in phase B (`ignore_eos`).
    #[arg(long, default_value_t = 64)]
    stream_tokens: usize,
    /// Runs of each configuration; figures are medians over them.
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Also write the results as JSON here.
    #[arg(long)]
    out: Option<PathBuf>,
}

// ---------------------------------------------------------------------------------------------
// The server

struct Server {
    child: Child,
    url: String,
}

impl Server {
    fn start(args: &Args) -> Result<Self> {
        if let Some(dir) = args.log.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let log = std::fs::File::create(&args.log)
            .with_context(|| format!("creating {}", args.log.display()))?;
        let mut child = Command::new(&args.baton)
            .args(["serve", "--port", "0"])
            .args(&args.server_args)
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .with_context(|| {
                format!(
                    "starting {} (cargo build --release -p baton)",
                    args.baton.display()
                )
            })?;
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if !sent {
                    if let Some(url) = line.strip_prefix("baton: listening on ") {
                        let _ = tx.send(url.trim().to_string());
                        sent = true;
                    }
                }
            }
        });
        match rx.recv_timeout(Duration::from_secs(180)) {
            Ok(url) => Ok(Self { child, url }),
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "the server printed no `baton: listening on` line within 180 s (see {})",
                    args.log.display()
                )
            }
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGINT, then the exit status within 30 s.
    fn stop(mut self) -> Result<i32> {
        let _ = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status.code().unwrap_or(-1));
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                bail!("the server did not exit within 30 s of SIGINT");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Load generation

#[derive(Clone, Copy, PartialEq)]
enum Conn {
    KeepAlive,
    NewPerRequest,
}

impl Conn {
    fn name(self) -> &'static str {
        match self {
            Conn::KeepAlive => "keep-alive",
            Conn::NewPerRequest => "new conn",
        }
    }
}

fn client(conn: Conn) -> Result<reqwest::Client> {
    let b = reqwest::Client::builder()
        .tcp_nodelay(true)
        .timeout(Duration::from_secs(600));
    let b = match conn {
        Conn::KeepAlive => b.pool_max_idle_per_host(usize::MAX),
        Conn::NewPerRequest => b.pool_max_idle_per_host(0),
    };
    Ok(b.build()?)
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    /// Token-id prompt.
    Completion,
    /// The same with a text prompt of about as many tokens.
    CompletionText,
    Live,
    StreamChat {
        max_tokens: usize,
    },
}

struct Load<'a> {
    http: &'a reqwest::Client,
    base: &'a str,
    conn: Conn,
    kind: Kind,
    prompt_len: usize,
}

/// One request; returns the output tokens it got.
async fn one(load: &Load<'_>, seed: u64) -> Result<usize> {
    let close = load.conn == Conn::NewPerRequest;
    let with_conn = |r: reqwest::RequestBuilder| {
        if close {
            r.header("connection", "close")
        } else {
            r
        }
    };
    match load.kind {
        Kind::Live => {
            let r = with_conn(load.http.get(format!("{}/live", load.base)))
                .send()
                .await?;
            let status = r.status();
            r.bytes().await?;
            if !status.is_success() {
                bail!("/live answered {status}");
            }
            Ok(0)
        }
        Kind::Completion | Kind::CompletionText => {
            // Random ids or words: no two requests share a prefix.
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
            let prompt = if load.kind == Kind::Completion {
                json!((0..load.prompt_len)
                    .map(|_| rng.random_range(100..49_000))
                    .collect::<Vec<u32>>())
            } else {
                const WORDS: [&str; 16] = [
                    "river", "stone", "light", "green", "music", "table", "north", "paper",
                    "quiet", "storm", "bread", "glass", "horse", "cloud", "sugar", "field",
                ];
                json!((0..load.prompt_len)
                    .map(|_| WORDS[rng.random_range(0..WORDS.len())])
                    .collect::<Vec<_>>()
                    .join(" "))
            };
            let body = json!({"model": "smollm2", "prompt": prompt, "max_tokens": 1,
                              "temperature": 0});
            let r = with_conn(load.http.post(format!("{}/v1/completions", load.base)))
                .json(&body)
                .send()
                .await?;
            let status = r.status();
            let text = r.text().await?;
            if !status.is_success() {
                bail!("/v1/completions answered {status}: {text}");
            }
            let v: Value = serde_json::from_str(&text)?;
            let n = v["usage"]["completion_tokens"].as_u64().unwrap_or(0) as usize;
            if n != 1 {
                bail!("/v1/completions gave {n} tokens for max_tokens 1: {text}");
            }
            Ok(n)
        }
        Kind::StreamChat { max_tokens } => {
            let body = json!({
                "model": "smollm2",
                "messages": [{"role": "user", "content": format!("Tell me a story, number {seed}.")}],
                "max_tokens": max_tokens, "ignore_eos": true, "temperature": 0,
                "stream": true, "stream_options": {"include_usage": true}});
            let r = with_conn(load.http.post(format!("{}/v1/chat/completions", load.base)))
                .json(&body)
                .send()
                .await?;
            let status = r.status();
            if !status.is_success() {
                bail!(
                    "/v1/chat/completions answered {status}: {}",
                    r.text().await?
                );
            }
            let mut all = Vec::with_capacity(32 << 10);
            let mut body = r.bytes_stream();
            while let Some(chunk) = body.next().await {
                all.extend_from_slice(&chunk?);
            }
            let text = String::from_utf8(all)?;
            let events: Vec<&str> = text
                .split("\n\n")
                .filter_map(|e| e.trim().strip_prefix("data: "))
                .collect();
            if events.last() != Some(&"[DONE]") {
                bail!("the stream did not end with [DONE]: {text}");
            }
            let usage: Value = serde_json::from_str(events[events.len() - 2])?;
            let n = usage["usage"]["completion_tokens"].as_u64().unwrap_or(0) as usize;
            if n != max_tokens {
                bail!("stream gave {n} tokens for max_tokens {max_tokens} with ignore_eos: {text}");
            }
            Ok(n)
        }
    }
}

struct RunResult {
    wall: f64,
    latencies: Vec<f64>,
    tokens: usize,
    server: CpuDelta,
    client_cpu: f64,
}

async fn run_load(
    load: &Load<'_>,
    n: usize,
    concurrency: usize,
    seed: u64,
    pid: u32,
    tick: f64,
) -> Result<RunResult> {
    let next = AtomicUsize::new(0);
    let worker = || async {
        let mut lat = Vec::new();
        let mut tokens = 0;
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            if i >= n {
                break;
            }
            let t = Instant::now();
            tokens += one(load, seed + i as u64).await?;
            lat.push(t.elapsed().as_secs_f64());
        }
        Ok::<_, anyhow::Error>((lat, tokens))
    };
    let client_before = self_cpu();
    let before = snapshot(pid)?;
    let start = Instant::now();
    let outs = futures::future::join_all((0..concurrency).map(|_| worker())).await;
    let wall = start.elapsed().as_secs_f64();
    let after = snapshot(pid)?;
    let client_cpu = self_cpu() - client_before;
    let mut latencies = Vec::with_capacity(n);
    let mut tokens = 0;
    for o in outs {
        let (l, t) = o?;
        latencies.extend(l);
        tokens += t;
    }
    Ok(RunResult {
        wall,
        latencies,
        tokens,
        server: cpu_delta(&before, &after, tick),
        client_cpu,
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn percentile(v: &[f64], p: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// Medians over repeats of one configuration's figures (times in ms, CPU in ms per unit).
struct Figures(Vec<(&'static str, f64)>);

impl Figures {
    fn get(&self, k: &str) -> f64 {
        self.0
            .iter()
            .find(|(n, _)| *n == k)
            .map_or(f64::NAN, |(_, v)| *v)
    }
    fn json(&self) -> Value {
        Value::Object(
            self.0
                .iter()
                .map(|(k, v)| (k.to_string(), json!(v)))
                .collect(),
        )
    }
}

fn figures(runs: &[RunResult], requests: usize) -> Figures {
    let per = |f: &dyn Fn(&RunResult) -> f64| median(runs.iter().map(f).collect());
    let rq = requests as f64;
    let ms = 1000.0;
    // NaN (null in the JSON) where a run streams no tokens.
    let tok = |r: &RunResult| {
        if r.tokens == 0 {
            f64::NAN
        } else {
            r.tokens as f64
        }
    };
    Figures(vec![
        ("req_per_s", per(&|r| rq / r.wall)),
        ("out_tok_per_s", per(&|r| r.tokens as f64 / r.wall)),
        ("lat_p50_ms", per(&|r| percentile(&r.latencies, 0.5) * ms)),
        ("lat_p90_ms", per(&|r| percentile(&r.latencies, 0.9) * ms)),
        (
            "lat_mean_ms",
            per(&|r| r.latencies.iter().sum::<f64>() / rq * ms),
        ),
        (
            "server_cpu_ms_per_req",
            per(&|r| r.server.total() / rq * ms),
        ),
        ("engine_cpu_ms_per_req", per(&|r| r.server.engine / rq * ms)),
        (
            "engine_busy_ms_per_req",
            per(&|r| r.server.engine_main / rq * ms),
        ),
        (
            "frontend_cpu_ms_per_req",
            per(&|r| r.server.frontend / rq * ms),
        ),
        (
            "frontend_cpu_ms_per_token",
            per(&|r| r.server.frontend / tok(r) * ms),
        ),
        ("exited_threads_cpu_ms", per(&|r| r.server.exited * ms)),
        // Latency not spent in the busy engine loop, per request: HTTP, processor, router,
        // request plane, scheduling on a shared CPU. Meaningful at concurrency 1.
        (
            "added_latency_ms",
            per(&|r| (r.latencies.iter().sum::<f64>() - r.server.engine_main) / rq * ms),
        ),
        ("client_cpu_ms_per_req", per(&|r| r.client_cpu / rq * ms)),
    ])
}

async fn bench(args: &Args, pid: u32, base: &str, tick: f64) -> Result<Value> {
    let keep = client(Conn::KeepAlive)?;
    let fresh = client(Conn::NewPerRequest)?;
    let mut seed = 1u64 << 20;
    let mut results = Vec::new();

    // Idle: the server's CPU with nothing to do (a baseline for everything below).
    let a = snapshot(pid)?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle = cpu_delta(&a, &snapshot(pid)?, tick);
    println!(
        "idle server: {:.2} ms CPU per s (engine {:.2}, rest {:.2})",
        idle.total() / idle.wall * 1e3,
        idle.engine / idle.wall * 1e3,
        idle.frontend / idle.wall * 1e3
    );

    let mut run = |label: String, conn: Conn, kind: Kind, n: usize, c: usize| -> RunFuture<'_> {
        let http = if conn == Conn::KeepAlive {
            &keep
        } else {
            &fresh
        };
        seed += 1 << 16;
        let seed = seed;
        Box::pin(async move {
            let load = Load {
                http,
                base,
                conn,
                kind,
                prompt_len: args.prompt_len,
            };
            // Warm-up: connections, the engine's thread pool, allocator.
            run_load(&load, (2 * c).max(4), c, seed ^ 0xdead, pid, tick).await?;
            let mut runs = Vec::new();
            for r in 0..args.repeats {
                runs.push(run_load(&load, n, c, seed + (r as u64) * 4096, pid, tick).await?);
            }
            Ok((label, figures(&runs, n)))
        })
    };

    println!(
        "\nphase A: /v1/completions, {}-token id prompt, max_tokens 1, non-streaming; \
         {} requests per run, median of {} runs",
        args.prompt_len, args.requests, args.repeats
    );
    println!(
        "{:<34} {:>7} {:>7} {:>7} {:>9} {:>9} {:>9} {:>10} {:>9} {:>8}",
        "",
        "req/s",
        "p50 ms",
        "p90 ms",
        "server",
        "engine",
        "eng busy",
        "frontend",
        "added",
        "client"
    );
    println!(
        "{:<34} {:>7} {:>7} {:>7} {:>9} {:>9} {:>9} {:>10} {:>9} {:>8}",
        "", "", "", "", "CPU ms/rq", "CPU ms/rq", "ms/rq", "CPU ms/rq", "lat ms", "CPU ms"
    );
    let row_a = |label: &str, f: &Figures, c: usize| {
        let added = if c == 1 {
            format!("{:.3}", f.get("added_latency_ms"))
        } else {
            "-".to_string()
        };
        println!(
            "{:<34} {:>7.1} {:>7.2} {:>7.2} {:>9.3} {:>9.3} {:>9.3} {:>10.3} {:>9} {:>8.3}",
            label,
            f.get("req_per_s"),
            f.get("lat_p50_ms"),
            f.get("lat_p90_ms"),
            f.get("server_cpu_ms_per_req"),
            f.get("engine_cpu_ms_per_req"),
            f.get("engine_busy_ms_per_req"),
            f.get("frontend_cpu_ms_per_req"),
            added,
            f.get("client_cpu_ms_per_req"),
        );
    };
    for conn in [Conn::KeepAlive, Conn::NewPerRequest] {
        let (label, f) = run(
            format!("GET /live, {}, c=1", conn.name()),
            conn,
            Kind::Live,
            args.requests,
            1,
        )
        .await?;
        row_a(&label, &f, 1);
        results.push(
            json!({"phase": "A", "route": "/live", "conn": conn.name(), "concurrency": 1,
                            "requests": args.requests, "figures": f.json()}),
        );
    }
    let configs = [
        (Kind::Completion, Conn::KeepAlive),
        (Kind::Completion, Conn::NewPerRequest),
        (Kind::CompletionText, Conn::KeepAlive),
    ];
    for &c in &args.concurrency {
        for (kind, conn) in configs {
            let prompt = if kind == Kind::Completion {
                "ids"
            } else {
                "text"
            };
            let (label, f) = run(
                format!("completions {prompt}, {}, c={c}", conn.name()),
                conn,
                kind,
                args.requests,
                c,
            )
            .await?;
            row_a(&label, &f, c);
            results.push(
                json!({"phase": "A", "route": "/v1/completions", "conn": conn.name(),
                                "concurrency": c, "requests": args.requests,
                                "prompt": prompt, "prompt_len": args.prompt_len,
                                "max_tokens": 1, "figures": f.json()}),
            );
        }
    }

    println!(
        "\nphase B: streaming /v1/chat/completions, ignore_eos, keep-alive; {} streams per run, \
         median of {} runs",
        args.stream_requests, args.repeats
    );
    println!(
        "{:<34} {:>8} {:>9} {:>9} {:>10} {:>11} {:>13}",
        "", "out tok/s", "server", "engine", "frontend", "frontend", "frontend"
    );
    println!(
        "{:<34} {:>8} {:>9} {:>9} {:>10} {:>11} {:>13}",
        "", "", "CPU ms/rq", "CPU ms/rq", "CPU ms/rq", "CPU ms/tok", "marginal ms/tok"
    );
    for &c in &args.stream_concurrency {
        let (l1, one_tok) = run(
            format!("stream chat 1 tok, c={c}"),
            Conn::KeepAlive,
            Kind::StreamChat { max_tokens: 1 },
            args.stream_requests,
            c,
        )
        .await?;
        let (ln, many) = run(
            format!("stream chat {} tok, c={c}", args.stream_tokens),
            Conn::KeepAlive,
            Kind::StreamChat {
                max_tokens: args.stream_tokens,
            },
            args.stream_requests,
            c,
        )
        .await?;
        // What one more streamed token costs outside the engine: the difference between the
        // long and the 1-token streams, per extra token.
        let marginal = (many.get("frontend_cpu_ms_per_req")
            - one_tok.get("frontend_cpu_ms_per_req"))
            / (args.stream_tokens - 1) as f64;
        for (label, f, m) in [(l1, &one_tok, None), (ln, &many, Some(marginal))] {
            println!(
                "{:<34} {:>8.1} {:>9.3} {:>9.3} {:>10.3} {:>11.4} {:>13}",
                label,
                f.get("out_tok_per_s"),
                f.get("server_cpu_ms_per_req"),
                f.get("engine_cpu_ms_per_req"),
                f.get("frontend_cpu_ms_per_req"),
                f.get("frontend_cpu_ms_per_token"),
                m.map_or("".to_string(), |m| format!("{m:.4}")),
            );
        }
        results.push(
            json!({"phase": "B", "route": "/v1/chat/completions", "stream": true,
                            "conn": "keep-alive", "concurrency": c,
                            "requests": args.stream_requests, "max_tokens": 1,
                            "figures": one_tok.json()}),
        );
        results.push(
            json!({"phase": "B", "route": "/v1/chat/completions", "stream": true,
                            "conn": "keep-alive", "concurrency": c,
                            "requests": args.stream_requests, "max_tokens": args.stream_tokens,
                            "figures": many.json(),
                            "frontend_marginal_cpu_ms_per_token": marginal}),
        );
    }
    Ok(json!({
        "idle_server_cpu_ms_per_s": {"engine": idle.engine / idle.wall * 1e3,
                                     "frontend": idle.frontend / idle.wall * 1e3},
        "runs": results,
    }))
}

fn main() -> Result<()> {
    let args = Args::parse();
    let tick = clock_tick();
    let server = Server::start(&args)?;
    let pid = server.pid();
    let threads = snapshot(pid)?;
    let mut names: Vec<_> = threads.tasks.values().map(|t| t.comm.clone()).collect();
    names.sort();
    println!(
        "server pid {pid} at {} ({} cores here); threads: {}",
        server.url,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        names.join(", ")
    );
    // The load generator: one thread, so it takes as little of the shared CPU as it can.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let measured = rt.block_on(bench(&args, pid, &server.url, tick));
    let exit = server.stop();
    let mut measured = measured?;
    let exit = exit?;
    println!("\nserver exit status after SIGINT: {exit}");
    measured["command"] = json!(std::env::args().collect::<Vec<_>>().join(" "));
    measured["server_exit_status"] = json!(exit);
    if let Some(out) = &args.out {
        std::fs::write(out, serde_json::to_string_pretty(&measured)? + "\n")
            .with_context(|| format!("writing {}", out.display()))?;
        println!("wrote {}", out.display());
    }
    if exit != 0 {
        bail!("the server exited with status {exit} after SIGINT");
    }
    Ok(())
}

/// One measured run of the sweep, boxed so the closure can be called in a loop.
type RunFuture<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<(String, Figures)>> + 'a>>;
