//! A sequence as the scheduler tracks it: its tokens, how many have KV computed, and its
//! sampling state.

use crate::block_manager::SeqId;
use crate::sampler::{SamplingParams, SequenceRng};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SeqStatus {
    Waiting,
    Running,
    /// Blocks allocated; KV being filled by a prefill worker.
    RemotePrefill,
    /// Prefill-only: computed and its first token sampled; blocks kept until released, so the
    /// prefill worker can read them out.
    Held,
}

pub struct Sequence {
    pub id: SeqId,
    pub request_id: String,
    pub prompt_len: usize,
    /// Prompt followed by the output so far.
    pub tokens: Vec<u32>,
    /// Leading tokens whose KV is in the cache.
    pub num_computed: usize,
    pub params: SamplingParams,
    pub rng: SequenceRng,
    pub status: SeqStatus,
    /// Prompt tokens served from the prefix cache at first admission (what usage reports).
    pub cached_prompt_tokens: Option<usize>,
    /// Sum of the sampled tokens' logprobs.
    pub cumulative_logprob: f64,
    /// A prefill worker's job: stop after the prompt and hold the blocks.
    pub prefill_only: bool,
}

impl Sequence {
    pub fn output(&self) -> &[u32] {
        &self.tokens[self.prompt_len..]
    }

    pub fn remaining(&self) -> usize {
        self.tokens.len() - self.num_computed
    }
}
