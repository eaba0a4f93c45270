//! The frontend's Prometheus metrics (`GET /metrics`): requests by model, endpoint and status,
//! in-flight requests, the admission queue (its length, and how long requests waited in it),
//! latencies (time to first token, inter-token latency, end to end), token
//! counts, and the engine's load as the workers report it (KV blocks, sequences, prefix-cache
//! hit rate). Every name starts with `baton_`; the exposition is OpenMetrics text.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use runtime::protocol::WorkerLoad;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    model: String,
    endpoint: String,
    status: u16,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelLabels {
    model: String,
}

impl ModelLabels {
    fn new(model: &str) -> Self {
        Self {
            model: model.to_owned(),
        }
    }
}

type HistogramFamily = Family<ModelLabels, Histogram, fn() -> Histogram>;

/// 1 ms .. ~33 s, ×2 per bucket: time to first token and request duration.
fn request_latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

/// 0.5 ms .. ~2 s, ×2 per bucket: time between tokens.
fn token_latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 13))
}

/// 1 ms .. ~65 s, ×2 per bucket: time in the admission queue, up to past the default
/// `--queue-timeout` of 60 s.
fn admission_wait_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

/// All of the frontend's metrics and the registry they are exposed from. `Send + Sync`: share
/// one behind an `Arc`.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    inflight: Gauge,
    admission_queued: Gauge,
    admission_wait: Histogram,
    ttft: HistogramFamily,
    itl: HistogramFamily,
    e2e: HistogramFamily,
    input_tokens: Family<ModelLabels, Counter>,
    output_tokens: Family<ModelLabels, Counter>,
    kv_blocks_used: Gauge,
    kv_blocks_total: Gauge,
    running_sequences: Gauge,
    waiting_sequences: Gauge,
    prefix_cache_hit_rate: Gauge<f64, AtomicU64>,
    workers: Gauge,
    prefill: crate::prefill_metrics::PrefillMetrics,
}

/// Holds one in-flight request: the gauge went up when it was made and goes down on drop.
#[derive(Debug)]
#[must_use = "the request counts as in flight only while the guard lives"]
pub struct InflightGuard {
    gauge: Gauge,
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new(|_| {})
    }
}

impl Metrics {
    /// The frontend's metrics plus whatever `extra` registers (the router's).
    pub fn new(extra: impl FnOnce(&mut Registry)) -> Self {
        let mut m = Self {
            requests: Family::default(),
            inflight: Gauge::default(),
            admission_queued: Gauge::default(),
            admission_wait: admission_wait_histogram(),
            ttft: Family::new_with_constructor(request_latency_histogram as fn() -> Histogram),
            itl: Family::new_with_constructor(token_latency_histogram as fn() -> Histogram),
            e2e: Family::new_with_constructor(request_latency_histogram as fn() -> Histogram),
            input_tokens: Family::default(),
            output_tokens: Family::default(),
            kv_blocks_used: Gauge::default(),
            kv_blocks_total: Gauge::default(),
            running_sequences: Gauge::default(),
            waiting_sequences: Gauge::default(),
            prefix_cache_hit_rate: Gauge::default(),
            workers: Gauge::default(),
            prefill: Default::default(),
            registry: Registry::default(),
        };
        let registry = &mut m.registry;
        // Counters are registered without `_total`: the encoder appends it.
        registry.register(
            "baton_requests",
            "Requests finished, by model, endpoint and HTTP status",
            m.requests.clone(),
        );
        registry.register(
            "baton_inflight_requests",
            "Requests being served now",
            m.inflight.clone(),
        );
        registry.register(
            "baton_admission_queued",
            "Requests waiting in the admission queue for a slot of --max-inflight",
            m.admission_queued.clone(),
        );
        registry.register(
            "baton_admission_wait_seconds",
            "Time a request waited for a slot: 0 for one admitted at once, the queue timeout for one refused after it",
            m.admission_wait.clone(),
        );
        registry.register(
            "baton_time_to_first_token_seconds",
            "Time from a request's arrival to its first generated token",
            m.ttft.clone(),
        );
        registry.register(
            "baton_inter_token_latency_seconds",
            "Time between consecutive generated tokens of a request",
            m.itl.clone(),
        );
        registry.register(
            "baton_request_duration_seconds",
            "Time from a request's arrival to its last byte",
            m.e2e.clone(),
        );
        registry.register(
            "baton_input_tokens",
            "Prompt tokens of finished requests",
            m.input_tokens.clone(),
        );
        registry.register(
            "baton_output_tokens",
            "Generated tokens of finished requests",
            m.output_tokens.clone(),
        );
        registry.register(
            "baton_kv_blocks_used",
            "KV cache blocks in use, summed over workers",
            m.kv_blocks_used.clone(),
        );
        registry.register(
            "baton_kv_blocks_total",
            "KV cache blocks, summed over workers",
            m.kv_blocks_total.clone(),
        );
        registry.register(
            "baton_running_sequences",
            "Sequences being generated, summed over workers",
            m.running_sequences.clone(),
        );
        registry.register(
            "baton_waiting_sequences",
            "Sequences waiting to be scheduled, summed over workers",
            m.waiting_sequences.clone(),
        );
        registry.register(
            "baton_prefix_cache_hit_rate",
            "Prompt tokens found in the prefix cache over prompt tokens looked up, over all workers since their start",
            m.prefix_cache_hit_rate.clone(),
        );
        registry.register(
            "baton_workers",
            "Workers reporting their load",
            m.workers.clone(),
        );
        m.prefill.register(registry);
        extra(registry);
        m
    }

    /// Counts a request as in flight until the returned guard drops.
    pub fn inflight(&self) -> InflightGuard {
        self.inflight.inc();
        InflightGuard {
            gauge: self.inflight.clone(),
        }
    }

    /// Sets the admission queue's length (read when `/metrics` is asked).
    pub fn set_admission_queued(&self, queued: usize) {
        self.admission_queued
            .set(i64::try_from(queued).unwrap_or(i64::MAX));
    }

    /// A request's wait for a slot: admitted after it, or refused at the queue timeout.
    pub fn observe_admission_wait(&self, waited: std::time::Duration) {
        self.admission_wait.observe(waited.as_secs_f64());
    }

    /// `endpoint`: a short name such as `chat` or `completions`.
    pub fn request_done(&self, model: &str, endpoint: &str, status: u16) {
        self.requests
            .get_or_create(&RequestLabels {
                model: model.to_owned(),
                endpoint: endpoint.to_owned(),
                status,
            })
            .inc();
    }

    pub fn observe_ttft(&self, model: &str, seconds: f64) {
        self.ttft
            .get_or_create(&ModelLabels::new(model))
            .observe(seconds);
    }

    pub fn observe_itl(&self, model: &str, seconds: f64) {
        self.itl
            .get_or_create(&ModelLabels::new(model))
            .observe(seconds);
    }

    pub fn observe_e2e(&self, model: &str, seconds: f64) {
        self.e2e
            .get_or_create(&ModelLabels::new(model))
            .observe(seconds);
    }

    pub fn add_tokens(&self, model: &str, input: u64, output: u64) {
        let labels = ModelLabels::new(model);
        self.input_tokens.get_or_create(&labels).inc_by(input);
        self.output_tokens.get_or_create(&labels).inc_by(output);
    }

    /// Sets the engine gauges from the workers' latest loads (one entry per worker).
    pub fn set_engine(&self, loads: &[WorkerLoad]) {
        let sum = |f: fn(&WorkerLoad) -> u64| loads.iter().map(f).sum::<u64>();
        let gauge = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        self.kv_blocks_used
            .set(gauge(sum(|l| l.kv_blocks_used as u64)));
        self.kv_blocks_total
            .set(gauge(sum(|l| l.kv_blocks_total as u64)));
        self.running_sequences.set(gauge(sum(|l| l.running as u64)));
        self.waiting_sequences.set(gauge(sum(|l| l.waiting as u64)));
        let hits = sum(|l| l.prefix_hit_tokens);
        let queries = sum(|l| l.prefix_query_tokens);
        let rate = if queries == 0 {
            0.0
        } else {
            hits as f64 / queries as f64
        };
        self.prefix_cache_hit_rate.set(rate);
        self.workers.set(gauge(loads.len() as u64));
        self.prefill.set(loads);
    }

    /// The OpenMetrics text exposition of every metric, ending in `# EOF`.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("encoding metrics into a String");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_line(text: &str, line: &str) {
        assert!(
            text.lines().any(|l| l == line),
            "missing line {line:?} in:\n{text}"
        );
    }

    #[test]
    fn metrics_are_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Metrics>();
        check::<InflightGuard>();
    }

    #[test]
    fn requests_and_tokens_are_counted() {
        let m = Metrics::default();
        m.request_done("m", "chat", 200);
        m.request_done("m", "chat", 200);
        m.request_done("m", "completions", 400);
        m.add_tokens("m", 10, 3);
        m.add_tokens("m", 5, 4);
        let text = m.render();
        assert_line(&text, "# TYPE baton_requests counter");
        assert_line(
            &text,
            r#"baton_requests_total{model="m",endpoint="chat",status="200"} 2"#,
        );
        assert_line(
            &text,
            r#"baton_requests_total{model="m",endpoint="completions",status="400"} 1"#,
        );
        assert_line(&text, r#"baton_input_tokens_total{model="m"} 15"#);
        assert_line(&text, r#"baton_output_tokens_total{model="m"} 7"#);
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn inflight_goes_back_to_zero() {
        let m = Metrics::default();
        let a = m.inflight();
        let b = m.inflight();
        assert_line(&m.render(), "baton_inflight_requests 2");
        drop(a);
        assert_line(&m.render(), "baton_inflight_requests 1");
        drop(b);
        assert_line(&m.render(), "baton_inflight_requests 0");
    }

    #[test]
    fn admission_queue_and_wait() {
        let m = Metrics::default();
        let text = m.render();
        assert_line(&text, "# TYPE baton_admission_queued gauge");
        assert_line(&text, "baton_admission_queued 0");
        assert_line(&text, "# TYPE baton_admission_wait_seconds histogram");
        m.set_admission_queued(3);
        m.observe_admission_wait(std::time::Duration::ZERO);
        m.observe_admission_wait(std::time::Duration::from_millis(1500));
        let text = m.render();
        assert_line(&text, "baton_admission_queued 3");
        assert_line(&text, "baton_admission_wait_seconds_count 2");
        assert_line(&text, "baton_admission_wait_seconds_sum 1.5");
        assert_line(
            &text,
            r#"baton_admission_wait_seconds_bucket{le="0.001"} 1"#,
        );
        assert_line(
            &text,
            r#"baton_admission_wait_seconds_bucket{le="2.048"} 2"#,
        );
    }

    #[test]
    fn latency_histograms() {
        let m = Metrics::default();
        m.observe_ttft("m", 0.05);
        m.observe_ttft("m", 0.15);
        m.observe_itl("m", 0.01);
        m.observe_e2e("m", 1.5);
        let text = m.render();
        assert_line(&text, "# TYPE baton_time_to_first_token_seconds histogram");
        assert_line(
            &text,
            r#"baton_time_to_first_token_seconds_count{model="m"} 2"#,
        );
        assert_line(
            &text,
            r#"baton_time_to_first_token_seconds_sum{model="m"} 0.2"#,
        );
        assert_line(
            &text,
            r#"baton_inter_token_latency_seconds_count{model="m"} 1"#,
        );
        assert_line(
            &text,
            r#"baton_request_duration_seconds_count{model="m"} 1"#,
        );
        // Smallest buckets: 1 ms for the request latencies, 0.5 ms for inter-token latency.
        assert_line(
            &text,
            r#"baton_time_to_first_token_seconds_bucket{le="0.001",model="m"} 0"#,
        );
        assert_line(
            &text,
            r#"baton_inter_token_latency_seconds_bucket{le="0.0005",model="m"} 0"#,
        );
        assert_line(
            &text,
            r#"baton_request_duration_seconds_bucket{le="+Inf",model="m"} 1"#,
        );
    }

    #[test]
    fn engine_gauges_sum_over_workers() {
        let m = Metrics::default();
        let text = m.render();
        assert_line(&text, "baton_prefix_cache_hit_rate 0.0");
        assert_line(&text, "baton_workers 0");
        m.set_engine(&[
            WorkerLoad {
                instance_id: 1,
                kv_blocks_used: 3,
                kv_blocks_total: 100,
                running: 2,
                waiting: 1,
                prefix_hit_tokens: 30,
                prefix_query_tokens: 100,
                prefill: {
                    let mut p = runtime::protocol::PrefillCounters {
                        local: 2,
                        remote: 3,
                        ..Default::default()
                    };
                    p.fallback("timeout");
                    p.record_transfer("shm", 1000, 0.002);
                    p
                },
            },
            WorkerLoad {
                instance_id: 2,
                kv_blocks_used: 4,
                kv_blocks_total: 100,
                running: 1,
                waiting: 0,
                prefix_hit_tokens: 20,
                prefix_query_tokens: 100,
                prefill: {
                    let mut p = runtime::protocol::PrefillCounters {
                        remote: 1,
                        ..Default::default()
                    };
                    p.record_transfer("shm", 500, 0.02);
                    p
                },
            },
        ]);
        let text = m.render();
        assert_line(&text, "baton_kv_blocks_used 7");
        assert_line(&text, "baton_kv_blocks_total 200");
        assert_line(&text, "baton_running_sequences 3");
        assert_line(&text, "baton_waiting_sequences 1");
        assert_line(&text, "baton_prefix_cache_hit_rate 0.25");
        assert_line(&text, "baton_workers 2");
        assert_line(&text, "baton_prefill_total{where=\"remote\"} 4");
        assert_line(&text, "baton_prefill_total{where=\"local\"} 2");
        assert_line(&text, "baton_prefill_fallbacks_total{reason=\"timeout\"} 1");
        assert_line(
            &text,
            "baton_prefill_fallbacks_total{reason=\"queue_full\"} 0",
        );
        assert_line(&text, "baton_kv_transfer_bytes_total{backend=\"shm\"} 1500");
        assert_line(&text, "baton_kv_transfer_seconds_count 2");
        assert_line(&text, "baton_kv_transfer_seconds_bucket{le=\"0.0025\"} 1");
        assert_line(&text, "baton_kv_transfer_seconds_bucket{le=\"0.025\"} 2");
        m.set_engine(&[]);
        let text = m.render();
        assert_line(&text, "baton_kv_blocks_used 0");
        assert_line(&text, "baton_prefix_cache_hit_rate 0.0");
        assert_line(&text, "baton_workers 0");
    }
}
