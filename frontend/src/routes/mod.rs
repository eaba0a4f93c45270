//! The HTTP routes and what they share: body limits, auth, model check, length rules.

mod admin;
mod chat;
mod completions;
mod logprobs;
mod status;

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures::StreamExt;
use processor::PromptError;
use runtime::protocol::SamplingParams;
use subtle::ConstantTimeEq;

use crate::error::ApiError;
use crate::protocol::CommonParams;
use crate::state::AppState;

/// Most choices one request may ask for (`n`); vLLM has no limit, but each is a full sequence.
const MAX_CHOICES: u32 = 128;

/// The routes an orchestrator probes without credentials; every other route, the 404 fallback
/// included, needs the API key when one is set.
const OPEN_PATHS: [&str; 2] = ["/health", "/live"];

pub fn app(state: Arc<AppState>) -> axum::Router {
    axum::Router::new()
        .route("/v1/chat/completions", post(chat::handle))
        .route("/v1/completions", post(completions::handle))
        .route("/v1/models", get(status::models))
        .route(
            "/admin/disagg",
            get(admin::get_disagg).post(admin::set_disagg),
        )
        .route("/health", get(status::health))
        .route("/live", get(status::live))
        .route("/metrics", get(status::metrics))
        .fallback(|| async { ApiError::not_found("no such route").into_response() })
        // A layer over the whole router, not `route_layer`: that one skips the fallback, which
        // would tell a caller without the key which paths exist.
        .layer(middleware::from_fn_with_state(state.clone(), authorize))
        .with_state(state)
}

async fn authorize(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    if let Some(key) = &state.config.api_key {
        if !OPEN_PATHS.contains(&request.uri().path()) {
            let given = request
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "));
            if !given.is_some_and(|given| key_matches(given, key)) {
                return ApiError::unauthorized().into_response();
            }
        }
    }
    next.run(request).await
}

/// Compares in constant time, so the time to refuse a guess does not tell how many of its
/// leading bytes were right (only whether its length was).
fn key_matches(given: &str, key: &str) -> bool {
    given.as_bytes().ct_eq(key.as_bytes()).into()
}

/// How much of a body over `--max-body-bytes` is read (and dropped) before the 413: a client
/// still sending when the server closes gets a reset that may destroy the 413 unread; past
/// this, it does.
const DRAIN_BYTES: usize = 64 << 20;

/// The body, or 413 (over `--max-body-bytes`) / 400 in OpenAI's error shape, or 408 when it
/// has not all arrived within `--request-timeout` (a slow upload must not hold a task and its
/// buffer for ever; hyper bounds the headers the same way, in `server`).
async fn body_bytes(state: &AppState, body: Body) -> Result<Bytes, ApiError> {
    let limit = state.config.max_body_bytes;
    let timeout = state.config.request_timeout;
    let mut seen = 0usize;
    let read = async {
        let mut chunks = body.into_data_stream();
        let mut bytes = Vec::new();
        while let Some(chunk) = chunks.next().await {
            let chunk = chunk
                .map_err(|e| ApiError::bad_request(format!("cannot read the request body: {e}")))?;
            seen = seen.saturating_add(chunk.len());
            if seen <= limit {
                bytes.extend_from_slice(&chunk);
            } else if seen > limit.saturating_add(DRAIN_BYTES) {
                break;
            }
        }
        Ok(bytes)
    };
    match tokio::time::timeout(timeout, read).await {
        Ok(Err(e)) => Err(e),
        // Also when the time ran out while draining the excess: the size is the news.
        _ if seen > limit => Err(ApiError::too_large(limit)),
        Ok(Ok(bytes)) => Ok(Bytes::from(bytes)),
        Err(_elapsed) => Err(ApiError::request_timeout(timeout)),
    }
}

/// The response, or the error's; a failed request is counted here (a served one is counted when
/// its response completes).
fn respond(state: &AppState, endpoint: &str, result: Result<Response, ApiError>) -> Response {
    result.unwrap_or_else(|e| {
        state
            .metrics
            .request_done(&state.model.name, endpoint, e.status);
        e.into_response()
    })
}

fn check_model(state: &AppState, model: &str) -> Result<(), ApiError> {
    if model == state.model.name {
        Ok(())
    } else {
        Err(ApiError::model_not_found(model))
    }
}

fn prompt_error(param: &str, e: PromptError) -> ApiError {
    match e {
        PromptError::Tokenize(_) => ApiError::internal(e.to_string()),
        other => ApiError::bad_param(param, other),
    }
}

/// `max_tokens` for a prompt: what the client asked, or the rest of the context; the prompt
/// plus it must fit the context (checked here, before any worker is involved).
fn max_tokens(
    state: &AppState,
    prompt_len: usize,
    asked: Option<u32>,
    default: Option<usize>,
    prompt_param: &str,
    max_tokens_field: &str,
) -> Result<usize, ApiError> {
    let context = state.model.max_context;
    if prompt_len >= context {
        return Err(ApiError::bad_param(
            prompt_param,
            format!("has {prompt_len} tokens; the model's context is {context} tokens"),
        ));
    }
    let room = context - prompt_len;
    match asked.map(|m| m as usize).or(default) {
        None => Ok(room),
        Some(m) if m > room => Err(ApiError::bad_param(
            max_tokens_field,
            format!(
                "{m} plus the prompt's {prompt_len} tokens exceeds the model's context of \
                 {context} tokens"
            ),
        )),
        Some(m) => Ok(m.min(room)),
    }
}

fn choices(common: &CommonParams) -> Result<u32, ApiError> {
    match common.n.unwrap_or(1) {
        0 => Err(ApiError::bad_param("n", "must be at least 1")),
        n if n > MAX_CHOICES => Err(ApiError::bad_param(
            "n",
            format!("must be at most {MAX_CHOICES}, got {n}"),
        )),
        n => Ok(n),
    }
}

/// Choice `i`'s parameters: with a seed, each choice gets its own (else n samples would be
/// identical), and choice 0 keeps the seed the client gave.
fn for_choice(params: &SamplingParams, i: u32) -> SamplingParams {
    SamplingParams {
        seed: params.seed.map(|s| s.wrapping_add(i as u64)),
        ..params.clone()
    }
}

fn request_id(prefix: &str) -> String {
    format!("{prefix}-{:032x}", rand::random::<u128>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_must_match_whole() {
        assert!(key_matches("secret", "secret"));
        for wrong in ["", "s", "secre", "secret ", "secreT", "Secret", "secrets"] {
            assert!(!key_matches(wrong, "secret"), "{wrong:?}");
        }
    }
}
