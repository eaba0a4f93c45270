//! A discrete-event simulation of a Baton graph on the mock engine, for studies at the seed's
//! scale (DESIGN.md §8) on a machine without GPUs. Each worker is a real [`Engine`] (scheduler,
//! block manager, prefix cache, chunked prefill, preemption) over a [`MockExecutor`] with its
//! own [`VirtualClock`]; a routing policy from `router` places requests; with disaggregation,
//! decode workers apply the seed's conditional rule (DESIGN.md §4) and prefill workers pull
//! from one FIFO queue, one job at a time as `prefill-worker` does, then hold the link for the
//! KV transfer (bytes / link bandwidth). A closed-loop client keeps `concurrency` requests in
//! flight, as genai-perf's `--concurrency` does; [`replay`] instead sends a Mooncake trace's
//! requests open loop, at their recorded arrival times, with their own prompts and lengths.
//!
//! Events run in simulated-time order: the earliest of an arrival, a finished remote prefill,
//! or the next step of a busy worker (a step starts when the worker's clock says it is free).
//! A request that arrives while its worker is mid-step joins the next step, as with a real
//! engine thread. What the simulation leaves out: HTTP, tokenization and the planes (their
//! cost is the serving-overhead study's subject, not this one's).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use engine::mock::{
    kv_blocks_that_fit, Clock, Efficiency, GpuSpec, MockExecutor, MockModel, Roofline, VirtualClock,
};
use engine::{Engine, EngineConfig, Request, RequestOutput, SampledToken, SamplingParams};
use rand::{Rng, SeedableRng};
use router::{
    policy_from_name, Candidate, KvCostConfig, RouteContext, RoutingPolicy, WorkerCounts,
};
use runtime::block_hash::block_hashes;
use runtime::discovery::{EndpointId, Instance};

mod replay;

pub use replay::{replay, routing_graph, Replay, ReplayPoint};

/// Llama 3's end-of-text ids: the 70B's card, for the engine's stop checks.
const LLAMA3_EOS: [u32; 2] = [128001, 128009];

/// Workers of one kind and the engine settings they share.
#[derive(Clone, Debug)]
pub struct Pool {
    pub workers: usize,
    pub tensor_parallel: usize,
    pub max_num_batched_tokens: usize,
    pub max_num_seqs: usize,
    pub max_model_len: usize,
}

/// The prefill side of a disaggregated graph.
#[derive(Clone, Debug)]
pub struct Disagg {
    pub prefill: Pool,
    /// The conditional rule's thresholds (the seed's config: 10 and 2).
    pub max_local_prefill_length: usize,
    pub max_prefill_queue_size: usize,
    /// Bytes/s of the path a prefill worker writes KV over (NVLink within a node).
    pub link_bytes_per_s: f64,
}

#[derive(Clone, Debug)]
pub struct Cluster {
    pub gpu: GpuSpec,
    pub model: MockModel,
    pub efficiency: Efficiency,
    pub block_size: usize,
    pub decode: Pool,
    pub disagg: Option<Disagg>,
    /// A `--router` name.
    pub policy: String,
}

impl Cluster {
    /// GPUs the graph occupies: the denominator of tok/s/GPU.
    pub fn gpus(&self) -> usize {
        let pool = |p: &Pool| p.workers * p.tensor_parallel;
        pool(&self.decode) + self.disagg.as_ref().map_or(0, |d| pool(&d.prefill))
    }
}

/// genai-perf's synthetic sweep point: fixed ISL and OSL (`min_tokens`/`ignore_eos`), no shared
/// prefixes, `warmup` requests first and then `requests` measured, `concurrency` in flight.
#[derive(Clone, Debug)]
pub struct Workload {
    pub isl: usize,
    pub osl: usize,
    pub concurrency: usize,
    pub requests: usize,
    pub warmup: usize,
    pub seed: u64,
}

impl Workload {
    /// The seed's script: ISL 3000, OSL 150, `concurrency × 10` requests after
    /// `concurrency × 2` of warm-up, seed 100.
    pub fn seed(concurrency: usize) -> Self {
        Workload {
            isl: 3000,
            osl: 150,
            concurrency,
            requests: concurrency * 10,
            warmup: concurrency * 2,
            seed: 100,
        }
    }
}

/// What one sweep point measured, in simulated time, over the measured requests.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Point {
    pub concurrency: usize,
    pub requests: usize,
    pub ttft_mean_s: f64,
    pub ttft_p90_s: f64,
    pub itl_mean_s: f64,
    pub e2e_mean_s: f64,
    pub duration_s: f64,
    pub output_tok_s: f64,
    pub tok_s_gpu: f64,
    /// 1 / mean ITL (DESIGN.md §8).
    pub tok_s_user: f64,
    pub remote_prefills: usize,
    pub local_prefills: usize,
    /// Requests that failed in an engine or that a worker refused at admission.
    pub errors: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("unknown routing policy `{0}` (use {names})", names = router::POLICY_NAMES)]
    Policy(String),
    #[error("request `{request}` failed in the engine: {reason}")]
    Engine { request: String, reason: String },
    #[error("the simulation stopped with {0} requests unfinished")]
    Stuck(usize),
    #[error("a graph needs at least one decode worker, got `workers` {0}")]
    NoWorkers(usize),
    #[error("`time_scale` {0} must be a finite number above 0")]
    TimeScale(f64),
    #[error("the trace to replay holds no requests")]
    EmptyTrace,
}

struct Worker {
    engine: Engine,
    clock: Arc<VirtualClock>,
    instance: Instance,
}

impl Worker {
    fn new(cluster: &Cluster, pool: &Pool, component: &str, index: usize) -> Self {
        let clock = Arc::new(VirtualClock::default());
        let roofline = Roofline {
            model: cluster.model.clone(),
            gpu: cluster.gpu.clone(),
            tensor_parallel: pool.tensor_parallel,
            efficiency: cluster.efficiency.clone(),
        };
        let blocks = kv_blocks_that_fit(
            &cluster.model,
            &cluster.gpu,
            pool.tensor_parallel,
            cluster.block_size,
        );
        let executor = MockExecutor::new(
            roofline,
            clock.clone(),
            blocks,
            cluster.block_size,
            cluster.model.vocab,
        );
        let config = EngineConfig {
            max_num_seqs: pool.max_num_seqs,
            max_num_batched_tokens: pool.max_num_batched_tokens,
            // The simulated workers schedule as vLLM's do by default.
            prefill_chunk_while_decoding: 0,
            enable_prefix_caching: true,
            eos_token_ids: LLAMA3_EOS.to_vec(),
            max_context: pool.max_model_len,
        };
        Worker {
            engine: Engine::new(Box::new(executor), config, None),
            clock,
            instance: Instance {
                endpoint: EndpointId::new("sim", component, "generate"),
                instance_id: index as u64 + 1,
                address: format!("sim.{component}.{index}"),
                model: None,
                metadata: serde_json::Value::Null,
            },
        }
    }

    fn now(&self) -> u64 {
        self.clock.now().as_nanos() as u64
    }

    /// Runs one step. `None`: there was work but the step neither took time nor produced
    /// anything (work the scheduler cannot place, say for want of blocks), so simulated time
    /// would stand still.
    fn step(&mut self, name: &str) -> Result<Option<Vec<RequestOutput>>, SimError> {
        let before = self.now();
        let outputs = self.engine.step().map_err(|e| SimError::Engine {
            request: format!("step of {name}"),
            reason: e.to_string(),
        })?;
        Ok((!outputs.is_empty() || self.now() != before).then_some(outputs))
    }

    /// An idle worker's clock catches up with the event that gives it work.
    fn wake_at(&self, t: u64) {
        let now = self.now();
        if t > now && !self.engine.has_work() {
            self.clock.advance(Duration::from_nanos(t - now));
        }
    }
}

struct Job {
    request: usize,
    decode: usize,
    tokens: Vec<u32>,
    cached_tokens: usize,
    enqueued: u64,
}

enum Event {
    Arrival(usize),
    RemoteDone {
        decode: usize,
        request: usize,
        token: SampledToken,
    },
}

#[derive(Default, Clone)]
struct Track {
    arrival: u64,
    first: Option<u64>,
    last: u64,
    tokens: usize,
    done: bool,
    /// Prompt tokens: what the router's counts add for the request and later release.
    isl: usize,
    osl: usize,
    /// The decode worker it was sent to, and the prompt tokens that worker's prefix cache
    /// held when it arrived.
    worker: usize,
    cached: usize,
    /// Refused at admission (longer than the worker's context or KV cache).
    rejected: bool,
}

/// Where a run's requests come from.
enum Source<'a> {
    /// The closed loop: the next request starts when one finishes; random prompts.
    Closed(&'a Workload),
    /// The open loop: a trace's requests at their own times, with their own prompts.
    Trace(Box<replay::Feed<'a>>),
}

struct Sim<'a> {
    cluster: &'a Cluster,
    source: Source<'a>,
    policy: Box<dyn RoutingPolicy>,
    decode: Vec<Worker>,
    prefill: Vec<Worker>,
    /// The job each prefill worker is computing.
    prefill_job: Vec<Option<Job>>,
    queue: VecDeque<Job>,
    events: BinaryHeap<Reverse<(u64, u64)>>,
    pending: HashMap<u64, Event>,
    next_event: u64,
    counts: Vec<WorkerCounts>,
    tracks: Vec<Track>,
    issued: usize,
    remote: usize,
    local: usize,
    errors: usize,
    rejected: usize,
    rng: rand_chacha::ChaCha8Rng,
}

/// Runs one sweep point to its end.
pub fn run(cluster: &Cluster, work: &Workload) -> Result<Point, SimError> {
    let total = work.warmup + work.requests;
    let mut sim = Sim::new(cluster, Source::Closed(work), total, work.seed)?;
    for _ in 0..work.concurrency.min(total) {
        sim.issue(0);
    }
    sim.run_events()?;
    Ok(sim.point(work))
}

impl<'a> Sim<'a> {
    /// The graph's workers, idle at time 0, for `total` requests.
    fn new(
        cluster: &'a Cluster,
        source: Source<'a>,
        total: usize,
        seed: u64,
    ) -> Result<Self, SimError> {
        if cluster.decode.workers == 0 {
            return Err(SimError::NoWorkers(0));
        }
        let policy = policy_from_name(&cluster.policy, KvCostConfig::default())
            .map_err(|_| SimError::Policy(cluster.policy.clone()))?;
        let decode = (0..cluster.decode.workers)
            .map(|i| Worker::new(cluster, &cluster.decode, "decode", i))
            .collect();
        let prefill: Vec<Worker> = cluster.disagg.as_ref().map_or(Vec::new(), |d| {
            (0..d.prefill.workers)
                .map(|i| Worker::new(cluster, &d.prefill, "prefill", i))
                .collect()
        });
        Ok(Sim {
            cluster,
            source,
            policy,
            prefill_job: prefill.iter().map(|_| None).collect(),
            decode,
            prefill,
            queue: VecDeque::new(),
            events: BinaryHeap::new(),
            pending: HashMap::new(),
            next_event: 0,
            counts: vec![WorkerCounts::default(); cluster.decode.workers],
            tracks: vec![Track::default(); total],
            issued: 0,
            remote: 0,
            local: 0,
            errors: 0,
            rejected: 0,
            rng: rand_chacha::ChaCha8Rng::seed_from_u64(seed),
        })
    }
}

impl Sim<'_> {
    fn push(&mut self, t: u64, event: Event) {
        let seq = self.next_event;
        self.next_event += 1;
        self.events.push(Reverse((t, seq)));
        self.pending.insert(seq, event);
    }

    /// The next request of the run starts at `t`: in the closed loop, when one ends; in the
    /// open loop the feed's own times decide instead.
    fn issue(&mut self, t: u64) {
        if self.issued < self.tracks.len() {
            let i = self.issued;
            let t = match &self.source {
                Source::Closed(_) => t,
                Source::Trace(feed) => feed.arrival_ns(i),
            };
            self.issued += 1;
            self.push(t, Event::Arrival(i));
        }
    }

    /// Request `i`'s prompt and output length.
    fn prompt(&mut self, i: usize) -> (Vec<u32>, usize) {
        match &self.source {
            Source::Closed(work) => {
                // Ids above Llama 3's special range and unique per request: no shared prefixes.
                let (isl, osl) = (work.isl, work.osl);
                let ids = prompt_ids(&self.cluster.model);
                let tokens = (0..isl)
                    .map(|_| self.rng.random_range(ids.clone()))
                    .collect();
                (tokens, osl)
            }
            Source::Trace(feed) => feed.request(i),
        }
    }

    fn run_events(&mut self) -> Result<(), SimError> {
        loop {
            let event_at = self.events.peek().map(|Reverse((t, _))| *t);
            let decode_at = self
                .decode
                .iter()
                .enumerate()
                .filter(|(_, w)| w.engine.has_work())
                .map(|(i, w)| (w.now(), i))
                .min();
            let prefill_at = self
                .prefill
                .iter()
                .enumerate()
                .filter_map(|(i, w)| {
                    if w.engine.has_work() {
                        Some((w.now(), i))
                    } else if self.prefill_job[i].is_none() {
                        self.queue.front().map(|j| (w.now().max(j.enqueued), i))
                    } else {
                        None
                    }
                })
                .min();
            let step_at = [decode_at.map(|d| d.0), prefill_at.map(|p| p.0)]
                .into_iter()
                .flatten()
                .min();
            match (event_at, step_at) {
                (Some(e), s) if s.is_none_or(|s| e <= s) => {
                    let Reverse((t, seq)) = self.events.pop().expect("peeked");
                    let event = self.pending.remove(&seq).expect("pushed with the event");
                    self.handle(t, event)?;
                }
                (_, Some(s)) => {
                    if decode_at.is_some_and(|d| d.0 == s) {
                        self.step_decode(decode_at.expect("checked").1)?;
                    } else {
                        self.step_prefill(prefill_at.expect("checked").1)?;
                    }
                }
                _ => break,
            }
        }
        let unfinished = self.tracks.iter().filter(|t| !t.done).count();
        if unfinished > 0 {
            return Err(SimError::Stuck(unfinished));
        }
        Ok(())
    }

    fn handle(&mut self, t: u64, event: Event) -> Result<(), SimError> {
        match event {
            Event::Arrival(i) => self.arrive(t, i),
            Event::RemoteDone {
                decode,
                request,
                token,
            } => {
                let w = &mut self.decode[decode];
                w.wake_at(t);
                // The worker takes the notice between steps: the first token leaves then.
                let at = w.now().max(t);
                let out = w
                    .engine
                    .complete_remote_prefill(&request_id(request), token)
                    .map_err(|e| SimError::Engine {
                        request: request_id(request),
                        reason: e.to_string(),
                    })?;
                self.record(decode, at, &out);
                Ok(())
            }
        }
    }

    fn arrive(&mut self, t: u64, i: usize) -> Result<(), SimError> {
        let (tokens, osl) = self.prompt(i);
        let hashes = block_hashes(&tokens, self.cluster.block_size);
        let bs = self.cluster.block_size;
        if let Source::Trace(feed) = &mut self.source {
            feed.observe(&hashes, tokens.len(), bs);
            self.issue(t);
        }
        let cached: Vec<usize> = self
            .decode
            .iter()
            .map(|w| w.engine.cached_prefix_len(&tokens))
            .collect();
        let candidates: Vec<Candidate<'_>> = self
            .decode
            .iter()
            .zip(&self.counts)
            .zip(&cached)
            .map(|((w, counts), cached)| Candidate {
                instance: &w.instance,
                overlap_blocks: cached / bs,
                cached_blocks: w.engine.stats().kv_blocks_cached,
                counts: *counts,
                recent_blocks: 0.0,
                reported: None,
            })
            .collect();
        let ctx = RouteContext {
            request_id: &request_id(i),
            token_ids: &tokens,
            block_hashes: &hashes,
            block_size: bs,
            candidates: &candidates,
        };
        let selection = self.policy.select(&ctx).map_err(|e| SimError::Engine {
            request: request_id(i),
            reason: e.to_string(),
        })?;
        self.policy.on_dispatch(&request_id(i), &selection, &ctx);
        drop(candidates);
        let d = selection.instance_id as usize - 1;
        let c = &mut self.counts[d];
        c.active_requests += 1;
        c.prefill_tokens += tokens.len();
        c.active_blocks += tokens.len().div_ceil(bs);
        self.tracks[i] = Track {
            arrival: t,
            isl: tokens.len(),
            osl,
            worker: d,
            cached: cached[d],
            ..Track::default()
        };

        let request = Request {
            request_id: request_id(i),
            prompt_token_ids: tokens,
            params: fixed_length(osl),
        };
        let worker = &mut self.decode[d];
        worker.wake_at(t);
        if let Some(rule) = &self.cluster.disagg {
            let hit = worker.engine.cached_prefix_len(&request.prompt_token_ids);
            let uncached = request.prompt_token_ids.len() - hit;
            if uncached > rule.max_local_prefill_length
                && self.queue.len() < rule.max_prefill_queue_size
            {
                if let Ok(slot) = worker.engine.add_remote_prefill_request(request.clone()) {
                    self.remote += 1;
                    self.queue.push_back(Job {
                        request: i,
                        decode: d,
                        tokens: request.prompt_token_ids,
                        cached_tokens: slot.cached_tokens,
                        enqueued: t,
                    });
                    return Ok(());
                }
            }
        }
        if worker.engine.add_request(request).is_err() {
            self.reject(t, d, i);
        } else {
            self.local += 1;
        }
        Ok(())
    }

    /// Request `i` was refused by worker `d` at admission (its prompt and output exceed the
    /// context or the whole KV cache): the client gets its error at once, and the router's
    /// books close as for a finished request.
    fn reject(&mut self, t: u64, d: usize, i: usize) {
        self.rejected += 1;
        let track = &mut self.tracks[i];
        track.done = true;
        track.rejected = true;
        track.last = t;
        let (isl, bs) = (track.isl, self.cluster.block_size);
        let c = &mut self.counts[d];
        c.active_requests -= 1;
        c.prefill_tokens = c.prefill_tokens.saturating_sub(isl);
        c.active_blocks = c.active_blocks.saturating_sub(isl.div_ceil(bs));
        self.policy
            .on_finish(&request_id(i), self.decode[d].instance.instance_id);
        if matches!(self.source, Source::Closed(_)) {
            self.issue(t);
        }
    }

    fn step_decode(&mut self, d: usize) -> Result<(), SimError> {
        let outputs = self.decode[d]
            .step(&format!("decode worker {d}"))?
            .ok_or_else(|| self.stuck())?;
        let at = self.decode[d].now();
        for out in &outputs {
            self.record(d, at, out);
        }
        Ok(())
    }

    fn stuck(&self) -> SimError {
        SimError::Stuck(self.tracks.iter().filter(|t| !t.done).count())
    }

    fn step_prefill(&mut self, p: usize) -> Result<(), SimError> {
        if self.prefill_job[p].is_none() {
            let mut job = self
                .queue
                .pop_front()
                .expect("a prefill worker pulls only a queued job");
            let w = &self.prefill[p];
            let now = w.now();
            if job.enqueued > now {
                w.clock.advance(Duration::from_nanos(job.enqueued - now));
            }
            // The job's tokens go to the prefill engine; the job itself stays for the notice.
            let request = Request {
                request_id: request_id(job.request),
                prompt_token_ids: std::mem::take(&mut job.tokens),
                params: fixed_length(self.tracks[job.request].osl),
            };
            self.prefill[p]
                .engine
                .add_prefill_request(request)
                .map_err(|e| SimError::Engine {
                    request: request_id(job.request),
                    reason: e.to_string(),
                })?;
            self.prefill_job[p] = Some(job);
            return Ok(());
        }
        let outputs = self.prefill[p]
            .step(&format!("prefill worker {p}"))?
            .ok_or_else(|| self.stuck())?;
        for out in outputs {
            match out {
                RequestOutput::Prefilled {
                    request_id: id,
                    token,
                    block_ids,
                    ..
                } => {
                    let job = self.prefill_job[p].take().expect("the worker's one job");
                    let rule = self.cluster.disagg.as_ref().expect("prefill workers");
                    let skip = job.cached_tokens / self.cluster.block_size;
                    let bytes = block_ids.len().saturating_sub(skip) as f64
                        * self.cluster.block_size as f64
                        * self.cluster.model.kv_bytes_per_token();
                    let w = &mut self.prefill[p];
                    w.clock
                        .advance(Duration::from_secs_f64(bytes / rule.link_bytes_per_s));
                    w.engine.abort(&id);
                    let at = w.now();
                    self.push(
                        at,
                        Event::RemoteDone {
                            decode: job.decode,
                            request: job.request,
                            token,
                        },
                    );
                }
                other => {
                    return Err(SimError::Engine {
                        request: other.request_id().to_string(),
                        reason: "a prefill job ended without its first token".into(),
                    })
                }
            }
        }
        Ok(())
    }

    /// Timestamps one output of decode worker `d`; a finished request frees its slot in the
    /// closed loop.
    fn record(&mut self, d: usize, at: u64, out: &RequestOutput) {
        let i = request_index(out.request_id());
        let n = out.tokens().len();
        let track = &mut self.tracks[i];
        let isl = track.isl;
        if n > 0 && track.first.is_none() {
            track.first = Some(at);
            self.counts[d].prefill_tokens = self.counts[d].prefill_tokens.saturating_sub(isl);
            self.policy
                .on_first_token(out.request_id(), self.decode[d].instance.instance_id);
        }
        track.tokens += n;
        track.last = at;
        if out.is_final() {
            track.done = true;
            if matches!(out, RequestOutput::Failed { .. }) {
                self.errors += 1;
            }
            let c = &mut self.counts[d];
            c.active_requests -= 1;
            c.active_blocks = c
                .active_blocks
                .saturating_sub(isl.div_ceil(self.cluster.block_size));
            self.policy
                .on_finish(out.request_id(), self.decode[d].instance.instance_id);
            if matches!(self.source, Source::Closed(_)) {
                self.issue(at);
            }
        }
    }

    fn point(&self, work: &Workload) -> Point {
        let measured: Vec<&Track> = self.tracks[work.warmup..]
            .iter()
            .filter(|t| t.first.is_some())
            .collect();
        let secs = |ns: u64| ns as f64 / 1e9;
        let mut ttft: Vec<f64> = measured
            .iter()
            .map(|t| secs(t.first.unwrap_or(t.arrival) - t.arrival))
            .collect();
        let itl: Vec<f64> = measured
            .iter()
            .filter(|t| t.tokens > 1)
            .map(|t| secs(t.last - t.first.unwrap_or(t.last)) / (t.tokens - 1) as f64)
            .collect();
        let e2e: Vec<f64> = measured.iter().map(|t| secs(t.last - t.arrival)).collect();
        let start = measured.iter().map(|t| t.arrival).min().unwrap_or(0);
        let end = measured.iter().map(|t| t.last).max().unwrap_or(0);
        let duration = secs(end.saturating_sub(start)).max(1e-9);
        let tokens: usize = measured.iter().map(|t| t.tokens).sum();
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
        ttft.sort_by(f64::total_cmp);
        let itl_mean = mean(&itl);
        let output_tok_s = tokens as f64 / duration;
        Point {
            concurrency: work.concurrency,
            requests: measured.len(),
            ttft_mean_s: mean(&ttft),
            ttft_p90_s: percentile(&ttft, 0.9),
            itl_mean_s: itl_mean,
            e2e_mean_s: mean(&e2e),
            duration_s: duration,
            output_tok_s,
            tok_s_gpu: output_tok_s / self.cluster.gpus() as f64,
            tok_s_user: if itl_mean > 0.0 { 1.0 / itl_mean } else { 0.0 },
            remote_prefills: self.remote,
            local_prefills: self.local,
            errors: self.errors + self.rejected,
        }
    }
}

/// The token ids synthetic prompts draw from: clear of Llama 3's special tokens at both ends.
fn prompt_ids(model: &MockModel) -> std::ops::Range<u32> {
    1000..model.vocab as u32 - 300
}

/// What every request asks: exactly `osl` tokens (`min_tokens`, `ignore_eos`).
fn fixed_length(osl: usize) -> SamplingParams {
    SamplingParams {
        max_tokens: osl,
        min_tokens: osl,
        ignore_eos: true,
        ..SamplingParams::default()
    }
}

fn request_id(i: usize) -> String {
    format!("sim-{i}")
}

fn request_index(id: &str) -> usize {
    id.strip_prefix("sim-")
        .and_then(|n| n.parse().ok())
        .expect("the simulation names every request")
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}
