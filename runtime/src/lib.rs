//! The runtime: what every Baton component shares — component discovery (memory | etcd), the
//! request plane (in-process | NATS), the event plane (in-process | NATS), the prefill work
//! queue (in-process | JetStream), bundled as [`Planes`]; and the wire types: the generate
//! protocol, block hashing and KV events. Each plane is a trait with its in-process
//! implementation beside the networked one; the networked ones (and their NATS and etcd
//! clients) come with the `network` feature, so crates that need only the traits and wire
//! types (the engine among them) do not compile them.

pub mod block_hash;
pub mod discovery;
pub mod dropped;
pub mod event_plane;
pub mod kv_event;
pub mod planes;
pub mod protocol;
pub mod request_plane;
pub mod work_queue;

pub use planes::{PlaneSettings, Planes, PlanesError};
