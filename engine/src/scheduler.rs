//! Continuous batching, vLLM-style: each step spends a token budget
//! (`max_num_batched_tokens`) on running sequences first — decodes and unfinished prefill
//! chunks, in arrival order — then admits waiting sequences first-come first-served while
//! `max_num_seqs` allows, chunking any prompt longer than what is left of the budget. When
//! the KV cache runs out, the latest-arrived running sequence is preempted: its blocks are
//! freed (its full blocks stay in the prefix cache) and it waits to be recomputed.

use std::collections::{HashMap, VecDeque};

use crate::block_manager::{BlockError, BlockManager, SeqId};
use crate::sequence::{SeqStatus, Sequence};

#[derive(Clone, Debug)]
pub struct SchedulerConfig {
    pub max_num_seqs: usize,
    pub max_num_batched_tokens: usize,
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
        let mut out = Vec::new();

        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let id = self.running[i];
            let seq = &self.seqs[&id];
            let n = seq.remaining().min(budget);
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

        while budget > 0 && self.running.len() < self.config.max_num_seqs {
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
