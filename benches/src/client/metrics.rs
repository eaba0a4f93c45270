//! Per-request metrics and the run's summary, with aiperf's names, units and definitions:
//! TTFT is the first chunk with output text; ITL is (latency − TTFT) / (output tokens − 1),
//! so the first token is excluded; tok/s/user is 1 / ITL per request; throughputs divide by
//! the measured window (first request's start to last request's end). Goodput counts the
//! requests that met every SLO, per second of that window.

use std::collections::BTreeMap;
use std::time::Instant;

use serde::Serialize;

use super::http::{ErrorDetails, Outcome};

/// One metric's distribution over requests, in aiperf's summary shape.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Stats {
    pub unit: &'static str,
    pub avg: f64,
    pub min: f64,
    pub max: f64,
    pub p1: f64,
    pub p5: f64,
    pub p10: f64,
    pub p25: f64,
    pub p50: f64,
    pub p75: f64,
    pub p90: f64,
    pub p95: f64,
    pub p99: f64,
    pub std: f64,
}

/// Linear interpolation between closest ranks (numpy's default, which aiperf uses).
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let pos = q / 100.0 * (sorted.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

impl Stats {
    pub fn of(unit: &'static str, values: &[f64]) -> Option<Stats> {
        if values.is_empty() {
            return None;
        }
        let mut v = values.to_vec();
        v.sort_by(f64::total_cmp);
        let n = v.len() as f64;
        let avg = v.iter().sum::<f64>() / n;
        let var = v.iter().map(|x| (x - avg).powi(2)).sum::<f64>() / n;
        let p = |q| percentile(&v, q);
        Some(Stats {
            unit,
            avg,
            min: v[0],
            max: v[v.len() - 1],
            p1: p(1.0),
            p5: p(5.0),
            p10: p(10.0),
            p25: p(25.0),
            p50: p(50.0),
            p75: p(75.0),
            p90: p(90.0),
            p95: p(95.0),
            p99: p(99.0),
            std: var.sqrt(),
        })
    }
}

/// Service-level objectives a good request meets (aiperf's `--goodput`).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Slo {
    pub ttft_ms: Option<f64>,
    pub itl_ms: Option<f64>,
    pub e2e_ms: Option<f64>,
}

impl Slo {
    /// `ttft_ms:200,itl_ms:50,e2e_ms:10000`.
    pub fn parse(s: &str) -> Result<Slo, String> {
        let mut slo = Slo::default();
        for part in s.split(',').filter(|p| !p.trim().is_empty()) {
            let (k, v) = part
                .split_once(':')
                .ok_or_else(|| format!("`{part}` is not name:value"))?;
            let v: f64 = v
                .trim()
                .parse()
                .ok()
                .filter(|v: &f64| v.is_finite() && *v > 0.0)
                .ok_or_else(|| format!("`{part}`: the limit is a positive number of ms"))?;
            match k.trim() {
                "ttft_ms" => slo.ttft_ms = Some(v),
                "itl_ms" => slo.itl_ms = Some(v),
                "e2e_ms" => slo.e2e_ms = Some(v),
                other => {
                    return Err(format!(
                        "unknown SLO `{other}` (known: ttft_ms, itl_ms, e2e_ms)"
                    ))
                }
            }
        }
        Ok(slo)
    }

    pub fn is_set(&self) -> bool {
        self.ttft_ms.is_some() || self.itl_ms.is_some() || self.e2e_ms.is_some()
    }

    fn met(&self, r: &RequestMetrics) -> bool {
        let within =
            |limit: Option<f64>, v: Option<f64>| limit.is_none_or(|l| v.is_some_and(|v| v <= l));
        within(self.ttft_ms, Some(r.ttft_ms))
            && within(self.itl_ms, r.itl_ms.or(Some(0.0)))
            && within(self.e2e_ms, Some(r.latency_ms))
    }
}

/// What one successful request measured.
#[derive(Clone, Debug, PartialEq)]
pub struct RequestMetrics {
    pub input_tokens: usize,
    pub output_tokens: usize,
    pub ttft_ms: f64,
    pub latency_ms: f64,
    /// `None` for a one-token output.
    pub itl_ms: Option<f64>,
    pub inter_chunk_ms: Vec<f64>,
}

fn ms(a: Instant, b: Instant) -> f64 {
    b.saturating_duration_since(a).as_secs_f64() * 1e3
}

impl RequestMetrics {
    /// `output_tokens`: the server's count, or the caller's count of the text.
    pub fn of(o: &Outcome, input_tokens: usize, output_tokens: usize) -> Option<Self> {
        let first = *o.chunks.first()?;
        let last = *o.chunks.last()?;
        let ttft_ms = ms(o.start, first);
        let latency_ms = ms(o.start, o.end.max(last));
        Some(RequestMetrics {
            input_tokens,
            output_tokens,
            ttft_ms,
            latency_ms,
            itl_ms: (output_tokens > 1)
                .then(|| (latency_ms - ttft_ms) / (output_tokens - 1) as f64),
            inter_chunk_ms: o.chunks.windows(2).map(|w| ms(w[0], w[1])).collect(),
        })
    }
}

/// One finished request: its metrics, or its error.
#[derive(Clone, Debug)]
pub struct Record {
    pub session_num: u64,
    pub outcome: Outcome,
    pub input_tokens: usize,
    pub metrics: Option<RequestMetrics>,
}

/// The run's summary (`profile_export_aiperf.json`'s metric part, plus Baton's per-GPU view).
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    pub concurrency: Option<usize>,
    pub metrics: BTreeMap<&'static str, Stats>,
    pub benchmark_duration_s: f64,
    pub request_count: usize,
    pub error_request_count: usize,
    pub good_request_count: Option<usize>,
    pub total_isl: usize,
    pub total_osl: usize,
    pub request_throughput: f64,
    pub output_token_throughput: f64,
    pub output_token_throughput_per_gpu: f64,
    pub goodput: Option<f64>,
    pub error_summary: Vec<(ErrorDetails, usize)>,
}

impl Summary {
    pub fn of(records: &[Record], gpus: usize, slo: &Slo, concurrency: Option<usize>) -> Self {
        let ok: Vec<&RequestMetrics> = records.iter().filter_map(|r| r.metrics.as_ref()).collect();
        let start = records.iter().map(|r| r.outcome.start).min();
        let end = records.iter().map(|r| r.outcome.end).max();
        let duration_s = match (start, end) {
            (Some(s), Some(e)) => e.saturating_duration_since(s).as_secs_f64(),
            _ => 0.0,
        }
        .max(1e-9);
        let col = |f: &dyn Fn(&RequestMetrics) -> Option<f64>| -> Vec<f64> {
            ok.iter().filter_map(|m| f(m)).collect()
        };
        let mut metrics = BTreeMap::new();
        let mut put = |name, unit, values: Vec<f64>| {
            if let Some(s) = Stats::of(unit, &values) {
                metrics.insert(name, s);
            }
        };
        put("time_to_first_token", "ms", col(&|m| Some(m.ttft_ms)));
        put("inter_token_latency", "ms", col(&|m| m.itl_ms));
        put("request_latency", "ms", col(&|m| Some(m.latency_ms)));
        put(
            "output_token_throughput_per_user",
            "tokens/sec/user",
            col(&|m| m.itl_ms.filter(|i| *i > 0.0).map(|i| 1e3 / i)),
        );
        put(
            "input_sequence_length",
            "tokens",
            col(&|m| Some(m.input_tokens as f64)),
        );
        put(
            "output_sequence_length",
            "tokens",
            col(&|m| Some(m.output_tokens as f64)),
        );
        let total_osl: usize = ok.iter().map(|m| m.output_tokens).sum();
        let mut errors: Vec<(ErrorDetails, usize)> = Vec::new();
        for e in records.iter().filter_map(|r| r.outcome.error.as_ref()) {
            match errors.iter_mut().find(|(d, _)| d == e) {
                Some((_, n)) => *n += 1,
                None => errors.push((e.clone(), 1)),
            }
        }
        let good = slo
            .is_set()
            .then(|| ok.iter().filter(|m| slo.met(m)).count());
        let output_tps = total_osl as f64 / duration_s;
        Summary {
            concurrency,
            metrics,
            benchmark_duration_s: duration_s,
            request_count: ok.len(),
            error_request_count: records.len() - ok.len(),
            good_request_count: good,
            total_isl: ok.iter().map(|m| m.input_tokens).sum(),
            total_osl,
            request_throughput: ok.len() as f64 / duration_s,
            output_token_throughput: output_tps,
            output_token_throughput_per_gpu: output_tps / gpus.max(1) as f64,
            goodput: good.map(|g| g as f64 / duration_s),
            error_summary: errors,
        }
    }

    pub fn mean(&self, metric: &str) -> f64 {
        self.metrics.get(metric).map_or(f64::NAN, |s| s.avg)
    }

    /// The seed's x axis: 1 / mean ITL, in tokens per second.
    pub fn tok_s_user(&self) -> f64 {
        let itl = self.mean("inter_token_latency");
        if itl > 0.0 {
            1e3 / itl
        } else {
            f64::NAN
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn outcome(start: Instant, chunk_ms: &[u64]) -> Outcome {
        let at = |ms| start + Duration::from_millis(ms);
        Outcome {
            start_epoch_ns: 0,
            start,
            ack: Some(start),
            chunks: chunk_ms.iter().map(|&m| at(m)).collect(),
            end: at(*chunk_ms.last().unwrap_or(&0)),
            text: String::new(),
            usage_prompt_tokens: None,
            usage_completion_tokens: None,
            usage_cached_tokens: None,
            error: None,
        }
    }

    #[test]
    fn itl_excludes_the_first_token_and_throughput_uses_the_window() {
        let t0 = Instant::now();
        // TTFT 100 ms, then 4 more tokens 10 ms apart.
        let o = outcome(t0, &[100, 110, 120, 130, 140]);
        let m = RequestMetrics::of(&o, 50, 5).unwrap();
        assert!((m.ttft_ms - 100.0).abs() < 1e-6 && (m.itl_ms.unwrap() - 10.0).abs() < 1e-6);
        let o2 = outcome(t0 + Duration::from_millis(60), &[40, 240]);
        let m2 = RequestMetrics::of(&o2, 50, 2).unwrap();
        let records = vec![
            Record {
                session_num: 0,
                outcome: o,
                input_tokens: 50,
                metrics: Some(m),
            },
            Record {
                session_num: 1,
                outcome: o2,
                input_tokens: 50,
                metrics: Some(m2),
            },
        ];
        let slo = Slo::parse("ttft_ms:50,itl_ms:50").unwrap();
        let s = Summary::of(&records, 2, &slo, Some(2));
        // Window 0..300 ms, 7 output tokens.
        assert!((s.benchmark_duration_s - 0.3).abs() < 1e-6);
        assert!((s.output_token_throughput - 7.0 / 0.3).abs() < 1e-6);
        assert!((s.output_token_throughput_per_gpu - 3.5 / 0.3).abs() < 1e-6);
        assert!((s.mean("inter_token_latency") - 105.0).abs() < 1e-6);
        // Only the second meets TTFT ≤ 50 ms, and its ITL of 200 ms misses the ITL SLO.
        assert_eq!(s.good_request_count, Some(0));
        assert_eq!(
            Slo::parse("ttft_ms:50").map(|s| s.met(&records[1].metrics.clone().unwrap())),
            Ok(true)
        );
    }

    #[test]
    fn percentiles_interpolate_like_numpy_and_slos_name_bad_parts() {
        let v = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(percentile(&v, 50.0), 2.5);
        assert!((percentile(&v, 90.0) - 3.7).abs() < 1e-9);
        assert!(Slo::parse("ttft:5").unwrap_err().contains("ttft"));
        assert!(Slo::parse("ttft_ms:-1").unwrap_err().contains("ttft_ms:-1"));
    }
}
