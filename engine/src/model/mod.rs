//! The Llama-family transformer (Llama 2/3, SmolLM2, DeepSeek-R1-Distill-Llama) over a paged KV
//! cache. One forward step takes a batch of sequence chunks — decode tokens and prefill chunks
//! mixed — and returns logits only for the chunks that end where a token is to be sampled.

mod attention;
mod cpu;
mod linear;
mod llama;
pub mod rope;

pub use cpu::Isa;
pub use linear::Linear;
pub use llama::Llama;

/// New tokens of one sequence for one step.
#[derive(Clone, Debug)]
pub struct SeqChunk<'a> {
    pub tokens: &'a [u32],
    /// Tokens of this sequence already in the KV cache (the chunk's first position).
    pub context_len: usize,
    /// Covers at least `context_len + tokens.len()` positions.
    pub block_table: &'a [u32],
    /// Return logits for the chunk's last token.
    pub sample: bool,
}

#[derive(Clone, Debug, Default)]
pub struct ForwardBatch<'a> {
    pub chunks: Vec<SeqChunk<'a>>,
}

impl ForwardBatch<'_> {
    pub fn num_tokens(&self) -> usize {
        self.chunks.iter().map(|c| c.tokens.len()).sum()
    }

    pub fn num_samples(&self) -> usize {
        self.chunks.iter().filter(|c| c.sample).count()
    }
}
