//! `MockExecutor`: the executor seam without a model. The scheduler, block manager, prefix
//! cache and KV events run unchanged above it; each step lets the roofline's time pass on its
//! clock and names each sampling row's token itself (no logits, no libtorch on the hot path): a
//! function of the chunk's last token and position, so replays of the same prompts compare
//! and any sampling parameters give the same text.

use std::sync::Arc;
use std::time::Duration;

use super::clock::Clock;
use super::timing::{Roofline, StepShape};
use crate::error::Result;
use crate::executor::{Executor, StepOutput};
use crate::model::ForwardBatch;

pub struct MockExecutor {
    roofline: Roofline,
    clock: Arc<dyn Clock>,
    num_blocks: usize,
    block_size: usize,
    vocab_size: usize,
    /// Lowest id generated: ids below it are often special tokens of the tokenizer.
    first_id: u32,
    simulated: Duration,
    steps: u64,
}

impl MockExecutor {
    pub fn new(
        roofline: Roofline,
        clock: Arc<dyn Clock>,
        num_blocks: usize,
        block_size: usize,
        vocab_size: usize,
    ) -> Self {
        Self {
            roofline,
            clock,
            num_blocks,
            block_size,
            vocab_size,
            first_id: (vocab_size as u32 / 100).min(1000),
            simulated: Duration::ZERO,
            steps: 0,
        }
    }

    /// The token the mock generates after `last` at `position`.
    pub fn token_for(&self, last: u32, position: usize) -> u32 {
        let h = xxhash_rust::xxh3::xxh3_64(
            &[u64::from(last), position as u64]
                .map(u64::to_le_bytes)
                .concat(),
        );
        let span = (self.vocab_size as u32)
            .saturating_sub(self.first_id)
            .max(1);
        self.first_id + (h % u64::from(span)) as u32
    }

    /// Simulated time spent in steps so far, and the number of steps.
    pub fn simulated(&self) -> (Duration, u64) {
        (self.simulated, self.steps)
    }
}

impl Executor for MockExecutor {
    fn execute(&mut self, batch: &ForwardBatch<'_>) -> Result<StepOutput> {
        let shape = StepShape {
            chunks: batch
                .chunks
                .iter()
                .map(|c| (c.tokens.len(), c.context_len))
                .collect(),
        };
        let t = Duration::from_secs_f64(self.roofline.step_seconds(&shape));
        self.clock.advance(t);
        self.simulated += t;
        self.steps += 1;
        Ok(StepOutput::Chosen(
            batch
                .chunks
                .iter()
                .filter(|c| c.sample)
                .map(|c| {
                    let last = c.tokens.last().copied().unwrap_or(0);
                    self.token_for(last, c.context_len + c.tokens.len())
                })
                .collect(),
        ))
    }

    fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    fn block_size(&self) -> usize {
        self.block_size
    }

    fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// The mock keeps no KV: a block is empty, and a simulated transfer stands for its bytes.
    fn read_kv_block(&self, block: u32) -> Result<Vec<u8>> {
        if block as usize >= self.num_blocks {
            return Err(crate::error::EngineError::NoSuchBlock {
                block,
                num_blocks: self.num_blocks,
            });
        }
        Ok(Vec::new())
    }

    fn write_kv_block(&mut self, block: u32, _data: &[u8]) -> Result<()> {
        if block as usize >= self.num_blocks {
            return Err(crate::error::EngineError::NoSuchBlock {
                block,
                num_blocks: self.num_blocks,
            });
        }
        Ok(())
    }
}
