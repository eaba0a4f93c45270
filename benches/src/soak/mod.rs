//! The soak: the distributed graph as separate processes — a frontend, decode workers and
//! prefill workers (`baton run …` on the mock engine) over real NATS and etcd — held under
//! `streams` closed-loop streaming requests for a while, with faults injected on a schedule
//! (kill -9 or SIGSTOP of a worker, a NATS or etcd restart). It reports what a client saw
//! (every request's ending, latency percentiles, 503s), what the processes did (RSS after
//! warm-up and at the end, when each fault left routing) and what was left behind (KV blocks
//! in use on every surviving worker once the load is over). `make test` runs it small
//! (benches/tests/soak.rs); `make bench-soak` runs it at 256 streams for 10 minutes.

mod graph;
pub mod load;
mod report;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

pub use graph::GraphError;
pub use load::{Ending, LoadShape, RequestLog};
pub use report::{ProcessReport, SoakReport};

/// A fault the soak injects.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Fault {
    /// SIGKILL of the first live decode worker.
    KillDecode,
    /// SIGKILL of the first live prefill worker.
    KillPrefill,
    /// SIGSTOP of the first live decode worker: it stalls instead of dying (killed at the end).
    StopDecode,
    /// NATS down for `outage`, then back on the same port.
    RestartNats,
    /// etcd down for `outage`, then back on the same port with its data.
    RestartEtcd,
}

impl Fault {
    pub fn parse(s: &str) -> Result<Fault, String> {
        Ok(match s {
            "kill-decode" => Fault::KillDecode,
            "kill-prefill" => Fault::KillPrefill,
            "stop-decode" => Fault::StopDecode,
            "restart-nats" => Fault::RestartNats,
            "restart-etcd" => Fault::RestartEtcd,
            other => {
                return Err(format!(
                    "unknown fault `{other}` (use kill-decode, kill-prefill, stop-decode, \
                     restart-nats or restart-etcd)"
                ))
            }
        })
    }
}

/// Everything a soak run is.
#[derive(Clone, Debug)]
pub struct SoakConfig {
    pub baton: PathBuf,
    /// Logs of every process go under it.
    pub work: PathBuf,
    pub streams: usize,
    pub duration: Duration,
    /// RSS is taken as the baseline at this point; growth is measured against it.
    pub warmup: Duration,
    pub decode_workers: usize,
    pub prefill_workers: usize,
    /// The frontend's `--max-inflight`: past it, 503 with `Retry-After` (the clients retry).
    pub max_inflight: usize,
    pub migration_limit: u32,
    pub router: String,
    pub isl: usize,
    pub long_isl: usize,
    pub long_every: usize,
    pub osl: usize,
    /// The mock's `--mock-speedup`.
    pub mock_speedup: f64,
    pub lease_ttl: u64,
    pub stream_timeout: u64,
    pub remote_prefill_timeout: f64,
    /// When each fault strikes, from the start of the load.
    pub faults: Vec<(Duration, Fault)>,
    /// How long NATS or etcd stays down in a restart.
    pub outage: Duration,
    /// Start a new worker after each one killed or stopped, once it has left routing (the
    /// long benchmark keeps its capacity; the tests check the graph without it).
    pub replace: bool,
    pub request_timeout: Duration,
}

impl SoakConfig {
    /// The graph of the issue (frontend, 2 decode, 2 prefill workers) under `streams` for
    /// `duration`, without faults.
    pub fn new(baton: PathBuf, work: PathBuf, streams: usize, duration: Duration) -> Self {
        Self {
            baton,
            work,
            streams,
            duration,
            warmup: duration / 4,
            decode_workers: 2,
            prefill_workers: 2,
            max_inflight: streams,
            migration_limit: 1,
            router: "kv".into(),
            isl: 256,
            long_isl: 1_200,
            long_every: 4,
            osl: 48,
            mock_speedup: 1.0,
            lease_ttl: 3,
            stream_timeout: 10,
            remote_prefill_timeout: 5.0,
            faults: Vec::new(),
            outage: Duration::from_secs(2),
            replace: false,
            request_timeout: Duration::from_secs(120),
        }
    }
}

/// Runs the soak on the calling thread (children die with it), with its own async runtime
/// for the clients.
pub fn run(config: &SoakConfig) -> Result<SoakReport, GraphError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| GraphError::Io("starting the clients' runtime".into(), e))?;
    let mut graph = graph::Graph::start(config, &rt)?;
    let logs = Arc::new(Mutex::new(Vec::new()));
    let shape = LoadShape {
        url: graph.url.clone(),
        model: graph::MODEL.into(),
        streams: config.streams,
        duration: config.duration,
        isl: config.isl,
        long_isl: config.long_isl,
        long_every: config.long_every,
        osl: config.osl,
        request_timeout: config.request_timeout,
        max_retry_after: Duration::from_secs(5),
    };
    let t0 = Instant::now();
    let load = rt.spawn(load::run(shape, t0, logs.clone()));

    let mut faults = config.faults.clone();
    faults.sort_by_key(|(at, _)| *at);
    let mut records = Vec::new();
    let mut rss_warm = None;
    let mut rss_max = BTreeMap::new();
    while !load.is_finished() {
        let now = t0.elapsed();
        if let Some(&(at, fault)) = faults.first() {
            if now >= at {
                faults.remove(0);
                records.push(graph.inject(&rt, fault, t0)?);
                continue;
            }
        }
        let rss = graph.rss();
        for (name, kib) in &rss {
            let e = rss_max.entry(name.clone()).or_insert(0);
            *e = (*e).max(*kib);
        }
        if rss_warm.is_none() && now >= config.warmup {
            rss_warm = Some(rss);
        }
        graph.check_alive()?;
        std::thread::sleep(Duration::from_millis(250));
    }
    let rss_end = graph.rss();
    let listening = graph.listening();
    let rss_warm = rss_warm.unwrap_or_else(|| rss_end.clone());
    let load_s = t0.elapsed().as_secs_f64();
    let metrics = graph.settled_metrics(&rt, Duration::from_secs(20));
    let decode_blocks = graph::decode_blocks(&metrics);
    let remote_prefills = graph::remote_prefills(&metrics);
    let stop_blocks = graph.stop_workers();
    let logs = std::mem::take(&mut *logs.lock().unwrap_or_else(|e| e.into_inner()));
    Ok(SoakReport::new(
        config,
        logs,
        records,
        load_s,
        report::Processes {
            warm: rss_warm,
            max: rss_max,
            end: rss_end,
            decode_blocks,
            stop_blocks,
            remote_prefills,
            listening,
        },
    ))
}

/// When a fault struck and what followed.
#[derive(Clone, Debug, Serialize)]
pub struct FaultRecord {
    pub fault: Fault,
    /// The process it struck (for NATS and etcd, the server).
    pub target: String,
    pub at_s: f64,
    /// For a decode worker: seconds until the frontend's `/health` stopped counting it.
    pub left_routing_after_s: Option<f64>,
    /// The worker started in its place, when `replace` is on.
    pub replaced_by: Option<String>,
}
