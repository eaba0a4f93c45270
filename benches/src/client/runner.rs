//! The load loops. A sweep level is a closed loop: C tasks, each sending its next request as
//! soon as its last one ends, warm-up requests first and unmeasured; prompts are built
//! before the level starts so tokenizing never competes with the timed requests. A trace
//! replay is an open loop: each request leaves at its timestamp (scaled by the speed-up)
//! whatever is still in flight.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};

use super::export::write_run;
use super::http::{send, RequestShape};
use super::metrics::{Record, RequestMetrics, Slo, Summary};
use super::prompts::{load_tokenizer, Length, Prompt, PromptSource};
use super::sweep::{SweepFile, SweepPoint};
use super::{BenchError, ProfileArgs};

/// A finished run: where its files are, and its figures.
pub struct Run {
    pub dir: PathBuf,
    pub sweep: SweepFile,
}

impl Run {
    pub fn table(&self) -> String {
        self.sweep.table()
    }
}

async fn served_model(
    client: &reqwest::Client,
    shape_url: &str,
    headers: &[(String, String)],
) -> Result<String, BenchError> {
    let url = format!("{}/v1/models", shape_url.trim_end_matches('/'));
    let err = |reason: String| BenchError::Server {
        url: url.clone(),
        reason,
    };
    let mut req = client.get(&url);
    for (k, v) in headers {
        req = req.header(k, v);
    }
    let resp = req.send().await.map_err(|e| err(e.to_string()))?;
    let status = resp.status();
    let body: Value = resp.json().await.map_err(|e| err(e.to_string()))?;
    if !status.is_success() {
        return Err(err(format!("{status}: {body}")));
    }
    body["data"][0]["id"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| err(format!("no model in {body}")))
}

fn bar(quiet: bool, len: usize, what: String) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(len as u64);
    pb.set_style(
        ProgressStyle::with_template("{msg:>24} [{bar:40}] {pos}/{len} {elapsed_precise}")
            .expect("a fixed template")
            .progress_chars("=> "),
    );
    pb.set_message(what);
    pb
}

/// Sends `prompts` through `lanes` closed-loop tasks; records in completion order.
async fn closed_loop(
    client: &reqwest::Client,
    shape: &RequestShape,
    prompts: Arc<Vec<(u64, Prompt)>>,
    lanes: usize,
    pb: &ProgressBar,
) -> Vec<(u64, Prompt, super::http::Outcome)> {
    let next = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(Mutex::new(Vec::with_capacity(prompts.len())));
    let mut tasks = Vec::new();
    for _ in 0..lanes.min(prompts.len()) {
        let (client, shape, prompts, next, done, pb) = (
            client.clone(),
            shape.clone(),
            prompts.clone(),
            next.clone(),
            done.clone(),
            pb.clone(),
        );
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some((k, p)) = prompts.get(i) else { break };
                let o = send(&client, &shape, p).await;
                done.lock()
                    .expect("no panics while held")
                    .push((*k, p.clone(), o));
                pb.inc(1);
            }
        }));
    }
    for t in tasks {
        t.await.ok();
    }
    let mut out = std::mem::take(&mut *done.lock().expect("tasks are done"));
    out.sort_by_key(|r| r.0);
    out
}

fn records(source: &PromptSource, done: Vec<(u64, Prompt, super::http::Outcome)>) -> Vec<Record> {
    done.into_iter()
        .map(|(k, p, o)| {
            let metrics = if o.error.is_none() {
                let out_tokens = o
                    .usage_completion_tokens
                    .or_else(|| source.count(&o.text).ok())
                    .unwrap_or(0);
                RequestMetrics::of(&o, p.input_tokens, out_tokens)
            } else {
                None
            };
            Record {
                session_num: k,
                outcome: o,
                input_tokens: p.input_tokens,
                metrics,
            }
        })
        .collect()
}

fn default_dir(model: &str, args: &ProfileArgs) -> PathBuf {
    let safe: String = model
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let endpoint = format!("{:?}", args.endpoint).to_lowercase();
    let time = chrono::Local::now().format("%Y%m%d-%H%M%S");
    PathBuf::from("artifacts").join(format!("{safe}-{endpoint}-{time}"))
}

/// Runs the sweep (or the trace replay) that `args` describe and writes its files.
pub async fn profile(args: &ProfileArgs) -> Result<Run, BenchError> {
    profile_with(args, &mut |_| {}).await
}

/// Where a run is: `Measuring(c)` just before a level's (or the replay's) measured requests
/// start, `Measured(c)` just after the last one ends; prompts are built outside that window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Measuring(Option<usize>),
    Measured(Option<usize>),
}

/// [`profile`], telling `on_phase` when measured requests start and end (what a caller needs
/// to charge a server's CPU to the requests alone).
pub async fn profile_with(
    args: &ProfileArgs,
    on_phase: &mut (dyn FnMut(Phase) + Send),
) -> Result<Run, BenchError> {
    args.check()?;
    let slo = match &args.slo {
        Some(s) => Slo::parse(s).map_err(|reason| BenchError::Flag {
            name: "slo",
            value: s.clone(),
            reason,
        })?,
        None => Slo::default(),
    };
    let headers = args.header_pairs()?;
    let client = reqwest::Client::builder()
        .tcp_nodelay(true)
        .pool_max_idle_per_host(usize::MAX)
        .build()
        .map_err(|e| BenchError::Runtime(e.to_string()))?;
    let model = match &args.model {
        Some(m) => m.clone(),
        None => served_model(&client, &args.url, &headers).await?,
    };
    let tokenizer_name = args.tokenizer.clone().unwrap_or_else(|| model.clone());
    let tokenizer = load_tokenizer(&tokenizer_name).map_err(|e| match &args.tokenizer {
        Some(_) => BenchError::Prompt(e),
        None => BenchError::Flag {
            name: "tokenizer",
            value: "(not given)".into(),
            reason: format!("the model name `{model}` is no tokenizer ({e}); pass --tokenizer"),
        },
    })?;
    let source = PromptSource::new(
        tokenizer,
        &tokenizer_name,
        Length::new("isl", args.isl, args.isl_stddev)?,
        Length::new("osl", args.osl, args.osl_stddev)?,
        args.shared_prefix_tokens,
        args.seed,
    )?;
    let shape = RequestShape {
        url: args.url.clone(),
        model: model.clone(),
        endpoint: args.endpoint,
        streaming: args.streaming,
        extra: args.extra()?,
        headers,
        timeout: args.timeout(),
    };
    let dir = args
        .output
        .clone()
        .unwrap_or_else(|| default_dir(&model, args));
    let label = args.label.clone().unwrap_or_else(|| {
        dir.file_name()
            .map_or("run".to_string(), |n| n.to_string_lossy().into_owned())
    });
    let config = |loadgen: Value| {
        json!({
            "endpoint": {"model_names": [model], "type": args.endpoint, "streaming": args.streaming,
                         "url": args.url},
            "input": {"random_seed": args.seed, "isl": args.isl, "isl_stddev": args.isl_stddev,
                      "osl": args.osl, "osl_stddev": args.osl_stddev,
                      "shared_prefix_tokens": args.shared_prefix_tokens,
                      "tokenizer": tokenizer_name, "trace": args.trace},
            "loadgen": loadgen,
            "slo": slo,
            "cli_command": std::env::args().collect::<Vec<_>>().join(" "),
        })
    };
    let write = |sub: &str, recs: &[Record], s: &Summary, cfg: &Value, t0, t1| {
        let d = dir.join(sub);
        write_run(&d, recs, s, cfg, t0, t1).map_err(|source| BenchError::Write { path: d, source })
    };
    let mut points = Vec::new();
    if let Some(trace_path) = &args.trace {
        let mut trace = crate::trace::load(trace_path)?;
        if let Some(n) = args.trace_requests {
            trace.truncate(n.max(1));
        }
        let prompts: Vec<(u64, Prompt)> = trace
            .iter()
            .enumerate()
            .map(|(k, r)| source.trace_prompt(r).map(|p| (k as u64, p)))
            .collect::<Result<_, _>>()?;
        let pb = bar(args.quiet, prompts.len(), "trace replay".into());
        let started = SystemTime::now();
        let lead = Duration::from_millis(10);
        let t0 = Instant::now() + lead;
        let t0_epoch_ns = (started + lead)
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let mut tasks = Vec::new();
        on_phase(Phase::Measuring(None));
        for ((k, p), r) in prompts.into_iter().zip(&trace) {
            let at = t0 + Duration::from_secs_f64(r.timestamp_ms as f64 / 1e3 / args.trace_speedup);
            let (client, shape, pb) = (client.clone(), shape.clone(), pb.clone());
            tasks.push(tokio::spawn(async move {
                tokio::time::sleep_until(at.into()).await;
                let o = send(&client, &shape, &p).await;
                pb.inc(1);
                (k, p, o)
            }));
        }
        let mut done = Vec::new();
        for t in tasks {
            done.push(t.await.map_err(|e| BenchError::Runtime(e.to_string()))?);
        }
        on_phase(Phase::Measured(None));
        pb.finish_and_clear();
        let recs = records(&source, done);
        let summary = Summary::of(&recs, args.gpus, &slo, None);
        let cfg = config(
            json!({"trace_speedup": args.trace_speedup, "request_count": recs.len(),
                                "schedule_start_ns": t0_epoch_ns}),
        );
        write("trace", &recs, &summary, &cfg, started, SystemTime::now())?;
        points.push(SweepPoint::of(&summary));
    } else {
        let mut k = 0u64;
        for &c in &args.concurrency {
            let warmup = args.warmup.unwrap_or(args.warmup_per_concurrency * c);
            let measured = args
                .request_count
                .unwrap_or(args.requests_per_concurrency * c);
            let mut take = |n: usize| -> Result<Arc<Vec<(u64, Prompt)>>, BenchError> {
                let v = (k..k + n as u64)
                    .map(|i| source.prompt(i).map(|p| (i, p)))
                    .collect::<Result<Vec<_>, _>>()?;
                k += n as u64;
                Ok(Arc::new(v))
            };
            let (warm, meas) = (take(warmup)?, take(measured)?);
            if !warm.is_empty() {
                let pb = bar(args.quiet, warm.len(), format!("c={c} warm-up"));
                closed_loop(&client, &shape, warm, c, &pb).await;
                pb.finish_and_clear();
            }
            let pb = bar(args.quiet, meas.len(), format!("c={c} profiling"));
            let started = SystemTime::now();
            on_phase(Phase::Measuring(Some(c)));
            let done = closed_loop(&client, &shape, meas, c, &pb).await;
            on_phase(Phase::Measured(Some(c)));
            pb.finish_and_clear();
            let recs = records(&source, done);
            let summary = Summary::of(&recs, args.gpus, &slo, Some(c));
            let cfg = config(json!({"concurrency": c, "request_count": measured,
                                    "warmup_request_count": warmup}));
            write(
                &format!("concurrency{c}"),
                &recs,
                &summary,
                &cfg,
                started,
                SystemTime::now(),
            )?;
            let point = SweepPoint::of(&summary);
            if !args.quiet {
                eprintln!(
                    "c={c}: {} ok, {} errors, TTFT {:.1} ms, ITL {:.2} ms, {:.1} output tok/s",
                    point.requests,
                    point.errors,
                    point.ttft_ms_mean,
                    point.itl_ms_mean,
                    point.output_token_throughput
                );
            }
            points.push(point);
        }
    }
    let sweep = SweepFile {
        label,
        gpus: args.gpus,
        points,
    };
    sweep.write(&dir)?;
    let md = dir.join("summary.md");
    std::fs::write(&md, sweep.table()).map_err(|source| BenchError::Write { path: md, source })?;
    Ok(Run { dir, sweep })
}
