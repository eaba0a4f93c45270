//! Engine logprobs in the two OpenAI shapes. Tokens are named by their own decoded text, as
//! vLLM names them; -inf becomes -9999 (JSON has no infinity; vLLM clamps the same way).

use processor::{OutputStep, ServedModel};

use crate::protocol::{ChatLogprobs, ChatTokenLogprob, CompletionLogprobs, TopLogprob};

fn finite(lp: f32) -> f32 {
    lp.max(-9999.0)
}

pub fn chat(model: &ServedModel, step: &OutputStep) -> ChatLogprobs {
    ChatLogprobs {
        content: step
            .token_ids
            .iter()
            .zip(&step.logprobs)
            .map(|(&id, lp)| {
                let top = lp
                    .top
                    .iter()
                    .map(|&(t, l)| TopLogprob::new(model.token_text(t), finite(l)))
                    .collect();
                ChatTokenLogprob::new(model.token_text(id), finite(lp.logprob), top)
            })
            .collect(),
    }
}

/// `offset`: characters of the choice's text before this step; advanced past each token.
pub fn completion(model: &ServedModel, step: &OutputStep, offset: &mut u32) -> CompletionLogprobs {
    let mut out = CompletionLogprobs::default();
    for (&id, lp) in step.token_ids.iter().zip(&step.logprobs) {
        let text = model.token_text(id);
        let top = lp
            .top
            .iter()
            .map(|&(t, l)| (model.token_text(t), finite(l)))
            .collect();
        out.push(text.clone(), finite(lp.logprob), top, *offset);
        *offset += text.chars().count() as u32;
    }
    out
}
