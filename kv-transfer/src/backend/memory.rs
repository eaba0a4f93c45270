//! Host-copy writer: in-process (the registered memory itself) and shared memory (the writer's
//! own mapping of the sink's `/dev/shm` file). Either way a write is one `memcpy` per layer
//! chunk, which is the physical limit for moving KV between processes on one host.

use std::sync::Arc;

use async_trait::async_trait;

use crate::descriptor::TransferBackend;
use crate::error::TransferError;
use crate::layout::KvLayout;
use crate::memory::{checked_len, scatter_blocks, KvMemory};
use crate::registry;
use crate::transfer::KvTransfer;

pub(crate) struct HostWriter {
    backend: TransferBackend,
    memory: Arc<dyn KvMemory>,
    layout: KvLayout,
}

impl HostWriter {
    pub(crate) fn new(
        backend: TransferBackend,
        memory: Arc<dyn KvMemory>,
        layout: KvLayout,
    ) -> Result<HostWriter, TransferError> {
        checked_len(&layout, &*memory)?;
        Ok(HostWriter {
            backend,
            memory,
            layout,
        })
    }
}

/// The in-process writer for the cache registered as `name`. The registered layout is the
/// one written with (it is the cache's own); `ours` must fit it like the descriptor's.
pub(crate) fn open(name: &str, ours: &KvLayout) -> Result<HostWriter, TransferError> {
    let (memory, layout) =
        registry::lookup(name).ok_or_else(|| TransferError::UnknownLocal(name.to_string()))?;
    ours.check_compatible(&layout)?;
    HostWriter::new(TransferBackend::Memory, memory, layout)
}

#[async_trait]
impl KvTransfer for HostWriter {
    fn backend(&self) -> TransferBackend {
        self.backend
    }

    async fn write_blocks(
        &self,
        dst_blocks: &[u32],
        blocks: &[Vec<u8>],
    ) -> Result<u64, TransferError> {
        // Inline rather than on a blocking thread: a memcpy at memory bandwidth finishes a
        // prompt's blocks in milliseconds, less than handing the slices to another thread
        // would cost in copies (the caller's buffers are borrowed, not owned).
        scatter_blocks(&*self.memory, &self.layout, dst_blocks, blocks)
    }
}
