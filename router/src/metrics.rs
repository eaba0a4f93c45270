//! The router's Prometheus metrics, registered into the frontend's registry: requests per
//! policy and worker, the overlap each decision found, the KV index's size, the KV events and
//! resyncs it went through, per-worker load as the router sees it, and migrations.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionLabels {
    policy: String,
    worker: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct WorkerLabels {
    worker: String,
}

impl WorkerLabels {
    pub fn of(worker: u64) -> Self {
        Self {
            worker: format!("{worker:x}"),
        }
    }
}

#[derive(Debug)]
pub struct RouterMetrics {
    requests: Family<DecisionLabels, Counter>,
    overlap_blocks: Histogram,
    pub(crate) indexer_blocks: Gauge,
    events: Family<KindLabels, Counter>,
    resyncs: Counter,
    pub(crate) worker_kv_blocks_used: Family<WorkerLabels, Gauge>,
    pub(crate) worker_active_requests: Family<WorkerLabels, Gauge>,
    migrations: Counter,
}

impl Default for RouterMetrics {
    fn default() -> Self {
        Self {
            requests: Family::default(),
            // 0, 1, 2, 4 … 4096 blocks.
            overlap_blocks: Histogram::new(
                std::iter::once(0.0).chain(exponential_buckets(1.0, 2.0, 13)),
            ),
            indexer_blocks: Gauge::default(),
            events: Family::default(),
            resyncs: Counter::default(),
            worker_kv_blocks_used: Family::default(),
            worker_active_requests: Family::default(),
            migrations: Counter::default(),
        }
    }
}

impl RouterMetrics {
    /// Adds every metric to `registry` (counters without `_total`: the encoder appends it).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "baton_router_requests",
            "Routing decisions, by policy and chosen worker",
            self.requests.clone(),
        );
        registry.register(
            "baton_router_overlap_blocks",
            "Prompt blocks the chosen worker was believed to cache, per decision",
            self.overlap_blocks.clone(),
        );
        registry.register(
            "baton_router_indexer_blocks",
            "Distinct KV blocks in the router's index",
            self.indexer_blocks.clone(),
        );
        registry.register(
            "baton_router_events",
            "KV events received from workers, by kind",
            self.events.clone(),
        );
        registry.register(
            "baton_router_resyncs",
            "Times the router asked a worker for missed KV events or a dump of its cache",
            self.resyncs.clone(),
        );
        registry.register(
            "baton_worker_kv_blocks_used",
            "KV blocks in use on each worker, as it last reported",
            self.worker_kv_blocks_used.clone(),
        );
        registry.register(
            "baton_worker_active_requests",
            "Requests in flight on each worker, as the routers of the namespace count them",
            self.worker_active_requests.clone(),
        );
        registry.register(
            "baton_migrations",
            "Requests moved mid-stream to another worker after theirs died",
            self.migrations.clone(),
        );
    }

    pub(crate) fn decision(&self, policy: &str, worker: u64, overlap_blocks: usize) {
        self.requests
            .get_or_create(&DecisionLabels {
                policy: policy.to_string(),
                worker: format!("{worker:x}"),
            })
            .inc();
        self.overlap_blocks.observe(overlap_blocks as f64);
    }

    pub(crate) fn kv_event(&self, kind: &str) {
        self.events
            .get_or_create(&KindLabels {
                kind: kind.to_string(),
            })
            .inc();
    }

    pub(crate) fn resync(&self) {
        self.resyncs.inc();
    }

    pub(crate) fn migration(&self) {
        self.migrations.inc();
    }

    /// Resyncs started so far.
    pub fn resyncs(&self) -> u64 {
        self.resyncs.get()
    }

    /// Requests migrated so far.
    pub fn migrations(&self) -> u64 {
        self.migrations.get()
    }
}
