//! `quantization_config`: which weight formats a checkpoint may hold.
//!
//! Only compressed-tensors FP8 is accepted (what llm-compressor writes for the `FP8_DYNAMIC`
//! scheme, e.g. neuralmagic/DeepSeek-R1-Distill-Llama-70B-FP8-dynamic): `float8_e4m3fn` weights
//! with one symmetric scale per output channel. Activation settings are not checked: the engine
//! quantizes activations per token at run time, which is what the dynamic scheme asks for and at
//! least as precise as a static per-tensor input scale.

use super::json::Object;
use crate::error::{EngineError, Result};

/// The weight formats a checkpoint declares.
#[derive(Clone, Debug, PartialEq)]
pub enum Quantization {
    /// No `quantization_config`: every weight is f32, f16 or bf16.
    None,
    /// compressed-tensors FP8, per-channel weight scales.
    Fp8 {
        /// Layers left unquantized (`lm_head`), as listed in `ignore`.
        ignore: Vec<String>,
    },
}

impl Quantization {
    /// Whether the layer (a weight name without `.weight`) is listed in `ignore`. Entries are
    /// layer names or `re:` regular expressions; only plain names are matched here.
    pub fn ignores(&self, layer: &str) -> bool {
        match self {
            Quantization::None => false,
            Quantization::Fp8 { ignore } => ignore.iter().any(|l| l == layer),
        }
    }
}

fn unsupported(what: impl Into<String>) -> EngineError {
    EngineError::UnsupportedQuantization(what.into())
}

/// Reads `quantization_config` from the `config.json` object.
pub(super) fn parse(config: &Object) -> Result<Quantization> {
    let Some(q) = config.object("quantization_config")? else {
        return Ok(Quantization::None);
    };
    let method: String = q.require("quant_method")?;
    if method != "compressed-tensors" {
        return Err(unsupported(method));
    }
    if let Some(sparsity) = q.object("sparsity_config")? {
        let format: Option<String> = sparsity.get("format")?;
        if let Some(format) = format.filter(|f| f != "dense") {
            return Err(unsupported(format!(
                "compressed-tensors sparsity format {format}"
            )));
        }
    }
    if q.object("kv_cache_scheme")?.is_some() {
        tracing::warn!(
            "ignoring the compressed-tensors `kv_cache_scheme`: the KV cache stays unquantized"
        );
    }
    let top_format: Option<String> = q.get("format")?;
    let groups = q
        .object("config_groups")?
        .ok_or_else(|| unsupported("compressed-tensors without `config_groups`"))?
        .objects()?;
    if groups.is_empty() {
        return Err(unsupported("compressed-tensors with empty `config_groups`"));
    }
    for (name, group) in groups {
        let format: Option<String> = match group.get("format")? {
            Some(f) => Some(f),
            None => top_format.clone(),
        };
        match format.as_deref() {
            Some("float-quantized" | "naive-quantized") => {}
            Some(other) => return Err(unsupported(format!("compressed-tensors format {other}"))),
            None => return Err(unsupported("compressed-tensors without a `format`")),
        }
        let weights = group.object("weights")?.ok_or_else(|| {
            unsupported(format!("compressed-tensors group {name} without `weights`"))
        })?;
        let num_bits: u32 = weights.require("num_bits")?;
        let kind: String = weights.require("type")?;
        let strategy: String = weights.require("strategy")?;
        let symmetric: bool = weights.get("symmetric")?.unwrap_or(true);
        if num_bits != 8 || kind != "float" || strategy != "channel" || !symmetric {
            let symmetry = if symmetric { "symmetric" } else { "asymmetric" };
            return Err(unsupported(format!(
                "compressed-tensors {num_bits}-bit {kind} weights, {symmetry}, strategy {strategy} \
                 (supported: 8-bit float, symmetric, strategy channel)"
            )));
        }
    }
    Ok(Quantization::Fp8 {
        ignore: q.get("ignore")?.unwrap_or_default(),
    })
}
