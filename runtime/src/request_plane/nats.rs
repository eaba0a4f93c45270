//! NATS request plane (DESIGN.md §2), the networked twin of `memory.rs` and the transport Dynamo's
//! runtime uses: a request is published to the instance's address subject
//! (`{namespace}.{component}.{endpoint}.{instance_id:x}`) with a fresh reply inbox; the worker
//! answers on that inbox, first with an acceptance and then with the response frames; the caller
//! cancels by publishing to `{inbox}.cancel`.
//!
//! Each side bridges NATS into the same channels the in-process plane uses, so ordering,
//! the silence timeout and cancellation are enforced by the shared `ResponseStream` and
//! `ResponseSender`:
//! - caller: a task forwards inbox messages into the stream's channel and, once the stream is
//!   dropped before `End` (its token fires), publishes the cancel message and unsubscribes;
//! - worker: a task per request forwards the `ResponseSender`'s frames to the inbox and turns a
//!   message on `{inbox}.cancel` into the sender's cancellation.
//!
//! Unknown addresses: the caller waits for the worker's acceptance (bounded by the silence
//! timeout) before `request` returns. NATS answers a request nobody subscribes to with a
//! "no responders" status, which becomes `NoSuchAddress` at once, as in memory; so does a
//! request that reaches a worker as it stops serving. A worker that is subscribed but never
//! accepts (hung, or NATS down), or a request that crosses the worker's unsubscription on the
//! wire, gives `Silent` after the timeout.
//!
//! Wire format (one NATS message each, compact so a token delta costs 9 bytes of framing):
//! `[tag u8][seq u64 LE][body]` for frames — tag 0 `Data` (body = raw bytes), 1 `Error`
//! (body = UTF-8 message), 2 `End` (no body), 6 `Heartbeat` (no body: the request is alive
//! but has nothing to say yet) — and a bare tag for the control messages:
//! 3 "accepted"; 4 "closed" (the worker dropped its sender without `End`, which the caller
//! reports as `Truncated`, as in memory); 5 "not served" (the worker stopped serving the address
//! while the request was on its way: `NoSuchAddress`).

use std::time::Duration;

use async_nats::{Client, StatusCode, Subject, Subscriber};
use async_trait::async_trait;
use futures::StreamExt;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::{
    Frame, FrameKind, IncomingRequest, RequestPlane, RequestPlaneError, ResponseSender,
    ResponseStream, Result,
};

/// How long `connect` waits for a server before naming it in an error.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a round trip to the server (to confirm a subscription) may take.
const ROUND_TRIP_TIMEOUT: Duration = Duration::from_secs(5);
/// Frames buffered per response at the worker before its engine waits for the network.
const RESPONSE_BUFFER: usize = 64;
/// Frames buffered per response at the caller. NATS has no backpressure to the worker; beyond
/// this the subscription's own buffer (64 Ki messages by default) holds the rest.
const CALLER_BUFFER: usize = 1024;
const REQUEST_BUFFER: usize = 1024;
/// Anyone can publish to an address without a reply inbox; each is dropped, the warnings
/// rate-limited.
static NO_INBOX: crate::dropped::DropWarnings =
    crate::dropped::DropWarnings::new("a request without a reply inbox");
/// Servers of one address share its requests (addresses are per instance, so this only matters
/// if an instance id were ever served twice).
const QUEUE_GROUP: &str = "baton";

/// A request plane over one NATS connection. Cloning shares the connection.
#[derive(Clone)]
pub struct NatsRequestPlane {
    client: Client,
    silence: Duration,
}

impl NatsRequestPlane {
    /// Connects to the NATS server at `url`; fails within a few seconds, naming it, when nobody
    /// answers. Once connected, the client reconnects by itself and re-subscribes after an
    /// outage. `silence`: how long a caller waits for the next frame before failing the stream.
    pub async fn connect(url: &str, silence: Duration) -> Result<Self> {
        Ok(Self::from_client(connect_client(url).await?, silence))
    }

    /// A request plane on an existing connection (shared with the event plane or work queue).
    pub fn from_client(client: Client, silence: Duration) -> Self {
        Self { client, silence }
    }

    /// The underlying connection, to share with other planes.
    pub fn client(&self) -> &Client {
        &self.client
    }
}

/// Returns once the server has processed everything this connection sent before the call (a
/// subscription, say). async-nats' `flush` only empties the socket buffer; a message to
/// ourselves comes back only after the server handled what preceded it on this connection.
pub(crate) async fn server_round_trip(client: &Client) -> std::result::Result<(), RoundTripError> {
    let probe = Subject::from(client.new_inbox());
    let mut echo = client
        .subscribe(probe.clone())
        .await
        .map_err(|e| RoundTripError::Client(e.to_string()))?;
    client
        .publish(probe, Vec::new().into())
        .await
        .map_err(|e| RoundTripError::Client(e.to_string()))?;
    match tokio::time::timeout(ROUND_TRIP_TIMEOUT, echo.next()).await {
        Ok(Some(_)) => Ok(()),
        Ok(None) => Err(RoundTripError::Closed),
        Err(_) => Err(RoundTripError::Timeout(ROUND_TRIP_TIMEOUT)),
    }
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum RoundTripError {
    #[error("{0}")]
    Client(String),
    #[error("the NATS connection closed")]
    Closed,
    #[error("the NATS server did not answer within {0:?}")]
    Timeout(Duration),
}

/// A NATS connection for the planes to share (`NatsRequestPlane::from_client`,
/// `NatsEventPlane::from_client`): `Connect` naming `url` if it fails.
///
/// The connect is bounded by a timeout: async-nats tries an unreachable
/// server once and fails (it retries forever only with `retry_on_initial_connect`), but a
/// server that accepts TCP and never speaks would otherwise hold us. Later disconnects are
/// logged and healed by the client's own reconnect loop.
pub async fn connect_client(url: &str) -> Result<Client> {
    let failed = |reason: String| RequestPlaneError::Connect {
        url: url.to_string(),
        reason,
    };
    let logged_url = url.to_string();
    let connecting = async_nats::ConnectOptions::new()
        .connection_timeout(CONNECT_TIMEOUT)
        .event_callback(move |event| {
            let url = logged_url.clone();
            async move {
                match event {
                    async_nats::Event::Connected => tracing::info!(%url, "NATS connected"),
                    async_nats::Event::Disconnected => {
                        tracing::warn!(%url, "NATS disconnected; reconnecting")
                    }
                    other => tracing::warn!(%url, "NATS: {other}"),
                }
            }
        })
        .connect(url);
    match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
        Ok(Ok(client)) => Ok(client),
        Ok(Err(e)) => Err(failed(e.to_string())),
        Err(_) => Err(failed(format!("no answer within {CONNECT_TIMEOUT:?}"))),
    }
}

#[async_trait]
impl RequestPlane for NatsRequestPlane {
    async fn serve(&self, address: &str) -> Result<mpsc::Receiver<IncomingRequest>> {
        let mut requests = self
            .client
            .queue_subscribe(address.to_string(), QUEUE_GROUP.to_string())
            .await
            .map_err(|e| RequestPlaneError::Transport(format!("serving `{address}`: {e}")))?;
        // The subscription must be live at the server before we return, or a request sent
        // right after (from another connection) would find no responders.
        server_round_trip(&self.client)
            .await
            .map_err(|e| RequestPlaneError::Transport(format!("serving `{address}`: {e}")))?;
        let (tx, rx) = mpsc::channel(REQUEST_BUFFER);
        let client = self.client.clone();
        let address = address.to_string();
        tokio::spawn(async move {
            loop {
                let message = tokio::select! {
                    message = requests.next() => match message {
                        Some(message) => message,
                        None => return,
                    },
                    _ = tx.closed() => break,
                };
                let Some(inbox) = message.reply else {
                    NO_INBOX.warn(format_args!("sent to `{address}`"));
                    continue;
                };
                match accept(&client, inbox, message.payload.to_vec()).await {
                    Ok(incoming) => {
                        if tx.send(incoming).await.is_err() {
                            break;
                        }
                    }
                    Err(e) => tracing::warn!(%address, "cannot accept a request: {e}"),
                }
            }
            // The worker stopped serving. Drain rather than drop the subscription: requests
            // already on their way are told the address is not served (`NoSuchAddress`) instead
            // of waiting out the silence timeout.
            if requests.drain().await.is_ok() {
                while let Some(message) = requests.next().await {
                    if let Some(inbox) = message.reply {
                        let _ = client
                            .publish(inbox, wire::NOT_SERVED.to_vec().into())
                            .await;
                    }
                }
            }
        });
        Ok(rx)
    }

    async fn request(&self, address: &str, payload: Vec<u8>) -> Result<ResponseStream> {
        let inbox = Subject::from(self.client.new_inbox());
        let replies =
            self.client.subscribe(inbox.clone()).await.map_err(|e| {
                RequestPlaneError::Transport(format!("subscribing to `{inbox}`: {e}"))
            })?;
        self.client
            .publish_with_reply(address.to_string(), inbox.clone(), payload.into())
            .await
            .map_err(|e| RequestPlaneError::Transport(format!("requesting `{address}`: {e}")))?;
        let (frames_tx, frames_rx) = mpsc::channel(CALLER_BUFFER);
        let cancel = CancellationToken::new();
        let (accepted_tx, accepted_rx) = oneshot::channel();
        // The bridge outlives this call: if the caller gives up on `request` itself, it still
        // sees the acceptance through and then cancels, so the worker does not run for nobody.
        tokio::spawn(bridge(Bridge {
            client: self.client.clone(),
            address: address.to_string(),
            inbox,
            replies,
            silence: self.silence,
            accepted: accepted_tx,
            frames: frames_tx,
            cancel: cancel.clone(),
        }));
        match accepted_rx.await {
            Ok(Ok(())) => Ok(ResponseStream::new(frames_rx, cancel, self.silence)),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(RequestPlaneError::Transport(format!(
                "the response task for `{address}` stopped"
            ))),
        }
    }
}

/// Worker side of one request: listens for the caller's cancel, acknowledges, and starts
/// forwarding the response.
async fn accept(client: &Client, inbox: Subject, payload: Vec<u8>) -> Result<IncomingRequest> {
    // Subscribe before acknowledging: the caller cancels only after the acceptance, and the
    // server handles this connection's SUB before its acceptance, so no cancel is missed.
    let cancels = client
        .subscribe(format!("{inbox}.cancel"))
        .await
        .map_err(|e| {
            RequestPlaneError::Transport(format!("subscribing to `{inbox}.cancel`: {e}"))
        })?;
    client
        .publish(inbox.clone(), wire::ACCEPTED.to_vec().into())
        .await
        .map_err(|e| RequestPlaneError::Transport(format!("accepting on `{inbox}`: {e}")))?;
    let (frames_tx, frames_rx) = mpsc::channel(RESPONSE_BUFFER);
    let cancel = CancellationToken::new();
    tokio::spawn(forward_response(
        client.clone(),
        inbox,
        frames_rx,
        cancels,
        cancel.clone(),
    ));
    Ok(IncomingRequest {
        payload,
        response: ResponseSender::new(frames_tx, cancel),
    })
}

/// Worker side: the `ResponseSender`'s frames to the caller's inbox; `{inbox}.cancel` to the
/// sender's cancellation. Ends after the last frame; dropping `cancels` unsubscribes.
async fn forward_response(
    client: Client,
    inbox: Subject,
    mut frames: mpsc::Receiver<Frame>,
    mut cancels: Subscriber,
    cancel: CancellationToken,
) {
    loop {
        tokio::select! {
            // Cancel first: a worker streaming flat out always has a frame ready.
            biased;
            // `None` means the connection closed for good: nobody will read the frames either.
            _ = cancels.next() => {
                cancel.cancel();
                return;
            }
            frame = frames.recv() => {
                let Some(frame) = frame else {
                    // The worker dropped its sender without `End`: tell the caller now rather
                    // than let it wait out the silence timeout.
                    let _ = client.publish(inbox, wire::CLOSED.to_vec().into()).await;
                    return;
                };
                let last = !matches!(frame.kind, FrameKind::Data(_) | FrameKind::Heartbeat);
                if let Err(e) = client.publish(inbox.clone(), wire::encode(frame).into()).await {
                    tracing::warn!(%inbox, "cannot send a response frame: {e}");
                    cancel.cancel();
                    return;
                }
                if last {
                    return;
                }
            }
        }
    }
}

/// Caller side of one request.
struct Bridge {
    client: Client,
    address: String,
    inbox: Subject,
    replies: Subscriber,
    silence: Duration,
    accepted: oneshot::Sender<Result<()>>,
    frames: mpsc::Sender<Frame>,
    cancel: CancellationToken,
}

/// Caller side: waits for the worker's acceptance, then forwards frames into the
/// `ResponseStream`'s channel until the last one, the stream's cancellation, or the connection's
/// end (the channel closes: `Truncated`). Dropping `replies` unsubscribes the inbox.
async fn bridge(mut b: Bridge) {
    let cancel_subject = format!("{}.cancel", b.inbox);
    let outcome = match tokio::time::timeout(b.silence, b.replies.next()).await {
        Err(_) => Err(RequestPlaneError::Silent(b.silence)),
        Ok(None) => Err(RequestPlaneError::Transport(format!(
            "the NATS connection closed while requesting `{}`",
            b.address
        ))),
        Ok(Some(m)) if m.status == Some(StatusCode::NO_RESPONDERS) => {
            Err(RequestPlaneError::NoSuchAddress(b.address.clone()))
        }
        Ok(Some(m)) => match wire::decode(&m.payload) {
            Ok(wire::Message::Accepted) => Ok(()),
            Ok(wire::Message::NotServed) => {
                Err(RequestPlaneError::NoSuchAddress(b.address.clone()))
            }
            Ok(other) => Err(RequestPlaneError::Transport(format!(
                "`{}` answered {other:?} before accepting the request",
                b.address
            ))),
            Err(e) => Err(RequestPlaneError::Transport(format!(
                "`{}` answered with a malformed message: {e}",
                b.address
            ))),
        },
    };
    let accepted = outcome.is_ok();
    // A silent worker may still accept later: tell it not to bother.
    let cancel_worker = matches!(outcome, Err(RequestPlaneError::Silent(_)));
    let caller_waiting = b.accepted.send(outcome).is_ok();
    if !accepted || !caller_waiting {
        if cancel_worker || accepted {
            let _ = b.client.publish(cancel_subject, Vec::new().into()).await;
        }
        return;
    }
    let mut next_seq = 0;
    loop {
        let message = tokio::select! {
            biased;
            _ = b.cancel.cancelled() => None,
            message = b.replies.next() => match message {
                Some(message) => Some(message),
                // The connection closed for good: dropping `frames` reports `Truncated`.
                None => return,
            },
        };
        let Some(message) = message else {
            let _ = b.client.publish(cancel_subject, Vec::new().into()).await;
            return;
        };
        let frame = match wire::decode(&message.payload) {
            Ok(wire::Message::Frame(frame)) => frame,
            // The worker dropped its sender: dropping `frames` reports `Truncated`.
            Ok(wire::Message::Closed) => return,
            Ok(wire::Message::Accepted | wire::Message::NotServed) => continue,
            // Surfaces as `Remote` with the reason, in the sequence slot it took.
            Err(e) => Frame {
                seq: next_seq,
                kind: FrameKind::Error(format!(
                    "malformed response frame from `{}`: {e}",
                    b.address
                )),
            },
        };
        next_seq = frame.seq.wrapping_add(1);
        let last = !matches!(frame.kind, FrameKind::Data(_) | FrameKind::Heartbeat);
        if b.frames.send(frame).await.is_err() {
            // The stream was dropped while we waited for room in its channel.
            let _ = b.client.publish(cancel_subject, Vec::new().into()).await;
            return;
        }
        if last {
            return;
        }
    }
}

/// The bytes on the wire (see the module doc).
mod wire {
    use super::{Frame, FrameKind};

    const DATA: u8 = 0;
    const ERROR: u8 = 1;
    const END: u8 = 2;
    const HEARTBEAT: u8 = 6;
    pub const ACCEPTED: &[u8] = &[3];
    pub const CLOSED: &[u8] = &[4];
    pub const NOT_SERVED: &[u8] = &[5];
    const HEADER: usize = 9;

    #[derive(Debug, PartialEq)]
    pub enum Message {
        Frame(Frame),
        Accepted,
        Closed,
        NotServed,
    }

    #[derive(Debug, PartialEq, thiserror::Error)]
    pub enum WireError {
        #[error("empty message")]
        Empty,
        #[error("unknown message tag `{0}`")]
        UnknownTag(u8),
        #[error("frame with tag `{tag}` has {len} bytes, fewer than its {HEADER}-byte header")]
        Short { tag: u8, len: usize },
    }

    pub fn encode(frame: Frame) -> Vec<u8> {
        let (tag, body): (u8, &[u8]) = match &frame.kind {
            FrameKind::Data(bytes) => (DATA, bytes),
            FrameKind::Error(message) => (ERROR, message.as_bytes()),
            FrameKind::End => (END, &[]),
            FrameKind::Heartbeat => (HEARTBEAT, &[]),
        };
        let mut out = Vec::with_capacity(HEADER + body.len());
        out.push(tag);
        out.extend_from_slice(&frame.seq.to_le_bytes());
        out.extend_from_slice(body);
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Message, WireError> {
        let &tag = bytes.first().ok_or(WireError::Empty)?;
        match bytes {
            [3] => return Ok(Message::Accepted),
            [4] => return Ok(Message::Closed),
            [5] => return Ok(Message::NotServed),
            _ => {}
        }
        if !matches!(tag, DATA | ERROR | END | HEARTBEAT) {
            return Err(WireError::UnknownTag(tag));
        }
        if bytes.len() < HEADER {
            return Err(WireError::Short {
                tag,
                len: bytes.len(),
            });
        }
        let mut seq = [0u8; 8];
        seq.copy_from_slice(&bytes[1..HEADER]);
        let body = &bytes[HEADER..];
        let kind = match tag {
            DATA => FrameKind::Data(body.to_vec()),
            ERROR => FrameKind::Error(String::from_utf8_lossy(body).into_owned()),
            HEARTBEAT => FrameKind::Heartbeat,
            _ => FrameKind::End,
        };
        Ok(Message::Frame(Frame {
            seq: u64::from_le_bytes(seq),
            kind,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::wire::{decode, encode, Message, WireError};
    use super::*;

    #[test]
    fn frames_round_trip_with_a_nine_byte_header() {
        for kind in [
            FrameKind::Data(b"{\"tokens\":[42]}".to_vec()),
            FrameKind::Data(Vec::new()),
            FrameKind::Error("engine failed: `max_tokens` too large".into()),
            FrameKind::End,
            FrameKind::Heartbeat,
        ] {
            let frame = Frame {
                seq: u64::MAX - 7,
                kind,
            };
            let bytes = encode(frame.clone());
            let body = match &frame.kind {
                FrameKind::Data(b) => b.len(),
                FrameKind::Error(m) => m.len(),
                FrameKind::End | FrameKind::Heartbeat => 0,
            };
            assert_eq!(bytes.len(), 9 + body);
            assert_eq!(decode(&bytes), Ok(Message::Frame(frame)));
        }
        assert_eq!(decode(wire::ACCEPTED), Ok(Message::Accepted));
        assert_eq!(decode(wire::CLOSED), Ok(Message::Closed));
        assert_eq!(decode(wire::NOT_SERVED), Ok(Message::NotServed));
    }

    #[test]
    fn malformed_messages_are_named() {
        assert_eq!(decode(&[]), Err(WireError::Empty));
        assert_eq!(decode(&[9, 0, 0]), Err(WireError::UnknownTag(9)));
        assert_eq!(decode(&[0, 1, 2]), Err(WireError::Short { tag: 0, len: 3 }));
    }
}
