//! `config.json` of a transformers Llama checkpoint: the architecture check, the hyper-parameters
//! with transformers' `LlamaConfig` defaults, RoPE scaling, the special-token ids and the
//! quantization scheme.

use serde_json::{Map, Value};

use super::json::{Object, OneOrMany};
use super::quant::{self, Quantization};
use crate::config::{LlamaConfig, RopeScaling};
use crate::error::{EngineError, Result};

const FILE: &str = "config.json";

/// What `config.json` says about a model.
#[derive(Clone, Debug, PartialEq)]
pub struct HfConfig {
    pub llama: LlamaConfig,
    /// `bos_token_id` (the first, when a list is given).
    pub bos_token_id: Option<u32>,
    /// `eos_token_id`, as a list.
    pub eos_token_ids: Vec<u32>,
    pub quantization: Quantization,
}

/// Parses and validates a `config.json` object.
pub fn parse(map: &Map<String, Value>) -> Result<HfConfig> {
    let obj = Object::new(FILE, map);
    check_architecture(&obj)?;

    let hidden_size: usize = obj.require("hidden_size")?;
    let num_attention_heads: usize = obj.require("num_attention_heads")?;
    let num_key_value_heads = obj
        .get("num_key_value_heads")?
        .unwrap_or(num_attention_heads);
    let head_dim = match obj.get("head_dim")? {
        Some(d) => d,
        None => hidden_size.checked_div(num_attention_heads).unwrap_or(0),
    };
    let llama = LlamaConfig {
        hidden_size,
        intermediate_size: obj.require("intermediate_size")?,
        num_hidden_layers: obj.require("num_hidden_layers")?,
        num_attention_heads,
        num_key_value_heads,
        head_dim,
        vocab_size: obj.require("vocab_size")?,
        max_position_embeddings: obj.require("max_position_embeddings")?,
        rope_theta: obj.get("rope_theta")?.unwrap_or(10_000.0),
        rope_scaling: rope_scaling(&obj)?,
        rms_norm_eps: obj.require("rms_norm_eps")?,
        tie_word_embeddings: obj.get("tie_word_embeddings")?.unwrap_or(false),
    };
    llama.validate().map_err(|e| match e {
        EngineError::InvalidConfig(reason) => {
            EngineError::InvalidConfig(format!("{reason} in {FILE}"))
        }
        other => other,
    })?;

    let bos_token_id = obj
        .get::<OneOrMany<u32>>("bos_token_id")?
        .and_then(|ids| ids.into_vec().into_iter().next());
    let eos_token_ids = obj
        .get::<OneOrMany<u32>>("eos_token_id")?
        .map(OneOrMany::into_vec)
        .unwrap_or_default();
    Ok(HfConfig {
        llama,
        bos_token_id,
        eos_token_ids,
        quantization: quant::parse(&obj)?,
    })
}

/// `architectures` must list `LlamaForCausalLM`; only a config without `architectures` falls back
/// to `model_type: llama` (a `LlamaForSequenceClassification` has no language-model head).
fn check_architecture(obj: &Object) -> Result<()> {
    let architectures: Vec<String> = obj.get("architectures")?.unwrap_or_default();
    let model_type: Option<String> = obj.get("model_type")?;
    let supported = if architectures.is_empty() {
        model_type.as_deref() == Some("llama")
    } else {
        architectures.iter().any(|a| a == "LlamaForCausalLM")
    };
    if supported {
        return Ok(());
    }
    let found = if architectures.is_empty() {
        model_type.unwrap_or_else(|| "neither `architectures` nor `model_type` given".to_string())
    } else {
        architectures.join(", ")
    };
    Err(EngineError::UnsupportedArchitecture(found))
}

/// `rope_scaling`: `null`, `{rope_type: llama3, ...}` or `{type: linear, factor}`. Older configs
/// spell the type `type`, newer ones `rope_type`; `default` means no scaling.
fn rope_scaling(obj: &Object) -> Result<Option<RopeScaling>> {
    let Some(rs) = obj.object("rope_scaling")? else {
        return Ok(None);
    };
    let kind: String = match rs.get("rope_type")? {
        Some(kind) => kind,
        None => rs.require("type")?,
    };
    match kind.as_str() {
        "default" => Ok(None),
        "linear" => Ok(Some(RopeScaling::Linear {
            factor: rs.require("factor")?,
        })),
        "llama3" => Ok(Some(RopeScaling::Llama3 {
            factor: rs.require("factor")?,
            low_freq_factor: rs.require("low_freq_factor")?,
            high_freq_factor: rs.require("high_freq_factor")?,
            original_max_position_embeddings: rs.require("original_max_position_embeddings")?,
        })),
        other => Err(EngineError::InvalidConfig(format!(
            "`rope_scaling` type `{other}` in {FILE} is not supported (supported: llama3, linear)"
        ))),
    }
}
