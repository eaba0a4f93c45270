//! Builds ready engines from a loaded model: places the weights once ([`SharedModel`]), then
//! gives each engine its own KV cache over those weights.

use std::sync::mpsc::Sender;
use std::sync::Arc;

use kv_transfer::{KvLayout, KvMemory};

use runtime::kv_event::KvEvent;
use tch::{Device, Kind};

use crate::card::ModelCard;
use crate::engine::{Engine, EngineConfig};
use crate::error::{EngineError, Result};
use crate::executor::ModelExecutor;
use crate::kv_cache::KvCache;
use crate::loader::LoadedModel;
use crate::model::Llama;

#[derive(Clone, Debug)]
pub struct EngineOptions {
    /// Compute dtype: bf16 serves, f32 reproduces reference outputs exactly.
    pub kind: Kind,
    pub device: Device,
    pub block_size: usize,
    /// KV cache size in blocks; `None` sizes it from `kv_cache_bytes`.
    pub num_blocks: Option<usize>,
    pub kv_cache_bytes: usize,
    pub max_num_seqs: usize,
    pub max_num_batched_tokens: usize,
    /// While sequences decode, prefill gets at most this many tokens of a step (0: the whole
    /// budget).
    pub prefill_chunk_while_decoding: usize,
    pub enable_prefix_caching: bool,
    /// Caps the model's own context length.
    pub max_model_len: Option<usize>,
    /// Steps on CPU through Baton's own kernels (`false`: libtorch ops throughout).
    pub cpu_kernels: bool,
    /// Where the block manager reports Stored/Removed/Cleared (the worker forwards them to the
    /// event plane); `None` keeps them in the engine.
    pub kv_events: Option<Sender<KvEvent>>,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            kind: Kind::BFloat16,
            device: Device::Cpu,
            block_size: 128,
            num_blocks: None,
            kv_cache_bytes: 1 << 30,
            max_num_seqs: 256,
            max_num_batched_tokens: 2048,
            prefill_chunk_while_decoding: 512,
            enable_prefix_caching: true,
            max_model_len: None,
            cpu_kernels: true,
            kv_events: None,
        }
    }
}

/// Parses a device name: `cpu`, `cuda` or `cuda:N`. CUDA needs the `cuda` feature and a GPU.
pub fn parse_device(name: &str) -> Result<Device> {
    let bad = |reason: String| EngineError::InvalidParameter {
        param: "device",
        reason,
    };
    let ordinal = match name {
        "cpu" => return Ok(Device::Cpu),
        "cuda" => 0,
        _ => name
            .strip_prefix("cuda:")
            .and_then(|n| n.parse::<usize>().ok())
            .ok_or_else(|| bad(format!("`{name}` is not `cpu`, `cuda` or `cuda:N`")))?,
    };
    if !cfg!(feature = "cuda") {
        return Err(bad(format!(
            "`{name}`: this build has no CUDA support (build with `--features cuda`)"
        )));
    }
    if ordinal >= tch::Cuda::device_count() as usize {
        return Err(bad(format!("`{name}`: no such CUDA device")));
    }
    Ok(Device::Cuda(ordinal))
}

/// Parses a dtype name as the CLI and configs spell it.
/// The compute dtype `auto` stands for on `device`, and why: bf16 where the hardware computes it
/// natively (CUDA; a CPU with AVX-512-BF16, which every AMX CPU has), f32 elsewhere — on a CPU
/// without it libtorch emulates bf16 matmuls, which halves prefill (measured: 242 against
/// 613 prefill tok/s on an AVX-512F-only Xeon).
pub fn auto_kind(device: Device) -> (Kind, &'static str) {
    if device.is_cuda() {
        return (Kind::BFloat16, "a CUDA device computes bf16 natively");
    }
    if cpu_has_native_bf16() {
        (Kind::BFloat16, "this CPU has AVX-512-BF16")
    } else {
        (
            Kind::Float,
            "this CPU has no AVX-512-BF16 or AMX, so bf16 would be emulated (about half the prefill speed of f32)",
        )
    }
}

fn cpu_has_native_bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// A `--dtype` value: `auto` (see [`auto_kind`]; the reason comes back to be logged), or a
/// dtype name.
pub fn resolve_kind(name: &str, device: Device) -> Option<(Kind, Option<&'static str>)> {
    if name == "auto" {
        let (kind, why) = auto_kind(device);
        return Some((kind, Some(why)));
    }
    parse_kind(name).map(|kind| (kind, None))
}

pub fn parse_kind(name: &str) -> Option<Kind> {
    match name {
        "bf16" | "bfloat16" => Some(Kind::BFloat16),
        "f32" | "float32" | "float" => Some(Kind::Float),
        "f16" | "float16" | "half" => Some(Kind::Half),
        _ => None,
    }
}

impl EngineOptions {
    /// Refuses options no engine can be built with, naming the option.
    pub fn check(&self) -> Result<()> {
        let bad = |param, reason: &str| {
            Err(EngineError::InvalidParameter {
                param,
                reason: reason.to_string(),
            })
        };
        if self.block_size == 0 {
            return bad("block_size", "must be positive");
        }
        if self.max_num_seqs == 0 {
            return bad("max_num_seqs", "must be positive");
        }
        if self.max_num_batched_tokens == 0 {
            return bad("max_num_batched_tokens", "must be positive");
        }
        Ok(())
    }
}

/// A model placed on its device in its compute dtype, from which any number of engines are
/// built; they share the weight tensors (one copy in memory for `baton serve --workers N`).
pub struct SharedModel {
    model: Llama,
    card: ModelCard,
}

impl SharedModel {
    /// Takes the weights of `loaded` into a model of `kind` on `device`.
    pub fn new(loaded: LoadedModel, kind: Kind, device: Device) -> Result<Self> {
        crate::host_threads::on_passing_thread(move || {
            let LoadedModel { card, mut weights } = loaded;
            let model = Llama::new(&card.config, &mut weights, kind, device)?;
            Ok(SharedModel { model, card })
        })
    }

    /// The card as an engine built with `opts` accepts requests.
    pub fn card(&self, opts: &EngineOptions) -> ModelCard {
        self.card.clone().with_max_model_len(opts.max_model_len)
    }

    /// The KV cache an engine built with `opts` gets: its block count from `opts.num_blocks`
    /// or what fits in `opts.kv_cache_bytes`.
    pub fn kv_layout(&self, opts: &EngineOptions) -> Result<KvLayout> {
        opts.check()?;
        let config = &self.card.config;
        let kind = self.model.kind();
        let num_blocks = opts.num_blocks.unwrap_or_else(|| {
            let per_block = KvCache::bytes_per_block(config, opts.block_size, kind);
            (opts.kv_cache_bytes / per_block).max(1)
        });
        if num_blocks == 0 {
            return Err(EngineError::InvalidParameter {
                param: "num_blocks",
                reason: "must be positive".to_string(),
            });
        }
        Ok(KvCache::layout(config, num_blocks, opts.block_size, kind))
    }

    /// A new engine over the shared weights with its own KV cache and scheduler. `opts.kind`
    /// and `opts.device` are the model's: the weights were placed when it was loaded.
    pub fn engine(&self, opts: &EngineOptions) -> Result<(Engine, ModelCard)> {
        self.engine_in(opts, None)
    }

    /// As [`SharedModel::engine`], with the KV cache in `memory` when given (a kv-transfer
    /// sink of [`SharedModel::kv_layout`]'s size, which prefill workers write into).
    pub fn engine_in(
        &self,
        opts: &EngineOptions,
        memory: Option<Arc<dyn KvMemory>>,
    ) -> Result<(Engine, ModelCard)> {
        let layout = self.kv_layout(opts)?;
        let card = self.card(opts);
        let model = self.model.share();
        let num_blocks = layout.num_blocks;
        crate::host_threads::on_passing_thread(move || {
            engine_over(model, num_blocks, card, opts, memory)
        })
    }
}

/// An engine over `model` with a new KV cache of `num_blocks` (in `memory` when given).
fn engine_over(
    mut model: Llama,
    num_blocks: usize,
    card: ModelCard,
    opts: &EngineOptions,
    memory: Option<Arc<dyn KvMemory>>,
) -> Result<(Engine, ModelCard)> {
    let kind = model.kind();
    model.use_cpu_kernels(opts.cpu_kernels);
    tracing::info!(
        num_blocks,
        block_size = opts.block_size,
        ?kind,
        external = memory.is_some(),
        "KV cache ready"
    );
    let cache = match memory {
        Some(memory) => KvCache::in_memory(
            &card.config,
            num_blocks,
            opts.block_size,
            kind,
            model.device(),
            memory,
        )?,
        None => KvCache::new(
            &card.config,
            num_blocks,
            opts.block_size,
            kind,
            model.device(),
        ),
    };
    let executor = ModelExecutor::with_cache(model, cache);
    let config = engine_config(opts, &card);
    let engine = Engine::new(Box::new(executor), config, opts.kv_events.clone());
    Ok((engine, card))
}

/// The scheduler's settings of an engine built with `opts` for `card`.
fn engine_config(opts: &EngineOptions, card: &ModelCard) -> EngineConfig {
    EngineConfig {
        max_num_seqs: opts.max_num_seqs,
        max_num_batched_tokens: opts.max_num_batched_tokens,
        prefill_chunk_while_decoding: opts.prefill_chunk_while_decoding,
        enable_prefix_caching: opts.enable_prefix_caching,
        eos_token_ids: card.eos_token_ids.clone(),
        max_context: card.max_context,
    }
}

/// An engine over the mock executor: `card` gives the vocabulary, EOS ids and context (so the
/// frontend's tokenizer works unchanged), `roofline` the step time, `clock` where it passes.
/// Without `opts.num_blocks`, the cache holds what fits beside the weights on the GPUs.
pub fn mock_engine(
    card: &ModelCard,
    opts: &EngineOptions,
    roofline: crate::mock::Roofline,
    clock: Arc<dyn crate::mock::Clock>,
) -> Result<Engine> {
    opts.check()?;
    let card = card.clone().with_max_model_len(opts.max_model_len);
    let num_blocks = opts.num_blocks.unwrap_or_else(|| {
        crate::mock::kv_blocks_that_fit(
            &roofline.model,
            &roofline.gpu,
            roofline.tensor_parallel,
            opts.block_size,
        )
    });
    let executor = crate::mock::MockExecutor::new(
        roofline,
        clock,
        num_blocks,
        opts.block_size,
        card.config.vocab_size,
    );
    let config = engine_config(opts, &card);
    Ok(Engine::new(
        Box::new(executor),
        config,
        opts.kv_events.clone(),
    ))
}

/// Takes the weights into a model on `opts.device` and returns one engine and the card.
pub fn build_engine(loaded: LoadedModel, opts: &EngineOptions) -> Result<(Engine, ModelCard)> {
    opts.check()?;
    SharedModel::new(loaded, opts.kind, opts.device)?.engine(opts)
}

#[cfg(test)]
mod dtype_tests {
    use super::*;

    #[test]
    fn auto_is_native_bf16_or_f32_and_says_why() {
        assert_eq!(resolve_kind("f32", Device::Cpu), Some((Kind::Float, None)));
        assert_eq!(resolve_kind("f64", Device::Cpu), None);
        let (kind, why) = resolve_kind("auto", Device::Cuda(0)).unwrap();
        assert_eq!(kind, Kind::BFloat16);
        assert!(why.unwrap().contains("CUDA"));
        let (kind, why) = resolve_kind("auto", Device::Cpu).unwrap();
        let why = why.unwrap();
        #[cfg(target_arch = "x86_64")]
        let native = std::is_x86_feature_detected!("avx512bf16");
        #[cfg(not(target_arch = "x86_64"))]
        let native = false;
        // The reason names the feature whichever way it went.
        assert!(why.contains("AVX-512-BF16"), "{why}");
        assert_eq!(kind, if native { Kind::BFloat16 } else { Kind::Float });
    }
}
