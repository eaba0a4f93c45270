//! The seed's claim on this machine: long prompts arriving while other streams decode, served
//! aggregated (two decode workers, one core each, least-loaded routing) and disaggregated (one
//! decode worker pinned to one core, one prefill worker to the other), side by side in one run,
//! as separate `baton run` processes over real NATS and etcd (`taskset`, one torch thread each).
//! The client sends the seed's aiperf shape: token-id prompts of exactly `--isl` tokens (no two
//! sharing a prefix), `max_tokens` = `min_tokens` = `--osl` with `ignore_eos`, streamed.
//!
//! `cargo run --release -p baton-benches --bin disagg-bench -- --concurrency 2,4`

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use futures::StreamExt;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use test_support::{EtcdServer, NatsServer};

#[derive(Parser, Debug)]
struct Args {
    #[arg(long, default_value_t = 3000)]
    isl: usize,
    #[arg(long, default_value_t = 150)]
    osl: usize,
    #[arg(long, value_delimiter = ',', default_value = "2,4")]
    concurrency: Vec<usize>,
    /// Requests per concurrency level, as a multiple of it.
    #[arg(long, default_value_t = 2)]
    requests_per_stream: usize,
    #[arg(long, default_value = "smollm2")]
    model: String,
    /// Compute dtype of every worker (auto: bf16 where the CPU has it).
    #[arg(long, default_value = "auto")]
    dtype: String,
    /// Prompts up to this many uncached tokens stay on the decode worker.
    #[arg(long, default_value_t = 512)]
    max_local_prefill_length: usize,
    #[arg(long, default_value = "target/disagg-bench.json")]
    out: String,
}

/// Children of one graph, killed on drop.
struct Graph(Vec<Child>);

impl Drop for Graph {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn baton() -> Result<std::path::PathBuf> {
    let exe = std::env::current_exe()?;
    let path = exe.parent().context("exe dir")?.join("baton");
    if !path.exists() {
        bail!("{} missing: cargo build --release -p baton", path.display());
    }
    Ok(path)
}

fn spawn(cpus: &str, args: &[String], log: &str) -> Result<Child> {
    let mut cmd = Command::new("taskset");
    cmd.args(["-c", cpus]).arg(baton()?).args(args);
    // One intra-op thread per pinned core: two would only take turns on it.
    if !cpus.contains('-') {
        cmd.env("OMP_NUM_THREADS", "1");
    }
    cmd.stdout(Stdio::piped())
        .stderr(std::fs::File::create(log)?)
        .spawn()
        .context("spawning baton under taskset")
}

fn listening(child: &mut Child) -> Result<String> {
    let stdout = child.stdout.take().context("stdout")?;
    for line in BufReader::new(stdout).lines() {
        if let Some(url) = line?.strip_prefix("baton: listening on ") {
            return Ok(url.to_string());
        }
    }
    bail!("the frontend ended without its listening line")
}

/// Starts `mode`'s graph; returns it and the frontend's URL.
async fn start(mode: &str, args: &Args, nats: &str, etcd: &str) -> Result<(Graph, String)> {
    let common = |component: &str| -> Vec<String> {
        let mut v: Vec<String> = [
            "run",
            component,
            "--model",
            &args.model,
            "--served-model-name",
            "m",
            "--dtype",
            &args.dtype,
            "--namespace",
            mode,
            "--nats-server",
            nats,
            "--etcd-endpoints",
            etcd,
            "--max-model-len",
            "4096",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if mode == "disaggregated" {
            v.extend(
                [
                    "--remote-prefill",
                    "true",
                    "--max-local-prefill-length",
                    &args.max_local_prefill_length.to_string(),
                    "--max-prefill-queue-size",
                    "64",
                    "--remote-prefill-timeout",
                    "600",
                ]
                .iter()
                .map(|s| s.to_string()),
            );
        }
        v
    };
    let log = |name: &str| format!("target/disagg-bench-{mode}-{name}.log");
    let mut children = Vec::new();
    if mode == "aggregated" {
        children.push(spawn("0", &common("decode-worker"), &log("decode0"))?);
        children.push(spawn("1", &common("decode-worker"), &log("decode1"))?);
    } else {
        children.push(spawn("0", &common("decode-worker"), &log("decode"))?);
        children.push(spawn("1", &common("prefill-worker"), &log("prefill"))?);
    }
    let mut front = common("frontend");
    front.extend(["--port", "0", "--router", "least-loaded"].map(String::from));
    let mut frontend = spawn("0-1", &front, &log("frontend"))?;
    let base = listening(&mut frontend)?;
    children.push(frontend);
    let graph = Graph(children);
    let want = if mode == "aggregated" { 2 } else { 1 };
    let http = reqwest::Client::new();
    for _ in 0..600 {
        let health: Value = http
            .get(format!("{base}/health"))
            .send()
            .await?
            .json()
            .await?;
        if health["workers"].as_u64() == Some(want) {
            return Ok((graph, base));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("{mode}: workers did not register")
}

/// One streamed request: (TTFT, gaps between content chunks, tokens, latency), seconds.
async fn one(
    http: &reqwest::Client,
    base: &str,
    prompt: Vec<u32>,
    osl: usize,
) -> Result<(f64, Vec<f64>, usize, f64)> {
    let body = json!({"model": "m", "prompt": prompt, "max_tokens": osl, "min_tokens": osl,
                      "ignore_eos": true, "temperature": 0, "stream": true,
                      "stream_options": {"include_usage": true}});
    let t0 = Instant::now();
    let r = http
        .post(format!("{base}/v1/completions"))
        .json(&body)
        .send()
        .await?;
    if !r.status().is_success() {
        bail!("{}: {}", r.status(), r.text().await?);
    }
    let mut stream = r.bytes_stream();
    let (mut buf, mut arrivals, mut tokens) = (String::new(), Vec::new(), 0usize);
    while let Some(chunk) = stream.next().await {
        buf.push_str(std::str::from_utf8(&chunk?)?);
        while let Some(end) = buf.find("\n\n") {
            let event: String = buf.drain(..end + 2).collect();
            let Some(data) = event.trim().strip_prefix("data: ") else {
                continue;
            };
            if data == "[DONE]" {
                continue;
            }
            let v: Value = serde_json::from_str(data)?;
            if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
                tokens = n as usize;
            }
            if v["choices"][0]["text"]
                .as_str()
                .is_some_and(|t| !t.is_empty())
            {
                arrivals.push(t0.elapsed().as_secs_f64());
            }
        }
    }
    if tokens != osl {
        bail!("{tokens} tokens for max_tokens {osl}");
    }
    let ttft = *arrivals.first().context("no content")?;
    let gaps = arrivals.windows(2).map(|w| w[1] - w[0]).collect();
    Ok((ttft, gaps, tokens, t0.elapsed().as_secs_f64()))
}

fn percentile(v: &[f64], p: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

async fn level(base: &str, args: &Args, concurrency: usize, seed: u64) -> Result<Value> {
    let http = reqwest::Client::new();
    let n = concurrency * args.requests_per_stream;
    let prompts: Vec<Vec<u32>> = (0..n)
        .map(|i| {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed + i as u64);
            (0..args.isl)
                .map(|_| rng.random_range(100..49_000))
                .collect()
        })
        .collect();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let started = Instant::now();
    let streams = (0..concurrency).map(|_| async {
        let mut out = Vec::new();
        loop {
            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if i >= n {
                return Ok::<_, anyhow::Error>(out);
            }
            out.push(one(&http, base, prompts[i].clone(), args.osl).await?);
        }
    });
    let results: Vec<_> = futures::future::try_join_all(streams)
        .await?
        .into_iter()
        .flatten()
        .collect();
    let wall = started.elapsed().as_secs_f64();
    let ttft: Vec<f64> = results.iter().map(|r| r.0).collect();
    let gaps: Vec<f64> = results.iter().flat_map(|r| r.1.clone()).collect();
    // aiperf's ITL: (last − first token time) / (tokens − 1), per request.
    let itl: Vec<f64> = results
        .iter()
        .map(|r| r.1.iter().sum::<f64>() / (r.2 - 1) as f64)
        .collect();
    let tokens: usize = results.iter().map(|r| r.2).sum();
    Ok(json!({
        "concurrency": concurrency, "requests": n, "wall_s": wall,
        "ttft_mean_s": mean(&ttft), "ttft_p50_s": percentile(&ttft, 0.5),
        "itl_mean_s": mean(&itl), "itl_p50_s": percentile(&gaps, 0.5),
        "itl_p99_s": percentile(&gaps, 0.99),
        "latency_mean_s": mean(&results.iter().map(|r| r.3).collect::<Vec<_>>()),
        "output_tok_s": tokens as f64 / wall,
    }))
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let nats = NatsServer::start()?;
    let etcd = EtcdServer::start()?;
    let mut all = Vec::new();
    for mode in ["aggregated", "disaggregated"] {
        let (graph, base) = start(mode, &args, &nats.url, &etcd.url).await?;
        // Warm-up: one short request through every path.
        let http = reqwest::Client::new();
        one(&http, &base, (100..700).collect(), 4).await?;
        for &c in &args.concurrency {
            let mut r = level(&base, &args, c, 1000 * c as u64).await?;
            r["mode"] = json!(mode);
            eprintln!("{r}");
            all.push(r);
        }
        drop(graph);
    }
    println!("| mode | conc. | requests | TTFT mean | ITL mean | ITL p50 | ITL p99 | request latency | output tok/s |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for r in &all {
        println!(
            "| {} | {} | {} | {:.2} s | {:.0} ms | {:.0} ms | {:.0} ms | {:.1} s | {:.2} |",
            r["mode"].as_str().unwrap_or(""),
            r["concurrency"],
            r["requests"],
            r["ttft_mean_s"].as_f64().unwrap_or(0.0),
            r["itl_mean_s"].as_f64().unwrap_or(0.0) * 1e3,
            r["itl_p50_s"].as_f64().unwrap_or(0.0) * 1e3,
            r["itl_p99_s"].as_f64().unwrap_or(0.0) * 1e3,
            r["latency_mean_s"].as_f64().unwrap_or(0.0),
            r["output_tok_s"].as_f64().unwrap_or(0.0),
        );
    }
    std::fs::write(&args.out, serde_json::to_vec_pretty(&all)?)?;
    Ok(())
}
