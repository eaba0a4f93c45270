//! Host-copy writer: in-process (the registered memory itself) and shared memory (the writer's
//! own mapping of the sink's `/dev/shm` file). Either way a write is one `memcpy` per layer
//! chunk, which is the physical limit for moving KV between processes on one host.

use std::sync::Arc;

use async_trait::async_trait;

use crate::descriptor::TransferBackend;
use crate::error::TransferError;
use crate::fence::{Generation, KvFences};
use crate::layout::KvLayout;
use crate::memory::{checked_len, scatter_blocks, KvMemory};
use crate::registry;
use crate::transfer::KvTransfer;

pub(crate) struct HostWriter {
    backend: TransferBackend,
    memory: Arc<dyn KvMemory>,
    layout: KvLayout,
    fences: KvFences,
}

impl HostWriter {
    pub(crate) fn new(
        backend: TransferBackend,
        memory: Arc<dyn KvMemory>,
        layout: KvLayout,
        fences: KvFences,
    ) -> Result<HostWriter, TransferError> {
        checked_len(&layout, &*memory)?;
        if fences.num_blocks() != layout.num_blocks {
            return Err(TransferError::Fence(format!(
                "a table of {} blocks for a cache of {}",
                fences.num_blocks(),
                layout.num_blocks
            )));
        }
        Ok(HostWriter {
            backend,
            memory,
            layout,
            fences,
        })
    }
}

/// The in-process writer for the cache registered as `name`. The registered layout is the
/// one written with (it is the cache's own); `ours` must fit it like the descriptor's.
pub(crate) fn open(name: &str, ours: &KvLayout) -> Result<HostWriter, TransferError> {
    let local =
        registry::lookup(name).ok_or_else(|| TransferError::UnknownLocal(name.to_string()))?;
    ours.check_compatible(&local.layout)?;
    HostWriter::new(
        TransferBackend::Memory,
        local.memory,
        local.layout,
        local.fences,
    )
}

#[async_trait]
impl KvTransfer for HostWriter {
    fn backend(&self) -> TransferBackend {
        self.backend
    }

    async fn write_blocks(
        &self,
        generation: Generation,
        dst_blocks: &[u32],
        blocks: &[Vec<u8>],
    ) -> Result<u64, TransferError> {
        // Inline rather than on a blocking thread: a memcpy at memory bandwidth finishes a
        // prompt's blocks in milliseconds, less than handing the slices to another thread
        // would cost in copies (the caller's buffers are borrowed, not owned).
        scatter_blocks(
            &*self.memory,
            &self.layout,
            &self.fences,
            generation,
            dst_blocks,
            blocks,
        )
    }
}
