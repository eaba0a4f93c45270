//! Architecture hyper-parameters of a Llama-family model, as read from GGUF metadata or config.json.

use serde::{Deserialize, Serialize};

use crate::error::{EngineError, Result};

/// Llama-3 style frequency-dependent RoPE scaling (`rope_type: llama3`), or plain linear scaling.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum RopeScaling {
    Linear {
        factor: f64,
    },
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
}

/// The longest context a config may give: 2^24 positions, above the longest Llama-family
/// context published (Llama 4 Scout's 10M).
pub const MAX_POSITIONS: usize = 1 << 24;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    pub rms_norm_eps: f64,
    pub tie_word_embeddings: bool,
}

impl LlamaConfig {
    /// Rejects configs the model code cannot run, naming the offending key.
    pub fn validate(&self) -> Result<()> {
        let bad = |what: &str| Err(EngineError::InvalidConfig(what.to_string()));
        if self.hidden_size == 0 || self.num_hidden_layers == 0 || self.vocab_size == 0 {
            return bad("`hidden_size`, `num_hidden_layers` and `vocab_size` must be positive");
        }
        if self.num_attention_heads == 0 || self.num_key_value_heads == 0 {
            return bad("`num_attention_heads` and `num_key_value_heads` must be positive");
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            return bad("`num_attention_heads` must be a multiple of `num_key_value_heads`");
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) {
            return bad("`head_dim` must be positive and even");
        }
        // The model builds its RoPE tables for every position up front; a corrupt context
        // length (2^32) would make that an allocation of hundreds of gigabytes, which libtorch
        // reports by panicking.
        if self.max_position_embeddings == 0 || self.max_position_embeddings > MAX_POSITIONS {
            return Err(EngineError::InvalidConfig(format!(
                "`max_position_embeddings` (the context length) is {}, outside 1..={MAX_POSITIONS}",
                self.max_position_embeddings
            )));
        }
        Ok(())
    }

    /// Parameters held by the weights (for bandwidth and roofline arithmetic).
    pub fn num_parameters(&self) -> usize {
        let h = self.hidden_size;
        let q = self.num_attention_heads * self.head_dim;
        let kv = self.num_key_value_heads * self.head_dim;
        let per_layer = h * q * 2 + h * kv * 2 + 3 * h * self.intermediate_size + 2 * h;
        let embed = self.vocab_size * h;
        let head = if self.tie_word_embeddings { 0 } else { embed };
        self.num_hidden_layers * per_layer + embed + head + h
    }
}
