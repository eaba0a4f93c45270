//! `MockExecutor`: the executor seam without a model. The scheduler, block manager, prefix
//! cache and KV events run unchanged above it; each step lets the roofline's time pass on its
//! clock and returns logits that make one token certain: a function of the chunk's last token
//! and position, so any sampling picks it and replays of the same prompts compare.

use std::sync::Arc;
use std::time::Duration;

use tch::{Device, Kind, Tensor};

use super::clock::Clock;
use super::timing::{Roofline, StepShape};
use crate::error::Result;
use crate::executor::Executor;
use crate::model::ForwardBatch;

/// The logit of the chosen token; every other is 0, so even temperature 2 picks it
/// (e^60 outweighs any vocabulary).
const CERTAIN: f64 = 60.0;

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
    fn execute(&mut self, batch: &ForwardBatch<'_>) -> Result<Tensor> {
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
        let chosen: Vec<i64> = batch
            .chunks
            .iter()
            .filter(|c| c.sample)
            .map(|c| {
                let last = c.tokens.last().copied().unwrap_or(0);
                i64::from(self.token_for(last, c.context_len + c.tokens.len()))
            })
            .collect();
        let rows = chosen.len() as i64;
        let logits = Tensor::f_zeros([rows, self.vocab_size as i64], (Kind::Float, Device::Cpu))?;
        let index = Tensor::from_slice(&chosen).view([rows, 1]);
        Ok(logits.f_scatter_value(1, &index, CERTAIN)?)
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
}
