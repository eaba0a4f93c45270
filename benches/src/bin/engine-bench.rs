//! Engine throughput without HTTP: prefill tok/s at a fixed prompt length and decode tok/s at
//! several batch sizes, each repeated and reported as the median. Prompts are random token ids
//! (no prefix-cache hits: caching is off), outputs ignore EOS so every run has the same length.

use std::time::{Duration, Instant};

use anyhow::Result;
use clap::Parser;
use engine::{build_engine, loader, parse_kind, Engine, EngineOptions, Request, SamplingParams};
use rand::{Rng, SeedableRng};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "smollm2")]
    model: String,
    #[arg(long, default_value = "bf16")]
    dtype: String,
    /// Prompt length of the prefill measurement.
    #[arg(long, default_value_t = 512)]
    prefill_len: usize,
    /// Decode batch sizes.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    batches: Vec<usize>,
    /// Prompt and output length of each decode stream (as the vLLM figures: 128 in, 128 out).
    #[arg(long, default_value_t = 128)]
    decode_isl: usize,
    #[arg(long, default_value_t = 128)]
    decode_osl: usize,
    #[arg(long, default_value_t = 5)]
    repeats: usize,
    /// libtorch intra-op threads (0: libtorch's default, one per core).
    #[arg(long, default_value_t = 0)]
    threads: i32,
    /// Steps on Baton's CPU kernels, libtorch ops, or each in turn (`true,false`).
    #[arg(long, value_delimiter = ',', default_value = "true")]
    cpu_kernels: Vec<bool>,
}

fn prompt(rng: &mut rand_chacha::ChaCha8Rng, len: usize, vocab: usize) -> Vec<u32> {
    (0..len)
        .map(|_| rng.random_range(100..vocab as u32))
        .collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

struct Run {
    ttft: Duration,
    /// Steps after every stream had its first token.
    decode: Duration,
    decode_steps: usize,
    total: Duration,
    output_tokens: usize,
}

fn run_batch(engine: &mut Engine, prompts: &[Vec<u32>], max_tokens: usize) -> Result<Run> {
    for (i, p) in prompts.iter().enumerate() {
        engine.add_request(Request {
            request_id: format!("r{i}"),
            prompt_token_ids: p.clone(),
            params: SamplingParams {
                ignore_eos: true,
                ..SamplingParams::greedy(max_tokens)
            },
        })?;
    }
    let start = Instant::now();
    let mut first = vec![false; prompts.len()];
    let mut all_started: Option<Instant> = None;
    let mut ttft = Duration::ZERO;
    let mut decode_steps = 0;
    let mut output_tokens = 0;
    while engine.has_unfinished() {
        let out = engine.step()?;
        if all_started.is_some() {
            decode_steps += 1;
        }
        for o in &out {
            output_tokens += o.tokens().len();
            let i: usize = o.request_id()[1..].parse()?;
            if !first[i] {
                first[i] = true;
                if i == 0 {
                    ttft = start.elapsed();
                }
            }
        }
        if all_started.is_none() && first.iter().all(|&f| f) {
            all_started = Some(Instant::now());
        }
    }
    let end = Instant::now();
    Ok(Run {
        ttft,
        decode: all_started.map_or(Duration::ZERO, |s| end - s),
        decode_steps,
        total: end - start,
        output_tokens,
    })
}

fn main() -> Result<()> {
    // As `baton` does, so the bench measures what a server runs.
    engine::host_memory::keep_freed_memory();
    let args = Args::parse();
    if args.threads > 0 {
        tch::set_num_threads(args.threads);
    }
    let kind = parse_kind(&args.dtype).ok_or_else(|| anyhow::anyhow!("bad --dtype"))?;
    for &cpu_kernels in &args.cpu_kernels {
        bench(&args, kind, cpu_kernels)?;
    }
    Ok(())
}

fn bench(args: &Args, kind: tch::Kind, cpu_kernels: bool) -> Result<()> {
    let loaded = loader::load(&args.model)?;
    let vocab = loaded.card.config.vocab_size;
    let opts = EngineOptions {
        kind,
        enable_prefix_caching: false,
        max_num_batched_tokens: 2048.max(args.prefill_len),
        cpu_kernels,
        ..EngineOptions::default()
    };
    let (mut engine, card) = build_engine(loaded, &opts)?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    println!(
        "model {} ({} params), dtype {}, libtorch threads {}, steps on {}",
        card.name,
        card.config.num_parameters(),
        args.dtype,
        tch::get_num_threads(),
        if cpu_kernels {
            "Baton's CPU kernels"
        } else {
            "libtorch ops"
        }
    );
    // A decode step reads every weight once (the tied embedding as the LM head); the
    // embedding lookup itself only touches B rows.
    let step_bytes = card.config.num_parameters() as f64 * kind.elt_size_in_bytes() as f64;
    println!("weights read per decode step: {:.0} MB", step_bytes / 1e6);

    // Warm-up: first calls pay for allocator and kernel selection.
    run_batch(&mut engine, &[prompt(&mut rng, 64, vocab)], 4)?;

    let mut prefill = Vec::new();
    for _ in 0..args.repeats {
        let r = run_batch(&mut engine, &[prompt(&mut rng, args.prefill_len, vocab)], 1)?;
        prefill.push(args.prefill_len as f64 / r.total.as_secs_f64());
    }
    println!(
        "prefill  ISL {:>5}: {:>8.0} tok/s (median of {})",
        args.prefill_len,
        median(prefill),
        args.repeats
    );

    for &b in &args.batches {
        let (mut step_ms, mut decode_tps, mut e2e_tps, mut ttft) = (vec![], vec![], vec![], vec![]);
        for _ in 0..args.repeats {
            let prompts: Vec<_> = (0..b)
                .map(|_| prompt(&mut rng, args.decode_isl, vocab))
                .collect();
            let r = run_batch(&mut engine, &prompts, args.decode_osl)?;
            let per_step = r.decode.as_secs_f64() / r.decode_steps.max(1) as f64;
            step_ms.push(per_step * 1000.0);
            decode_tps.push(b as f64 / per_step);
            e2e_tps.push(r.output_tokens as f64 / r.total.as_secs_f64());
            ttft.push(r.ttft.as_secs_f64() * 1000.0);
        }
        println!(
            "decode batch {b:>3} ({}/{}): {:>7.2} ms/step ({:>4.1} GB/s of weights), {:>7.1} decode tok/s, {:>7.1} output tok/s end-to-end, TTFT {:>6.0} ms",
            args.decode_isl,
            args.decode_osl,
            median(step_ms.clone()),
            step_bytes / (median(step_ms) / 1000.0) / 1e9,
            median(decode_tps),
            median(e2e_tps),
            median(ttft)
        );
    }
    Ok(())
}
