//! `sweep.json`: one line of figures per concurrency level (or one for a trace replay), what
//! tables and `baton bench plot` read. Simulated studies write the same file, so a
//! simulated curve and a measured one plot together.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::metrics::Summary;
use super::BenchError;
use crate::plot::{pareto, Curve};

/// JSON has no NaN: serde_json writes it as `null`, read back here as NaN (a figure the run
/// could not measure, e.g. a p99 of a simulation that keeps p90 only).
fn f64_or_nan<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// A figure for a table: `–` for one not measured.
fn fig(v: f64, decimals: usize) -> String {
    if v.is_finite() {
        format!("{v:.decimals$}")
    } else {
        "–".into()
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SweepPoint {
    /// `None` for an open-loop replay.
    pub concurrency: Option<usize>,
    pub requests: usize,
    pub errors: usize,
    #[serde(deserialize_with = "f64_or_nan")]
    pub ttft_ms_mean: f64,
    #[serde(deserialize_with = "f64_or_nan")]
    pub ttft_ms_p50: f64,
    #[serde(deserialize_with = "f64_or_nan")]
    pub ttft_ms_p90: f64,
    #[serde(deserialize_with = "f64_or_nan")]
    pub ttft_ms_p99: f64,
    #[serde(deserialize_with = "f64_or_nan")]
    pub itl_ms_mean: f64,
    #[serde(deserialize_with = "f64_or_nan")]
    pub itl_ms_p50: f64,
    #[serde(deserialize_with = "f64_or_nan")]
    pub itl_ms_p99: f64,
    #[serde(deserialize_with = "f64_or_nan")]
    pub e2e_ms_mean: f64,
    #[serde(deserialize_with = "f64_or_nan")]
    pub e2e_ms_p50: f64,
    #[serde(deserialize_with = "f64_or_nan")]
    pub e2e_ms_p90: f64,
    #[serde(deserialize_with = "f64_or_nan")]
    pub e2e_ms_p99: f64,
    #[serde(deserialize_with = "f64_or_nan")]
    pub request_throughput: f64,
    #[serde(deserialize_with = "f64_or_nan")]
    pub output_token_throughput: f64,
    #[serde(deserialize_with = "f64_or_nan")]
    pub tok_s_gpu: f64,
    /// 1 / mean ITL.
    #[serde(deserialize_with = "f64_or_nan")]
    pub tok_s_user: f64,
    pub goodput: Option<f64>,
}

impl SweepPoint {
    pub fn of(s: &Summary) -> Self {
        let get =
            |m: &str, f: fn(&super::metrics::Stats) -> f64| s.metrics.get(m).map_or(f64::NAN, f);
        SweepPoint {
            concurrency: s.concurrency,
            requests: s.request_count,
            errors: s.error_request_count,
            ttft_ms_mean: get("time_to_first_token", |x| x.avg),
            ttft_ms_p50: get("time_to_first_token", |x| x.p50),
            ttft_ms_p90: get("time_to_first_token", |x| x.p90),
            ttft_ms_p99: get("time_to_first_token", |x| x.p99),
            itl_ms_mean: get("inter_token_latency", |x| x.avg),
            itl_ms_p50: get("inter_token_latency", |x| x.p50),
            itl_ms_p99: get("inter_token_latency", |x| x.p99),
            e2e_ms_mean: get("request_latency", |x| x.avg),
            e2e_ms_p50: get("request_latency", |x| x.p50),
            e2e_ms_p90: get("request_latency", |x| x.p90),
            e2e_ms_p99: get("request_latency", |x| x.p99),
            request_throughput: s.request_throughput,
            output_token_throughput: s.output_token_throughput,
            tok_s_gpu: s.output_token_throughput_per_gpu,
            tok_s_user: s.tok_s_user(),
            goodput: s.goodput,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SweepFile {
    pub label: String,
    pub gpus: usize,
    pub points: Vec<SweepPoint>,
}

impl SweepFile {
    pub fn write(&self, dir: &Path) -> Result<PathBuf, BenchError> {
        let path = dir.join("sweep.json");
        std::fs::create_dir_all(dir)
            .and_then(|_| {
                std::fs::write(
                    &path,
                    serde_json::to_string_pretty(self).expect("plain numbers"),
                )
            })
            .map_err(|source| BenchError::Write {
                path: path.clone(),
                source,
            })?;
        Ok(path)
    }

    /// A run folder (its `sweep.json`) or the file itself.
    pub fn read(path: &Path) -> Result<Self, BenchError> {
        let file = if path.is_dir() {
            path.join("sweep.json")
        } else {
            path.to_path_buf()
        };
        let text = std::fs::read_to_string(&file).map_err(|e| BenchError::ReadRun {
            path: file.clone(),
            reason: e.to_string(),
        })?;
        serde_json::from_str(&text).map_err(|e| BenchError::ReadRun {
            path: file,
            reason: e.to_string(),
        })
    }

    /// The run as a markdown table.
    pub fn table(&self) -> String {
        let mut out = format!(
            "{} ({} GPU{})\n\n| concurrency | requests | errors | TTFT mean / p50 / p99 ms | \
             ITL mean / p99 ms | E2E mean / p99 ms | req/s | output tok/s | tok/s/GPU | \
             tok/s/user | goodput req/s |\n|---|---|---|---|---|---|---|---|---|---|---|\n",
            self.label,
            self.gpus,
            if self.gpus == 1 { "" } else { "s" }
        );
        for p in &self.points {
            out.push_str(&format!(
                "| {} | {} | {} | {} / {} / {} | {} / {} | {} / {} | {} | {} | {} | {} | {} |\n",
                p.concurrency.map_or("trace".to_string(), |c| c.to_string()),
                p.requests,
                p.errors,
                fig(p.ttft_ms_mean, 1),
                fig(p.ttft_ms_p50, 1),
                fig(p.ttft_ms_p99, 1),
                fig(p.itl_ms_mean, 2),
                fig(p.itl_ms_p99, 2),
                fig(p.e2e_ms_mean, 0),
                fig(p.e2e_ms_p99, 0),
                fig(p.request_throughput, 2),
                fig(p.output_token_throughput, 1),
                fig(p.tok_s_gpu, 1),
                fig(p.tok_s_user, 1),
                p.goodput.map_or("–".to_string(), |g| format!("{g:.2}")),
            ));
        }
        out
    }

    pub fn curve(&self) -> Curve {
        Curve::line(
            self.label.clone(),
            self.points
                .iter()
                .map(|p| (p.tok_s_user, p.tok_s_gpu))
                .collect(),
        )
    }
}

/// `baton bench plot RUN…`.
pub fn plot(runs: &[String], stem: &Path, title: &str) -> Result<Vec<PathBuf>, BenchError> {
    let mut curves = Vec::new();
    for run in runs {
        let (label, path) = match run.split_once('=') {
            Some((l, p)) if !Path::new(run).exists() => (Some(l.to_string()), p),
            _ => (None, run.as_str()),
        };
        let mut sweep = SweepFile::read(Path::new(path))?;
        if let Some(l) = label {
            sweep.label = l;
        }
        curves.push(sweep.curve());
    }
    Ok(pareto(stem, title, &curves)?)
}
