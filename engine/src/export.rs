//! A loaded model written back out as a Hugging Face folder (`config.json`,
//! `model.safetensors`, `tokenizer.json`, `tokenizer_config.json`, `chat_template.jinja`,
//! `generation_config.json`): how other engines (vLLM, Dynamo's mocker, aiperf's tokenizer)
//! get the very weights and tokenizer Baton serves from a GGUF. The loader has already
//! dequantized GGUF blocks and undone llama.cpp's RoPE row permutation, so the tensors are
//! transformers' own under their own names.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::config::RopeScaling;
use crate::error::{EngineError, Result};
use crate::loader::LoadedModel;
use crate::weights::WeightTensor;

/// Files [`write_hf`] writes besides the weights.
pub const CONFIG_FILES: &[&str] = &[
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
];

fn write_err(path: &Path) -> impl Fn(String) -> EngineError + '_ {
    move |reason| EngineError::Write {
        path: path.to_path_buf(),
        reason,
    }
}

fn write_json(dir: &Path, name: &str, v: &Value) -> Result<PathBuf> {
    let path = dir.join(name);
    let text = serde_json::to_string_pretty(v).expect("plain JSON");
    std::fs::write(&path, text + "\n").map_err(|e| write_err(&path)(e.to_string()))?;
    Ok(path)
}

fn torch_dtype(kind: tch::Kind) -> Result<&'static str> {
    match kind {
        tch::Kind::BFloat16 => Ok("bfloat16"),
        tch::Kind::Half => Ok("float16"),
        tch::Kind::Float => Ok("float32"),
        other => Err(EngineError::InvalidParameter {
            param: "dtype",
            reason: format!("{other:?} is not an export dtype (bf16, f16, f32)"),
        }),
    }
}

/// Writes `model` into `dir` (created if missing); the weights as `kind`, or none when
/// `weights` is false (a tokenizer-and-config folder). Returns the files written.
pub fn write_hf(
    model: &LoadedModel,
    dir: &Path,
    kind: tch::Kind,
    weights: bool,
) -> Result<Vec<PathBuf>> {
    let dtype = torch_dtype(kind)?;
    std::fs::create_dir_all(dir).map_err(|e| write_err(dir)(e.to_string()))?;
    let card = &model.card;
    let c = &card.config;
    let token = |id: Option<u32>| id.and_then(|i| card.tokenizer.id_to_token(i));
    let eos = card.eos_token_ids.first().copied();
    let rope_scaling = match &c.rope_scaling {
        None => Value::Null,
        Some(RopeScaling::Linear { factor }) => json!({"rope_type": "linear", "factor": factor}),
        Some(RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        }) => json!({
            "rope_type": "llama3", "factor": factor, "low_freq_factor": low_freq_factor,
            "high_freq_factor": high_freq_factor,
            "original_max_position_embeddings": original_max_position_embeddings,
        }),
    };
    let mut files = vec![write_json(
        dir,
        "config.json",
        &json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_act": "silu",
            "hidden_size": c.hidden_size,
            "intermediate_size": c.intermediate_size,
            "num_hidden_layers": c.num_hidden_layers,
            "num_attention_heads": c.num_attention_heads,
            "num_key_value_heads": c.num_key_value_heads,
            "head_dim": c.head_dim,
            "vocab_size": c.vocab_size,
            "max_position_embeddings": c.max_position_embeddings,
            "rope_theta": c.rope_theta,
            "rope_scaling": rope_scaling,
            // GGUF keeps it as f32: its shortest f32 text, 1e-5 rather than 9.99999974e-6.
            "rms_norm_eps": format!("{}", c.rms_norm_eps as f32).parse::<f64>().unwrap_or(c.rms_norm_eps),
            "tie_word_embeddings": c.tie_word_embeddings,
            "attention_bias": false,
            "mlp_bias": false,
            "bos_token_id": card.bos_token_id,
            "eos_token_id": card.eos_token_ids,
            "torch_dtype": dtype,
            "use_cache": true,
        }),
    )?];
    let tok_path = dir.join("tokenizer.json");
    card.tokenizer
        .save(&tok_path, true)
        .map_err(|e| write_err(&tok_path)(e.to_string()))?;
    files.push(tok_path);
    files.push(write_json(
        dir,
        "tokenizer_config.json",
        &json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": token(card.bos_token_id),
            "eos_token": token(eos),
            "add_bos_token": card.add_bos_token,
            "model_max_length": card.max_context,
            "chat_template": card.chat_template,
            "clean_up_tokenization_spaces": false,
        }),
    )?);
    if let Some(t) = &card.chat_template {
        let path = dir.join("chat_template.jinja");
        std::fs::write(&path, t).map_err(|e| write_err(&path)(e.to_string()))?;
        files.push(path);
    }
    files.push(write_json(
        dir,
        "generation_config.json",
        &json!({"bos_token_id": card.bos_token_id, "eos_token_id": card.eos_token_ids}),
    )?);
    if weights {
        let mut names: Vec<&str> = model.weights.names().collect();
        names.sort_unstable();
        let tensors: Vec<(&str, tch::Tensor)> = names
            .iter()
            .map(|&n| {
                let t = match model.weights.get(n).expect("listed") {
                    WeightTensor::Dense(t) => t.to_kind(kind),
                    fp8 => fp8.dequantize(kind),
                };
                (n, t.contiguous())
            })
            .collect();
        let path = dir.join("model.safetensors");
        tch::Tensor::write_safetensors(&tensors, &path)
            .map_err(|e| write_err(&path)(e.to_string()))?;
        files.push(path);
    }
    Ok(files)
}
