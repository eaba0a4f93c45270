//! In-process event plane: each subject keeps the senders of its live subscribers; a publish
//! clones the payload to each and forgets the ones whose receiver is gone.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use tokio::sync::mpsc;

use super::{EventPlane, EventPlaneError};

/// Live subscribers' senders by subject.
type Subscribers = HashMap<String, Vec<mpsc::UnboundedSender<Vec<u8>>>>;

#[derive(Clone, Default)]
pub struct MemoryEventPlane {
    subscribers: Arc<Mutex<Subscribers>>,
}

impl MemoryEventPlane {
    pub fn new() -> Self {
        Self::default()
    }
}

#[async_trait]
impl EventPlane for MemoryEventPlane {
    async fn publish(&self, subject: &str, payload: Vec<u8>) -> Result<(), EventPlaneError> {
        let mut subscribers = self.subscribers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(senders) = subscribers.get_mut(subject) {
            senders.retain(|tx| tx.send(payload.clone()).is_ok());
            if senders.is_empty() {
                subscribers.remove(subject);
            }
        }
        Ok(())
    }

    async fn subscribe(
        &self,
        subject: &str,
    ) -> Result<mpsc::UnboundedReceiver<Vec<u8>>, EventPlaneError> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.subscribers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(subject.to_string())
            .or_default()
            .push(tx);
        Ok(rx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_live_subscriber_gets_each_message_of_its_subject_only() {
        let plane = MemoryEventPlane::new();
        let mut a = plane.subscribe("ns.load").await.unwrap();
        let mut b = plane.subscribe("ns.load").await.unwrap();
        let mut other = plane.subscribe("ns.kv_events").await.unwrap();
        plane.publish("ns.load", b"1".to_vec()).await.unwrap();
        assert_eq!(a.try_recv().unwrap(), b"1");
        assert_eq!(b.try_recv().unwrap(), b"1");
        assert!(other.try_recv().is_err());
    }

    #[tokio::test]
    async fn dropped_subscribers_are_forgotten_and_do_not_break_publishing() {
        let plane = MemoryEventPlane::new();
        let dropped = plane.subscribe("ns.load").await.unwrap();
        let mut kept = plane.subscribe("ns.load").await.unwrap();
        drop(dropped);
        plane.publish("ns.load", b"1".to_vec()).await.unwrap();
        assert_eq!(kept.try_recv().unwrap(), b"1");
        let count = |p: &MemoryEventPlane| p.subscribers.lock().unwrap()["ns.load"].len();
        assert_eq!(count(&plane), 1);
        drop(kept);
        plane.publish("ns.load", b"2".to_vec()).await.unwrap();
        assert!(plane.subscribers.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn messages_before_the_subscription_are_not_delivered() {
        let plane = MemoryEventPlane::new();
        plane.publish("ns.load", b"early".to_vec()).await.unwrap();
        let mut rx = plane.subscribe("ns.load").await.unwrap();
        plane.publish("ns.load", b"late".to_vec()).await.unwrap();
        assert_eq!(rx.try_recv().unwrap(), b"late");
        assert!(rx.try_recv().is_err());
    }
}
