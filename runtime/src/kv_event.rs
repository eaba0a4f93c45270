//! KV cache events: what a worker's block manager reports about its prefix cache so the KV
//! router's indexer can mirror it (DESIGN §2 `{namespace}.kv_events`; the shape of Dynamo's
//! `KvCacheEvent`).
//!
//! Wire shape (one JSON object per event):
//! `{"worker_id":1,"event_id":7,"data":{"Stored":{"parent_hash":null,"blocks":[{"block_hash":…,"tokens_hash":…}]}}}`,
//! `{"worker_id":1,"event_id":8,"data":{"Removed":{"block_hashes":[…]}}}`,
//! `{"worker_id":1,"event_id":9,"data":"Cleared"}`.

use serde::{Deserialize, Serialize};

use crate::block_hash::BlockHash;

/// One change to a worker's prefix cache. `event_id` increases by one per event of a worker, so
/// a gap tells the receiver it missed something.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KvEvent {
    pub event_id: u64,
    pub data: KvEventData,
}

/// What changed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum KvEventData {
    /// Blocks newly registered, in chain order; `parent_hash` is the block hash of the block
    /// before the first one (`None` when the first is the sequence's first block).
    Stored {
        parent_hash: Option<u64>,
        blocks: Vec<BlockHash>,
    },
    /// Blocks evicted from the prefix cache, by block hash.
    Removed { block_hashes: Vec<u64> },
    /// The whole prefix cache was reset.
    Cleared,
}

/// A [`KvEvent`] on the wire, tagged with the worker that emitted it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WorkerKvEvent {
    pub worker_id: u64,
    #[serde(flatten)]
    pub event: KvEvent,
}

/// One cached block of a worker's prefix cache, with the block before it in its chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CachedBlock {
    /// Block hash of the parent block; `None` for a sequence's first block.
    pub parent_hash: Option<u64>,
    pub block: BlockHash,
}

/// A worker's whole prefix cache as of one event: what a router loads when it meets a worker
/// or cannot fill an event-id gap from the worker's ring of recent events.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct KvDump {
    /// The id of the last event reflected in `blocks` (`None`: the worker emitted none yet), so
    /// events after it apply on top and earlier ones are duplicates.
    pub last_event_id: Option<u64>,
    /// Every cached block, parents before children.
    pub blocks: Vec<CachedBlock>,
}

/// The key of a worker's discovery metadata that names the request-plane address where it
/// answers [`KvStateQuery`]s.
pub const KV_STATE_KEY: &str = "kv_state";

/// What a router asks a worker for when its view of the worker's cache may be stale.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KvStateQuery {
    /// The first event id the router lacks; `None` asks for a dump straight away.
    pub since: Option<u64>,
}

/// The worker's answer: the missing events when its ring still holds them all, else a dump.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum KvStateReply {
    Events(Vec<KvEvent>),
    Dump(KvDump),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(event: WorkerKvEvent) -> serde_json::Value {
        let json = serde_json::to_string(&event).unwrap();
        let back: WorkerKvEvent = serde_json::from_str(&json).unwrap();
        assert_eq!(back, event);
        serde_json::from_str(&json).unwrap()
    }

    #[test]
    fn roundtrip_and_shape() {
        let stored = roundtrip(WorkerKvEvent {
            worker_id: 3,
            event: KvEvent {
                event_id: 1,
                data: KvEventData::Stored {
                    parent_hash: Some(42),
                    blocks: vec![BlockHash {
                        block_hash: u64::MAX,
                        tokens_hash: 5,
                    }],
                },
            },
        });
        assert_eq!(
            stored,
            serde_json::json!({
                "worker_id": 3,
                "event_id": 1,
                "data": {"Stored": {"parent_hash": 42, "blocks": [
                    {"block_hash": u64::MAX, "tokens_hash": 5}
                ]}}
            })
        );

        let removed = roundtrip(WorkerKvEvent {
            worker_id: 3,
            event: KvEvent {
                event_id: 2,
                data: KvEventData::Removed {
                    block_hashes: vec![1, 2],
                },
            },
        });
        assert_eq!(
            removed,
            serde_json::json!({
                "worker_id": 3, "event_id": 2, "data": {"Removed": {"block_hashes": [1, 2]}}
            })
        );

        let cleared = roundtrip(WorkerKvEvent {
            worker_id: 3,
            event: KvEvent {
                event_id: 3,
                data: KvEventData::Cleared,
            },
        });
        assert_eq!(
            cleared,
            serde_json::json!({"worker_id": 3, "event_id": 3, "data": "Cleared"})
        );

        let root: WorkerKvEvent = serde_json::from_str(
            r#"{"worker_id":1,"event_id":0,"data":{"Stored":{"parent_hash":null,"blocks":[]}}}"#,
        )
        .unwrap();
        assert_eq!(
            root.event.data,
            KvEventData::Stored {
                parent_hash: None,
                blocks: vec![]
            }
        );
    }
}
