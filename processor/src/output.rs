//! One choice's output as the client sees it: the worker's token deltas become text through
//! the incremental detokenizer, and stop strings cut it (held back until they cannot match).
//! When a stop string matches, the choice is finished here and the caller drops the worker's
//! stream, which cancels the request in the engine.

use std::sync::Arc;

use runtime::protocol::{FinishReason, TokenDelta, TokenLogprob};
use tokenizers::Tokenizer;

use crate::detokenizer::{DetokenizeError, Detokenizer};
use crate::stop_strings::StopStrings;

/// What one delta released to the client.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OutputStep {
    pub text: String,
    pub token_ids: Vec<u32>,
    /// Parallel to `token_ids` when the request asked for logprobs.
    pub logprobs: Vec<TokenLogprob>,
    pub finish_reason: Option<FinishReason>,
}

pub struct ChoiceOutput {
    detokenizer: Detokenizer,
    stops: StopStrings,
    min_tokens: usize,
    generated: usize,
    finished: bool,
    pub prompt_tokens: usize,
    pub cached_tokens: usize,
}

impl ChoiceOutput {
    pub fn new(
        tokenizer: Arc<Tokenizer>,
        prompt: &[u32],
        stop: Vec<String>,
        min_tokens: usize,
    ) -> Self {
        Self {
            detokenizer: Detokenizer::new(tokenizer, prompt, true),
            stops: StopStrings::new(stop, false),
            min_tokens,
            generated: 0,
            finished: false,
            prompt_tokens: prompt.len(),
            cached_tokens: 0,
        }
    }

    /// Tokens generated so far (up to a stop string's match, the tokens that produced it).
    pub fn completion_tokens(&self) -> usize {
        self.generated
    }

    pub fn push(&mut self, delta: &TokenDelta) -> Result<OutputStep, DetokenizeError> {
        let mut step = OutputStep::default();
        if self.finished {
            return Ok(step);
        }
        self.prompt_tokens = delta.prompt_tokens;
        self.cached_tokens = delta.cached_tokens;
        for (i, &id) in delta.token_ids.iter().enumerate() {
            self.generated += 1;
            step.token_ids.push(id);
            if let Some(lp) = delta.logprobs.get(i) {
                step.logprobs.push(lp.clone());
            }
            let text = self.detokenizer.push(id)?;
            // Stop strings wait for `min_tokens` like every other stop condition.
            let armed = self.generated > self.min_tokens;
            let release = self.stops.push(&text, armed);
            step.text.push_str(&release.text);
            if release.stop.is_some() {
                step.finish_reason = Some(FinishReason::Stop);
                self.finished = true;
                return Ok(step);
            }
        }
        if let Some(reason) = delta.finish_reason {
            step.text.push_str(&self.finish_text()?);
            step.finish_reason = Some(reason);
            self.finished = true;
        }
        Ok(step)
    }

    /// Text held back for a possible stop string or a split character; nothing is lost.
    fn finish_text(&mut self) -> Result<String, DetokenizeError> {
        let tail = self.detokenizer.flush()?;
        let armed = self.generated > self.min_tokens;
        let mut text = self.stops.push(&tail, armed).text;
        text.push_str(&self.stops.flush());
        Ok(text)
    }
}
