//! The tokenizer side of a Hugging Face folder: `tokenizer.json`, the chat template and special
//! tokens of `tokenizer_config.json` (or `chat_template.jinja`), and the extra stop ids of
//! `generation_config.json`, as transformers' `AutoTokenizer` and `GenerationConfig` read them.

use std::path::Path;

use tokenizers::processors::sequence::Sequence;
use tokenizers::processors::template::{Template, TemplateProcessing};
use tokenizers::{PostProcessorWrapper, Tokenizer};

use super::json::{self, Object, OneOrMany};
use crate::error::{EngineError, Result};

const TOKENIZER_FILE: &str = "tokenizer.json";
const TOKENIZER_CONFIG_FILE: &str = "tokenizer_config.json";
const GENERATION_CONFIG_FILE: &str = "generation_config.json";
const CHAT_TEMPLATE_FILE: &str = "chat_template.jinja";

/// What the tokenizer files of a folder say.
pub struct TokenizerFiles {
    pub tokenizer: Tokenizer,
    pub chat_template: Option<String>,
    /// `bos_token` / `eos_token` of `tokenizer_config.json`, as text.
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    /// `add_bos_token` of `tokenizer_config.json`, when given.
    pub add_bos_token: Option<bool>,
    /// `eos_token_id` of `generation_config.json`.
    pub generation_eos_ids: Vec<u32>,
}

/// A special token in `tokenizer_config.json`: `"<s>"` or an added-token object `{content, ...}`.
#[derive(serde::Deserialize)]
#[serde(untagged)]
enum SpecialToken {
    Text(String),
    Added { content: String },
}

impl SpecialToken {
    fn into_text(self) -> String {
        match self {
            SpecialToken::Text(t) | SpecialToken::Added { content: t } => t,
        }
    }
}

/// `chat_template`: one template, or named templates of which we take `default`.
#[derive(serde::Deserialize)]
#[serde(untagged)]
enum ChatTemplates {
    One(String),
    Named(Vec<NamedTemplate>),
}

#[derive(serde::Deserialize)]
struct NamedTemplate {
    name: String,
    template: String,
}

/// Reads `tokenizer.json` (required) and the optional configs beside it.
pub fn read(dir: &Path) -> Result<TokenizerFiles> {
    let path = dir.join(TOKENIZER_FILE);
    let tokenizer = Tokenizer::from_file(&path)
        .map_err(|e| EngineError::Tokenizer(format!("cannot load `{}`: {e}", path.display())))?;

    let config = json::read_optional_object(&dir.join(TOKENIZER_CONFIG_FILE))?.unwrap_or_default();
    let config = Object::new(TOKENIZER_CONFIG_FILE, &config);
    let mut chat_template = match config.get::<ChatTemplates>("chat_template")? {
        None => None,
        Some(ChatTemplates::One(t)) => Some(t),
        Some(ChatTemplates::Named(named)) => {
            let default = named.into_iter().find(|t| t.name == "default");
            if default.is_none() {
                tracing::warn!(
                    "`chat_template` in {TOKENIZER_CONFIG_FILE} has no template named `default`"
                );
            }
            default.map(|t| t.template)
        }
    };
    // transformers >= 4.43 may save the template as its own file instead.
    let template_file = dir.join(CHAT_TEMPLATE_FILE);
    if chat_template.is_none() && template_file.exists() {
        let text = std::fs::read_to_string(&template_file).map_err(|source| EngineError::Io {
            path: template_file.clone(),
            source,
        })?;
        chat_template = Some(text);
    }

    let generation =
        json::read_optional_object(&dir.join(GENERATION_CONFIG_FILE))?.unwrap_or_default();
    let generation_eos_ids = Object::new(GENERATION_CONFIG_FILE, &generation)
        .get::<OneOrMany<u32>>("eos_token_id")?
        .map(OneOrMany::into_vec)
        .unwrap_or_default();

    Ok(TokenizerFiles {
        tokenizer,
        chat_template,
        bos_token: config
            .get::<SpecialToken>("bos_token")?
            .map(SpecialToken::into_text),
        eos_token: config
            .get::<SpecialToken>("eos_token")?
            .map(SpecialToken::into_text),
        add_bos_token: config.get("add_bos_token")?,
        generation_eos_ids,
    })
}

/// The id of a special token named in `tokenizer_config.json`, which must be in the tokenizer.
pub fn token_id(tokenizer: &Tokenizer, key: &str, token: &str) -> Result<u32> {
    tokenizer.token_to_id(token).ok_or_else(|| {
        EngineError::InvalidConfig(format!(
            "`{key}` `{token}` of {TOKENIZER_CONFIG_FILE} is not a token of {TOKENIZER_FILE}"
        ))
    })
}

/// Whether encoding with special tokens puts `bos_id` first, as the post-processor decides.
pub fn prepends_bos(tokenizer: &Tokenizer, bos_id: u32) -> Result<bool> {
    let encode = |special| {
        tokenizer
            .encode("a", special)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| EngineError::Tokenizer(format!("cannot encode a probe text: {e}")))
    };
    let (with, without) = (encode(true)?, encode(false)?);
    Ok(with.first() == Some(&bos_id) && with.len() > without.len())
}

/// Makes `encode(text, true)` prepend `bos` after the existing post-processor, as transformers'
/// `LlamaTokenizerFast` does for `add_bos_token: true`.
pub fn add_bos_processor(tokenizer: &mut Tokenizer, bos: &str, bos_id: u32) -> Result<()> {
    let err = |e: String| EngineError::Tokenizer(format!("cannot add BOS `{bos}`: {e}"));
    let template = |pieces: Vec<String>| Template::try_from(pieces).map_err(|e| err(e.to_string()));
    let bos_template: PostProcessorWrapper = TemplateProcessing::builder()
        .single(template(vec![bos.into(), "$A".into()])?)
        .pair(template(vec![
            bos.into(),
            "$A".into(),
            bos.into(),
            "$B:1".into(),
        ])?)
        .special_tokens(vec![(bos.to_string(), bos_id)])
        .build()
        .map_err(|e| err(e.to_string()))?
        .into();
    let processor = match tokenizer.get_post_processor() {
        Some(existing) => Sequence::new(vec![existing.clone(), bos_template]).into(),
        None => bos_template,
    };
    tokenizer.with_post_processor(Some(processor));
    Ok(())
}
