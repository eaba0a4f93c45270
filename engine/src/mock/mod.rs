//! The mock engine (DESIGN.md §3): a simulated DeepSeek-R1-Distill-Llama-70B on H100/H200 GPUs
//! behind the real scheduler. `spec` holds the GPUs and the model shape, `timing` the roofline
//! that turns a step's shape into seconds, `clock` real (sleeping, with a speed-up) or virtual
//! time, `executor` the `MockExecutor` that plugs into the executor seam.

pub mod clock;
pub mod executor;
pub mod spec;
pub mod timing;

pub use clock::{Clock, RealClock, VirtualClock};
pub use executor::MockExecutor;
pub use spec::{GpuSpec, MockModel, H100_SXM, H200};
pub use timing::{Efficiency, Roofline, StepShape, CALIBRATED_EFFICIENCY};

/// KV blocks that fit beside the weights on `tp` GPUs (90 % of HBM for weights and KV, as
/// vLLM's default `gpu-memory-utilization`).
pub fn kv_blocks_that_fit(model: &MockModel, gpu: &GpuSpec, tp: usize, block_size: usize) -> usize {
    let budget = gpu.hbm_bytes * tp.max(1) as f64 * 0.9 - model.params() * model.weight_bytes;
    let per_block = model.kv_bytes_per_token() * block_size as f64;
    (budget / per_block).max(1.0) as usize
}

/// The KV layout a mock engine of `model` would have with `num_blocks` blocks: what its
/// simulated transfers are timed by, and what prefill and decode workers check they agree on.
/// Every tensor-parallel shard together, as the bytes a whole prompt moves.
pub fn kv_layout(model: &MockModel, block_size: usize, num_blocks: usize) -> kv_transfer::KvLayout {
    kv_transfer::KvLayout {
        num_layers: model.num_layers,
        num_kv_heads: model.num_kv_heads,
        head_dim: model.head_dim,
        block_size,
        dtype: if model.kv_bytes == 1.0 {
            "fp8_e4m3"
        } else {
            "bf16"
        }
        .into(),
        elem_bytes: model.kv_bytes as usize,
        num_blocks,
    }
}
