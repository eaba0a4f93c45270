//! What a soak run found, as JSON and as the rows of benches/README.md's reliability table.

use std::collections::BTreeMap;

use serde::Serialize;

use super::load::{Ending, RequestLog};
use super::{FaultRecord, SoakConfig};
use crate::baseline::report::CpuInfo;
use crate::client::metrics::percentile;

/// What the processes did.
pub(super) struct Processes {
    /// VmRSS (KiB) after warm-up, the most seen after it, and at the end of the load.
    pub warm: BTreeMap<String, u64>,
    pub max: BTreeMap<String, u64>,
    pub end: BTreeMap<String, u64>,
    /// The frontend's last view of each decode worker's KV blocks in use.
    pub decode_blocks: BTreeMap<String, u64>,
    /// What each worker said it held when it stopped.
    pub stop_blocks: BTreeMap<String, Option<usize>>,
    pub remote_prefills: f64,
    pub listening: BTreeMap<String, Vec<String>>,
}

#[derive(Clone, Debug, Serialize)]
pub struct ProcessReport {
    pub name: String,
    pub rss_warm_mib: Option<f64>,
    pub rss_max_mib: Option<f64>,
    pub rss_end_mib: Option<f64>,
    /// KV blocks in use when it stopped (None: killed or stalled by a fault, or the frontend).
    pub kv_blocks_at_stop: Option<usize>,
}

impl ProcessReport {
    /// End RSS above the warm-up RSS by more than `share` of it plus `slack_mib`.
    pub fn grew(&self, share: f64, slack_mib: f64) -> bool {
        match (self.rss_warm_mib, self.rss_end_mib) {
            (Some(w), Some(e)) => e > w * (1.0 + share) + slack_mib,
            _ => false,
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct SoakReport {
    pub cpu: String,
    pub streams: usize,
    pub duration_s: f64,
    pub decode_workers: usize,
    pub prefill_workers: usize,
    pub max_inflight: usize,
    pub migration_limit: u32,
    pub isl: usize,
    pub long_isl: usize,
    pub long_every: usize,
    pub osl: usize,
    /// From the first request to the last response.
    pub load_s: f64,
    pub requests: usize,
    pub completed: usize,
    pub failed: usize,
    /// Failures that ended with an error event and `[DONE]`, or an error answer.
    pub failed_clearly: usize,
    pub hung: usize,
    /// Never admitted within the request timeout (every try a 503 with `Retry-After`).
    pub gave_up: usize,
    pub answered_twice: usize,
    /// 503 answers (each retried after its `Retry-After`), and the requests that got one.
    pub rejected_503: u64,
    pub requests_rejected: usize,
    pub ttft_p50_s: f64,
    pub ttft_p99_s: f64,
    pub e2e_p50_s: f64,
    pub e2e_p99_s: f64,
    pub output_tok_s: f64,
    /// Prefills the live decode workers sent to the prefill workers.
    pub remote_prefills: f64,
    pub faults: Vec<FaultRecord>,
    pub processes: Vec<ProcessReport>,
    /// The frontend's view of each decode worker's KV blocks in use after the load.
    pub decode_blocks_after: BTreeMap<String, u64>,
    /// The TCP addresses each Baton process listened on at the end.
    pub listening: BTreeMap<String, Vec<String>>,
    /// Failed requests by how they ended and what they were told (digits elided).
    pub failure_kinds: BTreeMap<String, usize>,
    /// Up to 50 failed requests, for the reader.
    pub failures: Vec<RequestLog>,
    #[serde(skip)]
    pub logs: Vec<RequestLog>,
}

impl SoakReport {
    pub(super) fn new(
        config: &SoakConfig,
        logs: Vec<RequestLog>,
        faults: Vec<FaultRecord>,
        load_s: f64,
        p: Processes,
    ) -> SoakReport {
        let osl = config.osl;
        let completed: Vec<&RequestLog> = logs
            .iter()
            .filter(|l| l.ending == Ending::Completed)
            .collect();
        let sorted = |f: &dyn Fn(&RequestLog) -> Option<f64>| {
            let mut v: Vec<f64> = completed.iter().filter_map(|l| f(l)).collect();
            v.sort_by(f64::total_cmp);
            v
        };
        let ttft = sorted(&|l| l.ttft_s);
        let e2e = sorted(&|l| Some(l.end_s - l.start_s));
        let mib = |m: &BTreeMap<String, u64>, n: &str| m.get(n).map(|k| *k as f64 / 1024.0);
        let mut names: Vec<String> = p.warm.keys().chain(p.end.keys()).cloned().collect();
        names.extend(p.stop_blocks.keys().cloned());
        names.sort();
        names.dedup();
        let processes = names
            .iter()
            .map(|n| ProcessReport {
                name: n.clone(),
                rss_warm_mib: mib(&p.warm, n),
                rss_max_mib: mib(&p.max, n),
                rss_end_mib: mib(&p.end, n),
                kv_blocks_at_stop: p.stop_blocks.get(n).copied().flatten(),
            })
            .collect();
        let failures: Vec<RequestLog> = logs
            .iter()
            .filter(|l| l.ending != Ending::Completed)
            .take(50)
            .cloned()
            .collect();
        let mut failure_kinds = BTreeMap::new();
        for l in logs.iter().filter(|l| l.ending != Ending::Completed) {
            let told: String = l
                .error
                .as_deref()
                .unwrap_or("")
                .chars()
                .filter(|c| !c.is_ascii_digit())
                .take(100)
                .collect();
            *failure_kinds
                .entry(format!("{:?}: {told}", l.ending))
                .or_insert(0) += 1;
        }
        SoakReport {
            cpu: CpuInfo::read().line(),
            streams: config.streams,
            duration_s: config.duration.as_secs_f64(),
            decode_workers: config.decode_workers,
            prefill_workers: config.prefill_workers,
            max_inflight: config.max_inflight,
            migration_limit: config.migration_limit,
            isl: config.isl,
            long_isl: config.long_isl,
            long_every: config.long_every,
            osl,
            load_s,
            requests: logs.len(),
            completed: completed.len(),
            failed: logs.len() - completed.len(),
            failed_clearly: logs.iter().filter(|l| l.failed_clearly()).count(),
            hung: logs.iter().filter(|l| l.ending == Ending::Hung).count(),
            gave_up: logs.iter().filter(|l| l.ending == Ending::GaveUp).count(),
            answered_twice: logs.iter().filter(|l| l.answered_twice(osl)).count(),
            rejected_503: logs.iter().map(|l| l.rejected as u64).sum(),
            requests_rejected: logs.iter().filter(|l| l.rejected > 0).count(),
            ttft_p50_s: percentile(&ttft, 50.0),
            ttft_p99_s: percentile(&ttft, 99.0),
            e2e_p50_s: percentile(&e2e, 50.0),
            e2e_p99_s: percentile(&e2e, 99.0),
            output_tok_s: (completed.len() * osl) as f64 / load_s.max(1e-9),
            remote_prefills: p.remote_prefills,
            faults,
            processes,
            decode_blocks_after: p.decode_blocks,
            listening: p.listening,
            failure_kinds,
            failures,
            logs,
        }
    }

    /// KV blocks still in use after the load: what surviving workers said at their stop,
    /// and the frontend's view of every decode worker it still routes to.
    pub fn leaked_blocks(&self) -> usize {
        let said: usize = self
            .processes
            .iter()
            .filter_map(|p| p.kv_blocks_at_stop)
            .sum();
        said + self.decode_blocks_after.values().sum::<u64>() as usize
    }

    /// Workers that stopped cleanly but did not say what they held.
    pub fn silent_workers(&self) -> Vec<String> {
        self.processes
            .iter()
            .filter(|p| p.name != "frontend" && p.rss_end_mib.is_some())
            .filter(|p| p.kv_blocks_at_stop.is_none())
            .map(|p| p.name.clone())
            .collect()
    }

    /// One row of the reliability table.
    pub fn row(&self, what: &str) -> String {
        let grew = self
            .processes
            .iter()
            .filter_map(|p| Some(p.rss_end_mib? - p.rss_warm_mib?))
            .fold(f64::MIN, f64::max);
        format!(
            "| {what} | {} × {:.0} s | {} | {} | {} | {} | {} | {} | {} ({}) | {:.2} / {:.2} s | {:.2} / {:.2} s | {:+.1} MiB | {} |",
            self.streams,
            self.duration_s,
            self.max_inflight,
            self.requests,
            self.completed,
            self.failed - self.gave_up,
            self.hung,
            self.answered_twice,
            self.rejected_503,
            self.gave_up,
            self.ttft_p50_s,
            self.ttft_p99_s,
            self.e2e_p50_s,
            self.e2e_p99_s,
            if grew == f64::MIN { 0.0 } else { grew },
            self.leaked_blocks(),
        )
    }

    pub const TABLE_HEAD: &'static str = "| run | streams × time | --max-inflight | requests | \
        completed | failed | hung | answered twice | 503s (gave up) | TTFT p50 / p99 | \
        E2E p50 / p99 | worst RSS growth after warm-up | KV blocks left |\n\
        |---|---|---|---|---|---|---|---|---|---|---|---|---|";
}
