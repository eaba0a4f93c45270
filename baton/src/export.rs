//! `baton export-hf`: a model Baton loads (a GGUF, or `smollm2`) written as a Hugging Face
//! folder, so vLLM, Dynamo's mocker and aiperf serve or count with the same weights and
//! tokenizer.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

#[derive(Args, Debug)]
pub struct ExportArgs {
    /// A GGUF file, a Hugging Face folder, or `smollm2`.
    #[arg(long, env = "BATON_MODEL", default_value = "smollm2")]
    model: String,
    /// The folder to write (created if missing).
    #[arg(long)]
    output: PathBuf,
    /// Weight dtype: bf16, f16 or f32.
    #[arg(long, default_value = "bf16")]
    dtype: String,
    /// Only the config and tokenizer files (what a tokenizer or a mock engine needs).
    #[arg(long)]
    no_weights: bool,
}

pub fn run(args: ExportArgs) -> Result<()> {
    let kind = match args.dtype.as_str() {
        "bf16" | "bfloat16" => tch::Kind::BFloat16,
        "f16" | "float16" | "half" => tch::Kind::Half,
        "f32" | "float32" | "float" => tch::Kind::Float,
        other => anyhow::bail!("--dtype {other}: expected bf16, f16 or f32"),
    };
    let model = if args.no_weights {
        engine::loader::LoadedModel {
            card: engine::loader::load_card(&args.model)?,
            weights: Default::default(),
        }
    } else {
        engine::loader::load(&args.model)?
    };
    let files = engine::export::write_hf(&model, &args.output, kind, !args.no_weights)
        .with_context(|| format!("exporting {} to {}", args.model, args.output.display()))?;
    for f in files {
        println!("{}", f.display());
    }
    Ok(())
}
