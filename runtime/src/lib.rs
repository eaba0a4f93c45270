//! The runtime: what every Baton component shares — block hashing and KV event types today;
//! discovery, request plane, event plane and work queue as later issues add them.

pub mod block_hash;
pub mod kv_event;
