//! Hugging Face loader: a transformers Llama folder (`config.json`, safetensors weights,
//! `tokenizer.json` and its configs) becomes a model card and weights under their HF names.
//!
//! Dense checkpoints keep their stored dtype (f32, f16, bf16); compressed-tensors FP8 checkpoints
//! (llm-compressor's `FP8_DYNAMIC`, as vLLM loads them) keep `float8_e4m3fn` weights with their
//! per-channel scales. Special-token ids follow transformers: `config.json` first, then the token
//! strings of `tokenizer_config.json`, with `generation_config.json` adding stop ids.

pub mod config;
mod header;
mod json;
pub mod quant;
pub mod tensors;
pub mod tokenizer;

use std::path::Path;

pub use config::HfConfig;
pub use quant::Quantization;

use tokenizers::Tokenizer;

use self::tokenizer::TokenizerFiles;
use super::LoadedModel;
use crate::card::ModelCard;
use crate::error::{EngineError, Result};

/// The file every Hugging Face model folder has.
pub const CONFIG_FILE: &str = "config.json";

/// Loads card and weights from the folder `dir`.
pub fn load(dir: &Path) -> Result<LoadedModel> {
    let (card, quantization) = card_and_quantization(dir)?;
    let weights = tensors::load(dir, &quantization)?;
    Ok(LoadedModel { card, weights })
}

/// Reads only what the card needs (configs, tokenizer), leaving the weights untouched.
pub fn load_card(dir: &Path) -> Result<ModelCard> {
    card_and_quantization(dir).map(|(card, _)| card)
}

/// Reads and validates `config.json`.
pub fn read_config(dir: &Path) -> Result<HfConfig> {
    config::parse(&json::read_object(&dir.join(CONFIG_FILE))?)
}

fn card_and_quantization(dir: &Path) -> Result<(ModelCard, Quantization)> {
    let config = read_config(dir)?;
    let files = tokenizer::read(dir)?;
    let (bos_token_id, eos_token_ids) = special_ids(&config, &files)?;
    let mut tokenizer = files.tokenizer;
    let llama = config.llama;
    if let Some(max) = tokenizer.get_vocab(true).into_values().max() {
        if max as usize >= llama.vocab_size {
            tracing::warn!(
                "tokenizer.json has token id {max}, outside the model's `vocab_size` {}",
                llama.vocab_size
            );
        }
    }
    let add_bos_token = match bos_token_id {
        Some(bos_id) => settle_add_bos(&mut tokenizer, bos_id, files.add_bos_token)?,
        None => false,
    };
    let name = dir
        .canonicalize()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "model".to_string());
    let card = ModelCard {
        name,
        tokenizer,
        chat_template: files.chat_template,
        bos_token_id,
        eos_token_ids,
        add_bos_token,
        max_context: llama.max_position_embeddings,
        config: llama,
    };
    Ok((card, config.quantization))
}

/// BOS and EOS ids: `config.json`, else the token strings of `tokenizer_config.json`; the
/// `eos_token_id` of `generation_config.json` adds stop ids (Llama 3 Instruct's `<|eot_id|>`).
fn special_ids(config: &HfConfig, files: &TokenizerFiles) -> Result<(Option<u32>, Vec<u32>)> {
    let bos_token_id = match (config.bos_token_id, &files.bos_token) {
        (Some(id), _) => Some(id),
        (None, Some(token)) => Some(tokenizer::token_id(&files.tokenizer, "bos_token", token)?),
        (None, None) => None,
    };
    let mut eos_token_ids = match (config.eos_token_ids.is_empty(), &files.eos_token) {
        (true, Some(token)) => vec![tokenizer::token_id(&files.tokenizer, "eos_token", token)?],
        _ => config.eos_token_ids.clone(),
    };
    for &id in &files.generation_eos_ids {
        if !eos_token_ids.contains(&id) {
            eos_token_ids.push(id);
        }
    }
    let vocab_size = config.llama.vocab_size;
    let in_vocab = |key: &str, id: u32| {
        if id as usize >= vocab_size {
            return Err(EngineError::InvalidConfig(format!(
                "`{key}` {id} is outside the vocabulary of {vocab_size}"
            )));
        }
        Ok(())
    };
    bos_token_id.map_or(Ok(()), |id| in_vocab("bos_token_id", id))?;
    eos_token_ids
        .iter()
        .try_for_each(|&id| in_vocab("eos_token_id", id))?;
    Ok((bos_token_id, eos_token_ids))
}

/// Whether `encode(text, true)` prepends BOS, which is what the card's `add_bos_token` states.
/// The post-processor of `tokenizer.json` decides, except that an explicit `add_bos_token: true`
/// it does not honour gets a BOS processor, as transformers' `LlamaTokenizerFast` would add.
fn settle_add_bos(
    tokenizer: &mut Tokenizer,
    bos_id: u32,
    configured: Option<bool>,
) -> Result<bool> {
    let prepends = tokenizer::prepends_bos(tokenizer, bos_id)?;
    match configured {
        Some(true) if !prepends => {
            let bos = tokenizer.id_to_token(bos_id).ok_or_else(|| {
                EngineError::InvalidConfig(format!(
                    "`bos_token_id` {bos_id} is not a token of tokenizer.json"
                ))
            })?;
            tokenizer::add_bos_processor(tokenizer, &bos, bos_id)?;
            Ok(true)
        }
        Some(false) if prepends => {
            tracing::warn!(
                "tokenizer.json prepends BOS although `add_bos_token` is false; keeping tokenizer.json"
            );
            Ok(true)
        }
        _ => Ok(prepends),
    }
}
