//! Incremental detokenization: turns each new token id into the text it adds, never emitting a
//! broken UTF-8 character. Byte-level BPE splits a multi-byte character across tokens, and
//! decoding a token alone loses context (leading spaces), so each step decodes a short window
//! ending at the new token and emits only what the window adds over its previous decode —
//! the prefix/read offset scheme of TGI and vLLM.

use std::sync::Arc;

use tokenizers::Tokenizer;

/// Tokens of context before the first new token (enough for any merge or space rule).
const CONTEXT_TOKENS: usize = 5;

#[derive(Debug, thiserror::Error)]
#[error("detokenization failed: {0}")]
pub struct DetokenizeError(String);

/// Owns a handle on the tokenizer so a response stream can carry it across await points.
pub struct Detokenizer {
    tokenizer: Arc<Tokenizer>,
    skip_special_tokens: bool,
    ids: Vec<u32>,
    /// Start of the decode window.
    prefix_offset: usize,
    /// Tokens before this index have been emitted as text.
    read_offset: usize,
}

impl Detokenizer {
    /// `context`: the prompt (or its tail); its text is never emitted.
    pub fn new(tokenizer: Arc<Tokenizer>, context: &[u32], skip_special_tokens: bool) -> Self {
        let tail = &context[context.len().saturating_sub(CONTEXT_TOKENS)..];
        Self {
            tokenizer,
            skip_special_tokens,
            ids: tail.to_vec(),
            prefix_offset: 0,
            read_offset: tail.len(),
        }
    }

    /// The text `token` adds; empty while it ends inside a multi-byte character.
    pub fn push(&mut self, token: u32) -> Result<String, DetokenizeError> {
        self.ids.push(token);
        let prefix = self.decode(self.prefix_offset, self.read_offset)?;
        let full = self.decode(self.prefix_offset, self.ids.len())?;
        if full.len() <= prefix.len() || full.ends_with('\u{FFFD}') {
            return Ok(String::new());
        }
        // Decoding more tokens can rewrite the window's start (rare; cleanup rules), so
        // compare on a char boundary rather than trusting `prefix` to be a byte prefix.
        let split = if full.starts_with(&prefix) {
            prefix.len()
        } else {
            common_prefix_len(&prefix, &full)
        };
        let delta = full[split..].to_string();
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        self.compact();
        Ok(delta)
    }

    /// Text still held because it ended inside a character (replacement chars included):
    /// emitted when the stream ends so that nothing the model produced is lost.
    pub fn flush(&mut self) -> Result<String, DetokenizeError> {
        if self.read_offset == self.ids.len() {
            return Ok(String::new());
        }
        let prefix = self.decode(self.prefix_offset, self.read_offset)?;
        let full = self.decode(self.prefix_offset, self.ids.len())?;
        self.prefix_offset = self.ids.len();
        self.read_offset = self.ids.len();
        Ok(full
            .get(common_prefix_len(&prefix, &full)..)
            .unwrap_or_default()
            .to_string())
    }

    fn decode(&self, from: usize, to: usize) -> Result<String, DetokenizeError> {
        self.tokenizer
            .decode(&self.ids[from..to], self.skip_special_tokens)
            .map_err(|e| DetokenizeError(e.to_string()))
    }

    /// Keeps the id buffer bounded on long generations.
    fn compact(&mut self) {
        if self.prefix_offset > 4 * CONTEXT_TOKENS {
            self.ids.drain(..self.prefix_offset);
            self.read_offset -= self.prefix_offset;
            self.prefix_offset = 0;
        }
    }
}

fn common_prefix_len(a: &str, b: &str) -> usize {
    a.char_indices()
        .zip(b.chars())
        .find(|((_, ca), cb)| ca != cb)
        .map_or(a.len().min(b.len()), |((i, _), _)| i)
}
