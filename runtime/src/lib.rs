//! The runtime: what every Baton component shares — component discovery (memory | etcd), the
//! request plane (in-process | NATS), the event plane (in-process | NATS), the work queue
//! (in-process | JetStream), graph configs, block hashing and KV event types. Each is a trait with
//! its simple implementation beside the networked one, so `baton serve` with no NATS or etcd
//! runs every code path except the network.

pub mod block_hash;
pub mod config;
pub mod discovery;
pub mod event_plane;
pub mod infra;
pub mod kv_event;
pub mod protocol;
pub mod request_plane;
pub mod work_queue;
