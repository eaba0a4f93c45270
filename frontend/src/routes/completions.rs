//! `POST /v1/completions`: one or more prompts (text or token ids), `n` choices each; choice
//! `p·n + i` is prompt `p`'s `i`-th sample, as OpenAI numbers them.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use processor::ServedModel;

use super::{
    body_bytes, check_model, choices, for_choice, logprobs, max_tokens, prompt_error, request_id,
};
use crate::error::ApiError;
use crate::generation::{self, ChoicePlan, ChoiceStep, ChunkWriter, StreamContext, Tally, Timer};
use crate::protocol::{
    parse, sse_data, unix_now, Completion, CompletionChoice, CompletionChunk, CompletionLogprobs,
    CompletionRequest, Prompt, Usage, UsageField,
};
use crate::state::AppState;

const ENDPOINT: &str = "completions";
/// OpenAI's (and vLLM's) default for this endpoint.
const DEFAULT_MAX_TOKENS: usize = 16;
/// Most choices one request may make in all, prompts × `n`: each is an engine request, and an
/// 8 MiB body holds two million one-token prompts.
const MAX_TOTAL_CHOICES: usize = 2048;

pub async fn handle(State(state): State<Arc<AppState>>, body: Body) -> Response {
    let started = Instant::now();
    let result = run(state.clone(), body, started).await;
    super::respond(&state, ENDPOINT, result)
}

/// A prompt as ids, and as text for `echo`.
struct PromptInput {
    ids: Vec<u32>,
    text: String,
}

fn prompts(model: &ServedModel, prompt: &Prompt) -> Result<Vec<PromptInput>, ApiError> {
    let from_text = |i: usize, text: &String| -> Result<PromptInput, ApiError> {
        let param = if i == usize::MAX {
            "prompt".to_string()
        } else {
            format!("prompt[{i}]")
        };
        Ok(PromptInput {
            ids: model
                .text_prompt(text)
                .map_err(|e| prompt_error(&param, e))?,
            text: text.clone(),
        })
    };
    let from_ids = |i: usize, ids: &Vec<u32>| -> Result<PromptInput, ApiError> {
        let param = if i == usize::MAX {
            "prompt".to_string()
        } else {
            format!("prompt[{i}]")
        };
        model
            .check_token_ids(ids)
            .map_err(|e| prompt_error(&param, e))?;
        Ok(PromptInput {
            ids: ids.clone(),
            text: model.tokenizer.decode(ids, false).unwrap_or_default(),
        })
    };
    let list = match prompt {
        Prompt::Text(t) => vec![from_text(usize::MAX, t)?],
        Prompt::Tokens(ids) => vec![from_ids(usize::MAX, ids)?],
        Prompt::Texts(v) => v
            .iter()
            .enumerate()
            .map(|(i, t)| from_text(i, t))
            .collect::<Result<_, _>>()?,
        Prompt::TokenBatches(v) => v
            .iter()
            .enumerate()
            .map(|(i, ids)| from_ids(i, ids))
            .collect::<Result<_, _>>()?,
    };
    if list.is_empty() {
        return Err(ApiError::bad_param("prompt", "must not be empty"));
    }
    Ok(list)
}

async fn run(state: Arc<AppState>, body: Body, started: Instant) -> Result<Response, ApiError> {
    let body = body_bytes(&state, body).await?;
    let req: CompletionRequest = parse(&body)?;
    check_model(&state, &req.model)?;
    let permit = state.admit().await?;
    let inflight = state.metrics.inflight();

    if req.echo && req.logprobs.is_some() {
        return Err(ApiError::bad_param(
            "echo",
            "together with `logprobs` needs prompt logprobs, which Baton does not compute yet",
        ));
    }
    let logprobs = req.logprobs.map(|k| k as usize);
    let n = choices(&req.common)?;
    let stop = req.common.stop_strings()?;
    let total = req.prompt.count().saturating_mul(n as usize);
    if total > MAX_TOTAL_CHOICES {
        let count = req.prompt.count();
        let param = if count > MAX_TOTAL_CHOICES {
            "prompt"
        } else {
            "n"
        };
        return Err(ApiError::bad_param(
            param,
            format!(
                "asks for {count} prompts × {n} choices = {total}; at most \
                 {MAX_TOTAL_CHOICES} choices per request"
            ),
        ));
    }
    let inputs = prompts(&state.model, &req.prompt)?;
    let mut plans = Vec::new();
    for (p, input) in inputs.iter().enumerate() {
        let max_tokens = max_tokens(
            &state,
            input.ids.len(),
            req.common.max_tokens(),
            Some(DEFAULT_MAX_TOKENS),
            "prompt",
            req.common.max_tokens_field(),
        )?;
        let sampling = req
            .common
            .sampling_params(max_tokens, logprobs, "logprobs")?;
        let ids = Arc::new(input.ids.clone());
        for i in 0..n {
            plans.push(ChoicePlan {
                index: p as u32 * n + i,
                prompt: ids.clone(),
                sampling: for_choice(&sampling, i),
            });
        }
    }
    let echo: Vec<String> = inputs
        .into_iter()
        .flat_map(|input| std::iter::repeat_n(input.text, n as usize))
        .map(|text| if req.echo { text } else { String::new() })
        .collect();

    let id = request_id("cmpl");
    let events = generation::start(&state, &id, plans, &stop);
    let mut timer = Timer::new(started);
    let created = unix_now();

    if req.common.stream {
        let writer = Writer {
            id,
            created,
            model: state.model.clone(),
            echo,
            logprobs: logprobs.is_some(),
            offsets: HashMap::new(),
            usage: UsageField::for_stream(req.common.include_usage()),
        };
        let ctx = StreamContext {
            state: state.clone(),
            endpoint: ENDPOINT,
            include_usage: req.common.include_usage(),
            choices_per_prompt: n,
            timer,
            permit,
            inflight,
        };
        return generation::sse_response(ctx, events, writer).await;
    }

    let steps = generation::collect(&state, events, &mut timer).await?;
    let mut tally = Tally::new(n);
    let mut out: Vec<CompletionChoice> = echo
        .iter()
        .enumerate()
        .map(|(i, text)| {
            let mut c = CompletionChoice::new(i as u32, text.clone());
            c.logprobs = logprobs.map(|_| CompletionLogprobs::default());
            c
        })
        .collect();
    let mut offsets = vec![0u32; out.len()];
    for s in &steps {
        let i = s.index as usize;
        let choice = &mut out[i];
        choice.text.push_str(&s.step.text);
        if let Some(lp) = &mut choice.logprobs {
            lp.extend(logprobs::completion(&state.model, &s.step, &mut offsets[i]));
        }
        if let Some(reason) = s.step.finish_reason {
            choice.finish_reason = Some(reason.as_str());
        }
        if let Some(u) = &s.usage {
            tally.add(s.index, u);
        }
    }
    timer.finish(&state, ENDPOINT, 200, &tally);
    drop((permit, inflight));
    Ok(Json(Completion::new(
        id,
        created,
        state.model.name.clone(),
        out,
        tally.usage(),
    ))
    .into_response())
}

struct Writer {
    id: String,
    created: u64,
    model: Arc<ServedModel>,
    /// Per choice: the prompt text to send first, or empty.
    echo: Vec<String>,
    logprobs: bool,
    offsets: HashMap<u32, u32>,
    usage: UsageField,
}

impl Writer {
    fn chunk(&self, choice: CompletionChoice) -> String {
        sse_data(&CompletionChunk::new(
            self.id.clone(),
            self.created,
            self.model.name.clone(),
            vec![choice],
            self.usage,
        ))
    }
}

impl ChunkWriter for Writer {
    fn opening(&mut self) -> Vec<String> {
        self.echo
            .iter()
            .enumerate()
            .filter(|(_, text)| !text.is_empty())
            .map(|(i, text)| self.chunk(CompletionChoice::new(i as u32, text.clone())))
            .collect()
    }

    fn step(&mut self, step: &ChoiceStep) -> Option<String> {
        let s = &step.step;
        let has_logprobs = self.logprobs && !s.token_ids.is_empty();
        if s.text.is_empty() && !has_logprobs && s.finish_reason.is_none() {
            return None;
        }
        let mut choice = CompletionChoice::new(step.index, s.text.clone());
        if has_logprobs {
            let offset = self.offsets.entry(step.index).or_insert(0);
            choice.logprobs = Some(logprobs::completion(&self.model, s, offset));
        }
        choice.finish_reason = s.finish_reason.map(|r| r.as_str());
        Some(self.chunk(choice))
    }

    fn usage(&self, usage: Usage) -> String {
        sse_data(&CompletionChunk::usage_only(
            self.id.clone(),
            self.created,
            self.model.name.clone(),
            usage,
        ))
    }
}
