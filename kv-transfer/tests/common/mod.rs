//! Shared by the kv-transfer tests: a small layout, distinct block patterns, a view of a sink.

#![allow(dead_code)]

use std::net::{IpAddr, Ipv4Addr};

use kv_transfer::{KvLayout, KvSink};

pub const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// 3 layers, 2 KV heads, head_dim 8, 16-token blocks, f32, 10 blocks: 1 KiB a layer chunk.
pub fn small_layout() -> KvLayout {
    KvLayout {
        num_layers: 3,
        num_kv_heads: 2,
        head_dim: 8,
        block_size: 16,
        dtype: "f32".into(),
        elem_bytes: 4,
        num_blocks: 10,
    }
}

/// The byte at `i` of layer `layer` in wire block `seed`: never zero, and different per block,
/// per layer and per position, so a chunk landing anywhere but its place shows.
pub fn pattern_byte(seed: usize, layer: usize, i: usize) -> u8 {
    ((seed * 31 + layer * 7 + i) % 251 + 1) as u8
}

pub fn pattern_block(layout: &KvLayout, seed: usize) -> Vec<u8> {
    let chunk = layout.layer_block_bytes();
    (0..layout.block_bytes())
        .map(|i| pattern_byte(seed, i / chunk, i % chunk))
        .collect()
}

/// A copy of the sink's whole cache.
pub fn snapshot(sink: &KvSink) -> Vec<u8> {
    let memory = sink.memory();
    // SAFETY: host memory of `len` bytes that lives while `memory` does; no write is in flight
    // while a test looks at it.
    unsafe { std::slice::from_raw_parts(memory.as_mut_ptr(), memory.len()) }.to_vec()
}

pub fn layer_chunk<'a>(cache: &'a [u8], layout: &KvLayout, layer: usize, block: usize) -> &'a [u8] {
    let start = layout.offset(layer, block);
    &cache[start..start + layout.layer_block_bytes()]
}
