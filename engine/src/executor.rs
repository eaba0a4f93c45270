//! The executor seam: what runs a forward step. `ModelExecutor` runs the Llama model on tch
//! and owns the paged KV cache; a mock executor (benchmarks without a model) plugs in here.

use std::panic::{catch_unwind, AssertUnwindSafe};

use tch::Tensor;

use crate::error::{EngineError, Result};
use crate::kv_cache::KvCache;
use crate::model::{ForwardBatch, Llama};

/// What a step gives the sampler, one row per chunk with `sample`, in chunk order.
pub enum StepOutput {
    /// Logits `[num_samples, vocab]`: the sampler chooses (penalties, temperature, top-k/p).
    Logits(Tensor),
    /// The executor chose each row's token itself (the mock engine, whose tokens are a function
    /// of position): no vocabulary-wide tensor is built, and only `min_tokens` still applies.
    Chosen(Vec<u32>),
}

impl From<Tensor> for StepOutput {
    fn from(logits: Tensor) -> Self {
        StepOutput::Logits(logits)
    }
}

pub trait Executor: Send {
    /// Runs one step.
    fn execute(&mut self, batch: &ForwardBatch<'_>) -> Result<StepOutput>;
    fn num_blocks(&self) -> usize;
    fn block_size(&self) -> usize;
    fn vocab_size(&self) -> usize;

    /// Bytes of one KV block over every layer (0 for an executor that keeps no KV).
    fn kv_block_bytes(&self) -> usize {
        0
    }

    /// Block `block` of every layer, layer after layer, each `[2, block_size, kv_heads,
    /// head_dim]` in the cache dtype: what kv-transfer moves between workers.
    fn read_kv_block(&self, block: u32) -> Result<Vec<u8>> {
        Err(EngineError::NoKvCache(block))
    }

    /// Overwrites block `block` of every layer with bytes [`Executor::read_kv_block`] gave.
    fn write_kv_block(&mut self, block: u32, _data: &[u8]) -> Result<()> {
        Err(EngineError::NoKvCache(block))
    }
}

pub struct ModelExecutor {
    model: Llama,
    cache: KvCache,
}

impl ModelExecutor {
    pub fn new(model: Llama, num_blocks: usize, block_size: usize) -> Self {
        let cache = KvCache::new(
            model.config(),
            num_blocks,
            block_size,
            model.kind(),
            model.device(),
        );
        ModelExecutor { model, cache }
    }

    /// Over a cache built elsewhere (say, in a kv-transfer sink's memory).
    pub fn with_cache(model: Llama, cache: KvCache) -> Self {
        ModelExecutor { model, cache }
    }

    pub fn model(&self) -> &Llama {
        &self.model
    }

    pub fn kv_cache(&self) -> &KvCache {
        &self.cache
    }
}

impl Executor for ModelExecutor {
    fn execute(&mut self, batch: &ForwardBatch<'_>) -> Result<StepOutput> {
        // tch turns a libtorch exception (say, out of memory) into a panic; a failed step must
        // fail its requests, not the process.
        catch_unwind(AssertUnwindSafe(|| {
            self.model.forward(batch, &mut self.cache)
        }))
        .map_err(|panic| {
            let msg = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown failure".to_string());
            EngineError::StepFailed(msg)
        })
        .map(StepOutput::Logits)
    }

    fn num_blocks(&self) -> usize {
        self.cache.num_blocks()
    }

    fn block_size(&self) -> usize {
        self.cache.block_size()
    }

    fn vocab_size(&self) -> usize {
        self.model.config().vocab_size
    }

    fn kv_block_bytes(&self) -> usize {
        self.cache.block_bytes()
    }

    fn read_kv_block(&self, block: u32) -> Result<Vec<u8>> {
        self.cache.read_block(block)
    }

    fn write_kv_block(&mut self, block: u32, data: &[u8]) -> Result<()> {
        self.cache.write_block(block, data)
    }
}
