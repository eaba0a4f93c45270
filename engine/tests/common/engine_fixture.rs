//! The engine fixture the behaviour tests share: the tiny random Llama (f32, CPU, 4-token
//! blocks) as an engine, prompts that share no prefix, and run/collect helpers that check every
//! output on the way.

use std::collections::HashMap;

use engine::{
    build_engine, loader, Engine, EngineOptions, FinishReason, ModelCard, Request, RequestOutput,
    SampledToken, SamplingParams,
};
use tch::Kind;

use super::tiny_llama::{write_tiny_llama, TinyLlamaOptions, EOS_ID, EOT_ID};
use super::ScratchDir;

pub const BLOCK_SIZE: usize = 4;

pub fn options() -> EngineOptions {
    EngineOptions {
        kind: Kind::Float,
        block_size: BLOCK_SIZE,
        num_blocks: Some(256),
        max_num_batched_tokens: 512,
        ..EngineOptions::default()
    }
}

pub fn tiny_engine(opts: EngineOptions) -> Engine {
    tiny_engine_with_card(opts, |_| {})
}

/// The tiny Llama (seed 0) as an engine, after `edit` changed its card (say, its EOS ids).
pub fn tiny_engine_with_card(opts: EngineOptions, edit: impl FnOnce(&mut ModelCard)) -> Engine {
    let scratch = ScratchDir::new("behaviour");
    let model = write_tiny_llama(&scratch.join("tiny"), TinyLlamaOptions::default());
    let mut loaded =
        loader::load(model.dir.to_str().expect("utf-8 path")).expect("tiny model loads");
    assert_eq!(loaded.card.eos_token_ids, vec![EOS_ID, EOT_ID]);
    edit(&mut loaded.card);
    build_engine(loaded, &opts).expect("engine builds").0
}

/// `len` byte-range ids, different for each `salt` from the first token on (so two salts share
/// no prefix block).
pub fn prompt(salt: u32, len: usize) -> Vec<u32> {
    (0..len as u32)
        .map(|i| (salt * 37 + i * 11 + 5) % 256)
        .collect()
}

pub fn request(id: &str, prompt_token_ids: Vec<u32>, params: SamplingParams) -> Request {
    Request {
        request_id: id.to_string(),
        prompt_token_ids,
        params,
    }
}

/// Greedy, `max_tokens` long whatever the model picks.
pub fn fixed_length(max_tokens: usize) -> SamplingParams {
    SamplingParams {
        ignore_eos: true,
        ..SamplingParams::greedy(max_tokens)
    }
}

/// What one request produced over a run.
#[derive(Clone, Debug, PartialEq)]
pub struct Outcome {
    pub tokens: Vec<u32>,
    pub finish: Option<FinishReason>,
    pub cached_tokens: usize,
}

/// Gathers step outputs by request, checking nothing follows a finished output.
pub fn collect(outputs: &[RequestOutput]) -> HashMap<String, Outcome> {
    let mut by_id: HashMap<String, Outcome> = HashMap::new();
    for o in outputs {
        let id = o.request_id();
        if let RequestOutput::Failed { error, .. } = o {
            panic!("{id} failed: {error}");
        }
        let entry = by_id.entry(id.to_string()).or_insert_with(|| Outcome {
            tokens: Vec::new(),
            finish: None,
            cached_tokens: o.usage().map_or(0, |u| u.cached_tokens),
        });
        assert!(entry.finish.is_none(), "{id}: output after it finished");
        assert_eq!(o.tokens().len(), 1, "{id}: one token per step");
        entry.tokens.extend(o.tokens().iter().map(|t| t.token));
        entry.finish = o.finish_reason();
    }
    by_id
}

/// Queues `requests` together and runs them to completion.
pub fn run(engine: &mut Engine, requests: Vec<Request>) -> HashMap<String, Outcome> {
    for r in requests {
        engine.add_request(r).expect("request accepted");
    }
    let outcomes = collect(&engine.run_to_completion().expect("engine runs"));
    for (id, o) in &outcomes {
        assert!(o.finish.is_some(), "{id} finished");
    }
    outcomes
}

pub fn run_one(engine: &mut Engine, prompt: Vec<u32>, params: SamplingParams) -> Outcome {
    run(engine, vec![request("one", prompt, params)])
        .remove("one")
        .expect("the request produced output")
}

/// Nothing queued, running or holding a block.
pub fn assert_idle(engine: &Engine, context: &str) {
    let s = engine.stats();
    assert_eq!(s.kv_blocks_used, 0, "{context}: KV blocks still used");
    assert_eq!(
        (s.running, s.waiting),
        (0, 0),
        "{context}: running, waiting"
    );
    assert!(
        !engine.has_unfinished(),
        "{context}: unfinished requests left"
    );
}

pub fn token(id: u32) -> SampledToken {
    SampledToken {
        token: id,
        logprob: -0.5,
        top_logprobs: Vec::new(),
    }
}
