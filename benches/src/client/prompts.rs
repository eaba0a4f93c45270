//! Synthetic prompts of an exact length in the served model's tokenizer, as aiperf and
//! genai-perf make them: random words whose tokens survive a decode/encode round trip one for
//! one, so a prompt of N drawn tokens is N tokens again when the server tokenizes its text.
//! Prompt k of a run starts with two tokens that spell k, so no two requests share a prefix
//! (and a KV-cache hit) unless `--shared-prefix-tokens` asks for one.

use std::path::Path;

use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal};
use tokenizers::Tokenizer;

use crate::trace::{BlockTokens, TraceRequest, MOONCAKE_BLOCK_TOKENS};

#[derive(Debug, thiserror::Error)]
pub enum PromptError {
    #[error("cannot load the tokenizer `{what}`: {reason}")]
    Tokenizer { what: String, reason: String },
    #[error("the tokenizer `{0}` has too few plain word tokens to build prompts from")]
    Alphabet(String),
    #[error("tokenizer error: {0}")]
    Encode(String),
    #[error("cannot build a prompt of exactly {0} tokens with this tokenizer")]
    Length(usize),
    #[error("--{name} {value}: {reason}")]
    Bad {
        name: &'static str,
        value: String,
        reason: &'static str,
    },
}

/// Loads a tokenizer: a `tokenizer.json`, a Hugging Face folder, a GGUF file (its metadata),
/// or `smollm2`.
pub fn load_tokenizer(what: &str) -> Result<Tokenizer, PromptError> {
    let err = |reason: String| PromptError::Tokenizer {
        what: what.to_string(),
        reason,
    };
    let path = Path::new(what);
    if path.is_file() && path.extension().is_some_and(|e| e == "json") {
        return Tokenizer::from_file(path).map_err(|e| err(e.to_string()));
    }
    if path.is_dir() && path.join("tokenizer.json").is_file() {
        return Tokenizer::from_file(path.join("tokenizer.json")).map_err(|e| err(e.to_string()));
    }
    engine::loader::load_card(what)
        .map(|card| card.tokenizer)
        .map_err(|e| err(e.to_string()))
}

/// A length distribution: a mean, and a standard deviation (0: every request the same).
#[derive(Clone, Copy, Debug)]
pub struct Length {
    pub mean: usize,
    pub stddev: f64,
}

impl Length {
    pub fn new(name: &'static str, mean: usize, stddev: f64) -> Result<Self, PromptError> {
        if mean == 0 {
            return Err(PromptError::Bad {
                name,
                value: mean.to_string(),
                reason: "must be at least 1",
            });
        }
        if !stddev.is_finite() || stddev < 0.0 {
            return Err(PromptError::Bad {
                name,
                value: stddev.to_string(),
                reason: "a standard deviation is a finite number ≥ 0",
            });
        }
        Ok(Length { mean, stddev })
    }

    fn draw(&self, rng: &mut impl Rng) -> usize {
        if self.stddev == 0.0 {
            return self.mean;
        }
        let normal = Normal::new(self.mean as f64, self.stddev).expect("checked in new");
        normal.sample(rng).round().max(1.0) as usize
    }
}

/// One request's input: its text (what is sent), its token count in the tokenizer, and the
/// output length it asks for.
#[derive(Clone, Debug)]
pub struct Prompt {
    pub text: String,
    pub input_tokens: usize,
    pub output_tokens: usize,
}

/// Builds prompts for one run; prompt k depends only on (seed, k).
pub struct PromptSource {
    tokenizer: Tokenizer,
    /// Tokens that decode to a space and a plain word, and encode back to themselves.
    alphabet: Vec<u32>,
    isl: Length,
    osl: Length,
    shared_prefix: Vec<u32>,
    seed: u64,
}

impl PromptSource {
    pub fn new(
        tokenizer: Tokenizer,
        name: &str,
        isl: Length,
        osl: Length,
        shared_prefix_tokens: usize,
        seed: u64,
    ) -> Result<Self, PromptError> {
        let alphabet = word_alphabet(&tokenizer)?;
        if alphabet.len() < 256 {
            return Err(PromptError::Alphabet(name.to_string()));
        }
        if shared_prefix_tokens >= isl.mean {
            return Err(PromptError::Bad {
                name: "shared-prefix-tokens",
                value: shared_prefix_tokens.to_string(),
                reason: "must be shorter than --isl",
            });
        }
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(u64::MAX);
        let shared_prefix = (0..shared_prefix_tokens)
            .map(|_| alphabet[rng.random_range(0..alphabet.len())])
            .collect();
        Ok(PromptSource {
            tokenizer,
            alphabet,
            isl,
            osl,
            shared_prefix,
            seed,
        })
    }

    /// The k-th prompt of the run.
    pub fn prompt(&self, k: u64) -> Result<Prompt, PromptError> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(self.seed);
        rng.set_stream(k);
        let isl = self.isl.draw(&mut rng).max(self.shared_prefix.len() + 2);
        let output_tokens = self.osl.draw(&mut rng);
        let a = self.alphabet.len() as u64;
        let mut ids = self.shared_prefix.clone();
        // Two tokens spelling k: distinct starts for a² requests.
        ids.push(self.alphabet[(k % a) as usize]);
        ids.push(self.alphabet[((k / a) % a) as usize]);
        while ids.len() < isl {
            ids.push(self.alphabet[rng.random_range(0..self.alphabet.len())]);
        }
        let (text, input_tokens) = self.exact(ids, isl, &mut rng)?;
        Ok(Prompt {
            text,
            input_tokens,
            output_tokens,
        })
    }

    /// A trace request's prompt: its hash ids as blocks of word tokens (equal ids, equal text).
    pub fn trace_prompt(&self, r: &TraceRequest) -> Result<Prompt, PromptError> {
        let blocks = BlockTokens::new(self.alphabet.clone(), MOONCAKE_BLOCK_TOKENS, self.seed);
        let ids = blocks.prompt(r);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(self.seed ^ r.timestamp_ms);
        let (text, input_tokens) = self.exact(ids, r.input_length, &mut rng)?;
        Ok(Prompt {
            text,
            input_tokens,
            output_tokens: r.output_length.max(1),
        })
    }

    /// Decodes `ids` and trims or extends the tail until the text is `want` tokens again (a
    /// rare merge across words can change the count).
    fn exact(
        &self,
        mut ids: Vec<u32>,
        want: usize,
        rng: &mut impl Rng,
    ) -> Result<(String, usize), PromptError> {
        for _ in 0..64 {
            let text = self
                .tokenizer
                .decode(&ids, false)
                .map_err(|e| PromptError::Encode(e.to_string()))?;
            let n = self.count(&text)?;
            match n.cmp(&want) {
                std::cmp::Ordering::Equal => return Ok((text, n)),
                std::cmp::Ordering::Greater => {
                    let cut = (n - want).min(ids.len().saturating_sub(1));
                    ids.truncate(ids.len() - cut.max(1));
                }
                std::cmp::Ordering::Less => {
                    for _ in 0..want - n {
                        ids.push(self.alphabet[rng.random_range(0..self.alphabet.len())]);
                    }
                }
            }
        }
        Err(PromptError::Length(want))
    }

    /// Tokens of `text` as a server counts a prompt's text (no special tokens).
    pub fn count(&self, text: &str) -> Result<usize, PromptError> {
        Ok(self
            .tokenizer
            .encode(text, false)
            .map_err(|e| PromptError::Encode(e.to_string()))?
            .len())
    }
}

/// Ids whose text is a space and 2–10 ASCII letters and that encode back to themselves alone:
/// a concatenation of them splits at the spaces into the same ids again.
fn word_alphabet(tokenizer: &Tokenizer) -> Result<Vec<u32>, PromptError> {
    let mut out = Vec::new();
    for id in 0..tokenizer.get_vocab_size(true) as u32 {
        let Ok(text) = tokenizer.decode(&[id], false) else {
            continue;
        };
        let Some(word) = text.strip_prefix(' ') else {
            continue;
        };
        if !(2..=10).contains(&word.len()) || !word.bytes().all(|b| b.is_ascii_lowercase()) {
            continue;
        }
        let back = tokenizer
            .encode(text.as_str(), false)
            .map_err(|e| PromptError::Encode(e.to_string()))?;
        if back.get_ids() == [id] {
            out.push(id);
        }
    }
    Ok(out)
}
