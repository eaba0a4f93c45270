//! What the processor knows of a served model: its tokenizer, chat template, EOS ids and
//! context. Built once from the engine's model card; shared by every request.

use std::sync::Arc;

use tokenizers::Tokenizer;

use crate::chat_template::{ChatMessage, ChatTemplate, TemplateError};

#[derive(Debug, thiserror::Error)]
pub enum PromptError {
    #[error("the model has no chat template; use /v1/completions")]
    NoChatTemplate,
    #[error(transparent)]
    Template(#[from] TemplateError),
    #[error("tokenizing the prompt failed: {0}")]
    Tokenize(String),
    #[error("the prompt is empty")]
    Empty,
    #[error("token id {token} is outside the vocabulary of {vocab_size}")]
    TokenOutOfVocab { token: u32, vocab_size: usize },
}

pub struct ServedModel {
    /// The name clients put in `model`.
    pub name: String,
    pub tokenizer: Arc<Tokenizer>,
    pub chat_template: Option<ChatTemplate>,
    pub eos_token_ids: Vec<u32>,
    /// Whether plain prompts get the tokenizer's special tokens (BOS).
    pub add_bos_token: bool,
    /// Longest sequence, prompt plus output.
    pub max_context: usize,
    /// Computed once: tokenizers' `get_vocab_size(true)` rebuilds the whole vocabulary map.
    pub vocab_size: usize,
}

impl ServedModel {
    /// Renders the conversation with the model's template and tokenizes it. Templates write
    /// their own special tokens, so none are added.
    pub fn chat_prompt(&self, messages: &[ChatMessage]) -> Result<Vec<u32>, PromptError> {
        let template = self
            .chat_template
            .as_ref()
            .ok_or(PromptError::NoChatTemplate)?;
        let text = template.render(messages, true)?;
        self.encode(&text, false)
    }

    pub fn text_prompt(&self, text: &str) -> Result<Vec<u32>, PromptError> {
        self.encode(text, self.add_bos_token)
    }

    /// Prompt ids given by the client, checked against the vocabulary.
    pub fn check_token_ids(&self, ids: &[u32]) -> Result<(), PromptError> {
        if ids.is_empty() {
            return Err(PromptError::Empty);
        }
        let vocab_size = self.vocab_size;
        match ids.iter().find(|&&t| t as usize >= vocab_size) {
            Some(&token) => Err(PromptError::TokenOutOfVocab { token, vocab_size }),
            None => Ok(()),
        }
    }

    /// The text of one token alone (logprob entries name tokens this way, as vLLM does).
    pub fn token_text(&self, id: u32) -> String {
        self.tokenizer.decode(&[id], false).unwrap_or_default()
    }

    fn encode(&self, text: &str, special: bool) -> Result<Vec<u32>, PromptError> {
        let ids = self
            .tokenizer
            .encode(text, special)
            .map_err(|e| PromptError::Tokenize(e.to_string()))?
            .get_ids()
            .to_vec();
        if ids.is_empty() {
            return Err(PromptError::Empty);
        }
        Ok(ids)
    }
}
