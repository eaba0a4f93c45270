//! Running one HTTP request's choices: each choice is routed to a worker as its own engine
//! request, its token deltas pass through the processor's [`ChoiceOutput`], and the choices'
//! steps merge into one event stream. Streaming responses are written by a task that also
//! watches the client: when the client goes away the task ends, dropping the worker streams,
//! which cancels the requests in the engine and frees their KV blocks.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::http::{header, StatusCode};
use axum::response::Response;
use futures::stream::{self, BoxStream, StreamExt};
use processor::{ChoiceOutput, OutputStep};
use router::{RoutedStream, Router, RouterError};
use runtime::protocol::{GenerateRequest, GenerateResponse, SamplingParams};
use tokio::sync::mpsc;

use crate::admission::Permit;
use crate::error::ApiError;
use crate::metrics::InflightGuard;
use crate::protocol::Usage;
use crate::state::AppState;

/// One choice to generate: the `index`-th choice of the response, a sample of `prompt`.
pub struct ChoicePlan {
    pub index: u32,
    pub prompt: Arc<Vec<u32>>,
    pub sampling: SamplingParams,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ChoiceUsage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub cached_tokens: usize,
}

/// What one choice released, with its usage once it finished.
#[derive(Debug, Clone)]
pub struct ChoiceStep {
    pub index: u32,
    pub step: OutputStep,
    pub usage: Option<ChoiceUsage>,
}

pub type Events = BoxStream<'static, Result<ChoiceStep, ApiError>>;

/// Starts every choice; steps arrive in the order the workers produce them.
pub fn start(
    state: &AppState,
    request_id: &str,
    plans: Vec<ChoicePlan>,
    stop: &[String],
) -> Events {
    let runs = plans.into_iter().map(|plan| {
        let run = ChoiceRun {
            index: plan.index,
            output: ChoiceOutput::new(
                state.model.tokenizer.clone(),
                &plan.prompt,
                stop.to_vec(),
                plan.sampling.min_tokens,
            ),
            request: Some(GenerateRequest {
                request_id: format!("{request_id}-{}", plan.index),
                token_ids: plan.prompt.to_vec(),
                sampling: plan.sampling,
                router_overlap_blocks: 0,
            }),
            router: state.router.clone(),
            stream: None,
            done: false,
        };
        stream::unfold(run, |mut run| async move {
            let item = run.next().await?;
            Some((item, run))
        })
        .boxed()
    });
    stream::select_all(runs).boxed()
}

/// One choice on its way through the router (which moves it to another worker if its worker
/// fails before the first token) and the processor.
struct ChoiceRun {
    index: u32,
    output: ChoiceOutput,
    /// Until it is routed.
    request: Option<GenerateRequest>,
    router: Arc<Router>,
    stream: Option<RoutedStream>,
    done: bool,
}

impl ChoiceRun {
    async fn next(&mut self) -> Option<Result<ChoiceStep, ApiError>> {
        if self.done {
            return None;
        }
        let item = self.advance().await;
        if !matches!(&item, Ok(step) if step.usage.is_none()) {
            // Finished or failed: dropping the routed stream cancels what is left of it.
            self.done = true;
            self.stream = None;
        }
        Some(item)
    }

    async fn advance(&mut self) -> Result<ChoiceStep, ApiError> {
        loop {
            if let Some(request) = self.request.take() {
                self.stream = Some(self.router.generate(request).await.map_err(routing_error)?);
            }
            let stream = self.stream.as_mut().expect("routed above");
            let delta = match stream.next().await {
                None => {
                    return Err(ApiError::internal(
                        "the worker ended the stream before the request finished",
                    ))
                }
                Some(Err(e)) => return Err(routing_error(e)),
                Some(Ok(GenerateResponse::Rejected { message, param })) => {
                    return Err(match param {
                        Some(p) => ApiError::bad_param(&p, message),
                        None => ApiError::bad_request(message),
                    })
                }
                Some(Ok(GenerateResponse::Tokens(delta))) => delta,
            };
            let step = self
                .output
                .push(&delta)
                .map_err(|e| ApiError::internal(e.to_string()))?;
            let usage = step.finish_reason.map(|_| ChoiceUsage {
                prompt_tokens: self.output.prompt_tokens,
                completion_tokens: self.output.completion_tokens(),
                cached_tokens: self.output.cached_tokens,
            });
            if step.token_ids.is_empty() && usage.is_none() {
                continue;
            }
            return Ok(ChoiceStep {
                index: self.index,
                step,
                usage,
            });
        }
    }
}

fn routing_error(e: RouterError) -> ApiError {
    match e {
        RouterError::NoInstances(_) => {
            ApiError::unavailable("no worker is available to serve the model")
        }
        e @ RouterError::TooFewWorkers { .. } => ApiError::unavailable(e.to_string()),
        RouterError::NoCapacity(_) => {
            ApiError::unavailable("every worker is at capacity; retry later")
        }
        RouterError::Vanished { .. } => ApiError::unavailable("the chosen worker went away; retry"),
        // Its worker died and the migration limit was spent: nothing wrong with the request,
        // and before the first token nothing was sent, so the client may simply retry.
        e @ RouterError::Lost(_) => ApiError::unavailable(format!("{e}; retry")),
        other => ApiError::internal(other.to_string()),
    }
}

/// Usage over all choices: each prompt counts once however many samples it has (OpenAI's rule).
pub struct Tally {
    per_prompt: u32,
    prompt_tokens: usize,
    completion_tokens: usize,
    cached_tokens: usize,
}

impl Tally {
    pub fn new(choices_per_prompt: u32) -> Self {
        Self {
            per_prompt: choices_per_prompt.max(1),
            prompt_tokens: 0,
            completion_tokens: 0,
            cached_tokens: 0,
        }
    }

    pub fn add(&mut self, index: u32, usage: &ChoiceUsage) {
        self.completion_tokens += usage.completion_tokens;
        if index.is_multiple_of(self.per_prompt) {
            self.prompt_tokens += usage.prompt_tokens;
            self.cached_tokens += usage.cached_tokens;
        }
    }

    pub fn usage(&self) -> Usage {
        Usage::new(
            self.prompt_tokens as u32,
            self.completion_tokens as u32,
            Some(self.cached_tokens as u32),
        )
    }
}

/// Latency observations of one request.
pub struct Timer {
    started: Instant,
    last_token: Option<Instant>,
}

impl Timer {
    pub fn new(started: Instant) -> Self {
        Self {
            started,
            last_token: None,
        }
    }

    pub fn tokens(&mut self, state: &AppState, count: usize) {
        if count == 0 {
            return;
        }
        let now = Instant::now();
        let name = &state.model.name;
        match self.last_token {
            None => state
                .metrics
                .observe_ttft(name, (now - self.started).as_secs_f64()),
            Some(last) => {
                let each = (now - last).as_secs_f64() / count as f64;
                for _ in 0..count {
                    state.metrics.observe_itl(name, each);
                }
            }
        }
        self.last_token = Some(now);
    }

    pub fn finish(&self, state: &AppState, endpoint: &str, status: u16, tally: &Tally) {
        let name = &state.model.name;
        state.metrics.request_done(name, endpoint, status);
        state.metrics.add_tokens(
            name,
            tally.prompt_tokens as u64,
            tally.completion_tokens as u64,
        );
        if status == 200 {
            state
                .metrics
                .observe_e2e(name, self.started.elapsed().as_secs_f64());
        }
    }
}

/// Collects every step of a non-streaming request; the first error fails it.
pub async fn collect(
    state: &AppState,
    mut events: Events,
    timer: &mut Timer,
) -> Result<Vec<ChoiceStep>, ApiError> {
    let mut steps = Vec::new();
    loop {
        let item = tokio::select! {
            biased;
            _ = state.abort_streams.cancelled() => Some(Err(shutting_down())),
            item = events.next() => item,
        };
        match item {
            None => return Ok(steps),
            Some(Err(e)) => return Err(e),
            Some(Ok(step)) => {
                timer.tokens(state, step.step.token_ids.len());
                steps.push(step);
            }
        }
    }
}

fn shutting_down() -> ApiError {
    ApiError::unavailable("the server is shutting down")
}

/// Turns steps into the SSE chunks of one endpoint.
pub trait ChunkWriter: Send + 'static {
    /// Chunks sent before the first step (the assistant role, an echoed prompt).
    fn opening(&mut self) -> Vec<String>;
    /// The chunk for a step, or nothing when it carries nothing for the client.
    fn step(&mut self, step: &ChoiceStep) -> Option<String>;
    /// The final usage-only chunk (`stream_options.include_usage`).
    fn usage(&self, usage: Usage) -> String;
}

/// Everything a streaming response needs besides its events.
pub struct StreamContext {
    pub state: Arc<AppState>,
    pub endpoint: &'static str,
    pub include_usage: bool,
    pub choices_per_prompt: u32,
    pub timer: Timer,
    pub permit: Permit,
    pub inflight: InflightGuard,
}

/// Streams `first` and the rest of `events` as server-sent events; `data: [DONE]` last. A
/// failure after the stream started is sent as an error event before `[DONE]`.
///
/// It first waits for the first step, so a request the worker refuses still gets its 4xx
/// status instead of a stream that starts and fails.
pub async fn sse_response(
    ctx: StreamContext,
    mut events: Events,
    mut writer: impl ChunkWriter,
) -> Result<Response, ApiError> {
    let first = match events.next().await {
        Some(Ok(step)) => step,
        Some(Err(e)) => return Err(e),
        None => return Err(ApiError::internal("no choice produced output")),
    };
    let (tx, mut rx) = mpsc::channel::<Bytes>(64);
    tokio::spawn(async move {
        let StreamContext {
            state,
            endpoint,
            include_usage,
            choices_per_prompt,
            mut timer,
            permit,
            inflight,
        } = ctx;
        let _held = (permit, inflight);
        let mut tally = Tally::new(choices_per_prompt);
        let send = |text: String| {
            let tx = tx.clone();
            async move {
                tx.send(Bytes::from(format!("data: {text}\n\n")))
                    .await
                    .is_ok()
            }
        };
        let mut open = true;
        for chunk in writer.opening() {
            open = open && send(chunk).await;
        }
        let mut pending = Some(Ok(first));
        let status = loop {
            if !open {
                break CLIENT_GONE;
            }
            let item = match pending.take() {
                Some(item) => Some(item),
                None => tokio::select! {
                    biased;
                    _ = tx.closed() => break CLIENT_GONE,
                    _ = state.abort_streams.cancelled() => Some(Err(shutting_down())),
                    item = events.next() => item,
                },
            };
            match item {
                None => break 200,
                Some(Ok(step)) => {
                    timer.tokens(&state, step.step.token_ids.len());
                    if let Some(u) = &step.usage {
                        tally.add(step.index, u);
                    }
                    if let Some(chunk) = writer.step(&step) {
                        open = send(chunk).await;
                    }
                }
                Some(Err(e)) => {
                    open = send(e.to_json()).await;
                    break e.status;
                }
            }
        };
        // Ends the worker streams now: cancels whatever still runs.
        drop(events);
        if status == 200 && include_usage && open {
            open = send(writer.usage(tally.usage())).await;
        }
        if open {
            send("[DONE]".to_string()).await;
        }
        timer.finish(&state, endpoint, status, &tally);
    });
    let body = stream::poll_fn(move |cx| rx.poll_recv(cx).map(|b| b.map(Ok::<_, Infallible>)));
    Ok(Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(body))
        .expect("static headers are valid"))
}

/// The status recorded when the client disconnected mid-stream (nginx's convention).
pub const CLIENT_GONE: u16 = 499;
