//! The runtime: what every Baton component shares — block hashing, KV event types, discovery
//! and the request plane, each a trait with its in-process implementation today (etcd, NATS,
//! the event plane and the work queue come with the distributed-runtime issue).

pub mod block_hash;
pub mod config;
pub mod discovery;
pub mod kv_event;
pub mod protocol;
pub mod request_plane;
