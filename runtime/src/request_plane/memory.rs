//! In-process request plane: addresses map to channels in a shared registry.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{
    IncomingRequest, RequestPlane, RequestPlaneError, ResponseSender, ResponseStream, Result,
};

/// Frames buffered per response before the worker waits for the caller.
const RESPONSE_BUFFER: usize = 64;
const REQUEST_BUFFER: usize = 1024;

#[derive(Clone)]
pub struct MemoryRequestPlane {
    routes: Arc<Mutex<HashMap<String, mpsc::Sender<IncomingRequest>>>>,
    silence: Duration,
}

impl MemoryRequestPlane {
    /// `silence`: how long a caller waits for the next frame before failing the stream.
    pub fn new(silence: Duration) -> Self {
        Self {
            routes: Arc::default(),
            silence,
        }
    }
}

#[async_trait]
impl RequestPlane for MemoryRequestPlane {
    async fn serve(&self, address: &str) -> Result<mpsc::Receiver<IncomingRequest>> {
        let mut routes = self.routes.lock().unwrap_or_else(|e| e.into_inner());
        if routes.get(address).is_some_and(|tx| !tx.is_closed()) {
            return Err(RequestPlaneError::AddressInUse(address.into()));
        }
        let (tx, rx) = mpsc::channel(REQUEST_BUFFER);
        routes.insert(address.into(), tx);
        Ok(rx)
    }

    async fn request(&self, address: &str, payload: Vec<u8>) -> Result<ResponseStream> {
        let route = self
            .routes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(address)
            .cloned()
            .ok_or_else(|| RequestPlaneError::NoSuchAddress(address.into()))?;
        let (tx, rx) = mpsc::channel(RESPONSE_BUFFER);
        let cancel = CancellationToken::new();
        let incoming = IncomingRequest {
            payload,
            response: ResponseSender::new(tx, cancel.clone()),
        };
        route
            .send(incoming)
            .await
            .map_err(|_| RequestPlaneError::NoSuchAddress(address.into()))?;
        Ok(ResponseStream::new(rx, cancel, self.silence))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plane() -> MemoryRequestPlane {
        MemoryRequestPlane::new(Duration::from_millis(300))
    }

    #[tokio::test]
    // The shared contract (`tests/contract`) covers frames, cancellation, errors and unknown
    // addresses; what is left here is specific to the in-process plane.
    async fn a_silent_worker_fails_the_caller() {
        let p = plane();
        let mut incoming = p.serve("w1").await.unwrap();
        let mut silent = p.request("w1", vec![]).await.unwrap();
        let _held = incoming.recv().await.unwrap();
        assert!(matches!(
            silent.next().await,
            Some(Err(RequestPlaneError::Silent(_)))
        ));
    }

    #[tokio::test]
    async fn unknown_and_duplicate_addresses_are_errors() {
        let p = plane();
        assert!(matches!(
            p.request("nobody", vec![]).await,
            Err(RequestPlaneError::NoSuchAddress(a)) if a == "nobody"
        ));
        let _rx = p.serve("w1").await.unwrap();
        assert!(matches!(
            p.serve("w1").await,
            Err(RequestPlaneError::AddressInUse(_))
        ));
    }
}
