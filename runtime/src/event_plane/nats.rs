//! NATS event plane: core NATS subjects (no JetStream), as Dynamo publishes KV events and load.
//! A subscription is confirmed with the server before `subscribe` returns, so "after this call"
//! holds across connections; the client re-subscribes by itself after a NATS restart, and
//! messages published while it is disconnected are lost (events are best effort).

use async_nats::Client;
use async_trait::async_trait;
use futures::StreamExt;
use tokio::sync::mpsc;

use super::{EventPlane, EventPlaneError};
use crate::request_plane::nats::{connect_client, server_round_trip};
use crate::request_plane::RequestPlaneError;

/// An event plane over one NATS connection. Cloning shares the connection.
#[derive(Clone)]
pub struct NatsEventPlane {
    client: Client,
}

impl NatsEventPlane {
    /// Connects to the NATS server at `url`; fails within a few seconds, naming it, when nobody
    /// answers.
    pub async fn connect(url: &str) -> Result<Self, EventPlaneError> {
        match connect_client(url).await {
            Ok(client) => Ok(Self::from_client(client)),
            Err(RequestPlaneError::Connect { url, reason }) => {
                Err(EventPlaneError::Connect { url, reason })
            }
            Err(other) => Err(EventPlaneError::Connect {
                url: url.to_string(),
                reason: other.to_string(),
            }),
        }
    }

    /// An event plane on an existing connection (e.g. `NatsRequestPlane::client()`).
    pub fn from_client(client: Client) -> Self {
        Self { client }
    }
}

#[async_trait]
impl EventPlane for NatsEventPlane {
    async fn publish(&self, subject: &str, payload: Vec<u8>) -> Result<(), EventPlaneError> {
        self.client
            .publish(subject.to_string(), payload.into())
            .await
            .map_err(|e| EventPlaneError::Publish {
                subject: subject.to_string(),
                reason: e.to_string(),
            })
    }

    async fn subscribe(
        &self,
        subject: &str,
    ) -> Result<mpsc::UnboundedReceiver<Vec<u8>>, EventPlaneError> {
        let failed = |reason: String| EventPlaneError::Subscribe {
            subject: subject.to_string(),
            reason,
        };
        let mut messages = self
            .client
            .subscribe(subject.to_string())
            .await
            .map_err(|e| failed(e.to_string()))?;
        server_round_trip(&self.client)
            .await
            .map_err(|e| failed(e.to_string()))?;
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    message = messages.next() => match message {
                        Some(message) => {
                            if tx.send(message.payload.to_vec()).is_err() {
                                break;
                            }
                        }
                        None => break,
                    },
                    // The subscriber went away: dropping `messages` unsubscribes.
                    _ = tx.closed() => break,
                }
            }
        });
        Ok(rx)
    }
}
