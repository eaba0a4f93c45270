//! GGUF loader: a llama.cpp model file becomes a model card and f32 weights under Hugging Face
//! names, so the model code sees the same thing it would from a transformers checkpoint.
//!
//! Quantized tensors are dequantized on load (the engine casts to its compute dtype later), the
//! Q and K rows are put back from llama.cpp's interleaved RoPE order into the rotate-half order
//! transformers uses, and the tokenizer is rebuilt from the vocabulary in the metadata.

pub mod dequant;
pub mod metadata;
pub mod reader;

use std::path::Path;

use tch::Tensor;

pub use metadata::{Metadata, MetadataValue};
pub use reader::{GgmlType, GgufFile, TensorInfo};

use super::gguf_tokenizer;
use super::LoadedModel;
use crate::card::ModelCard;
use crate::config::{LlamaConfig, RopeScaling};
use crate::error::{EngineError, Result};
use crate::weights::{WeightTensor, Weights};

/// Loads card and weights.
pub fn load(path: &Path) -> Result<LoadedModel> {
    let file = GgufFile::open(path)?;
    let card = card(&file)?;
    let weights = weights(&file, &card.config)?;
    Ok(LoadedModel { card, weights })
}

/// Reads only what the card needs (metadata, vocabulary), leaving the tensor data untouched.
pub fn load_card(path: &Path) -> Result<ModelCard> {
    card(&GgufFile::open(path)?)
}

fn invalid(meta: &Metadata, reason: impl Into<String>) -> EngineError {
    EngineError::InvalidGguf {
        path: meta.path().to_path_buf(),
        reason: reason.into(),
    }
}

fn card(file: &GgufFile) -> Result<ModelCard> {
    let meta = &file.metadata;
    let config = llama_config(file)?;
    let tokenizer = gguf_tokenizer::build_tokenizer(meta)?;
    let name = match meta.str("general.name")? {
        Some(name) => name.to_string(),
        None => file
            .path()
            .file_stem()
            .map_or_else(|| "model".to_string(), |s| s.to_string_lossy().into_owned()),
    };
    let token = |key: &str| -> Result<Option<u32>> {
        match meta.u32(key)? {
            Some(id) if id as usize >= config.vocab_size => Err(invalid(
                meta,
                format!(
                    "`{key}` {id} is outside the vocabulary of {}",
                    config.vocab_size
                ),
            )),
            id => Ok(id),
        }
    };
    let bos_token_id = token("tokenizer.ggml.bos_token_id")?;
    let mut eos_token_ids: Vec<u32> = token("tokenizer.ggml.eos_token_id")?.into_iter().collect();
    // Chat models converted from Llama 3 end turns with `<|eot_id|>`, which is not their EOS.
    if let Some(eot) = token("tokenizer.ggml.eot_token_id")? {
        if !eos_token_ids.contains(&eot) {
            eos_token_ids.push(eot);
        }
    }
    Ok(ModelCard {
        name,
        tokenizer,
        chat_template: meta.str("tokenizer.chat_template")?.map(str::to_string),
        bos_token_id,
        eos_token_ids,
        add_bos_token: gguf_tokenizer::adds_bos(meta)?,
        max_context: config.max_position_embeddings,
        config,
    })
}

fn llama_config(file: &GgufFile) -> Result<LlamaConfig> {
    let meta = &file.metadata;
    let arch = meta
        .str("general.architecture")?
        .ok_or_else(|| invalid(meta, "metadata `general.architecture` is missing"))?;
    if arch != "llama" {
        return Err(EngineError::UnsupportedArchitecture(arch.to_string()));
    }
    let required = |key: &str| -> Result<usize> {
        let key = format!("llama.{key}");
        meta.usize(&key)?
            .ok_or_else(|| invalid(meta, format!("metadata `{key}` is missing")))
    };
    let hidden_size = required("embedding_length")?;
    let num_attention_heads = required("attention.head_count")?;
    let num_key_value_heads = meta
        .usize("llama.attention.head_count_kv")?
        .unwrap_or(num_attention_heads);
    let head_dim = match meta.usize("llama.attention.key_length")? {
        Some(d) => d,
        None => match meta.usize("llama.rope.dimension_count")? {
            Some(d) => d,
            None => hidden_size.checked_div(num_attention_heads).unwrap_or(0),
        },
    };
    let vocab_size = match meta.usize("llama.vocab_size")? {
        Some(n) => n,
        None => meta
            .str_array("tokenizer.ggml.tokens")?
            .map(|t| t.len())
            .ok_or_else(|| invalid(meta, "neither `llama.vocab_size` nor a token list is given"))?,
    };
    let rope_theta = meta.f64("llama.rope.freq_base")?.unwrap_or(10_000.0);
    let rms_norm_eps = meta
        .f64("llama.attention.layer_norm_rms_epsilon")?
        .ok_or_else(|| {
            invalid(
                meta,
                "metadata `llama.attention.layer_norm_rms_epsilon` is missing",
            )
        })?;
    let config = LlamaConfig {
        hidden_size,
        intermediate_size: required("feed_forward_length")?,
        num_hidden_layers: required("block_count")?,
        num_attention_heads,
        num_key_value_heads,
        head_dim,
        vocab_size,
        max_position_embeddings: required("context_length")?,
        rope_theta,
        rope_scaling: rope_scaling(file, head_dim, rope_theta)?,
        rms_norm_eps,
        tie_word_embeddings: file.tensor("output.weight").is_none(),
    };
    config
        .validate()
        .map_err(|e| invalid(meta, e.to_string()))?;
    Ok(config)
}

/// RoPE scaling from `llama.rope.scaling.*`, or recognised from a `rope_freqs.weight` tensor.
///
/// llama.cpp's converter does not write Llama-3 scaling as metadata: it bakes the per-frequency
/// divisors into `rope_freqs.weight`. We recognise them by recomputing the divisors with
/// Llama 3.1's published parameters (low 1, high 4, original context 8192; the factor is the
/// largest divisor). Anything else is left out with a warning, as llama.cpp would still apply it.
fn rope_scaling(file: &GgufFile, head_dim: usize, theta: f64) -> Result<Option<RopeScaling>> {
    let meta = &file.metadata;
    match meta.str("llama.rope.scaling.type")? {
        Some("linear") => {
            let factor = meta.f64("llama.rope.scaling.factor")?.ok_or_else(|| {
                invalid(
                    meta,
                    "linear RoPE scaling without `llama.rope.scaling.factor`",
                )
            })?;
            return Ok(Some(RopeScaling::Linear { factor }));
        }
        None | Some("none") => {}
        Some(other) => {
            return Err(EngineError::InvalidConfig(format!(
                "`llama.rope.scaling.type` `{other}` is not supported (supported: none, linear)"
            )))
        }
    }
    let Some(info) = file.tensor("rope_freqs.weight") else {
        return Ok(None);
    };
    let divisors =
        dequant::dequantize(info.ggml_type, file.tensor_data(info)?).ok_or_else(|| {
            EngineError::UnsupportedTensorType {
                kind: info.ggml_type.name(),
                tensor: info.name.clone(),
            }
        })?;
    let factor = divisors.iter().copied().fold(1.0f32, f32::max) as f64;
    if factor == 1.0 {
        return Ok(None);
    }
    let llama3 = RopeScaling::Llama3 {
        factor,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 8192,
    };
    let expected = llama3_divisors(factor, 1.0, 4.0, 8192.0, head_dim, theta);
    let matches = expected.len() == divisors.len()
        && expected
            .iter()
            .zip(&divisors)
            .all(|(&e, &d)| ((e - d as f64) / e).abs() < 1e-3);
    if matches {
        Ok(Some(llama3))
    } else {
        tracing::warn!(
            "`rope_freqs.weight` in {} is not Llama-3 scaling with the usual parameters; ignoring it",
            file.path().display()
        );
        Ok(None)
    }
}

/// The divisors llama.cpp's `convert_hf_to_gguf.py` stores for `rope_type: llama3`.
fn llama3_divisors(
    factor: f64,
    low: f64,
    high: f64,
    context: f64,
    dim: usize,
    theta: f64,
) -> Vec<f64> {
    let (low_wavelen, high_wavelen) = (context / low, context / high);
    (0..dim / 2)
        .map(|i| {
            let freq = 1.0 / theta.powf((2 * i) as f64 / dim as f64);
            let wavelen = 2.0 * std::f64::consts::PI / freq;
            if wavelen < high_wavelen {
                1.0
            } else if wavelen > low_wavelen {
                factor
            } else {
                let smooth = (context / wavelen - low) / (high - low);
                1.0 / ((1.0 - smooth) / factor + smooth)
            }
        })
        .collect()
}

/// The Hugging Face name of a llama.cpp tensor name.
pub fn hf_name(gguf: &str) -> Option<String> {
    let top = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(name) = top {
        return Some(name.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let part = match rest.strip_suffix(".weight")? {
        "attn_norm" => "input_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_norm" => "post_attention_layernorm",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{part}.weight"))
}

fn weights(file: &GgufFile, config: &LlamaConfig) -> Result<Weights> {
    let mut weights = Weights::default();
    for info in &file.tensors {
        let Some(name) = hf_name(&info.name) else {
            // `rope_freqs.weight` lands here too: `rope_scaling` already turned it into config.
            tracing::debug!(tensor = %info.name, "skipping GGUF tensor the Llama model does not use");
            continue;
        };
        let unsupported = || EngineError::UnsupportedTensorType {
            kind: info.ggml_type.name(),
            tensor: info.name.clone(),
        };
        let data = file.tensor_data(info)?;
        let mut values = dequant::dequantize(info.ggml_type, data).ok_or_else(unsupported)?;
        let shape = info.shape();
        let rope_heads = if name.ends_with("q_proj.weight") {
            Some(config.num_attention_heads)
        } else if name.ends_with("k_proj.weight") {
            Some(config.num_key_value_heads)
        } else {
            None
        };
        if let Some(n_head) = rope_heads {
            let rows = shape.first().map_or(0, |&r| r as usize);
            values = unpermute_rope_rows(&values, rows, n_head).ok_or_else(|| {
                invalid(
                    &file.metadata,
                    format!(
                        "tensor `{}` has {rows} rows, not a multiple of 2 × {n_head} heads",
                        info.name
                    ),
                )
            })?;
        }
        let tensor = Tensor::f_from_slice(&values)?.f_reshape(&shape)?;
        weights.insert(name, WeightTensor::Dense(tensor));
    }
    Ok(weights)
}

/// Undoes the row permutation llama.cpp's converter applies to Q and K projections.
///
/// The converter (`LlamaModel.permute`) does `w.reshape(n_head, 2, d/2, cols).swapaxes(1, 2)` so
/// that ggml's RoPE can rotate adjacent pairs: within each head of `d` rows, HF row `s·d/2 + i`
/// (half `s`, frequency `i`) becomes row `2i + s`. This moves row `2i + s` back to `s·d/2 + i`,
/// the same as transformers' `reverse_permute_weights`
/// (`w.reshape(n_head, d/2, 2, cols).swapaxes(1, 2)`). `None` when `rows` does not split into
/// `n_head` heads of an even size or `w` is not `rows` whole rows.
pub fn unpermute_rope_rows(w: &[f32], rows: usize, n_head: usize) -> Option<Vec<f32>> {
    let whole_heads = n_head > 0 && rows.is_multiple_of(2 * n_head);
    if rows == 0 || !whole_heads || !w.len().is_multiple_of(rows) {
        return None;
    }
    let cols = w.len() / rows;
    let d = rows / n_head;
    let half = d / 2;
    let mut out = vec![0f32; w.len()];
    for h in 0..n_head {
        for i in 0..half {
            for s in 0..2 {
                let src = (h * d + 2 * i + s) * cols;
                let dst = (h * d + s * half + i) * cols;
                out[dst..dst + cols].copy_from_slice(&w[src..src + cols]);
            }
        }
    }
    Some(out)
}
