//! Engine errors: every bad file, tensor, prompt or parameter names what is wrong.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("cannot read `{path}`: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write `{path}`: {reason}")]
    Write { path: PathBuf, reason: String },
    #[error("`{path}` is not a valid GGUF file: {reason}")]
    InvalidGguf { path: PathBuf, reason: String },
    #[error("`{path}` is not a valid safetensors file: {reason}")]
    InvalidSafetensors { path: PathBuf, reason: String },
    #[error("unsupported tensor type `{kind}` for tensor `{tensor}`")]
    UnsupportedTensorType { kind: String, tensor: String },
    #[error("unsupported architecture `{0}` (supported: llama)")]
    UnsupportedArchitecture(String),
    #[error("unsupported quantization `{0}`")]
    UnsupportedQuantization(String),
    #[error("model is missing tensor `{0}`")]
    MissingTensor(String),
    #[error("tensor `{name}` has shape {actual:?}, expected {expected:?}")]
    ShapeMismatch {
        name: String,
        expected: Vec<i64>,
        actual: Vec<i64>,
    },
    #[error("invalid model config: {0}")]
    InvalidConfig(String),
    #[error("model `{0}` not found (give a GGUF file, a Hugging Face folder, or `smollm2`)")]
    ModelNotFound(String),
    #[error("tokenizer error: {0}")]
    Tokenizer(String),
    #[error("token id {token} is outside the vocabulary of {vocab_size}")]
    TokenOutOfVocab { token: u32, vocab_size: usize },
    #[error("invalid parameter `{param}`: {reason}")]
    InvalidParameter { param: &'static str, reason: String },
    #[error("logits of batch row {row} cannot be sampled: {reason}")]
    InvalidLogits { row: usize, reason: &'static str },
    #[error("forward step failed: {0}")]
    StepFailed(String),
    #[error("request `{0}` is not waiting for a remote prefill")]
    NotAwaitingPrefill(String),
    #[error("torch error: {0}")]
    Torch(#[from] tch::TchError),
    #[error(transparent)]
    Block(#[from] crate::block_manager::BlockError),
    #[error(transparent)]
    Admission(#[from] AdmissionError),
    #[error("KV block {block} does not exist (the cache has {num_blocks} blocks)")]
    NoSuchBlock { block: u32, num_blocks: usize },
    #[error("this executor keeps no KV cache (asked for block {0})")]
    NoKvCache(u32),
    #[error("KV block data of {got} bytes does not fit a block of {expected} bytes")]
    BlockDataSize { expected: usize, got: usize },
}

/// Why the engine refused a request before running it: the caller's fault, so each says which
/// request field to fix ([`AdmissionError::param`]).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AdmissionError {
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("prompt token id {token} is outside the vocabulary of {vocab_size}")]
    TokenOutOfVocab { token: u32, vocab_size: usize },
    #[error("prompt of {prompt_tokens} tokens plus `max_tokens` {max_tokens} exceeds the model context of {context} tokens")]
    ContextExceeded {
        prompt_tokens: usize,
        max_tokens: usize,
        context: usize,
    },
    #[error("the KV cache of {total_blocks} blocks cannot hold a sequence needing {needed_blocks} blocks (prompt plus `max_tokens`)")]
    SequenceTooLong {
        needed_blocks: usize,
        total_blocks: usize,
    },
    #[error("invalid parameter `{param}`: {reason}")]
    InvalidParameter { param: &'static str, reason: String },
    #[error("request `{0}` already exists")]
    DuplicateRequest(String),
    #[error("no free KV blocks for the prompt of request `{0}`")]
    NoFreeBlocks(String),
}

impl AdmissionError {
    /// The request field the client should change, when one is to blame.
    pub fn param(&self) -> Option<&'static str> {
        match self {
            AdmissionError::EmptyPrompt | AdmissionError::TokenOutOfVocab { .. } => Some("prompt"),
            AdmissionError::ContextExceeded { .. } | AdmissionError::SequenceTooLong { .. } => {
                Some("max_tokens")
            }
            AdmissionError::InvalidParameter { param, .. } => Some(param),
            AdmissionError::DuplicateRequest(_) | AdmissionError::NoFreeBlocks(_) => None,
        }
    }
}

impl From<runtime::protocol::InvalidParameter> for AdmissionError {
    fn from(e: runtime::protocol::InvalidParameter) -> Self {
        AdmissionError::InvalidParameter {
            param: e.param,
            reason: e.reason,
        }
    }
}

pub type Result<T, E = EngineError> = std::result::Result<T, E>;

impl From<runtime::protocol::InvalidParameter> for EngineError {
    fn from(e: runtime::protocol::InvalidParameter) -> Self {
        EngineError::InvalidParameter {
            param: e.param,
            reason: e.reason,
        }
    }
}
