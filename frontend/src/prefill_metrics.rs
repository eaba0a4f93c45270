//! Disaggregation's metrics, from the decode workers' load reports: where prefills ran, the
//! queue's length, fallbacks by reason, and KV transfers (bytes by backend, a time histogram).
//! Each worker reports totals since its start; these are their sums over the live workers.

use std::sync::{Arc, Mutex};

use prometheus_client::encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use runtime::protocol::{PrefillCounters, WorkerLoad, TRANSFER_SECONDS_BUCKETS};

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WhereLabels {
    r#where: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackendLabels {
    backend: String,
}

/// A histogram's sum, count and `(upper bound, count)` buckets.
type HistogramState = (f64, u64, Vec<(f64, u64)>);

/// A histogram whose buckets are set from reports rather than observed here.
#[derive(Debug, Clone, Default)]
struct ReportedHistogram(Arc<Mutex<HistogramState>>);

impl EncodeMetric for ReportedHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let (sum, count, buckets) = self.0.lock().unwrap_or_else(|e| e.into_inner()).clone();
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

#[derive(Debug, Default)]
pub struct PrefillMetrics {
    prefills: Family<WhereLabels, Gauge>,
    queue_length: Gauge,
    fallbacks: Family<ReasonLabels, Gauge>,
    transfer_bytes: Family<BackendLabels, Gauge>,
    transfer_seconds: ReportedHistogram,
    refused_writes: Gauge,
}

impl PrefillMetrics {
    pub fn register(&self, registry: &mut Registry) {
        // Sums of the workers' totals go down when a worker leaves, so they are gauges; the
        // names are the (`_total` included).
        registry.register(
            "baton_prefill_total",
            "Prefills by where they ran (local, remote), summed over live decode workers",
            self.prefills.clone(),
        );
        registry.register(
            "baton_prefill_queue_length",
            "Jobs waiting in the prefill queue, as the decode workers last saw it (largest)",
            self.queue_length.clone(),
        );
        registry.register(
            "baton_prefill_fallbacks_total",
            "Remote prefills done locally instead, by reason (timeout, failed, queue_full)",
            self.fallbacks.clone(),
        );
        registry.register(
            "baton_kv_transfer_bytes_total",
            "KV bytes prefill workers wrote into decode workers' caches, by backend",
            self.transfer_bytes.clone(),
        );
        registry.register(
            "baton_kv_transfer_refused_total",
            "KV writes the decode workers' fences refused because the writer's claim had ended \
             (expired, cancelled, taken over) or was never granted",
            self.refused_writes.clone(),
        );
        registry.register(
            "baton_kv_transfer_seconds",
            "Time of one remote prefill's KV transfer",
            self.transfer_seconds.clone(),
        );
    }

    pub fn set(&self, loads: &[WorkerLoad]) {
        let mut total = PrefillCounters::default();
        let mut queue = 0;
        let mut buckets = vec![0u64; TRANSFER_SECONDS_BUCKETS.len() + 1];
        for l in loads {
            let p = &l.prefill;
            total.local += p.local;
            total.remote += p.remote;
            queue = queue.max(p.queue_length);
            for (k, v) in &p.fallbacks {
                *total.fallbacks.entry(k.clone()).or_default() += v;
            }
            for (k, v) in &p.transfer_bytes {
                *total.transfer_bytes.entry(k.clone()).or_default() += v;
            }
            for (b, v) in buckets.iter_mut().zip(&p.transfer_buckets) {
                *b += v;
            }
            total.transfer_seconds_sum += p.transfer_seconds_sum;
            total.transfers += p.transfers;
            total.refused_writes += p.refused_writes;
        }
        let g = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        for (place, n) in [("local", total.local), ("remote", total.remote)] {
            self.prefills
                .get_or_create(&WhereLabels {
                    r#where: place.into(),
                })
                .set(g(n));
        }
        self.queue_length.set(g(queue));
        self.refused_writes.set(g(total.refused_writes));
        for reason in ["timeout", "failed", "queue_full"] {
            let n = total.fallbacks.get(reason).copied().unwrap_or(0);
            self.fallbacks
                .get_or_create(&ReasonLabels {
                    reason: reason.into(),
                })
                .set(g(n));
        }
        for (backend, n) in &total.transfer_bytes {
            self.transfer_bytes
                .get_or_create(&BackendLabels {
                    backend: backend.clone(),
                })
                .set(g(*n));
        }
        let bounds = TRANSFER_SECONDS_BUCKETS.iter().copied().chain([f64::MAX]);
        *self
            .transfer_seconds
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = (
            total.transfer_seconds_sum,
            total.transfers,
            bounds.zip(buckets).collect(),
        );
    }
}
