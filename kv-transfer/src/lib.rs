//! kv-transfer moves finished prefill KV blocks from a prefill worker into the blocks a decode
//! worker reserved for the request (DESIGN.md §4, §6). The decode worker's KV cache lives in
//! memory this crate allocates (a [`KvSink`]): anonymous memory for the in-process backend, a
//! `/dev/shm` segment that a prefill worker on the same host maps (in-process writers then use
//! that same segment), device memory for CUDA; a TCP server writes frames from other hosts into
//! the same host memory. The sink's [`KvDescriptor`] (layout and endpoints) travels through
//! discovery; a prefill worker [`connect`]s to it — after checking that both sides agree on the
//! layout — and gets a [`KvTransfer`] whose `write_blocks` puts whole blocks (every layer) at
//! the destination block ids. Every write is fenced ([`KvFences`]): it lands only in blocks the
//! decode worker granted to the writer's claim, under the generation the grant named, so a
//! writer whose claim ended (expired, cancelled, taken over) is refused before a byte lands;
//! the TCP server also refuses a peer that does not present the sink's secret.

mod backend;
mod descriptor;
mod error;
mod fence;
mod layout;
mod memory;
mod registry;
mod sink;
pub mod tls;
mod transfer;

pub use descriptor::{address_towards, KvDescriptor, KvEndpoint, SinkSecret, TransferBackend};
pub use error::TransferError;
pub use fence::{BlockHeld, BlockHold, Generation, KvFences};
pub use layout::KvLayout;
pub use memory::{KvMemory, MemoryLocation};
pub use sink::KvSink;
pub use transfer::{connect, connect_with, BackendChoice, KvTransfer};
