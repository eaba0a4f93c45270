//! The paged KV cache: per layer one tensor `[num_blocks, 2, block_size, kv_heads, head_dim]`.
//! A block holds K then V for `block_size` consecutive positions of one sequence, so one block
//! of one layer is a single contiguous range — the unit kv-transfer moves between workers.

use std::sync::Arc;

use kv_transfer::{KvLayout, KvMemory, MemoryLocation};
use tch::{Device, Kind, Tensor};

use crate::config::LlamaConfig;
use crate::error::{EngineError, Result};

pub struct KvCache {
    layers: Vec<Tensor>,
    block_size: usize,
    num_blocks: usize,
    /// [`KvCache::bytes_per_block`] of this cache.
    block_bytes: usize,
    /// Memory the layer tensors point into when it is not theirs (a kv-transfer sink, so
    /// prefill workers can write blocks into it). Declared after `layers`: dropped after them.
    _memory: Option<Arc<dyn KvMemory>>,
}

/// The name kv-transfer layouts give a cache dtype.
pub fn kind_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Float => "f32",
        Kind::BFloat16 => "bf16",
        Kind::Half => "f16",
        Kind::Float8e4m3fn => "fp8_e4m3",
        _ => "other",
    }
}

impl KvCache {
    pub fn new(
        config: &LlamaConfig,
        num_blocks: usize,
        block_size: usize,
        kind: Kind,
        device: Device,
    ) -> Self {
        let shape = [
            num_blocks as i64,
            2,
            block_size as i64,
            config.num_key_value_heads as i64,
            config.head_dim as i64,
        ];
        let layers = (0..config.num_hidden_layers)
            .map(|_| Tensor::zeros(shape, (kind, device)))
            .collect();
        KvCache {
            layers,
            block_size,
            num_blocks,
            block_bytes: Self::bytes_per_block(config, block_size, kind),
            _memory: None,
        }
    }

    /// The layout of a cache [`KvCache::new`] or [`KvCache::in_memory`] would build.
    pub fn layout(
        config: &LlamaConfig,
        num_blocks: usize,
        block_size: usize,
        kind: Kind,
    ) -> KvLayout {
        KvLayout {
            num_layers: config.num_hidden_layers,
            num_kv_heads: config.num_key_value_heads,
            head_dim: config.head_dim,
            block_size,
            dtype: kind_name(kind).to_string(),
            elem_bytes: kind.elt_size_in_bytes(),
            num_blocks,
        }
    }

    /// A cache whose layer tensors live in `memory` (laid out as [`KvCache::layout`] says), so
    /// what kv-transfer writes there is what attention reads.
    pub fn in_memory(
        config: &LlamaConfig,
        num_blocks: usize,
        block_size: usize,
        kind: Kind,
        device: Device,
        memory: Arc<dyn KvMemory>,
    ) -> Result<Self> {
        let layout = Self::layout(config, num_blocks, block_size, kind);
        if memory.len() < layout.total_bytes() {
            return Err(EngineError::InvalidParameter {
                param: "kv_memory",
                reason: format!(
                    "{} bytes of memory for a cache of {} bytes",
                    memory.len(),
                    layout.total_bytes()
                ),
            });
        }
        let matches = match (memory.location(), device) {
            (MemoryLocation::Host, Device::Cpu) => true,
            (MemoryLocation::Cuda { ordinal }, Device::Cuda(d)) => ordinal == d,
            _ => false,
        };
        if !matches {
            return Err(EngineError::InvalidParameter {
                param: "kv_memory",
                reason: format!(
                    "memory on {:?} for a cache on {device:?}",
                    memory.location()
                ),
            });
        }
        let shape = [
            num_blocks as i64,
            2,
            block_size as i64,
            config.num_key_value_heads as i64,
            config.head_dim as i64,
        ];
        let mut strides = [1i64; 5];
        for i in (0..4).rev() {
            strides[i] = strides[i + 1] * shape[i + 1];
        }
        let layers = (0..config.num_hidden_layers)
            .map(|l| {
                // SAFETY: the range [offset(l, 0), offset(l, 0) + layer_bytes) lies inside
                // `memory` (checked above), which stays mapped while `_memory` holds it, and the
                // struct drops `layers` first.
                unsafe {
                    let ptr = memory.as_mut_ptr().add(layout.offset(l, 0));
                    Tensor::f_from_blob(ptr, &shape, &strides, kind, device)
                }
            })
            .collect::<std::result::Result<Vec<_>, _>>()?;
        Ok(KvCache {
            layers,
            block_size,
            num_blocks,
            block_bytes: layout.block_bytes(),
            _memory: Some(memory),
        })
    }

    /// Bytes one block occupies across all layers.
    pub fn bytes_per_block(config: &LlamaConfig, block_size: usize, kind: Kind) -> usize {
        2 * block_size
            * config.num_key_value_heads
            * config.head_dim
            * config.num_hidden_layers
            * kind.elt_size_in_bytes()
    }

    pub fn layer(&self, layer: usize) -> &Tensor {
        &self.layers[layer]
    }

    pub fn layer_mut(&mut self, layer: usize) -> &mut Tensor {
        &mut self.layers[layer]
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Bytes of one block over every layer.
    pub fn block_bytes(&self) -> usize {
        self.block_bytes
    }

    fn check_block(&self, block: u32) -> Result<i64> {
        if block as usize >= self.num_blocks {
            return Err(EngineError::NoSuchBlock {
                block,
                num_blocks: self.num_blocks,
            });
        }
        Ok(i64::from(block))
    }

    /// Block `block` of every layer, layer-major, as raw bytes of the cache dtype.
    pub fn read_block(&self, block: u32) -> Result<Vec<u8>> {
        let b = self.check_block(block)?;
        let mut out = Vec::with_capacity(self.block_bytes());
        for layer in &self.layers {
            // One block of one layer is contiguous (the leading dimension), so this copies once.
            let part = layer.get(b).to_device(Device::Cpu).contiguous();
            let len = part.numel() * part.kind().elt_size_in_bytes();
            let start = out.len();
            out.resize(start + len, 0);
            part.f_copy_data_u8(&mut out[start..], part.numel())?;
        }
        Ok(out)
    }

    /// Overwrites block `block` of every layer from [`KvCache::read_block`]'s layout.
    pub fn write_block(&mut self, block: u32, data: &[u8]) -> Result<()> {
        let b = self.check_block(block)?;
        let expected = self.block_bytes();
        if data.len() != expected {
            return Err(EngineError::BlockDataSize {
                expected,
                got: data.len(),
            });
        }
        let mut offset = 0;
        for layer in &mut self.layers {
            let mut dst = layer.get(b);
            let len = dst.numel() * dst.kind().elt_size_in_bytes();
            let src =
                Tensor::f_from_data_size(&data[offset..offset + len], &dst.size(), dst.kind())?
                    .to_device(dst.device());
            dst.f_copy_(&src)?;
            offset += len;
        }
        Ok(())
    }

    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }
}
