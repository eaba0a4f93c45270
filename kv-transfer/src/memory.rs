//! The memory a KV cache lives in, and the one routine that scatters wire blocks into it.
//!
//! A sink allocates the memory once; the engine wraps it as tensors (tch `from_blob`), so a
//! [`KvMemory`] never moves or unmaps while any `Arc` to it lives. Writers get at it through a
//! raw pointer because the engine reads *other* blocks of the same memory while a transfer runs.
//!
//! # The aliasing invariant
//! Every write through this crate targets blocks the decode worker reserved for one request
//! and granted to one writer (`dst_block_ids`, under a generation: `fence.rs`): the engine does
//! not read them until that request's `PrefillDone` arrives, no two grants share a block, and
//! a copy happens only while the writer holds the block's fence, which the decode worker
//! closes before it frees or reuses the block. So a writer's byte ranges never overlap a range
//! anyone else reads or writes at the same time, which is what makes the `&mut [u8]` views and
//! `copy_nonoverlapping` calls below sound. Checking happens in [`KvLayout::check_write`],
//! [`checked_len`] and the fence, before a byte moves.

use std::io;

use memmap2::MmapMut;

use crate::error::TransferError;
use crate::fence::{Generation, KvFences};
use crate::layout::KvLayout;

/// Memory holding a KV cache; the engine wraps it as tensors (tch from_blob), so it must stay
/// mapped and never move while the Arc lives.
pub trait KvMemory: Send + Sync {
    fn as_mut_ptr(&self) -> *mut u8;
    fn len(&self) -> usize;
    fn location(&self) -> MemoryLocation;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemoryLocation {
    Host,
    Cuda { ordinal: usize },
}

/// Host memory in a mapping: anonymous (in-process and TCP sinks) or a `/dev/shm` file shared
/// with writers in other processes.
pub(crate) struct HostMemory {
    // Held only to keep the mapping alive; all access goes through `ptr`.
    _map: MmapMut,
    ptr: *mut u8,
    len: usize,
}

// SAFETY: `HostMemory` owns its mapping and never hands out references, only the raw pointer;
// concurrent access through it is governed by the aliasing invariant in the module doc.
unsafe impl Send for HostMemory {}
// SAFETY: as for `Send`: `&HostMemory` only exposes the pointer and the length.
unsafe impl Sync for HostMemory {}

impl HostMemory {
    /// Zeroed anonymous memory (the kernel hands out zero pages).
    pub(crate) fn anonymous(len: usize) -> io::Result<HostMemory> {
        Ok(HostMemory::from_mapping(MmapMut::map_anon(len)?))
    }

    pub(crate) fn from_mapping(mut map: MmapMut) -> HostMemory {
        // The pointer is taken once: moving the `MmapMut` value does not move the mapping.
        let ptr = map.as_mut_ptr();
        let len = map.len();
        HostMemory {
            _map: map,
            ptr,
            len,
        }
    }
}

impl KvMemory for HostMemory {
    fn as_mut_ptr(&self) -> *mut u8 {
        self.ptr
    }
    fn len(&self) -> usize {
        self.len
    }
    fn location(&self) -> MemoryLocation {
        MemoryLocation::Host
    }
}

/// The cache size `layout` needs, refusing memory too small to hold it (so offsets computed
/// from the layout stay inside the allocation).
pub(crate) fn checked_len(
    layout: &KvLayout,
    memory: &dyn KvMemory,
) -> Result<usize, TransferError> {
    let needed = layout.checked_total_bytes()?;
    if memory.len() < needed {
        return Err(TransferError::MemoryTooSmall {
            needed,
            len: memory.len(),
        });
    }
    Ok(needed)
}

/// The bytes of block `block` of layer `layer`, for a reader that fills them in place (the TCP
/// server).
///
/// # Safety
/// `layout` must have passed [`checked_len`] against `memory`, `block < layout.num_blocks`,
/// `layer < layout.num_layers`, and the caller must hold the range exclusively under the
/// aliasing invariant (module doc) for the returned lifetime.
// `&dyn KvMemory` in, `&mut` out: the memory is shared by design and exclusivity per range
// comes from the aliasing invariant, not from the borrow.
#[allow(clippy::mut_from_ref)]
pub(crate) unsafe fn layer_chunk_mut<'a>(
    memory: &'a dyn KvMemory,
    layout: &KvLayout,
    layer: usize,
    block: usize,
) -> &'a mut [u8] {
    let offset = layout.offset(layer, block);
    // SAFETY: in bounds by the caller's `checked_len` and index checks; exclusive by the
    // aliasing invariant.
    unsafe {
        std::slice::from_raw_parts_mut(memory.as_mut_ptr().add(offset), layout.layer_block_bytes())
    }
}

/// Writes wire blocks into host memory under `generation`'s grant: each block is taken in
/// `fences` (refused unless granted to `generation`), its per-layer chunks copied to
/// `offset(layer, dst)`, then let go. Returns the bytes written.
pub(crate) fn scatter_blocks(
    memory: &dyn KvMemory,
    layout: &KvLayout,
    fences: &KvFences,
    generation: Generation,
    dst_blocks: &[u32],
    blocks: &[Vec<u8>],
) -> Result<u64, TransferError> {
    layout.check_write(dst_blocks, blocks)?;
    checked_len(layout, memory)?;
    if memory.location() != MemoryLocation::Host {
        return Err(TransferError::NotHostMemory(memory.location()));
    }
    let chunk = layout.layer_block_bytes();
    let base = memory.as_mut_ptr();
    for (&dst, data) in dst_blocks.iter().zip(blocks) {
        let _hold = fences.acquire(dst, generation)?;
        for (layer, src) in data.chunks_exact(chunk).enumerate() {
            let offset = layout.offset(layer, dst as usize);
            // SAFETY: `check_write` bounded `dst` and the block size, `checked_len` the memory,
            // so `offset + chunk <= memory.len()`; `src` is a caller's buffer, never the cache,
            // so the ranges do not overlap; the hold makes the range ours (module doc).
            unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), base.add(offset), chunk) };
        }
    }
    Ok((blocks.len() * layout.block_bytes()) as u64)
}
