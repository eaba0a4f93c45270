//! The engine against the reference greedy outputs of SmolLM2-135M-Instruct
//! (`../shared/golden/`, computed with transformers in float32), and invariance of greedy
//! output under batching, chunked prefill and prefix-cache hits.

use engine::{build_engine, loader, Engine, EngineOptions, FinishReason, Request, SamplingParams};
use serde_json::Value;
use tch::Kind;

/// Below this top-2 logit margin two implementations may legitimately pick different tokens.
const NEAR_TIE: f64 = 0.05;

fn golden() -> Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../shared/golden/smollm2-135m-instruct-q4_1.json"
    );
    let text = std::fs::read_to_string(path).expect("golden file readable");
    serde_json::from_str(&text).expect("golden file is JSON")
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

struct Case {
    id: String,
    prompt: Vec<u32>,
    greedy: Vec<u32>,
    /// Top-2 logit margin of the reference at each generated position.
    margins: Vec<f64>,
    /// Tokens that must match: up to the first near-tie.
    checked: usize,
}

fn cases() -> Vec<Case> {
    golden()["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .map(|c| {
            let greedy = ids(&c["greedy_token_ids"]);
            let margins: Vec<f64> = c["top2_margins_all_steps"]
                .as_array()
                .expect("margins")
                .iter()
                .map(|m| m.as_f64().expect("margin"))
                .collect();
            let checked = margins
                .iter()
                .position(|&m| m < NEAR_TIE)
                .unwrap_or(greedy.len());
            Case {
                id: c["id"].as_str().expect("id").to_string(),
                prompt: ids(&c["prompt_token_ids"]),
                greedy,
                margins,
                checked,
            }
        })
        .collect()
}

fn engine(opts: EngineOptions) -> Engine {
    let loaded = loader::load("smollm2").expect("SmolLM2 loads (run `make test`)");
    build_engine(loaded, &opts).expect("engine builds").0
}

fn f32_options() -> EngineOptions {
    EngineOptions {
        kind: Kind::Float,
        num_blocks: Some(256),
        ..EngineOptions::default()
    }
}

/// Runs `prompts` as concurrently queued requests; returns each one's tokens and cached count.
fn run(engine: &mut Engine, prompts: &[(String, Vec<u32>, usize)]) -> Vec<(Vec<u32>, usize)> {
    for (id, prompt, max_tokens) in prompts {
        engine
            .add_request(Request {
                request_id: id.clone(),
                prompt_token_ids: prompt.clone(),
                params: SamplingParams::greedy(*max_tokens),
            })
            .expect("request accepted");
    }
    let outputs = engine.run_to_completion().expect("engine runs");
    prompts
        .iter()
        .map(|(id, _, _)| {
            let mine: Vec<_> = outputs.iter().filter(|o| o.request_id() == id).collect();
            let tokens = mine
                .iter()
                .flat_map(|o| o.tokens().iter().map(|t| t.token))
                .collect();
            let last = mine.last().expect("request produced output");
            assert!(last.finish_reason().is_some(), "{id} finished");
            (tokens, last.usage().unwrap().cached_tokens)
        })
        .collect()
}

fn assert_prefix(case: &Case, got: &[u32], what: &str) {
    let n = case.checked;
    assert!(
        got.len() >= n,
        "{}: {what}: only {} tokens",
        case.id,
        got.len()
    );
    assert_eq!(
        &got[..n],
        &case.greedy[..n],
        "{}: {what}: differs within the first {n} tokens",
        case.id
    );
}

#[test]
fn greedy_reproduces_reference_tokens() {
    let mut engine = engine(f32_options());
    for case in cases() {
        let out = run(
            &mut engine,
            &[(case.id.clone(), case.prompt.clone(), case.greedy.len())],
        );
        assert_prefix(&case, &out[0].0, "alone");
        if case.checked == case.greedy.len() {
            // Whole reference reproduced, including where it ended with EOS.
            assert_eq!(out[0].0, case.greedy, "{}", case.id);
        }
    }
}

#[test]
fn first_step_top5_and_logprobs_match_reference() {
    let mut engine = engine(f32_options());
    for c in golden()["cases"].as_array().expect("cases") {
        let id = c["id"].as_str().expect("id");
        let lse = c["first_step_logsumexp"].as_f64().expect("lse");
        let top5: Vec<(u32, f64)> = c["first_step_top5"]
            .as_array()
            .expect("top5")
            .iter()
            .map(|t| {
                (
                    t["token_id"].as_u64().expect("id") as u32,
                    t["logit"].as_f64().expect("logit"),
                )
            })
            .collect();
        engine
            .add_request(Request {
                request_id: id.to_string(),
                prompt_token_ids: ids(&c["prompt_token_ids"]),
                params: SamplingParams {
                    logprobs: Some(5),
                    ..SamplingParams::greedy(1)
                },
            })
            .expect("accepted");
        let out = engine.run_to_completion().expect("runs");
        let tok = &out[0].tokens()[0];
        let got: Vec<u32> = tok.top_logprobs.iter().map(|(t, _)| *t).collect();
        let want: Vec<u32> = top5.iter().map(|(t, _)| *t).collect();
        assert_eq!(got, want, "{id}: first-step top-5 ids");
        for ((_, lp), (_, logit)) in tok.top_logprobs.iter().zip(&top5) {
            let expected = logit - lse;
            assert!(
                (*lp as f64 - expected).abs() < 2e-3,
                "{id}: logprob {lp} vs reference {expected}"
            );
        }
        assert_eq!(out[0].finish_reason(), Some(FinishReason::Length));
    }
}

#[test]
fn batching_chunking_and_prefix_hits_do_not_change_greedy_output() {
    let cases = cases();
    let requests = |tag: &str| -> Vec<(String, Vec<u32>, usize)> {
        cases
            .iter()
            .map(|c| (format!("{tag}-{}", c.id), c.prompt.clone(), c.greedy.len()))
            .collect()
    };
    // Small blocks so that even short prompts have full blocks to reuse.
    let opts = EngineOptions {
        block_size: 16,
        num_blocks: Some(512),
        ..f32_options()
    };

    let mut batched = engine(opts.clone());
    let together = run(&mut batched, &requests("batch"));
    for (case, (tokens, _)) in cases.iter().zip(&together) {
        assert_prefix(case, tokens, "all prompts in one batch");
    }
    // Same prompts again: their full blocks are cached now.
    for (case, req) in cases.iter().zip(requests("again")) {
        let out = run(&mut batched, std::slice::from_ref(&req));
        assert_prefix(case, &out[0].0, "after a prefix-cache hit");
        let expected_hit = (case.prompt.len() - 1) / 16 * 16;
        assert_eq!(out[0].1, expected_hit, "{}: cached tokens", case.id);
    }

    let mut chunked = engine(EngineOptions {
        max_num_batched_tokens: 64,
        enable_prefix_caching: false,
        ..opts
    });
    let chunks = run(&mut chunked, &requests("chunked"));
    for (case, (tokens, cached)) in cases.iter().zip(&chunks) {
        assert_prefix(case, tokens, "chunked prefill, budget 64");
        assert_eq!(*cached, 0);
    }
}

/// bf16 is the serving default where the CPU computes it natively (`--dtype auto`) and decodes
/// through its own attention path; it cannot match float32 bit for bit, so it is held to the
/// reference only where the reference is decisive.
#[test]
fn bf16_batched_decode_follows_reference_where_it_is_decisive() {
    const DECISIVE: f64 = 0.3;
    let cases = cases();
    let mut engine = engine(EngineOptions {
        kind: Kind::BFloat16,
        num_blocks: Some(256),
        ..EngineOptions::default()
    });
    let requests: Vec<_> = cases
        .iter()
        .map(|c| (format!("bf16-{}", c.id), c.prompt.clone(), c.greedy.len()))
        .collect();
    let outputs = run(&mut engine, &requests);
    let mut compared = 0;
    for (case, (tokens, _)) in cases.iter().zip(&outputs) {
        let m = &case.margins;
        let n = m.iter().position(|&x| x < DECISIVE).unwrap_or(m.len());
        assert!(
            tokens.len() >= n,
            "{}: only {} tokens",
            case.id,
            tokens.len()
        );
        assert_eq!(
            &tokens[..n],
            &case.greedy[..n],
            "{}: bf16 differs within the first {n} decisive tokens",
            case.id
        );
        compared += n;
    }
    eprintln!("bf16: {compared} decisive tokens compared");
    assert!(
        compared >= cases.len(),
        "the reference has decisive steps to compare"
    );
}
