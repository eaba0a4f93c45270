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
    async fn a_thousand_frames_arrive_complete_and_in_order() {
        let p = plane();
        let mut incoming = p.serve("w1").await.unwrap();
        tokio::spawn(async move {
            let mut req = incoming.recv().await.unwrap();
            let n: u32 = String::from_utf8(req.payload).unwrap().parse().unwrap();
            for i in 0..n {
                req.response.data(i.to_le_bytes().to_vec()).await.unwrap();
            }
            req.response.end().await.unwrap();
        });
        let mut stream = p.request("w1", b"1000".to_vec()).await.unwrap();
        let mut got = Vec::new();
        while let Some(frame) = stream.next().await {
            got.push(u32::from_le_bytes(frame.unwrap().try_into().unwrap()));
        }
        assert_eq!(got, (0..1000).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn dropping_the_stream_cancels_at_the_worker() {
        let p = plane();
        let mut incoming = p.serve("w1").await.unwrap();
        let stream = p.request("w1", vec![]).await.unwrap();
        let req = incoming.recv().await.unwrap();
        assert!(!req.response.is_cancelled());
        drop(stream);
        tokio::time::timeout(Duration::from_secs(1), req.response.cancelled())
            .await
            .expect("cancellation reaches the worker");
    }

    #[tokio::test]
    async fn worker_errors_and_vanishing_workers_fail_the_caller() {
        let p = plane();
        let mut incoming = p.serve("w1").await.unwrap();
        let mut erroring = p.request("w1", vec![]).await.unwrap();
        let req = incoming.recv().await.unwrap();
        req.response.error("boom".into()).await.unwrap();
        assert_eq!(
            erroring.next().await,
            Some(Err(RequestPlaneError::Remote("boom".into())))
        );
        assert_eq!(erroring.next().await, None);

        let mut truncated = p.request("w1", vec![]).await.unwrap();
        drop(incoming.recv().await.unwrap());
        assert_eq!(
            truncated.next().await,
            Some(Err(RequestPlaneError::Truncated))
        );

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
