//! Continuous batching, vLLM-style: each step spends a token budget
//! (`max_num_batched_tokens`) on running sequences first — decodes and unfinished prefill
//! chunks, in arrival order — then admits waiting sequences first-come first-served while
//! `max_num_seqs` allows, chunking any prompt longer than what is left of the budget. While
//! any sequence decodes, prefill chunks together take at most `prefill_chunk_while_decoding`
//! tokens of a step (decode first), so running streams keep their pace under long prompts. When
//! the KV cache runs out, the latest-arrived running sequence is preempted: its blocks are
//! freed (its full blocks stay in the prefix cache) and it waits to be recomputed.

use std::collections::{HashMap, VecDeque};

use crate::block_manager::{BlockError, BlockManager, SeqId};
use crate::sequence::{SeqStatus, Sequence};

#[derive(Clone, Debug)]
pub struct SchedulerConfig {
    pub max_num_seqs: usize,
    pub max_num_batched_tokens: usize,
    /// Decode first: while any sequence decodes, a step's prefill tokens stay under this, so
    /// a long prompt delays running streams by one short chunk per token, not by a full
    /// budget's worth. 0 lets prefill take the whole budget.
    pub prefill_chunk_while_decoding: usize,
}

/// One sequence's share of a step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScheduledChunk {
    pub seq: SeqId,
    /// Tokens computed this step, starting at the sequence's `num_computed`.
    pub num_tokens: usize,
    /// The chunk reaches the sequence's last token, so a new token is sampled.
    pub sample: bool,
}

pub struct Scheduler {
    config: SchedulerConfig,
    pub(crate) blocks: BlockManager,
    pub(crate) seqs: HashMap<SeqId, Sequence>,
    waiting: VecDeque<SeqId>,
    /// In arrival order; the tail is preempted first.
    running: Vec<SeqId>,
    num_preemptions: u64,
}

impl Scheduler {
    pub fn new(config: SchedulerConfig, blocks: BlockManager) -> Self {
        Scheduler {
            config,
            blocks,
            seqs: HashMap::new(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            num_preemptions: 0,
        }
    }

    pub fn add(&mut self, seq: Sequence) {
        let id = seq.id;
        match seq.status {
            SeqStatus::Waiting => self.waiting.push_back(id),
            SeqStatus::Running => self.running.push(id),
            SeqStatus::RemotePrefill | SeqStatus::Held => {}
        }
        self.seqs.insert(id, seq);
    }

    /// Moves a sequence whose KV was filled elsewhere into the running set.
    pub fn start_running(&mut self, id: SeqId) {
        if let Some(seq) = self.seqs.get_mut(&id) {
            seq.status = SeqStatus::Running;
            self.running.push(id);
        }
    }

    /// Takes a running sequence out of the batch and keeps its blocks (a finished prefill-only
    /// sequence whose KV is still to be read out).
    pub fn hold(&mut self, id: SeqId) {
        self.running.retain(|&s| s != id);
        if let Some(seq) = self.seqs.get_mut(&id) {
            seq.status = SeqStatus::Held;
        }
    }

    /// A sequence that was waiting for a remote prefill computes its prompt here after all:
    /// its reserved blocks are freed and it queues ahead of new arrivals, as a preempted one.
    pub fn prefill_locally(&mut self, id: SeqId) -> bool {
        let Some(seq) = self.seqs.get_mut(&id) else {
            return false;
        };
        if seq.status != SeqStatus::RemotePrefill {
            return false;
        }
        seq.status = SeqStatus::Waiting;
        seq.num_computed = 0;
        // What usage reports is decided again at admission.
        seq.cached_prompt_tokens = None;
        self.blocks.free(id);
        self.waiting.push_front(id);
        true
    }

    /// Drops a sequence wherever it is and frees its blocks at once.
    pub fn remove(&mut self, id: SeqId) -> Option<Sequence> {
        let seq = self.seqs.remove(&id)?;
        self.waiting.retain(|&s| s != id);
        self.running.retain(|&s| s != id);
        self.blocks.free(id);
        Some(seq)
    }

    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn num_preemptions(&self) -> u64 {
        self.num_preemptions
    }

    pub fn has_work(&self) -> bool {
        !self.running.is_empty() || !self.waiting.is_empty()
    }

    /// Picks this step's chunks and reserves their KV slots.
    pub fn schedule(&mut self) -> Vec<ScheduledChunk> {
        let mut budget = self.config.max_num_batched_tokens;
        let cap = self.config.prefill_chunk_while_decoding;
        let decoding = self.running.iter().any(|id| self.seqs[id].remaining() == 1);
        // Tokens left for chunks of more than one token (prefills) this step.
        let mut prefill_left = if decoding && cap > 0 { cap } else { usize::MAX };
        let mut out = Vec::new();

        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let id = self.running[i];
            let seq = &self.seqs[&id];
            let remaining = seq.remaining();
            let n = if remaining > 1 {
                remaining.min(budget).min(prefill_left)
            } else {
                remaining.min(budget)
            };
            if n == 0 {
                // A prefill past this step's prefill share: it waits, decodes behind it go on.
                i += 1;
                continue;
            }
            let needed = seq.num_computed + n;
            match self.blocks.append_slots(id, needed) {
                Ok(()) => {
                    let sample = n == seq.remaining();
                    out.push(ScheduledChunk {
                        seq: id,
                        num_tokens: n,
                        sample,
                    });
                    budget -= n;
                    if remaining > 1 {
                        prefill_left = prefill_left.saturating_sub(n);
                    }
                    i += 1;
                }
                Err(_) => {
                    // Free the youngest sequence and retry; if that is this one, stop here.
                    let victim = *self.running.last().expect("running is not empty");
                    self.preempt(victim);
                    if victim == id {
                        break;
                    }
                }
            }
        }

        while budget > 0 && prefill_left > 0 && self.running.len() < self.config.max_num_seqs {
            let Some(&id) = self.waiting.front() else {
                break;
            };
            let seq = self.seqs.get_mut(&id).expect("waiting sequence exists");
            let cached = match self.blocks.allocate(id, &seq.tokens) {
                Ok(cached) => cached,
                Err(BlockError::OutOfBlocks(_)) => break,
                Err(e) => unreachable!("scheduler keeps block tables consistent: {e}"),
            };
            seq.num_computed = cached;
            seq.cached_prompt_tokens
                .get_or_insert(cached.min(seq.prompt_len));
            seq.status = SeqStatus::Running;
            let n = seq.remaining().min(budget);
            let n = if n > 1 { n.min(prefill_left) } else { n };
            prefill_left = prefill_left.saturating_sub(if n > 1 { n } else { 0 });
            out.push(ScheduledChunk {
                seq: id,
                num_tokens: n,
                sample: n == seq.remaining(),
            });
            budget -= n;
            self.waiting.pop_front();
            self.running.push(id);
        }
        out
    }

    fn preempt(&mut self, id: SeqId) {
        self.running.retain(|&s| s != id);
        self.blocks.free(id);
        if let Some(seq) = self.seqs.get_mut(&id) {
            seq.num_computed = 0;
            seq.status = SeqStatus::Waiting;
        }
        // Ahead of new arrivals: it was admitted before them.
        self.waiting.push_front(id);
        self.num_preemptions += 1;
        tracing::debug!(seq = id, "preempted (KV cache full), will recompute");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block_manager::BlockManagerConfig;
    use crate::sampler::{SamplingParams, SequenceRng};

    fn seq(id: SeqId, prompt: usize) -> Sequence {
        Sequence {
            id,
            request_id: format!("r{id}"),
            prompt_len: prompt,
            tokens: (0..prompt as u32).map(|t| t + 1000 * id as u32).collect(),
            num_computed: 0,
            rng: SequenceRng::new(Some(0)),
            params: SamplingParams::greedy(100),
            status: SeqStatus::Waiting,
            cached_prompt_tokens: None,
            cumulative_logprob: 0.0,
            prefill_only: false,
        }
    }

    fn scheduler(cap: usize) -> Scheduler {
        let blocks = BlockManager::new(
            BlockManagerConfig {
                num_blocks: 256,
                block_size: 16,
                enable_prefix_caching: false,
            },
            None,
        );
        Scheduler::new(
            SchedulerConfig {
                max_num_seqs: 16,
                max_num_batched_tokens: 2048,
                prefill_chunk_while_decoding: cap,
            },
            blocks,
        )
    }

    /// Applies a step as the engine would: chunks computed, a token appended where sampled.
    fn finish(s: &mut Scheduler, chunks: &[ScheduledChunk]) {
        for c in chunks {
            let seq = s.seqs.get_mut(&c.seq).expect("scheduled sequence");
            seq.num_computed += c.num_tokens;
            if c.sample {
                seq.tokens.push(7);
            }
        }
    }

    /// Two streams decoding, then a 3 000-token prompt: returns (prefill tokens, decodes) per
    /// step until the prompt is computed.
    fn long_prompt_under_decodes(cap: usize) -> Vec<(usize, usize)> {
        let mut s = scheduler(cap);
        s.add(seq(1, 40));
        s.add(seq(2, 50));
        let first = s.schedule();
        finish(&mut s, &first);
        s.add(seq(3, 3000));
        let mut steps = Vec::new();
        while s.seqs[&3].num_computed < 3000 {
            let chunks = s.schedule();
            let prefill = chunks
                .iter()
                .filter(|c| c.seq == 3)
                .map(|c| c.num_tokens)
                .sum();
            let decodes = chunks.iter().filter(|c| c.seq != 3).count();
            finish(&mut s, &chunks);
            steps.push((prefill, decodes));
        }
        steps
    }

    #[test]
    fn while_streams_decode_a_long_prompt_prefills_in_capped_chunks_beside_them() {
        let steps = long_prompt_under_decodes(512);
        assert_eq!(steps.len(), 6, "3 000 tokens in chunks of 512: {steps:?}");
        for (i, &(prefill, decodes)) in steps.iter().enumerate() {
            assert!(prefill <= 512, "step {i}: {prefill} prefill tokens");
            assert_eq!(decodes, 2, "step {i}: both streams decode every step");
        }
        // Off, the prompt takes the rest of the budget: two steps.
        let steps = long_prompt_under_decodes(0);
        assert_eq!(
            steps.iter().map(|s| s.0).collect::<Vec<_>>(),
            vec![2046, 954]
        );
    }

    #[test]
    fn with_nothing_decoding_prefill_takes_the_whole_budget() {
        let mut s = scheduler(512);
        s.add(seq(1, 3000));
        s.add(seq(2, 100));
        let chunks = s.schedule();
        assert_eq!(chunks.len(), 1);
        assert_eq!(chunks[0].num_tokens, 2048);
    }
}
