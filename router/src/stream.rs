//! A routed request's response: the worker's messages, decoded, with failover and migration.
//! When the worker fails before sending a token (it died, left discovery, or its address
//! vanished), the client has seen nothing, so the request moves to another instance under a
//! fresh id. When it dies mid-stream, the request migrates (up to the migration limit): the
//! prompt plus the tokens generated so far go to another worker with the output budget that
//! is left, and its tokens continue the client's stream — for greedy sampling, the same text.
//! An engine's own failure is not retried (it would fail anywhere). The load charge and the
//! policy's hooks follow each dispatch, whichever way it ends.

use std::sync::Arc;

use runtime::protocol::{GenerateRequest, GenerateResponse};
use runtime::request_plane::RequestPlaneError;

use crate::error::RouterError;
use crate::router::{Dispatch, Shared};

pub struct RoutedStream {
    shared: Arc<Shared>,
    request: GenerateRequest,
    /// The id the caller gave; attempt `n` runs as `{base_id}-r{n}`.
    base_id: String,
    /// The caller's prompt length and output budgets (a migrated attempt has a longer prompt).
    prompt_len: usize,
    max_tokens: usize,
    min_tokens: usize,
    /// Tokens already passed to the caller.
    generated: Vec<u32>,
    dispatch: Option<Dispatch>,
    /// Instances that failed this request.
    failed: Vec<u64>,
    /// Whether the current attempt sent a token.
    started: bool,
    retries_left: u32,
    migrations_left: u32,
    attempt: u32,
    done: bool,
}

/// How a worker stream failed.
enum Failure {
    Plane(RequestPlaneError),
    Ended,
    Gone,
}

impl RoutedStream {
    pub(crate) async fn start(
        shared: Arc<Shared>,
        request: GenerateRequest,
    ) -> Result<Self, RouterError> {
        let mut stream = Self {
            retries_left: shared.options.retries,
            migrations_left: shared.options.migration_limit,
            shared,
            base_id: request.request_id.clone(),
            prompt_len: request.token_ids.len(),
            max_tokens: request.sampling.max_tokens,
            min_tokens: request.sampling.min_tokens,
            generated: Vec::new(),
            request,
            dispatch: None,
            failed: Vec::new(),
            started: false,
            attempt: 0,
            done: false,
        };
        stream.connect().await?;
        Ok(stream)
    }

    /// The instance serving the request now.
    pub fn instance_id(&self) -> Option<u64> {
        self.dispatch.as_ref().map(|d| d.selection.instance_id)
    }

    /// The id the current attempt runs under (retries get fresh ids).
    pub fn request_id(&self) -> &str {
        &self.request.request_id
    }

    /// Times the request moved mid-stream so far.
    pub fn migrations(&self) -> u32 {
        self.shared.options.migration_limit - self.migrations_left
    }

    /// Dispatches, retrying elsewhere when the chosen address has just vanished.
    async fn connect(&mut self) -> Result<(), RouterError> {
        loop {
            match self.shared.dispatch(&self.request, &self.failed).await {
                Ok(d) => {
                    self.dispatch = Some(d);
                    return Ok(());
                }
                Err(RouterError::Vanished {
                    instance_id,
                    address,
                    reason,
                }) if self.retries_left > 0 => {
                    tracing::warn!(request = %self.request.request_id, %address, %reason, "worker did not take the request; routing elsewhere");
                    self.retries_left -= 1;
                    // Until its lease ends the dead worker is still a candidate, and the
                    // policy may well like it best (it reports no load): avoid it.
                    self.next_attempt(Some(instance_id));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The next message: tokens, or a rejection of the request; `None` after the last one.
    pub async fn next(&mut self) -> Option<Result<GenerateResponse, RouterError>> {
        if self.done {
            return None;
        }
        let item = self.advance().await;
        let last = match &item {
            Ok(GenerateResponse::Tokens(d)) => d.finish_reason.is_some(),
            _ => true,
        };
        if last {
            self.done = true;
            self.leave();
        }
        Some(item)
    }

    async fn advance(&mut self) -> Result<GenerateResponse, RouterError> {
        loop {
            if self.dispatch.is_none() {
                self.connect().await?;
            }
            let d = self.dispatch.as_mut().expect("connected above");
            let frame = tokio::select! {
                biased;
                frame = d.stream.next() => match frame {
                    Some(Ok(bytes)) => Ok(bytes),
                    Some(Err(e)) => Err(Failure::Plane(e)),
                    None => Err(Failure::Ended),
                },
                _ = d.gone.cancelled() => Err(Failure::Gone),
            };
            let bytes = match frame {
                Ok(bytes) => bytes,
                Err(failure) => {
                    let instance = self.leave();
                    // An engine error (`Remote`) would fail again elsewhere; a lost worker not.
                    let engine_error =
                        matches!(failure, Failure::Plane(RequestPlaneError::Remote(_)));
                    if !engine_error && !self.started && self.retries_left > 0 {
                        tracing::warn!(request = %self.request.request_id, "worker failed before the first token; retrying on another");
                        self.retries_left -= 1;
                        self.next_attempt(instance);
                        continue;
                    }
                    if !engine_error && !self.generated.is_empty() && self.migrations_left > 0 {
                        tracing::warn!(request = %self.request.request_id, generated = self.generated.len(), "worker lost mid-stream; migrating the request");
                        self.migrations_left -= 1;
                        self.shared.metrics.migration();
                        self.migrate(instance);
                        continue;
                    }
                    return Err(match failure {
                        Failure::Plane(RequestPlaneError::Remote(m)) => RouterError::Worker(m),
                        Failure::Plane(e) => RouterError::Lost(e.to_string()),
                        Failure::Ended => RouterError::Lost(
                            "the worker ended the stream before the request finished".into(),
                        ),
                        Failure::Gone => RouterError::Lost(
                            "the worker serving this request went away (its discovery lease ended)"
                                .into(),
                        ),
                    });
                }
            };
            let mut message: GenerateResponse = serde_json::from_slice(&bytes)
                .map_err(|e| RouterError::Malformed(e.to_string()))?;
            if let GenerateResponse::Tokens(delta) = &mut message {
                if !delta.token_ids.is_empty() {
                    if !self.started {
                        self.started = true;
                        if let Some(d) = self.dispatch.as_mut() {
                            d.load.first_token();
                            let id = d.selection.instance_id;
                            self.shared
                                .policy
                                .on_first_token(&self.request.request_id, id);
                        }
                    }
                    self.generated.extend_from_slice(&delta.token_ids);
                }
                // The caller asked about its prompt, not the migrated one.
                delta.prompt_tokens = self.prompt_len;
                delta.cached_tokens = delta.cached_tokens.min(self.prompt_len);
            }
            return Ok(message);
        }
    }

    /// Drops the current dispatch (cancelling it at the worker, releasing its load) and tells
    /// the policy.
    fn leave(&mut self) -> Option<u64> {
        let d = self.dispatch.take()?;
        let id = d.selection.instance_id;
        self.shared.policy.on_finish(&self.request.request_id, id);
        Some(id)
    }

    /// A fresh id, so a worker that still holds the last attempt cannot take it for a duplicate.
    fn next_attempt(&mut self, failed: Option<u64>) {
        self.failed.extend(failed);
        self.attempt += 1;
        self.started = false;
        self.request.request_id = format!("{}-r{}", self.base_id, self.attempt);
    }

    /// The next attempt continues from what the caller has: the generated tokens join the
    /// prompt and leave the output budgets.
    fn migrate(&mut self, failed: Option<u64>) {
        self.next_attempt(failed);
        let mut tokens = self.request.token_ids[..self.prompt_len].to_vec();
        tokens.extend_from_slice(&self.generated);
        self.request.token_ids = tokens;
        let n = self.generated.len();
        self.request.sampling.max_tokens = self.max_tokens.saturating_sub(n).max(1);
        self.request.sampling.min_tokens = self.min_tokens.saturating_sub(n);
    }
}

impl Drop for RoutedStream {
    fn drop(&mut self) {
        self.leave();
    }
}
