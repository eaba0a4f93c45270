//! The paged KV cache: per layer one tensor `[num_blocks, 2, block_size, kv_heads, head_dim]`.
//! A block holds K then V for `block_size` consecutive positions of one sequence, so one block
//! of one layer is a single contiguous range — the unit kv-transfer moves between workers.

use tch::{Device, Kind, Tensor};

use crate::config::LlamaConfig;

pub struct KvCache {
    layers: Vec<Tensor>,
    block_size: usize,
    num_blocks: usize,
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

    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }
}
