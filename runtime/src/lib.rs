//! The runtime: what every Baton component shares — block hashing, KV event types and
//! discovery (in-memory today; etcd, the request plane, event plane and work queue come with
//! the serving-path and distributed-runtime issues).

pub mod block_hash;
pub mod discovery;
pub mod kv_event;
