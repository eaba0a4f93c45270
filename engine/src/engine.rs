//! The engine loop: validate and queue requests, run one scheduled step through the executor,
//! sample, apply stop conditions, and report per-request output. Single-threaded by design —
//! a worker drives `step()` from its own thread and calls `add_request`/`abort` between steps,
//! so a cancellation frees its KV blocks before the next step starts.

use std::collections::HashMap;
use std::sync::mpsc::Sender;
use std::sync::Arc;

use runtime::kv_event::KvEvent;

use crate::block_manager::{BlockManager, BlockManagerConfig, SeqId};
use crate::error::{AdmissionError, EngineError, Result};
use crate::executor::{Executor, StepOutput};
use crate::model::{ForwardBatch, SeqChunk};
use crate::sampler::{sample, SampledToken, SamplerRow, SamplingParams, SequenceRng};
use crate::scheduler::{ScheduledChunk, Scheduler, SchedulerConfig};
use crate::sequence::{SeqStatus, Sequence};

#[derive(Clone, Debug)]
pub struct EngineConfig {
    pub max_num_seqs: usize,
    pub max_num_batched_tokens: usize,
    /// See [`SchedulerConfig::prefill_chunk_while_decoding`].
    pub prefill_chunk_while_decoding: usize,
    pub enable_prefix_caching: bool,
    /// Ids that end generation unless `ignore_eos` (the model card's EOS ids).
    pub eos_token_ids: Vec<u32>,
    /// Longest sequence, prompt plus output.
    pub max_context: usize,
}

#[derive(Clone, Debug)]
pub struct Request {
    pub request_id: String,
    pub prompt_token_ids: Vec<u32>,
    pub params: SamplingParams,
}

pub use runtime::protocol::FinishReason;

/// What one step produced for one request.
#[derive(Clone, Debug)]
pub enum RequestOutput {
    /// New tokens; the request goes on.
    Tokens {
        request_id: String,
        tokens: Vec<SampledToken>,
        usage: PromptUsage,
    },
    /// The last tokens; the request is gone from the engine.
    Finished {
        request_id: String,
        tokens: Vec<SampledToken>,
        reason: FinishReason,
        usage: PromptUsage,
    },
    /// A prefill-only request computed its prompt and sampled its first token; its blocks
    /// (`block_ids`, in sequence order) stay held until [`Engine::abort`] releases them.
    Prefilled {
        request_id: String,
        token: SampledToken,
        block_ids: Vec<u32>,
        usage: PromptUsage,
    },
    /// The step that ran it failed; the request is gone from the engine, its blocks free.
    Failed {
        request_id: String,
        error: Arc<EngineError>,
    },
}

/// Prompt facts every token output carries, for usage reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PromptUsage {
    pub prompt_tokens: usize,
    /// Prompt tokens served from the prefix cache at admission.
    pub cached_tokens: usize,
}

impl RequestOutput {
    pub fn request_id(&self) -> &str {
        match self {
            RequestOutput::Tokens { request_id, .. }
            | RequestOutput::Finished { request_id, .. }
            | RequestOutput::Prefilled { request_id, .. }
            | RequestOutput::Failed { request_id, .. } => request_id,
        }
    }

    /// The tokens this output adds (none for a failure).
    pub fn tokens(&self) -> &[SampledToken] {
        match self {
            RequestOutput::Tokens { tokens, .. } | RequestOutput::Finished { tokens, .. } => tokens,
            RequestOutput::Prefilled { token, .. } => std::slice::from_ref(token),
            RequestOutput::Failed { .. } => &[],
        }
    }

    /// Prompt and cached-token counts (none for a failure).
    pub fn usage(&self) -> Option<PromptUsage> {
        match self {
            RequestOutput::Tokens { usage, .. }
            | RequestOutput::Finished { usage, .. }
            | RequestOutput::Prefilled { usage, .. } => Some(*usage),
            RequestOutput::Failed { .. } => None,
        }
    }

    pub fn finish_reason(&self) -> Option<FinishReason> {
        match self {
            RequestOutput::Finished { reason, .. } => Some(*reason),
            _ => None,
        }
    }

    /// Whether the request is over (finished or failed; a prefill-only request once its
    /// prompt is computed).
    pub fn is_final(&self) -> bool {
        !matches!(self, RequestOutput::Tokens { .. })
    }
}

/// Blocks reserved for a prompt that a prefill worker will fill.
#[derive(Clone, Debug)]
pub struct RemotePrefillSlot {
    pub block_ids: Vec<u32>,
    /// Leading prompt tokens already cached here (their blocks need no transfer).
    pub cached_tokens: usize,
}

#[derive(Clone, Debug, Default)]
pub struct EngineStats {
    pub running: usize,
    pub waiting: usize,
    pub kv_blocks_total: usize,
    pub kv_blocks_used: usize,
    pub kv_blocks_cached: usize,
    pub prefix_hit_tokens: u64,
    pub prefix_query_tokens: u64,
    pub preemptions: u64,
}

pub struct Engine {
    executor: Box<dyn Executor>,
    scheduler: Scheduler,
    config: EngineConfig,
    ids: HashMap<String, SeqId>,
    next_seq: SeqId,
}

impl Engine {
    pub fn new(
        executor: Box<dyn Executor>,
        config: EngineConfig,
        events: Option<Sender<KvEvent>>,
    ) -> Self {
        let blocks = BlockManager::new(
            BlockManagerConfig {
                num_blocks: executor.num_blocks(),
                block_size: executor.block_size(),
                enable_prefix_caching: config.enable_prefix_caching,
            },
            events,
        );
        let scheduler = Scheduler::new(
            SchedulerConfig {
                max_num_seqs: config.max_num_seqs,
                max_num_batched_tokens: config.max_num_batched_tokens,
                prefill_chunk_while_decoding: config.prefill_chunk_while_decoding,
            },
            blocks,
        );
        Engine {
            executor,
            scheduler,
            config,
            ids: HashMap::new(),
            next_seq: 0,
        }
    }

    fn validate(&self, req: &Request) -> Result<(), AdmissionError> {
        if req.prompt_token_ids.is_empty() {
            return Err(AdmissionError::EmptyPrompt);
        }
        let vocab_size = self.executor.vocab_size();
        if let Some(&token) = req
            .prompt_token_ids
            .iter()
            .find(|&&t| t as usize >= vocab_size)
        {
            return Err(AdmissionError::TokenOutOfVocab { token, vocab_size });
        }
        req.params.validate()?;
        // Saturating: `max_tokens` comes off the request plane as any u64, and a wrapped sum
        // would admit a request of 2^64 - 1 tokens as one of 1.
        let total = req
            .prompt_token_ids
            .len()
            .saturating_add(req.params.max_tokens);
        if total > self.config.max_context {
            return Err(AdmissionError::ContextExceeded {
                prompt_tokens: req.prompt_token_ids.len(),
                max_tokens: req.params.max_tokens,
                context: self.config.max_context,
            });
        }
        let needed_blocks = total.div_ceil(self.executor.block_size());
        if needed_blocks > self.executor.num_blocks() {
            return Err(AdmissionError::SequenceTooLong {
                needed_blocks,
                total_blocks: self.executor.num_blocks(),
            });
        }
        if self.ids.contains_key(&req.request_id) {
            return Err(AdmissionError::DuplicateRequest(req.request_id.clone()));
        }
        Ok(())
    }

    fn new_sequence(&mut self, req: Request, status: SeqStatus) -> Sequence {
        let id = self.next_seq;
        self.next_seq += 1;
        self.ids.insert(req.request_id.clone(), id);
        Sequence {
            id,
            request_id: req.request_id,
            prompt_len: req.prompt_token_ids.len(),
            tokens: req.prompt_token_ids,
            num_computed: 0,
            rng: SequenceRng::new(req.params.seed),
            params: req.params,
            status,
            cached_prompt_tokens: None,
            cumulative_logprob: 0.0,
            prefill_only: false,
        }
    }

    /// Queues a request; a refusal says which request field is at fault.
    pub fn add_request(&mut self, req: Request) -> Result<(), AdmissionError> {
        self.validate(&req)?;
        let seq = self.new_sequence(req, SeqStatus::Waiting);
        self.scheduler.add(seq);
        Ok(())
    }

    /// A prefill worker's job: compute the prompt, sample the first token as `req.params` would
    /// (min_tokens suppression included), then report [`RequestOutput::Prefilled`] and hold the
    /// blocks until [`Engine::abort`]. Only the prompt must fit this engine's context.
    pub fn add_prefill_request(&mut self, mut req: Request) -> Result<(), AdmissionError> {
        req.params.min_tokens = req.params.min_tokens.min(1);
        req.params.max_tokens = 1;
        self.validate(&req)?;
        let mut seq = self.new_sequence(req, SeqStatus::Waiting);
        seq.prefill_only = true;
        self.scheduler.add(seq);
        Ok(())
    }

    /// Whether a step has anything to run (requests waiting for a remote prefill or held after
    /// a prefill do not count).
    pub fn has_work(&self) -> bool {
        self.scheduler.has_work()
    }

    /// Tokens the model knows: every token id it takes or samples is below this.
    pub fn vocab_size(&self) -> usize {
        self.executor.vocab_size()
    }

    /// Prompt tokens the prefix cache holds for `tokens` now (full blocks, at least one token
    /// left to compute): the `prefix_hit_len` of the disaggregation rule. No side effects.
    pub fn cached_prefix_len(&self, tokens: &[u32]) -> usize {
        if self.config.enable_prefix_caching {
            self.scheduler.blocks.cached_prefix_len(tokens)
        } else {
            0
        }
    }

    /// Gives up on a remote prefill: the reserved blocks are freed and the request prefills in
    /// this engine's batch (ahead of later arrivals). False if it was not waiting for one.
    pub fn prefill_locally(&mut self, request_id: &str) -> bool {
        match self.ids.get(request_id) {
            Some(&id) => self.scheduler.prefill_locally(id),
            None => false,
        }
    }

    /// Cancels a request wherever it is; its KV blocks are free when this returns.
    pub fn abort(&mut self, request_id: &str) -> bool {
        match self.ids.remove(request_id) {
            Some(id) => self.scheduler.remove(id).is_some(),
            None => false,
        }
    }

    pub fn has_unfinished(&self) -> bool {
        !self.ids.is_empty()
    }

    pub fn stats(&self) -> EngineStats {
        let b = &self.scheduler.blocks;
        let (hit, query) = b.prefix_cache_hits();
        EngineStats {
            running: self.scheduler.num_running(),
            waiting: self.scheduler.num_waiting(),
            kv_blocks_total: b.total_blocks(),
            kv_blocks_used: b.num_used_blocks(),
            kv_blocks_cached: b.num_cached_blocks(),
            prefix_hit_tokens: hit,
            prefix_query_tokens: query,
            preemptions: self.scheduler.num_preemptions(),
        }
    }

    /// Reserves KV blocks for a prompt whose prefill runs elsewhere (disaggregation). The
    /// request waits, outside the batch, until `complete_remote_prefill` or `abort`.
    pub fn add_remote_prefill_request(
        &mut self,
        req: Request,
    ) -> Result<RemotePrefillSlot, AdmissionError> {
        self.validate(&req)?;
        let seq = self.new_sequence(req, SeqStatus::RemotePrefill);
        let id = seq.id;
        match self.scheduler.blocks.allocate(id, &seq.tokens) {
            Ok(cached) => {
                let mut seq = seq;
                seq.num_computed = cached;
                seq.cached_prompt_tokens = Some(cached);
                let block_ids = self.table_of(id);
                self.scheduler.add(seq);
                Ok(RemotePrefillSlot {
                    block_ids,
                    cached_tokens: cached,
                })
            }
            Err(_) => {
                self.ids.remove(&seq.request_id);
                Err(AdmissionError::NoFreeBlocks(seq.request_id))
            }
        }
    }

    /// The prompt's KV is in the reserved blocks and `first` was sampled by the prefill
    /// worker: register the blocks and let the sequence decode in the batch.
    pub fn complete_remote_prefill(
        &mut self,
        request_id: &str,
        first: SampledToken,
    ) -> Result<RequestOutput> {
        let id = *self
            .ids
            .get(request_id)
            .ok_or_else(|| EngineError::NotAwaitingPrefill(request_id.to_string()))?;
        let seq = self
            .scheduler
            .seqs
            .get_mut(&id)
            .expect("known id has a sequence");
        if seq.status != SeqStatus::RemotePrefill {
            return Err(EngineError::NotAwaitingPrefill(request_id.to_string()));
        }
        seq.num_computed = seq.prompt_len;
        if !seq.params.is_greedy() {
            seq.rng.skip_draw();
        }
        self.scheduler.blocks.commit(id, &seq.tokens)?;
        self.scheduler.start_running(id);
        Ok(self.append_token(id, first))
    }

    /// A sequence's block table, copied (empty if it holds none).
    fn table_of(&self, id: SeqId) -> Vec<u32> {
        self.scheduler
            .blocks
            .block_table(id)
            .unwrap_or(&[])
            .to_vec()
    }

    /// The KV blocks `request_id` holds, in sequence order (`None` for an unknown request).
    pub fn block_table(&self, request_id: &str) -> Option<Vec<u32>> {
        let id = self.ids.get(request_id)?;
        self.scheduler.blocks.block_table(*id).map(<[u32]>::to_vec)
    }

    /// Tokens per KV block.
    pub fn block_size(&self) -> usize {
        self.executor.block_size()
    }

    /// Bytes of one KV block over every layer: the unit [`Engine::read_kv_blocks`] hands out.
    pub fn kv_block_bytes(&self) -> usize {
        self.executor.kv_block_bytes()
    }

    /// Copies whole KV blocks (every layer) out of the cache, for another engine to take.
    pub fn read_kv_blocks(&self, block_ids: &[u32]) -> Result<Vec<Vec<u8>>> {
        block_ids
            .iter()
            .map(|&b| self.executor.read_kv_block(b))
            .collect()
    }

    /// Overwrites whole KV blocks with what [`Engine::read_kv_blocks`] gave on an engine of the
    /// same model and cache layout (a remote prefill's result).
    pub fn write_kv_blocks(&mut self, block_ids: &[u32], data: &[Vec<u8>]) -> Result<()> {
        for (&b, bytes) in block_ids.iter().zip(data) {
            self.executor.write_kv_block(b, bytes)?;
        }
        Ok(())
    }

    /// Runs one scheduled step. If the forward pass or sampling fails, every request it
    /// touched ends with an output carrying the error (blocks freed) and the engine stays usable.
    pub fn step(&mut self) -> Result<Vec<RequestOutput>> {
        let scheduled = self.scheduler.schedule();
        if scheduled.is_empty() {
            return Ok(Vec::new());
        }
        let started = std::time::Instant::now();
        let logits = self.execute(&scheduled);
        // Where a served step's time goes, without a profiler: RUST_LOG=engine::engine=trace.
        tracing::trace!(
            chunks = scheduled.len(),
            tokens = scheduled.iter().map(|c| c.num_tokens).sum::<usize>(),
            ms = started.elapsed().as_secs_f64() * 1e3,
            "step"
        );
        let logits = match logits {
            Ok(l) => l,
            Err(e) => {
                let ids: Vec<SeqId> = scheduled.iter().map(|c| c.seq).collect();
                return Ok(self.fail(&ids, e));
            }
        };
        for c in &scheduled {
            let seq = self
                .scheduler
                .seqs
                .get_mut(&c.seq)
                .expect("scheduled exists");
            seq.num_computed += c.num_tokens;
            let computed = &seq.tokens[..seq.num_computed];
            self.scheduler.blocks.commit(c.seq, computed)?;
        }
        let to_sample: Vec<SeqId> = scheduled
            .iter()
            .filter(|c| c.sample)
            .map(|c| c.seq)
            .collect();
        let sampled = self.sample(&logits, &to_sample);
        let sampled = match sampled {
            Ok(s) => s,
            Err(e) => return Ok(self.fail(&to_sample, e)),
        };
        Ok(to_sample
            .into_iter()
            .zip(sampled)
            .map(|(id, tok)| self.append_token(id, tok))
            .collect())
    }

    fn execute(&mut self, scheduled: &[ScheduledChunk]) -> Result<StepOutput> {
        let seqs = &self.scheduler.seqs;
        let blocks = &self.scheduler.blocks;
        let chunks = scheduled
            .iter()
            .map(|c| {
                let seq = &seqs[&c.seq];
                SeqChunk {
                    tokens: &seq.tokens[seq.num_computed..seq.num_computed + c.num_tokens],
                    context_len: seq.num_computed,
                    block_table: blocks.block_table(c.seq).expect("scheduled has blocks"),
                    sample: c.sample,
                }
            })
            .collect();
        self.executor.execute(&ForwardBatch { chunks })
    }

    fn sample(&mut self, output: &StepOutput, ids: &[SeqId]) -> Result<Vec<SampledToken>> {
        let eos = &self.config.eos_token_ids;
        // Until min_tokens is reached, nothing may end the sequence.
        let suppressed: Vec<Vec<u32>> = ids
            .iter()
            .map(|id| {
                let seq = &self.scheduler.seqs[id];
                if seq.output().len() < seq.params.min_tokens {
                    eos.iter()
                        .chain(&seq.params.stop_token_ids)
                        .copied()
                        .collect()
                } else {
                    Vec::new()
                }
            })
            .collect();
        let mut by_id: HashMap<SeqId, &mut Sequence> = self
            .scheduler
            .seqs
            .iter_mut()
            .filter(|(id, _)| ids.contains(id))
            .map(|(id, s)| (*id, s))
            .collect();
        let mut rows: Vec<SamplerRow<'_>> = Vec::with_capacity(ids.len());
        // Rows must follow `ids` order; take each sequence out of the map once.
        for (id, suppressed) in ids.iter().zip(&suppressed) {
            let seq = by_id.remove(id).expect("sampled sequence exists");
            let (prompt, output) = seq.tokens.split_at(seq.prompt_len);
            rows.push(SamplerRow {
                params: &seq.params,
                rng: &mut seq.rng,
                prompt_tokens: prompt,
                output_tokens: output,
                suppressed_tokens: suppressed,
            });
        }
        match output {
            StepOutput::Logits(logits) => sample(logits, &mut rows),
            StepOutput::Chosen(tokens) => {
                Ok(take_chosen(tokens, &mut rows, self.executor.vocab_size()))
            }
        }
    }

    fn append_token(&mut self, id: SeqId, tok: SampledToken) -> RequestOutput {
        let seq = self.scheduler.seqs.get_mut(&id).expect("sequence exists");
        if seq.prefill_only {
            let request_id = seq.request_id.clone();
            let usage = PromptUsage {
                prompt_tokens: seq.prompt_len,
                cached_tokens: seq.cached_prompt_tokens.unwrap_or(0),
            };
            self.scheduler.hold(id);
            let block_ids = self.table_of(id);
            return RequestOutput::Prefilled {
                request_id,
                token: tok,
                block_ids,
                usage,
            };
        }
        seq.tokens.push(tok.token);
        seq.cumulative_logprob += tok.logprob as f64;
        let out_len = seq.output().len();
        let p = &seq.params;
        let ends = (!p.ignore_eos && self.config.eos_token_ids.contains(&tok.token))
            || p.stop_token_ids.contains(&tok.token);
        let finish = if ends && out_len >= p.min_tokens {
            Some(FinishReason::Stop)
        } else if out_len >= p.max_tokens || seq.tokens.len() >= self.config.max_context {
            Some(FinishReason::Length)
        } else {
            None
        };
        let request_id = seq.request_id.clone();
        let usage = PromptUsage {
            prompt_tokens: seq.prompt_len,
            cached_tokens: seq.cached_prompt_tokens.unwrap_or(0),
        };
        let tokens = vec![tok];
        match finish {
            None => RequestOutput::Tokens {
                request_id,
                tokens,
                usage,
            },
            Some(reason) => {
                self.finish(id);
                RequestOutput::Finished {
                    request_id,
                    tokens,
                    reason,
                    usage,
                }
            }
        }
    }

    fn fail(&mut self, ids: &[SeqId], error: EngineError) -> Vec<RequestOutput> {
        tracing::error!(requests = ids.len(), %error, "step failed");
        let error = Arc::new(error);
        let outputs = ids
            .iter()
            .filter_map(|id| self.scheduler.seqs.get(id))
            .map(|seq| RequestOutput::Failed {
                request_id: seq.request_id.clone(),
                error: error.clone(),
            })
            .collect();
        for &id in ids {
            self.finish(id);
        }
        outputs
    }

    fn finish(&mut self, id: SeqId) {
        if let Some(seq) = self.scheduler.remove(id) {
            self.ids.remove(&seq.request_id);
        }
    }

    /// Runs steps until every queued request finishes, or nothing can run (only requests
    /// waiting for a remote prefill, or waiting for blocks those hold); outputs in order.
    pub fn run_to_completion(&mut self) -> Result<Vec<RequestOutput>> {
        let mut all = Vec::new();
        while self.has_unfinished() {
            let out = self.step()?;
            if out.is_empty() && self.scheduler.num_running() == 0 {
                break;
            }
            all.extend(out);
        }
        Ok(all)
    }
}

/// The executor's own choices as sampled tokens. A chosen token that is suppressed (EOS
/// before `min_tokens`) gives way to the next id that is not, so the choice stays a function of
/// the step. Each certain token has log-probability 0; a sampling row still consumes its
/// random number, so seeded rows stay in step with a remote prefill's draw.
fn take_chosen(tokens: &[u32], rows: &mut [SamplerRow<'_>], vocab: usize) -> Vec<SampledToken> {
    let vocab = vocab.max(1) as u32;
    tokens
        .iter()
        .zip(rows.iter_mut())
        .map(|(&chosen, row)| {
            if !row.params.is_greedy() {
                row.rng.skip_draw();
            }
            let mut token = chosen % vocab;
            for _ in 0..vocab {
                if !row.suppressed_tokens.contains(&token) {
                    break;
                }
                token = (token + 1) % vocab;
            }
            let top_logprobs = match row.params.logprobs {
                Some(n) if n > 0 => std::iter::once((token, 0.0))
                    .chain((1..n as u32).map(|k| ((token + k) % vocab, -60.0)))
                    .collect(),
                _ => Vec::new(),
            };
            SampledToken {
                token,
                logprob: 0.0,
                top_logprobs,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ForwardBatch;

    /// Fails every step, as a device out of memory would.
    struct FailingExecutor;

    impl Executor for FailingExecutor {
        fn execute(&mut self, _batch: &ForwardBatch<'_>) -> Result<StepOutput> {
            Err(EngineError::StepFailed("simulated device failure".into()))
        }
        fn num_blocks(&self) -> usize {
            16
        }
        fn block_size(&self) -> usize {
            4
        }
        fn vocab_size(&self) -> usize {
            100
        }
    }

    #[test]
    fn a_failed_step_ends_each_of_its_requests_with_the_error_and_frees_blocks() {
        let config = EngineConfig {
            max_num_seqs: 8,
            max_num_batched_tokens: 64,
            prefill_chunk_while_decoding: 0,
            enable_prefix_caching: true,
            eos_token_ids: vec![0],
            max_context: 64,
        };
        let mut engine = Engine::new(Box::new(FailingExecutor), config, None);
        for id in ["a", "b"] {
            engine
                .add_request(Request {
                    request_id: id.into(),
                    prompt_token_ids: vec![1, 2, 3, 4, 5],
                    params: SamplingParams::greedy(4),
                })
                .unwrap();
        }
        let out = engine.step().expect("failures are reported per request");
        let mut failed: Vec<&str> = out.iter().map(|o| o.request_id()).collect();
        failed.sort();
        assert_eq!(failed, ["a", "b"]);
        for o in &out {
            match o {
                RequestOutput::Failed { error, .. } => {
                    assert!(error.to_string().contains("simulated device failure"))
                }
                other => panic!("expected a failure, got {other:?}"),
            }
        }
        assert!(!engine.has_unfinished());
        assert_eq!(engine.stats().kv_blocks_used, 0);
    }
}
