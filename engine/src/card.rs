//! A model card: what a loader knows about a model besides its weights.

use crate::config::LlamaConfig;

#[derive(Clone)]
pub struct ModelCard {
    /// Display name (GGUF `general.name`, or the folder name).
    pub name: String,
    pub config: LlamaConfig,
    pub tokenizer: tokenizers::Tokenizer,
    /// Jinja chat template, when the model ships one.
    pub chat_template: Option<String>,
    pub bos_token_id: Option<u32>,
    /// Every id that ends generation (Llama 3 has several).
    pub eos_token_ids: Vec<u32>,
    /// Whether plain (non-chat) prompts get BOS prepended.
    pub add_bos_token: bool,
    /// Longest sequence (prompt + output) the model accepts.
    pub max_context: usize,
}

impl ModelCard {
    /// The card with its context capped by `--max-model-len` and the model's position table:
    /// the one place the limit is applied, so frontend and engine check the same number.
    pub fn with_max_model_len(mut self, max_model_len: Option<usize>) -> Self {
        self.max_context = max_model_len
            .map_or(self.max_context, |m| m.min(self.max_context))
            .min(self.config.max_position_embeddings);
        self
    }
}

impl std::fmt::Debug for ModelCard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelCard")
            .field("name", &self.name)
            .field("config", &self.config)
            .field("bos_token_id", &self.bos_token_id)
            .field("eos_token_ids", &self.eos_token_ids)
            .field("max_context", &self.max_context)
            .finish_non_exhaustive()
    }
}
