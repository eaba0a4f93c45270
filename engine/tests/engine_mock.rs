//! The mock engine behind the real scheduler and block manager (the tiny Llama's card for the
//! vocabulary; no weights are read): its tokens are deterministic and stay in the vocabulary,
//! invariant under batching and preemption; prefix-cache hits and cancellation behave as with
//! the model; the virtual clock holds exactly the modelled step times; 1 000 requests replay on
//! it in seconds and give the same simulated figures twice.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::engine_fixture::{collect, fixed_length, prompt, request};
use common::tiny_llama::{write_tiny_llama, TinyLlamaOptions};
use common::ScratchDir;
use engine::mock::{Clock, MockModel, Roofline, VirtualClock, CALIBRATED_EFFICIENCY, H100_SXM};
use engine::{loader, mock_engine, Engine, EngineOptions, ModelCard, Request};

fn card() -> ModelCard {
    let scratch = ScratchDir::new("mock");
    let model = write_tiny_llama(&scratch.join("tiny"), TinyLlamaOptions::default());
    loader::load_card(model.dir.to_str().unwrap()).expect("card")
}

fn roofline(tp: usize) -> Roofline {
    Roofline {
        model: MockModel::deepseek_r1_distill_llama_70b(),
        gpu: H100_SXM,
        tensor_parallel: tp,
        efficiency: CALIBRATED_EFFICIENCY,
    }
}

fn engine(card: &ModelCard, num_blocks: usize, clock: Arc<dyn Clock>) -> Engine {
    let opts = EngineOptions {
        block_size: 4,
        num_blocks: Some(num_blocks),
        max_num_batched_tokens: 256,
        ..EngineOptions::default()
    };
    mock_engine(card, &opts, roofline(4), clock).expect("mock engine")
}

fn run_all(engine: &mut Engine, requests: Vec<Request>) -> HashMap<String, Vec<u32>> {
    for r in requests {
        engine.add_request(r).unwrap();
    }
    collect(&engine.run_to_completion().unwrap())
        .into_iter()
        .map(|(id, o)| (id, o.tokens))
        .collect()
}

#[test]
fn tokens_are_deterministic_in_vocabulary_and_invariant_under_batching_and_preemption() {
    let card = card();
    let vocab = card.config.vocab_size as u32;
    let alone: Vec<Vec<u32>> = (0..6)
        .map(|i| {
            let mut e = engine(&card, 256, Arc::new(VirtualClock::default()));
            run_all(&mut e, vec![request("r", prompt(i, 9), fixed_length(12))])["r"].clone()
        })
        .collect();
    for tokens in &alone {
        assert_eq!(tokens.len(), 12);
        assert!(tokens.iter().all(|&t| t < vocab));
    }
    let batch: Vec<Request> = (0..6)
        .map(|i| request(&format!("r{i}"), prompt(i, 9), fixed_length(12)))
        .collect();
    // Roomy, then so tight that sequences are preempted and recomputed.
    for blocks in [256, 12] {
        let mut e = engine(&card, blocks, Arc::new(VirtualClock::default()));
        let out = run_all(&mut e, batch.clone());
        for (i, tokens) in alone.iter().enumerate() {
            assert_eq!(&out[&format!("r{i}")], tokens, "{blocks} blocks");
        }
        if blocks == 12 {
            assert!(e.stats().preemptions > 0, "the tight cache preempted");
        }
        assert_eq!(e.stats().kv_blocks_used, 0);
    }
}

#[test]
fn prefix_hits_and_cancellation_behave_as_with_the_model() {
    let card = card();
    let mut e = engine(&card, 64, Arc::new(VirtualClock::default()));
    let p = prompt(7, 13);
    run_all(&mut e, vec![request("a", p.clone(), fixed_length(2))]);
    e.add_request(request("b", p.clone(), fixed_length(2)))
        .unwrap();
    let out = e.run_to_completion().unwrap();
    assert_eq!(
        out[0].usage().unwrap().cached_tokens,
        12,
        "three full blocks reused"
    );
    e.add_request(request("c", prompt(8, 30), fixed_length(50)))
        .unwrap();
    e.step().unwrap();
    assert!(e.stats().kv_blocks_used > 0);
    assert!(e.abort("c"));
    assert_eq!(
        e.stats().kv_blocks_used,
        0,
        "cancelled: blocks free at once"
    );
}

#[test]
fn the_virtual_clock_holds_the_modelled_step_times() {
    let card = card();
    let clock = Arc::new(VirtualClock::default());
    let mut e = engine(&card, 256, clock.clone());
    // One prefill of 8 tokens, then one decode step at context 8.
    e.add_request(request("r", prompt(1, 8), fixed_length(2)))
        .unwrap();
    e.step().unwrap();
    let after_prefill = clock.now();
    let want = roofline(4).step_seconds(&engine::mock::StepShape {
        chunks: vec![(8, 0)],
    });
    assert!((after_prefill.as_secs_f64() - want).abs() < 1e-9);
    e.step().unwrap();
    let decode = roofline(4).step_seconds(&engine::mock::StepShape {
        chunks: vec![(1, 8)],
    });
    assert!(((clock.now() - after_prefill).as_secs_f64() - decode).abs() < 1e-9);
}

/// 1 000 requests (ISL 200, OSL 20) through one simulated TP4 worker: (simulated seconds, steps).
fn replay(card: &ModelCard) -> (Duration, usize) {
    let clock = Arc::new(VirtualClock::default());
    let opts = EngineOptions {
        block_size: 16,
        num_blocks: Some(4096),
        max_num_batched_tokens: 4096,
        ..EngineOptions::default()
    };
    let mut e = mock_engine(card, &opts, roofline(4), clock.clone()).unwrap();
    for i in 0..1000u32 {
        let p: Vec<u32> = (0..200).map(|j| (i * 7 + j * 13) % 300 + 10).collect();
        e.add_request(request(&format!("q{i}"), p, fixed_length(20)))
            .unwrap();
    }
    let mut steps = 0;
    while e.has_unfinished() {
        e.step().unwrap();
        steps += 1;
    }
    (clock.now(), steps)
}

#[test]
fn a_thousand_requests_replay_on_the_virtual_clock_quickly_and_identically() {
    let card = card();
    let started = Instant::now();
    let first = replay(&card);
    let second = replay(&card);
    assert_eq!(first, second, "the same simulated figures twice");
    assert!(
        first.0 > Duration::from_secs(1),
        "simulated time passed: {first:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "two replays took {:?} of wall time",
        started.elapsed()
    );
}
