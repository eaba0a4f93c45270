//! The prefill queue over NATS JetStream (DESIGN.md §2), as Dynamo runs it: decode workers
//! publish remote-prefill requests to `{namespace}.prefill.{model}` on the work-queue stream
//! `{namespace}_prefill`; every prefill worker pulls from one durable consumer, so each job goes
//! to one worker; a job is acked after its KV blocks are delivered, and the server redelivers
//! it after `ack_wait` if its worker died. Stream and consumer are get-or-created, so processes
//! may start in any order, and re-created if a NATS restart without storage lost them.

use std::sync::Mutex;
use std::time::Duration;

use async_nats::jetstream::{self, consumer, consumer::PullConsumer, stream, AckKind};
use async_trait::async_trait;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::{Acker, Job, WorkQueue, WorkQueueError};

/// How long `connect` waits for NATS before reporting it unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long one pull request waits on the server for a job. Short enough that a `next`
/// abandoned by its caller leaves a pull open only briefly (a job delivered to an abandoned
/// pull waits out `ack_wait` before anyone else gets it).
const PULL_EXPIRES: Duration = Duration::from_secs(5);
/// Retry pacing of `next` while NATS is unreachable.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// A JetStream-backed work queue; one per (namespace, model).
pub struct JetStreamWorkQueue {
    js: jetstream::Context,
    stream: stream::Config,
    consumer_config: consumer::pull::Config,
    /// Cloned out for each call; replaced when the consumer has to be re-created.
    consumer: Mutex<PullConsumer>,
    subject: String,
    closed: CancellationToken,
}

impl JetStreamWorkQueue {
    /// Connects to the NATS server at `url` (failing within a few seconds, naming it, when
    /// nobody answers) and opens the queue.
    pub async fn connect(
        url: &str,
        namespace: &str,
        model: &str,
        ack_wait: Duration,
    ) -> Result<Self, WorkQueueError> {
        let unavailable = |reason: String| WorkQueueError::Unavailable {
            url: url.to_string(),
            reason,
        };
        let connecting = async_nats::ConnectOptions::new()
            .connection_timeout(CONNECT_TIMEOUT)
            .connect(url);
        let client = match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
            Ok(Ok(client)) => client,
            Ok(Err(e)) => return Err(unavailable(e.to_string())),
            Err(_) => return Err(unavailable(format!("no answer within {CONNECT_TIMEOUT:?}"))),
        };
        Self::with_client(client, namespace, model, ack_wait).await
    }

    /// Opens the queue on an existing connection (shared with the request and event planes).
    pub async fn with_client(
        client: async_nats::Client,
        namespace: &str,
        model: &str,
        ack_wait: Duration,
    ) -> Result<Self, WorkQueueError> {
        let (ns, model) = (name_token(namespace), name_token(model));
        let subject = format!("{ns}.prefill.{model}");
        let stream = stream::Config {
            name: format!("{ns}_prefill"),
            // One stream per namespace holds every model's queue; each model has its own
            // consumer filtered to its subject (work-queue streams forbid overlapping filters).
            subjects: vec![format!("{ns}.prefill.*")],
            retention: stream::RetentionPolicy::WorkQueue,
            ..Default::default()
        };
        let name = format!("{ns}_prefill_{model}");
        let consumer_config = consumer::pull::Config {
            durable_name: Some(name),
            filter_subject: subject.clone(),
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait,
            ..Default::default()
        };
        let js = jetstream::new(client);
        let consumer = open(&js, &stream, &consumer_config).await?;
        Ok(Self {
            js,
            stream,
            consumer_config,
            consumer: Mutex::new(consumer),
            subject,
            closed: CancellationToken::new(),
        })
    }

    /// The subject jobs are published on (`{namespace}.prefill.{model}`, sanitized).
    pub fn subject(&self) -> &str {
        &self.subject
    }

    /// Stops handing out jobs: waiting and later `next` calls return `None`, `enqueue` fails.
    /// Jobs stay in the stream for other workers.
    pub fn close(&self) {
        self.closed.cancel();
    }

    fn consumer(&self) -> PullConsumer {
        self.consumer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Re-opens stream and consumer, for when the server lost them (a NATS restart without
    /// storage) or the consumer was deleted.
    async fn reopen(&self) -> Result<(), WorkQueueError> {
        let consumer = open(&self.js, &self.stream, &self.consumer_config).await?;
        *self.consumer.lock().unwrap_or_else(|e| e.into_inner()) = consumer;
        Ok(())
    }

    /// One pull of at most one job, waiting up to `PULL_EXPIRES`. `Ok(None)`: none came.
    async fn pull_one(&self) -> Result<Option<Job>, String> {
        let mut batch = self
            .consumer()
            .batch()
            .max_messages(1)
            .expires(PULL_EXPIRES)
            .messages()
            .await
            .map_err(|e| e.to_string())?;
        let Some(message) = batch.next().await else {
            return Ok(None);
        };
        let message = message.map_err(|e| e.to_string())?;
        let delivery = message.info().map_err(|e| e.to_string())?.delivered;
        let (message, acker) = message.split();
        Ok(Some(Job::new(
            message.payload.to_vec(),
            delivery.max(1) as u64,
            JetStreamAcker {
                acker,
                target: self.target(),
            },
        )))
    }

    fn target(&self) -> String {
        format!(
            "{}/{}",
            self.stream.name,
            self.consumer_config.durable_name.as_deref().unwrap_or("")
        )
    }

    fn failed(&self, op: &'static str, reason: impl ToString) -> WorkQueueError {
        WorkQueueError::JetStream {
            op,
            target: self.target(),
            reason: reason.to_string(),
        }
    }

    async fn publish(&self, payload: Vec<u8>) -> Result<(), String> {
        let ack = self
            .js
            .publish(self.subject.clone(), payload.into())
            .await
            .map_err(|e| e.to_string())?;
        ack.await.map(|_| ()).map_err(|e| e.to_string())
    }
}

#[async_trait]
impl WorkQueue for JetStreamWorkQueue {
    /// Returns once the server has stored the job (publish ack).
    async fn enqueue(&self, payload: Vec<u8>) -> Result<(), WorkQueueError> {
        if self.closed.is_cancelled() {
            return Err(WorkQueueError::Closed);
        }
        match self.publish(payload.clone()).await {
            Ok(()) => Ok(()),
            Err(first) => {
                // No stream answering the subject usually means the server lost it: re-create
                // and try once more before reporting.
                debug!("publish to `{}` failed ({first}); reopening", self.subject);
                self.reopen().await?;
                self.publish(payload)
                    .await
                    .map_err(|e| self.failed("publish", e))
            }
        }
    }

    /// Pulls until a job arrives. Pull failures (NATS restarting, the consumer re-created)
    /// are retried here with backoff, so a worker loop survives outages without restarting.
    async fn next(&self) -> Result<Option<Job>, WorkQueueError> {
        let mut backoff = FIRST_BACKOFF;
        loop {
            let pulled = tokio::select! {
                biased;
                _ = self.closed.cancelled() => return Ok(None),
                pulled = self.pull_one() => pulled,
            };
            match pulled {
                Ok(Some(job)) => return Ok(Some(job)),
                Ok(None) => backoff = FIRST_BACKOFF,
                Err(e) => {
                    warn!(target = %self.target(), "pulling a job failed: {e}; retrying");
                    tokio::select! {
                        _ = self.closed.cancelled() => return Ok(None),
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    if let Err(e) = self.reopen().await {
                        debug!("reopening the queue failed: {e}");
                    }
                }
            }
        }
    }

    async fn pending(&self) -> Result<u64, WorkQueueError> {
        let info = self
            .consumer()
            .get_info()
            .await
            .map_err(|e| self.failed("consumer info", e))?;
        Ok(info.num_pending)
    }
}

/// Get-or-creates the stream and the shared durable consumer; if an existing consumer has
/// another `ack_wait` (config changed between deployments), updates it to ours.
async fn open(
    js: &jetstream::Context,
    stream: &stream::Config,
    config: &consumer::pull::Config,
) -> Result<PullConsumer, WorkQueueError> {
    let name = config.durable_name.clone().unwrap_or_default();
    let failed = |op, e: &dyn std::fmt::Display| WorkQueueError::JetStream {
        op,
        target: format!("{}/{name}", stream.name),
        reason: e.to_string(),
    };
    let handle = js
        .get_or_create_stream(stream.clone())
        .await
        .map_err(|e| failed("get or create stream", &e))?;
    let consumer: PullConsumer = handle
        .get_or_create_consumer(&name, config.clone())
        .await
        .map_err(|e| failed("get or create consumer", &e))?;
    if consumer.cached_info().config.ack_wait != config.ack_wait {
        warn!(
            consumer = %name,
            "consumer had ack_wait {:?}; updating to {:?}",
            consumer.cached_info().config.ack_wait,
            config.ack_wait
        );
        return handle
            .update_consumer(config.clone())
            .await
            .map_err(|e| failed("update consumer", &e));
    }
    Ok(consumer)
}

struct JetStreamAcker {
    acker: jetstream::message::Acker,
    /// `stream/consumer`, for error messages.
    target: String,
}

#[async_trait]
impl Acker for JetStreamAcker {
    /// Waits for the server to confirm, so "acked" means the job is gone (a lost ack would
    /// make another worker redo the prefill after `ack_wait`).
    async fn ack(self: Box<Self>) -> Result<(), WorkQueueError> {
        self.acker
            .double_ack()
            .await
            .map_err(|e| WorkQueueError::JetStream {
                op: "ack",
                target: self.target.clone(),
                reason: e.to_string(),
            })
    }

    async fn nak(self: Box<Self>) -> Result<(), WorkQueueError> {
        self.acker
            .ack_with(AckKind::Nak(None))
            .await
            .map_err(|e| WorkQueueError::JetStream {
                op: "nak",
                target: self.target.clone(),
                reason: e.to_string(),
            })
    }
}

/// Maps a namespace or model name to a token valid in both JetStream names and NATS subjects.
/// Those forbid `.`, `*`, `>`, whitespace and path separators, and model names are often
/// `org/Model-1.5B`. Letters, digits and `-` are kept; every other byte becomes `_` and two
/// hex digits (`_` itself too), so distinct names never share a token:
/// `neuralmagic/DeepSeek-R1.5` → `neuralmagic_2fDeepSeek-R1_2e5`.
pub fn name_token(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for byte in name.bytes() {
        if byte.is_ascii_alphanumeric() || byte == b'-' {
            out.push(byte as char);
        } else {
            out.push_str(&format!("_{byte:02x}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn name_tokens_are_safe_and_distinct() {
        assert_eq!(
            name_token("neuralmagic/DeepSeek-R1.5"),
            "neuralmagic_2fDeepSeek-R1_2e5"
        );
        assert_eq!(name_token("dynamo"), "dynamo");
        let names = ["a/b", "a.b", "a_b", "a b", "a*b", "a>b", "a_2fb"];
        let tokens: std::collections::HashSet<String> =
            names.iter().map(|n| name_token(n)).collect();
        assert_eq!(tokens.len(), names.len(), "{tokens:?}");
        for t in &tokens {
            assert!(
                t.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
                "{t}"
            );
        }
    }
}
