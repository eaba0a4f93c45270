//! `baton bench`: the load generator users point at any OpenAI-compatible URL (Baton, vLLM,
//! nginx in front of either, Dynamo), with aiperf's and genai-perf's flags and output shapes.
//! It sits outside the request flow: it plays the client, sweeps concurrency (a closed loop:
//! C requests in flight, warm-up first) or replays a Mooncake trace at its timestamps (an
//! open loop), and writes per concurrency `profile_export.jsonl`,
//! `profile_export_aiperf.json` and `profile_export_aiperf.csv`, plus `sweep.json` for
//! `baton bench plot`, which draws the Pareto view (tok/s/GPU against tok/s/user).

pub mod export;
pub mod http;
pub mod metrics;
pub mod prompts;
mod runner;
mod simulate;
pub mod sweep;

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};
use serde_json::{Map, Value};

pub use http::Endpoint;
pub use runner::{profile, profile_with, Phase, Run};

/// [`profile`] on a runtime of its own, for callers without one.
pub fn profile_blocking(args: &ProfileArgs) -> Result<Run, BenchError> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| BenchError::Runtime(e.to_string()))?
        .block_on(profile(args))
}
pub use sweep::{SweepFile, SweepPoint};

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(transparent)]
    Prompt(#[from] prompts::PromptError),
    #[error(transparent)]
    Trace(#[from] crate::trace::TraceError),
    #[error(transparent)]
    Plot(#[from] crate::plot::PlotError),
    #[error("--{name} {value}: {reason}")]
    Flag {
        name: &'static str,
        value: String,
        reason: String,
    },
    #[error("cannot reach {url}: {reason}")]
    Server { url: String, reason: String },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read the run {path}: {reason}")]
    ReadRun { path: PathBuf, reason: String },
    #[error("{0}")]
    Runtime(String),
}

#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub command: Option<BenchCommand>,
    #[command(flatten)]
    pub profile: ProfileArgs,
}

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Draw runs' sweeps as a Pareto chart (tok/s/GPU against tok/s/user), PNG and SVG.
    Plot(PlotArgs),
}

#[derive(Args, Debug)]
pub struct PlotArgs {
    /// Run folders (holding sweep.json) or sweep.json files; `label=path` names a curve.
    #[arg(required = true)]
    pub runs: Vec<String>,
    /// Output path without extension: writes STEM.png and STEM.svg.
    #[arg(long, default_value = "pareto")]
    pub output: PathBuf,
    #[arg(long, default_value = "tok/s/GPU against tok/s/user")]
    pub title: String,
}

/// The flags of a profile run, named as aiperf / genai-perf name them where they exist.
#[derive(Args, Debug, Clone)]
pub struct ProfileArgs {
    /// Server base URL.
    #[arg(long, env = "BATON_BENCH_URL", default_value = "http://127.0.0.1:8000")]
    pub url: String,
    /// Model name to send [default: the first of the server's /v1/models].
    #[arg(long, short = 'm')]
    pub model: Option<String>,
    /// Tokenizer for prompt lengths: a tokenizer.json, a Hugging Face folder, a GGUF, or
    /// `smollm2` [default: the model, else smollm2].
    #[arg(long)]
    pub tokenizer: Option<String>,
    #[arg(long, value_enum, default_value = "chat")]
    pub endpoint: Endpoint,
    /// Input tokens per request (text tokens, as aiperf counts them; the chat template adds
    /// its own).
    #[arg(long, default_value_t = 550)]
    pub isl: usize,
    #[arg(long, default_value_t = 0.0)]
    pub isl_stddev: f64,
    /// Output tokens per request, made exact with `max_tokens`, `min_tokens`, `ignore_eos`.
    #[arg(long, default_value_t = 150)]
    pub osl: usize,
    #[arg(long, default_value_t = 0.0)]
    pub osl_stddev: f64,
    /// Concurrency levels of the sweep, each a closed loop with this many requests in flight.
    #[arg(long, value_delimiter = ',', default_value = "1")]
    pub concurrency: Vec<usize>,
    /// Measured requests per level [default: --requests-per-concurrency × the level].
    #[arg(long)]
    pub request_count: Option<usize>,
    #[arg(long, default_value_t = 10)]
    pub requests_per_concurrency: usize,
    /// Warm-up requests per level, not measured [default: --warmup-per-concurrency × level].
    #[arg(long = "warmup")]
    pub warmup: Option<usize>,
    #[arg(long, default_value_t = 2)]
    pub warmup_per_concurrency: usize,
    #[arg(long, default_value_t = 100)]
    pub seed: u64,
    /// Stream responses (needed for TTFT and ITL); `--streaming false` sends whole ones.
    #[arg(long, default_value_t = true, num_args = 0..=1, default_missing_value = "true",
          action = clap::ArgAction::Set)]
    pub streaming: bool,
    /// Extra body fields, `key:value` (the value is JSON if it parses as JSON), repeatable.
    #[arg(long = "extra-inputs")]
    pub extra_inputs: Vec<String>,
    /// Extra HTTP headers, `Name: value`, repeatable.
    #[arg(long = "header", short = 'H')]
    pub headers: Vec<String>,
    /// Service-level objectives for goodput: `ttft_ms:…,itl_ms:…,e2e_ms:…`.
    #[arg(long)]
    pub slo: Option<String>,
    /// GPUs the server uses, for tok/s/GPU.
    #[arg(long, default_value_t = 1)]
    pub gpus: usize,
    /// All requests start with the same this many tokens (the rest of each is its own).
    #[arg(long, default_value_t = 0)]
    pub shared_prefix_tokens: usize,
    /// Replay a Mooncake trace (JSONL) at its timestamps instead of the concurrency sweep.
    #[arg(long)]
    pub trace: Option<PathBuf>,
    /// Replay the trace this many times faster than recorded.
    #[arg(long, default_value_t = 1.0)]
    pub trace_speedup: f64,
    /// Replay only the first N requests of the trace.
    #[arg(long)]
    pub trace_requests: Option<usize>,
    /// Replay the trace against an embedded graph of simulated workers (the mock engine on
    /// virtual clocks: the seed's 70B FP8, one H200 each) instead of `--url`.
    #[arg(long, requires = "trace")]
    pub simulate: bool,
    #[arg(long, default_value_t = 8)]
    pub simulate_workers: usize,
    /// Routing policy of the simulated graph.
    #[arg(long, default_value = "kv")]
    pub router: String,
    /// A request that has not finished after this long fails.
    #[arg(long, default_value_t = 600.0)]
    pub request_timeout_s: f64,
    /// Output folder [default: artifacts/<model>-<endpoint>-<time>].
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// The run's name in tables and plots [default: the output folder's name].
    #[arg(long)]
    pub label: Option<String>,
    /// No progress bars (they draw only on a terminal anyway).
    #[arg(long)]
    pub quiet: bool,
}

/// `ProfileArgs` as a parser of its own, for reports that drive the client in process.
#[derive(clap::Parser)]
struct Flags {
    #[command(flatten)]
    profile: ProfileArgs,
}

impl ProfileArgs {
    /// The args that `baton bench FLAGS…` would get, e.g. `["--isl", "128", "--quiet"]`.
    pub fn from_flags<S: AsRef<str>>(flags: &[S]) -> Result<ProfileArgs, BenchError> {
        use clap::Parser;
        let argv = std::iter::once("baton-bench").chain(flags.iter().map(AsRef::as_ref));
        Flags::try_parse_from(argv)
            .map(|f| f.profile)
            .map_err(|e| BenchError::Flag {
                name: "bench",
                value: flags
                    .iter()
                    .map(AsRef::as_ref)
                    .collect::<Vec<_>>()
                    .join(" "),
                reason: e.to_string(),
            })
    }

    pub fn check(&self) -> Result<(), BenchError> {
        let flag = |name, value: String, reason: &str| {
            Err(BenchError::Flag {
                name,
                value,
                reason: reason.to_string(),
            })
        };
        if self.concurrency.contains(&0) {
            return flag(
                "concurrency",
                format!("{:?}", self.concurrency),
                "every level is ≥ 1",
            );
        }
        if self.request_count == Some(0) || self.requests_per_concurrency == 0 {
            return flag("request-count", "0".into(), "measure at least one request");
        }
        if self.gpus == 0 {
            return flag(
                "gpus",
                "0".into(),
                "a server uses at least one GPU (or CPU) slot",
            );
        }
        if !(self.trace_speedup.is_finite() && self.trace_speedup > 0.0) {
            return flag(
                "trace-speedup",
                self.trace_speedup.to_string(),
                "a positive factor",
            );
        }
        if !(self.request_timeout_s.is_finite() && self.request_timeout_s > 0.0) {
            return flag(
                "request-timeout-s",
                self.request_timeout_s.to_string(),
                "a positive number of seconds",
            );
        }
        Ok(())
    }

    pub fn timeout(&self) -> Duration {
        Duration::from_secs_f64(self.request_timeout_s)
    }

    /// `--extra-inputs` as body fields.
    pub fn extra(&self) -> Result<Map<String, Value>, BenchError> {
        let mut out = Map::new();
        for kv in &self.extra_inputs {
            let (k, v) = kv.split_once(':').ok_or_else(|| BenchError::Flag {
                name: "extra-inputs",
                value: kv.clone(),
                reason: "expected key:value".into(),
            })?;
            let v = serde_json::from_str(v).unwrap_or_else(|_| Value::String(v.to_string()));
            out.insert(k.trim().to_string(), v);
        }
        Ok(out)
    }

    pub fn header_pairs(&self) -> Result<Vec<(String, String)>, BenchError> {
        self.headers
            .iter()
            .map(|h| {
                h.split_once(':')
                    .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                    .filter(|(k, _)| !k.is_empty())
                    .ok_or_else(|| BenchError::Flag {
                        name: "header",
                        value: h.clone(),
                        reason: "expected `Name: value`".into(),
                    })
            })
            .collect()
    }
}

/// `baton bench …`: a profile run, or `plot`.
pub fn main(args: BenchArgs) -> Result<(), BenchError> {
    match args.command {
        Some(BenchCommand::Plot(p)) => {
            let files = sweep::plot(&p.runs, &p.output, &p.title)?;
            for f in files {
                println!("{}", f.display());
            }
            Ok(())
        }
        None => {
            let run = if args.profile.simulate {
                args.profile.check()?;
                simulate::simulate(&args.profile)?
            } else {
                profile_blocking(&args.profile)?
            };
            print!("{}", run.table());
            println!("results: {}", run.dir.display());
            Ok(())
        }
    }
}
