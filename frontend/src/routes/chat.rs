//! `POST /v1/chat/completions`: render the conversation with the model's chat template, run
//! `n` choices, answer as one `chat.completion` or as `chat.completion.chunk` events.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use processor::{ChatMessage, ServedModel};

use super::{
    body_bytes, check_model, choices, for_choice, logprobs, max_tokens, prompt_error, request_id,
};
use crate::error::ApiError;
use crate::generation::{self, ChoicePlan, ChoiceStep, ChunkWriter, StreamContext, Tally, Timer};
use crate::protocol::{
    parse, sse_data, unix_now, ChatChoice, ChatChunkChoice, ChatCompletion, ChatCompletionChunk,
    ChatCompletionRequest, ChatDelta, ChatLogprobs, ChatMessageOut, Message, Usage, UsageField,
};
use crate::state::AppState;

const ENDPOINT: &str = "chat";
const ROLES: [&str; 3] = ["system", "user", "assistant"];

pub async fn handle(State(state): State<Arc<AppState>>, body: Body) -> Response {
    let started = Instant::now();
    let result = run(state.clone(), body, started).await;
    super::respond(&state, ENDPOINT, result)
}

async fn run(state: Arc<AppState>, body: Body, started: Instant) -> Result<Response, ApiError> {
    let body = body_bytes(&state, body).await?;
    let req: ChatCompletionRequest = parse(&body)?;
    check_model(&state, &req.model)?;
    let permit = state.admit().await?;
    let inflight = state.metrics.inflight();

    let messages = chat_messages(&req.messages)?;
    let prompt = state
        .model
        .chat_prompt(&messages)
        .map_err(|e| prompt_error("messages", e))?;
    let logprobs = match (req.logprobs, req.top_logprobs) {
        (true, k) => Some(k.unwrap_or(0) as usize),
        (false, Some(_)) => {
            return Err(ApiError::bad_param(
                "top_logprobs",
                "needs `logprobs` set to true",
            ))
        }
        (false, None) => None,
    };
    let max_tokens = max_tokens(
        &state,
        prompt.len(),
        req.common.max_tokens(),
        None,
        "messages",
        req.common.max_tokens_field(),
    )?;
    let sampling = req
        .common
        .sampling_params(max_tokens, logprobs, "top_logprobs")?;
    let n = choices(&req.common)?;
    let stop = req.common.stop_strings()?;

    let id = request_id("chatcmpl");
    let prompt = Arc::new(prompt);
    let plans = (0..n)
        .map(|i| ChoicePlan {
            index: i,
            prompt: prompt.clone(),
            sampling: for_choice(&sampling, i),
        })
        .collect();
    let events = generation::start(&state, &id, plans, &stop);
    let mut timer = Timer::new(started);
    let created = unix_now();

    if req.common.stream {
        let writer = Writer {
            id,
            created,
            model: state.model.clone(),
            n,
            logprobs: logprobs.is_some(),
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
    let mut out: Vec<ChatChoice> = (0..n)
        .map(|i| ChatChoice {
            index: i,
            message: ChatMessageOut::assistant(""),
            logprobs: logprobs.map(|_| ChatLogprobs::default()),
            finish_reason: None,
        })
        .collect();
    for s in &steps {
        let choice = &mut out[s.index as usize];
        choice.message.content.push_str(&s.step.text);
        if let Some(lp) = &mut choice.logprobs {
            lp.content
                .extend(logprobs::chat(&state.model, &s.step).content);
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
    Ok(Json(ChatCompletion::new(
        id,
        created,
        state.model.name.clone(),
        out,
        tally.usage(),
    ))
    .into_response())
}

fn chat_messages(messages: &[Message]) -> Result<Vec<ChatMessage>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::bad_param("messages", "must not be empty"));
    }
    messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            if !ROLES.contains(&m.role.as_str()) {
                return Err(ApiError::bad_param(
                    &format!("messages[{i}].role"),
                    format!("must be system, user or assistant, got `{}`", m.role),
                ));
            }
            let content = match &m.content {
                None => String::new(),
                Some(c) if c.has_non_text_parts() => {
                    return Err(ApiError::bad_param(
                        &format!("messages[{i}].content"),
                        "has a non-text part; this model reads text only",
                    ))
                }
                Some(c) => c.text(),
            };
            Ok(ChatMessage::new(m.role.as_str(), content))
        })
        .collect()
}

struct Writer {
    id: String,
    created: u64,
    model: Arc<ServedModel>,
    n: u32,
    logprobs: bool,
    usage: UsageField,
}

impl Writer {
    fn chunk(&self, choice: ChatChunkChoice) -> String {
        sse_data(&ChatCompletionChunk::new(
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
        (0..self.n)
            .map(|i| self.chunk(ChatChunkChoice::new(i, ChatDelta::assistant_role())))
            .collect()
    }

    fn step(&mut self, step: &ChoiceStep) -> Option<String> {
        let s = &step.step;
        let has_logprobs = self.logprobs && !s.token_ids.is_empty();
        if s.text.is_empty() && !has_logprobs && s.finish_reason.is_none() {
            return None;
        }
        let delta = if s.text.is_empty() && s.finish_reason.is_some() {
            ChatDelta::empty()
        } else {
            ChatDelta::content(s.text.clone())
        };
        let mut choice = ChatChunkChoice::new(step.index, delta);
        if has_logprobs {
            choice.logprobs = Some(logprobs::chat(&self.model, s));
        }
        choice.finish_reason = s.finish_reason.map(|r| r.as_str());
        Some(self.chunk(choice))
    }

    fn usage(&self, usage: Usage) -> String {
        sse_data(&ChatCompletionChunk::usage_only(
            self.id.clone(),
            self.created,
            self.model.name.clone(),
            usage,
        ))
    }
}
