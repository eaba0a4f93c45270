//! The paged KV cache: per layer one tensor `[num_blocks, 2, block_size, kv_heads, head_dim]`.
//! A block holds K then V for `block_size` consecutive positions of one sequence, so one block
//! of one layer is a single contiguous range — the unit kv-transfer moves between workers.

use tch::{Device, Kind, Tensor};

use crate::config::LlamaConfig;
use crate::error::{EngineError, Result};

pub struct KvCache {
    layers: Vec<Tensor>,
    block_size: usize,
    num_blocks: usize,
    /// [`KvCache::bytes_per_block`] of this cache.
    block_bytes: usize,
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
        }
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
