//! Open-loop replay of a Mooncake trace through the simulated graph (issue 13's routing study):
//! each request arrives at its recorded timestamp (times a scale that raises or lowers the
//! load), whatever the graph's state, with the trace's own prompt length and output length
//! (fixed, as the closed loop's are). Prompts come from [`BlockTokens`], so requests whose
//! `hash_ids` start alike share token prefixes and the workers' prefix caches can hit.
//!
//! Besides latency and throughput, a replay reports how much of the prompt the chosen worker
//! already cached when the request arrived (what routing can win) next to the ideal: the hits
//! one unbounded cache that had seen every earlier prompt would give, counted on the same
//! synthetic tokens and chained block hashes the engines use. Because the workers' caches are
//! far smaller than the trace's working set, it also reports the hits of one LRU cache as large
//! as all the workers' KV caches together: what perfect placement could roughly hope for with
//! this much memory (a reference, not a bound: LRU is not the optimal eviction, and running
//! sequences hold blocks a pooled cache would not lose).

use std::collections::{HashMap, HashSet, VecDeque};

use runtime::block_hash::BlockHash;

use engine::mock::{kv_blocks_that_fit, MockModel, CALIBRATED_EFFICIENCY, H200};

use super::{percentile, prompt_ids, Cluster, Pool, Sim, SimError, Source, Track};
use crate::trace::{BlockTokens, TraceRequest, MOONCAKE_BLOCK_TOKENS};

/// The routing study's graph: `workers` aggregated workers of the seed's 70B FP8, one H200
/// each (TP1: the weights leave ~56 GB of HBM, 2 686 blocks of 128 tokens = 344 k tokens of KV,
/// so the trace's longest request, 126 k tokens, fits one worker; an H100 at TP1 would hold
/// 8.8 k). Engine settings are the seed's vLLM baseline: chunked prefill at 2 048 tokens a
/// step, 256 sequences, the model's 128 K context; prefix caching on.
pub fn routing_graph(workers: usize, policy: &str) -> Cluster {
    Cluster {
        gpu: H200,
        model: MockModel::deepseek_r1_distill_llama_70b(),
        efficiency: CALIBRATED_EFFICIENCY,
        block_size: 128,
        decode: Pool {
            workers,
            tensor_parallel: 1,
            max_num_batched_tokens: 2048,
            max_num_seqs: 256,
            max_model_len: 131_072,
        },
        disagg: None,
        policy: policy.into(),
    }
}

/// How a trace is replayed.
#[derive(Clone, Debug, PartialEq)]
pub struct Replay {
    /// Multiplies the trace's arrival times: 0.5 sends the same requests at twice the rate.
    pub time_scale: f64,
    /// Seed of the synthetic tokens behind the hash ids.
    pub seed: u64,
}

impl Default for Replay {
    fn default() -> Self {
        Replay {
            time_scale: 1.0,
            seed: 0,
        }
    }
}

/// What one replay measured, in simulated time, over every request of the trace.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct ReplayPoint {
    pub policy: String,
    pub time_scale: f64,
    pub requests: usize,
    pub completed: usize,
    /// Refused at admission (prompt and output beyond a worker's context or KV cache).
    pub rejected: usize,
    /// Ended by an engine failure.
    pub errors: usize,
    pub ttft_mean_s: f64,
    pub ttft_p50_s: f64,
    pub ttft_p90_s: f64,
    pub e2e_mean_s: f64,
    pub e2e_p50_s: f64,
    pub e2e_p90_s: f64,
    /// Mean over requests of (last − first token time) / (tokens − 1).
    pub itl_mean_s: f64,
    /// First arrival to last token.
    pub duration_s: f64,
    pub output_tok_s: f64,
    pub requests_per_s: f64,
    pub prompt_tokens: usize,
    /// Prompt tokens the chosen worker's prefix cache held at arrival.
    pub hit_tokens: usize,
    pub hit_rate: f64,
    /// The hit rate of one unbounded cache of every earlier prompt.
    pub ideal_hit_rate: f64,
    /// The hit rate of one LRU cache of every earlier prompt, as many blocks as all the
    /// workers' KV caches together.
    pub pooled_lru_hit_rate: f64,
    /// Requests each decode worker got.
    pub worker_requests: Vec<usize>,
    /// Prompt tokens each worker had to compute (not found in its cache at arrival).
    pub worker_prefill_tokens: Vec<usize>,
    /// The busiest worker's prefill tokens over the mean: 1 is an even spread.
    pub prefill_imbalance: f64,
    /// Sequences the engines preempted for want of KV blocks.
    pub preemptions: u64,
}

/// The trace side of a replay: arrival times, prompts, and the ideal cache's books.
pub(super) struct Feed<'a> {
    trace: &'a [TraceRequest],
    tokens: BlockTokens,
    time_scale: f64,
    seen: HashSet<u64>,
    ideal_hit_tokens: usize,
    pooled: Lru,
    pooled_hit_tokens: usize,
}

impl Feed<'_> {
    /// Request `i`'s arrival, ns after the first's.
    pub(super) fn arrival_ns(&self, i: usize) -> u64 {
        let ms = (self.trace[i].timestamp_ms - self.trace[0].timestamp_ms) as f64;
        (ms * self.time_scale * 1e6).round() as u64
    }

    /// Request `i`'s prompt and output length.
    pub(super) fn request(&self, i: usize) -> (Vec<u32>, usize) {
        let r = &self.trace[i];
        (self.tokens.prompt(r), r.output_length)
    }

    /// Books the next prompt (in arrival order) against the ideal cache. Hits are counted as
    /// the engine counts them, at most `(len − 1) / bs` blocks, so that at least one token is
    /// left to compute; a policy's hit rate can then never exceed the ideal one.
    pub(super) fn observe(&mut self, hashes: &[BlockHash], len: usize, bs: usize) {
        let countable = &hashes[..hashes.len().min(len.saturating_sub(1) / bs)];
        let ideal = countable
            .iter()
            .take_while(|h| self.seen.contains(&h.block_hash))
            .count();
        let pooled = countable
            .iter()
            .take_while(|h| self.pooled.contains(h.block_hash))
            .count();
        self.ideal_hit_tokens += ideal * bs;
        self.pooled_hit_tokens += pooled * bs;
        for h in hashes {
            self.seen.insert(h.block_hash);
            self.pooled.touch(h.block_hash);
        }
    }
}

/// A least-recently-used set of block hashes, `capacity` at most.
struct Lru {
    capacity: usize,
    tick: u64,
    /// Each member's last use.
    last: HashMap<u64, u64>,
    /// Uses in order; an entry older than its member's last use is stale and skipped.
    uses: VecDeque<(u64, u64)>,
}

impl Lru {
    fn new(capacity: usize) -> Self {
        Lru {
            capacity,
            tick: 0,
            last: HashMap::new(),
            uses: VecDeque::new(),
        }
    }

    fn contains(&self, hash: u64) -> bool {
        self.last.contains_key(&hash)
    }

    fn touch(&mut self, hash: u64) {
        self.tick += 1;
        self.last.insert(hash, self.tick);
        self.uses.push_back((self.tick, hash));
        while self.last.len() > self.capacity {
            let Some((tick, oldest)) = self.uses.pop_front() else {
                break;
            };
            if self.last.get(&oldest) == Some(&tick) {
                self.last.remove(&oldest);
            }
        }
    }
}

/// Replays `trace` (arrival order) on `cluster` to its end.
pub fn replay(
    cluster: &Cluster,
    trace: &[TraceRequest],
    opts: &Replay,
) -> Result<ReplayPoint, SimError> {
    if trace.is_empty() {
        return Err(SimError::EmptyTrace);
    }
    if !opts.time_scale.is_finite() || opts.time_scale <= 0.0 {
        return Err(SimError::TimeScale(opts.time_scale));
    }
    let ids = prompt_ids(&cluster.model);
    let per_worker = kv_blocks_that_fit(
        &cluster.model,
        &cluster.gpu,
        cluster.decode.tensor_parallel,
        cluster.block_size,
    );
    let feed = Feed {
        trace,
        tokens: BlockTokens::range(ids.start, ids.end, MOONCAKE_BLOCK_TOKENS, opts.seed),
        time_scale: opts.time_scale,
        seen: HashSet::new(),
        ideal_hit_tokens: 0,
        pooled: Lru::new(per_worker * cluster.decode.workers),
        pooled_hit_tokens: 0,
    };
    let mut sim = Sim::new(
        cluster,
        Source::Trace(Box::new(feed)),
        trace.len(),
        opts.seed,
    )?;
    sim.issue(0);
    sim.run_events()?;
    Ok(sim.replay_point(opts.time_scale))
}

impl Sim<'_> {
    fn replay_point(&self, time_scale: f64) -> ReplayPoint {
        let (ideal_hit_tokens, pooled_hit_tokens) = match &self.source {
            Source::Trace(feed) => (feed.ideal_hit_tokens, feed.pooled_hit_tokens),
            Source::Closed(_) => (0, 0),
        };
        let served: Vec<&Track> = self
            .tracks
            .iter()
            .filter(|t| !t.rejected && t.first.is_some())
            .collect();
        let secs = |ns: u64| ns as f64 / 1e9;
        let sorted = |mut v: Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v
        };
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
        let ttft = sorted(
            served
                .iter()
                .map(|t| secs(t.first.unwrap_or(t.arrival) - t.arrival))
                .collect(),
        );
        let e2e = sorted(served.iter().map(|t| secs(t.last - t.arrival)).collect());
        let itl: Vec<f64> = served
            .iter()
            .filter(|t| t.tokens > 1)
            .map(|t| secs(t.last - t.first.unwrap_or(t.last)) / (t.tokens - 1) as f64)
            .collect();
        let start = self.tracks.iter().map(|t| t.arrival).min().unwrap_or(0);
        let end = self.tracks.iter().map(|t| t.last).max().unwrap_or(0);
        let duration = secs(end.saturating_sub(start)).max(1e-9);
        let output: usize = served.iter().map(|t| t.tokens).sum();

        let workers = self.decode.len();
        let mut worker_requests = vec![0; workers];
        let mut worker_prefill_tokens = vec![0; workers];
        for t in self.tracks.iter().filter(|t| !t.rejected) {
            worker_requests[t.worker] += 1;
            worker_prefill_tokens[t.worker] += t.isl - t.cached;
        }
        let prefill_mean = worker_prefill_tokens.iter().sum::<usize>() as f64 / workers as f64;
        let prefill_max = worker_prefill_tokens.iter().copied().max().unwrap_or(0) as f64;
        let prompt_tokens: usize = self.tracks.iter().map(|t| t.isl).sum();
        let hit_tokens: usize = self.tracks.iter().map(|t| t.cached).sum();
        let rate = |hits: usize| hits as f64 / prompt_tokens.max(1) as f64;
        ReplayPoint {
            policy: self.cluster.policy.clone(),
            time_scale,
            requests: self.tracks.len(),
            completed: served.len(),
            rejected: self.rejected,
            errors: self.errors,
            ttft_mean_s: mean(&ttft),
            ttft_p50_s: percentile(&ttft, 0.5),
            ttft_p90_s: percentile(&ttft, 0.9),
            e2e_mean_s: mean(&e2e),
            e2e_p50_s: percentile(&e2e, 0.5),
            e2e_p90_s: percentile(&e2e, 0.9),
            itl_mean_s: mean(&itl),
            duration_s: duration,
            output_tok_s: output as f64 / duration,
            requests_per_s: served.len() as f64 / duration,
            prompt_tokens,
            hit_tokens,
            hit_rate: rate(hit_tokens),
            ideal_hit_rate: rate(ideal_hit_tokens),
            pooled_lru_hit_rate: rate(pooled_hit_tokens),
            worker_requests,
            worker_prefill_tokens,
            prefill_imbalance: if prefill_mean > 0.0 {
                prefill_max / prefill_mean
            } else {
                1.0
            },
            preemptions: self
                .decode
                .iter()
                .map(|w| w.engine.stats().preemptions)
                .sum(),
        }
    }
}
