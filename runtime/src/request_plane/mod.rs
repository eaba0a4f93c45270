//! The request plane: a caller sends one request to an instance's address and reads the
//! response back as ordered frames (`Data`, `Error`, `End`) carrying sequence numbers
//! (DESIGN.md §2). Dropping the response stream cancels the request at the worker. A stream
//! that falls silent without `End` (a dead worker) fails the caller after a timeout.
//! The in-process implementation serves `baton serve`; the NATS one (`nats.rs`) serves
//! `baton run`, where every component is its own process.

pub mod memory;
#[cfg(feature = "network")]
pub mod nats;

use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub use memory::MemoryRequestPlane;
#[cfg(feature = "network")]
pub use nats::NatsRequestPlane;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RequestPlaneError {
    #[error("no instance serves address `{0}`")]
    NoSuchAddress(String),
    #[error("address `{0}` is already served")]
    AddressInUse(String),
    #[error("the worker sent an error: {0}")]
    Remote(String),
    #[error("the worker went silent for {0:?} without ending the stream")]
    Silent(Duration),
    #[error("the response stream closed without an end frame")]
    Truncated,
    #[error("response frame {got} arrived where {expected} was due")]
    OutOfOrder { expected: u64, got: u64 },
    #[error("the request was cancelled")]
    Cancelled,
    #[error("cannot connect to the request plane at `{url}`: {reason}")]
    Connect { url: String, reason: String },
    #[error("request plane transport failed: {0}")]
    Transport(String),
}

pub type Result<T> = std::result::Result<T, RequestPlaneError>;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum FrameKind {
    Data(Vec<u8>),
    Error(String),
    End,
    /// "Still working on it": sent while a request waits (queued, prefilling elsewhere) so the
    /// caller's silence timeout tells a busy worker from a stalled or dead one.
    Heartbeat,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Frame {
    pub seq: u64,
    pub kind: FrameKind,
}

/// The caller's side of one request.
pub struct ResponseStream {
    frames: mpsc::Receiver<Frame>,
    cancel: CancellationToken,
    silence: Duration,
    next_seq: u64,
    done: bool,
}

impl ResponseStream {
    pub fn new(
        frames: mpsc::Receiver<Frame>,
        cancel: CancellationToken,
        silence: Duration,
    ) -> Self {
        Self {
            frames,
            cancel,
            silence,
            next_seq: 0,
            done: false,
        }
    }

    /// The next data payload; `None` after `End`. Errors end the stream. Heartbeats are taken
    /// in silence: each restarts the silence timeout.
    pub async fn next(&mut self) -> Option<Result<Vec<u8>>> {
        loop {
            if self.done {
                return None;
            }
            match self.next_frame().await {
                Some(Ok(None)) => continue,
                Some(Ok(Some(bytes))) => return Some(Ok(bytes)),
                Some(Err(e)) => return Some(Err(e)),
                None => return None,
            }
        }
    }

    /// One frame: `Ok(None)` for a heartbeat.
    async fn next_frame(&mut self) -> Option<Result<Option<Vec<u8>>>> {
        let outcome = match tokio::time::timeout(self.silence, self.frames.recv()).await {
            Err(_) => Err(RequestPlaneError::Silent(self.silence)),
            Ok(None) => Err(RequestPlaneError::Truncated),
            Ok(Some(frame)) if frame.seq != self.next_seq => Err(RequestPlaneError::OutOfOrder {
                expected: self.next_seq,
                got: frame.seq,
            }),
            Ok(Some(frame)) => {
                self.next_seq += 1;
                match frame.kind {
                    FrameKind::Data(bytes) => return Some(Ok(Some(bytes))),
                    FrameKind::Heartbeat => return Some(Ok(None)),
                    FrameKind::Error(msg) => Err(RequestPlaneError::Remote(msg)),
                    FrameKind::End => {
                        self.done = true;
                        return None;
                    }
                }
            }
        };
        self.done = true;
        self.cancel.cancel();
        Some(outcome.map(Some))
    }
}

impl Drop for ResponseStream {
    fn drop(&mut self) {
        if !self.done {
            self.cancel.cancel();
        }
    }
}

/// The worker's side of one request.
pub struct ResponseSender {
    frames: mpsc::Sender<Frame>,
    cancel: CancellationToken,
    seq: u64,
}

impl ResponseSender {
    pub fn new(frames: mpsc::Sender<Frame>, cancel: CancellationToken) -> Self {
        Self {
            frames,
            cancel,
            seq: 0,
        }
    }

    pub async fn data(&mut self, bytes: Vec<u8>) -> Result<()> {
        self.send(FrameKind::Data(bytes)).await
    }

    pub async fn error(mut self, message: String) -> Result<()> {
        self.send(FrameKind::Error(message)).await
    }

    pub async fn end(mut self) -> Result<()> {
        self.send(FrameKind::End).await
    }

    /// Tells the caller the request is alive though it has nothing to say yet.
    pub async fn heartbeat(&mut self) -> Result<()> {
        self.send(FrameKind::Heartbeat).await
    }

    /// Resolves when the caller cancelled or went away.
    pub async fn cancelled(&self) {
        self.cancel.cancelled().await
    }

    pub fn is_cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }

    /// A handle on the cancellation, for waiting on it while sending.
    pub fn cancel_token(&self) -> CancellationToken {
        self.cancel.clone()
    }

    async fn send(&mut self, kind: FrameKind) -> Result<()> {
        if self.cancel.is_cancelled() {
            return Err(RequestPlaneError::Cancelled);
        }
        let frame = Frame {
            seq: self.seq,
            kind,
        };
        self.seq += 1;
        self.frames
            .send(frame)
            .await
            .map_err(|_| RequestPlaneError::Cancelled)
    }
}

/// One request as a worker receives it.
pub struct IncomingRequest {
    pub payload: Vec<u8>,
    pub response: ResponseSender,
}

/// Sends `request` (as JSON) to `address` and parses the single frame a query-style endpoint
/// answers with — a worker's KV state, the reply to a prefill notice. Errors are the plane's, the
/// remote's, or a stream that ended without data, as text.
pub async fn query<Q: Serialize, A: serde::de::DeserializeOwned>(
    plane: &dyn RequestPlane,
    address: &str,
    request: &Q,
) -> std::result::Result<A, String> {
    let payload = serde_json::to_vec(request).map_err(|e| e.to_string())?;
    let mut stream = plane
        .request(address, payload)
        .await
        .map_err(|e| e.to_string())?;
    match stream.next().await {
        Some(Ok(bytes)) => serde_json::from_slice(&bytes).map_err(|e| e.to_string()),
        Some(Err(e)) => Err(e.to_string()),
        None => Err(format!("`{address}` ended its answer without data")),
    }
}

#[async_trait]
pub trait RequestPlane: Send + Sync {
    /// Starts serving `address`; requests arrive on the returned channel until it is dropped.
    async fn serve(&self, address: &str) -> Result<mpsc::Receiver<IncomingRequest>>;

    async fn request(&self, address: &str, payload: Vec<u8>) -> Result<ResponseStream>;
}
