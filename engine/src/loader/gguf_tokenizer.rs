//! A Hugging Face `tokenizers` tokenizer rebuilt from a GGUF's `tokenizer.ggml.*` vocabulary, with
//! the pre-tokenizer llama.cpp picks for `tokenizer.ggml.pre` (llama.cpp's `llama-vocab.cpp`).
//!
//! Only byte-level BPE (`tokenizer.ggml.model = gpt2`, the Llama 3 / SmolLM2 family) is built;
//! SentencePiece vocabularies (`llama`) are refused rather than approximated.

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Merges, Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::template::{Template, TemplateProcessing};
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer};

use super::gguf::Metadata;
use crate::error::{EngineError, Result};

/// The Llama 3 pre-tokenizer pattern (tokenizer.json of Meta-Llama-3, llama.cpp's `LLAMA3`).
const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// `tokenizer.ggml.token_type` values (llama.cpp's `llama_token_type`).
const TOKEN_CONTROL: i64 = 3;
const TOKEN_USER_DEFINED: i64 = 4;

fn err(reason: impl Into<String>) -> EngineError {
    EngineError::Tokenizer(reason.into())
}

/// Whether plain prompts get BOS: `tokenizer.ggml.add_bos_token`, else off (the byte-level BPE
/// default; SentencePiece models would default to on, but are not built here).
pub fn adds_bos(meta: &Metadata) -> Result<bool> {
    Ok(meta.bool("tokenizer.ggml.add_bos_token")?.unwrap_or(false))
}

/// Builds the tokenizer a GGUF describes; ids are the positions in `tokenizer.ggml.tokens`.
pub fn build_tokenizer(meta: &Metadata) -> Result<Tokenizer> {
    let model = meta
        .str("tokenizer.ggml.model")?
        .ok_or_else(|| err("the GGUF has no `tokenizer.ggml.model`"))?;
    if model != "gpt2" {
        return Err(err(format!(
            "GGUF tokenizer model `{model}` is not supported (supported: gpt2 byte-level BPE)"
        )));
    }
    let tokens = meta
        .str_array("tokenizer.ggml.tokens")?
        .ok_or_else(|| err("the GGUF has no `tokenizer.ggml.tokens`"))?;
    let pre = meta.str("tokenizer.ggml.pre")?.unwrap_or("default");
    let is_llama3 = matches!(pre, "llama-bpe" | "llama3");

    let vocab: Vocab = tokens
        .iter()
        .enumerate()
        .map(|(id, &t)| Ok((t.to_string(), token_id(id)?)))
        .collect::<Result<_>>()?;
    let merges: Merges = meta
        .str_array("tokenizer.ggml.merges")?
        .unwrap_or_default()
        .into_iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| {
                    err(format!(
                        "merge `{m}` is not two tokens separated by a space"
                    ))
                })
        })
        .collect::<Result<_>>()?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        // Llama 3's tokenizer.json sets this: a word that is itself a token is not re-merged.
        .ignore_merges(is_llama3)
        .build()
        .map_err(|e| err(format!("cannot build the BPE model: {e}")))?;

    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer.with_pre_tokenizer(Some(pre_tokenizer(pre)?));
    tokenizer.with_decoder(Some(ByteLevelDecoder::default()));

    let types = meta
        .i64_array("tokenizer.ggml.token_type")?
        .unwrap_or_default();
    let added = |wanted: i64, special: bool| -> Vec<AddedToken> {
        tokens
            .iter()
            .zip(&types)
            .filter(|(_, &ty)| ty == wanted)
            .map(|(&t, _)| AddedToken::from(t, special))
            .collect()
    };
    // Registered as added tokens so their literal text in a prompt maps to their id, as with
    // the model's tokenizer.json (the ids stay those of the vocabulary).
    tokenizer.add_special_tokens(&added(TOKEN_CONTROL, true));
    tokenizer.add_tokens(&added(TOKEN_USER_DEFINED, false));

    if adds_bos(meta)? {
        let bos_id = meta
            .u32("tokenizer.ggml.bos_token_id")?
            .ok_or_else(|| err("`tokenizer.ggml.add_bos_token` is set but there is no BOS id"))?;
        let bos = tokens
            .get(bos_id as usize)
            .ok_or_else(|| err(format!("BOS id {bos_id} is outside the vocabulary")))?
            .to_string();
        tokenizer.with_post_processor(Some(bos_processor(bos, bos_id)?));
    }
    Ok(tokenizer)
}

fn token_id(index: usize) -> Result<u32> {
    u32::try_from(index).map_err(|_| err("the vocabulary has more than 2^32 tokens"))
}

fn pre_tokenizer(pre: &str) -> Result<PreTokenizerWrapper> {
    let byte_level = |use_regex| ByteLevel::new(false, true, use_regex);
    Ok(match pre {
        // SmolLM2's tokenizer.json: every digit is its own pre-token before the GPT-2 split.
        "smollm" => Sequence::new(vec![Digits::new(true).into(), byte_level(true).into()]).into(),
        "llama-bpe" | "llama3" => {
            let split = Split::new(
                SplitPattern::Regex(LLAMA3_PATTERN.to_string()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(|e| {
                err(format!(
                    "cannot compile the Llama 3 pre-tokenizer pattern: {e}"
                ))
            })?;
            Sequence::new(vec![split.into(), byte_level(false).into()]).into()
        }
        "default" | "gpt2" => byte_level(true).into(),
        other => {
            tracing::warn!("unknown `tokenizer.ggml.pre` `{other}`; using the GPT-2 pre-tokenizer");
            byte_level(true).into()
        }
    })
}

/// Prepends BOS to every encoding made with `add_special_tokens = true`.
fn bos_processor(bos: String, bos_id: u32) -> Result<TemplateProcessing> {
    let template = |pieces: Vec<String>| {
        Template::try_from(pieces)
            .map_err(|e| err(format!("cannot use BOS `{bos}` in a template: {e}")))
    };
    TemplateProcessing::builder()
        .single(template(vec![bos.clone(), "$A".into()])?)
        .pair(template(vec![
            bos.clone(),
            "$A".into(),
            bos.clone(),
            "$B:1".into(),
        ])?)
        .special_tokens(vec![(bos.clone(), bos_id)])
        .build()
        .map_err(|e| err(format!("cannot build the BOS post-processor: {e}")))
}
