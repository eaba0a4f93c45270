//! A link without bytes, for the mock engine: the sink keeps no memory and a write checks its
//! block ids, then takes the time the bytes would need on the link (`bytes / rate`, the
//! endpoint's address). What a simulated 70B's prefill worker "sends" is 20 MiB a block, which
//! no test machine should allocate; the timing is what a study needs.

use std::time::Duration;

use async_trait::async_trait;

use crate::descriptor::TransferBackend;
use crate::error::TransferError;
use crate::fence::Generation;
use crate::layout::KvLayout;
use crate::memory::{KvMemory, MemoryLocation};
use crate::transfer::KvTransfer;

/// The memory of a simulated sink: none.
pub(crate) struct NoMemory;

impl KvMemory for NoMemory {
    fn as_mut_ptr(&self) -> *mut u8 {
        std::ptr::null_mut()
    }
    fn len(&self) -> usize {
        0
    }
    fn location(&self) -> MemoryLocation {
        MemoryLocation::Host
    }
}

/// Parses an endpoint address: bytes per second, positive (`inf`: no time at all).
pub(crate) fn parse_rate(address: &str) -> Result<f64, TransferError> {
    match address.parse::<f64>() {
        Ok(r) if r > 0.0 => Ok(r),
        _ => Err(TransferError::Backends {
            backends: vec![TransferBackend::Simulated.to_string()],
            reason: format!("the link rate must be positive bytes/s (or inf), not `{address}`"),
        }),
    }
}

pub(crate) struct SimulatedLink {
    layout: KvLayout,
    bytes_per_s: f64,
}

impl SimulatedLink {
    pub(crate) fn open(layout: KvLayout, address: &str) -> Result<Self, TransferError> {
        Ok(Self {
            layout,
            bytes_per_s: parse_rate(address)?,
        })
    }
}

#[async_trait]
impl KvTransfer for SimulatedLink {
    fn backend(&self) -> TransferBackend {
        TransferBackend::Simulated
    }

    /// The blocks' contents are ignored (the mock's are empty); their destinations are checked
    /// as every backend checks them. No bytes land anywhere, so there is nothing to fence.
    async fn write_blocks(
        &self,
        _generation: Generation,
        dst_blocks: &[u32],
        blocks: &[Vec<u8>],
    ) -> Result<u64, TransferError> {
        self.layout.check_destinations(dst_blocks, blocks.len())?;
        let bytes = (dst_blocks.len() * self.layout.block_bytes()) as u64;
        let seconds = bytes as f64 / self.bytes_per_s;
        if seconds > 0.0 && seconds.is_finite() {
            tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
        }
        Ok(bytes)
    }
}
