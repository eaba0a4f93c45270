//! An FP8 compressed-tensors checkpoint serves the same model as its dequantized twin: the
//! first-step top-5 logprobs agree within [`TOLERANCE`] and greedy outputs are equal. On CPU the
//! FP8 weights are dequantized at load time, so any difference beyond rounding means a wrong
//! scale, a transposed weight or a misread tensor; the wrong-variant test shows the comparison
//! catches both kinds of mistake.

mod common;

use std::path::Path;

use common::tiny_llama::{
    write_tiny_llama, StoredTensor, TinyLlama, TinyLlamaOptions, LINEAR_LAYERS,
};
use common::ScratchDir;
use engine::{build_engine, loader, Engine, EngineOptions, Request, SamplingParams};
use tch::Kind;

/// Largest allowed difference between two first-step logprobs. The twin holds the FP8 weights'
/// dequantized values bit for bit, so only summation order could separate the two (on CPU they
/// agree exactly); one output channel's scale 5% off in one projection already moves a logprob
/// by ~7e-4, and a wrong scale or a transposed weight changes the top ids (see
/// `wrong_variants_fail_the_comparison`).
const TOLERANCE: f32 = 1e-4;

const PROMPTS: [&[u32]; 4] = [
    &[262, 72, 101, 108, 108, 111],
    &[262, 256, 257, 258, 32, 99, 97, 116],
    &[1, 2, 3],
    &[262, 300, 17, 250, 261, 44, 199, 88, 123, 7, 64, 31],
];

fn engine(dir: &Path) -> Engine {
    let loaded = loader::load(dir.to_str().expect("utf-8 path"))
        .unwrap_or_else(|e| panic!("{} loads: {e}", dir.display()));
    let opts = EngineOptions {
        kind: Kind::Float,
        block_size: 16,
        num_blocks: Some(64),
        ..EngineOptions::default()
    };
    build_engine(loaded, &opts).expect("engine builds").0
}

/// The first-step top-5 (token, logprob) of each prompt.
fn first_step_top5(engine: &mut Engine) -> Vec<Vec<(u32, f32)>> {
    PROMPTS
        .iter()
        .enumerate()
        .map(|(i, prompt)| {
            engine
                .add_request(Request {
                    request_id: format!("top5-{i}"),
                    prompt_token_ids: prompt.to_vec(),
                    params: SamplingParams {
                        logprobs: Some(5),
                        ..SamplingParams::greedy(1)
                    },
                })
                .expect("request accepted");
            let out = engine.run_to_completion().expect("engine runs");
            assert_eq!(out.len(), 1, "one token for prompt {i}");
            let top = out[0].tokens()[0].top_logprobs.clone();
            assert_eq!(top.len(), 5, "prompt {i}: five alternatives");
            top
        })
        .collect()
}

/// Greedy outputs of up to 8 tokens, all prompts in one batch.
fn greedy_outputs(engine: &mut Engine) -> Vec<Vec<u32>> {
    for (i, prompt) in PROMPTS.iter().enumerate() {
        engine
            .add_request(Request {
                request_id: format!("greedy-{i}"),
                prompt_token_ids: prompt.to_vec(),
                params: SamplingParams::greedy(8),
            })
            .expect("request accepted");
    }
    let out = engine.run_to_completion().expect("engine runs");
    (0..PROMPTS.len())
        .map(|i| {
            let id = format!("greedy-{i}");
            out.iter()
                .filter(|o| o.request_id() == id)
                .flat_map(|o| o.tokens().iter().map(|t| t.token))
                .collect()
        })
        .collect()
}

/// Whether two models' first-step top-5s agree: same ids in the same order, logprobs within
/// `TOLERANCE`. Returns what differs first.
fn compare_top5(a: &[Vec<(u32, f32)>], b: &[Vec<(u32, f32)>]) -> Result<f32, String> {
    let mut worst = 0.0f32;
    for (i, (ta, tb)) in a.iter().zip(b).enumerate() {
        let ids_a: Vec<u32> = ta.iter().map(|t| t.0).collect();
        let ids_b: Vec<u32> = tb.iter().map(|t| t.0).collect();
        if ids_a != ids_b {
            return Err(format!("prompt {i}: top-5 ids {ids_a:?} vs {ids_b:?}"));
        }
        for ((id, la), (_, lb)) in ta.iter().zip(tb) {
            let diff = (la - lb).abs();
            if !diff.is_finite() || diff > TOLERANCE {
                return Err(format!("prompt {i}, token {id}: logprob {la} vs {lb}"));
            }
            worst = worst.max(diff);
        }
    }
    Ok(worst)
}

/// A copy of `model`'s weights with `edit` applied to each FP8 projection `(name, weight, scale)`.
fn edited(model: &TinyLlama, edit: impl Fn(&str, &StoredTensor) -> StoredTensor) -> TinyLlama {
    TinyLlama {
        dir: model.dir.clone(),
        options: model.options.clone(),
        config: model.config.clone(),
        weights: model
            .weights
            .iter()
            .map(|(name, t)| (name.clone(), edit(name, t)))
            .collect(),
    }
}

fn copy(t: &StoredTensor) -> StoredTensor {
    match t {
        StoredTensor::Dense(t) => StoredTensor::Dense(t.copy()),
        StoredTensor::Fp8 { weight, scale } => StoredTensor::Fp8 {
            weight: weight.copy(),
            scale: scale.copy(),
        },
    }
}

fn fp8_model(dir: &Path, seed: u64) -> TinyLlama {
    write_tiny_llama(
        dir,
        TinyLlamaOptions {
            fp8: true,
            seed,
            ..TinyLlamaOptions::default()
        },
    )
}

#[test]
fn fp8_checkpoint_matches_its_dequantized_twin() {
    let scratch = ScratchDir::new("fp8-twin");
    let model = fp8_model(&scratch.join("fp8"), 11);
    assert!(LINEAR_LAYERS.iter().all(|l| matches!(
        model.weights[&format!("model.layers.0.{l}.weight")],
        StoredTensor::Fp8 { .. }
    )));
    let twin = model.write_dequantized_twin(&scratch.join("twin"));

    let mut fp8 = engine(&model.dir);
    let mut dense = engine(&twin.dir);
    let worst = compare_top5(&first_step_top5(&mut fp8), &first_step_top5(&mut dense))
        .unwrap_or_else(|e| panic!("FP8 and its dequantized twin differ: {e}"));
    eprintln!("largest first-step logprob difference: {worst:e}");

    let greedy_fp8 = greedy_outputs(&mut fp8);
    let greedy_dense = greedy_outputs(&mut dense);
    for (i, tokens) in greedy_fp8.iter().enumerate() {
        assert!(!tokens.is_empty(), "prompt {i} produced tokens");
    }
    assert_eq!(greedy_fp8, greedy_dense, "greedy outputs");
}

/// The comparison above is tight enough to fail on a model that is only slightly wrong.
#[test]
fn wrong_variants_fail_the_comparison() {
    let scratch = ScratchDir::new("fp8-wrong");
    let model = fp8_model(&scratch.join("fp8"), 11);
    let reference = first_step_top5(&mut engine(&model.dir));

    // Scales doubled in one projection of one layer: what a scale read as the wrong dtype or
    // applied twice does.
    let doubled = edited(&model, |name, t| match t {
        StoredTensor::Fp8 { weight, scale } if name == "model.layers.1.mlp.down_proj.weight" => {
            StoredTensor::Fp8 {
                weight: weight.copy(),
                scale: scale * 2.0,
            }
        }
        other => copy(other),
    })
    .write_dequantized_twin(&scratch.join("doubled"));
    // A square projection transposed: `[out, in]` read as `[in, out]` keeps the shape.
    let transposed = edited(&model, |name, t| match t {
        StoredTensor::Fp8 { weight, scale } if name == "model.layers.0.self_attn.o_proj.weight" => {
            StoredTensor::Dense((weight.to_kind(Kind::Float) * scale).tr().contiguous())
        }
        other => copy(other),
    })
    .write_dequantized_twin(&scratch.join("transposed"));
    // One output channel's scale 5% off: the same top-5 ids, logprobs ~1e-3 apart.
    let one_channel = edited(&model, |name, t| match t {
        StoredTensor::Fp8 { weight, scale } if name == "model.layers.1.mlp.down_proj.weight" => {
            let scale = scale.copy();
            let _ = scale.get(0).g_mul_scalar_(1.05);
            StoredTensor::Fp8 {
                weight: weight.copy(),
                scale,
            }
        }
        other => copy(other),
    })
    .write_dequantized_twin(&scratch.join("one-channel"));
    // Another random model altogether.
    let other_seed = fp8_model(&scratch.join("seed12"), 12);

    for (what, dir) in [
        ("scales doubled", &doubled.dir),
        ("weight transposed", &transposed.dir),
        ("one channel's scale 5% off", &one_channel.dir),
        ("different seed", &other_seed.dir),
    ] {
        let got = first_step_top5(&mut engine(dir));
        match compare_top5(&reference, &got) {
            Ok(worst) => panic!("{what}: passed the comparison (worst difference {worst:e})"),
            Err(e) => eprintln!("{what}: rejected as expected: {e}"),
        }
    }
}
