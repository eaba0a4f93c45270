//! Aborts on the tiny Llama: an aborted request frees its blocks at once and leaves the others'
//! tokens unchanged, and 200 requests aborted at random points (with chunked prefill and
//! preemption happening) leave nothing allocated. Expected tokens come from reference runs of
//! the same model, never from hard-coded ids.

mod common;

use std::collections::HashSet;

use common::engine_fixture::*;
use engine::{EngineOptions, FinishReason, SamplingParams};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

// ---------------------------------------------------------------------------------------------
// Abort
// ---------------------------------------------------------------------------------------------

#[test]
fn abort_frees_blocks_at_once_and_leaves_other_requests_unaffected() {
    let opts = EngineOptions {
        max_num_seqs: 3,
        ..options()
    };
    let keep = |id: &str, salt| request(id, prompt(salt, 8), fixed_length(10));
    let doomed = |id: &str, salt| request(id, prompt(salt, 8), fixed_length(30));

    let mut reference = tiny_engine(opts.clone());
    let want = run(&mut reference, vec![keep("keep-a", 1), keep("keep-b", 2)]);

    let mut engine = tiny_engine(opts);
    // Admitted first come first served: keep-a, doomed-running and keep-b run (max_num_seqs 3),
    // doomed-waiting waits.
    for r in [
        keep("keep-a", 1),
        doomed("doomed-running", 3),
        keep("keep-b", 2),
        doomed("doomed-waiting", 4),
    ] {
        engine.add_request(r).expect("accepted");
    }
    let mut outputs = Vec::new();
    for _ in 0..3 {
        outputs.extend(engine.step().expect("step runs"));
    }
    let before = engine.stats();
    assert_eq!((before.running, before.waiting), (3, 1));
    let generated = collect(&outputs)["doomed-running"].tokens.len();
    assert_eq!(generated, 3);
    // Its table covers every token but the newest (whose KV the next step computes).
    let its_blocks = (8 + generated - 1).div_ceil(BLOCK_SIZE);

    assert!(engine.abort("doomed-running"));
    let after = engine.stats();
    assert_eq!(
        before.kv_blocks_used - after.kv_blocks_used,
        its_blocks,
        "the running request's blocks are freed by abort itself"
    );
    assert_eq!((after.running, after.waiting), (2, 1));
    assert!(engine.abort("doomed-waiting"));
    let after_both = engine.stats();
    assert_eq!(after_both.kv_blocks_used, after.kv_blocks_used);
    assert_eq!((after_both.running, after_both.waiting), (2, 0));
    assert!(
        !engine.abort("doomed-running"),
        "a second abort finds nothing"
    );
    assert!(!engine.abort("never-added"));

    let rest = engine.run_to_completion().expect("engine runs");
    assert!(
        rest.iter().all(|o| !o.request_id().starts_with("doomed")),
        "no output after abort"
    );
    outputs.extend(rest);
    let got = collect(&outputs);
    for id in ["keep-a", "keep-b"] {
        assert_eq!(got[id].tokens, want[id].tokens, "{id}: tokens");
        assert_eq!(got[id].finish, Some(FinishReason::Length));
    }
    assert_idle(&engine, "after the others finished");

    // With only aborted requests in flight (3 running, 1 waiting), nothing stays allocated.
    for salt in 5..9 {
        engine
            .add_request(doomed(&format!("late-{salt}"), salt))
            .expect("accepted");
    }
    engine.step().expect("step runs");
    engine.step().expect("step runs");
    let s = engine.stats();
    assert_eq!((s.running, s.waiting), (3, 1));
    assert!(s.kv_blocks_used > 0);
    for salt in 5..9 {
        assert!(engine.abort(&format!("late-{salt}")));
    }
    assert_idle(&engine, "right after aborting everything");
    assert!(engine.step().expect("empty step").is_empty());
}

#[test]
fn requests_aborted_at_random_points_leave_nothing_allocated() {
    random_aborts(true, 7);
    random_aborts(false, 8);
}

/// 200 requests (random prompt and output lengths, greedy or sampled) added at random points,
/// each aborted at a random point unless it finished first; the budget and the cache are small
/// enough for chunked prefill and preemption to happen too.
fn random_aborts(prefix_caching: bool, seed: u64) {
    const REQUESTS: usize = 200;
    const MAX_NUM_SEQS: usize = 6;
    let mut engine = tiny_engine(EngineOptions {
        num_blocks: Some(40),
        max_num_seqs: MAX_NUM_SEQS,
        max_num_batched_tokens: 48,
        enable_prefix_caching: prefix_caching,
        ..options()
    });
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut live: Vec<String> = Vec::new();
    let mut aborted: HashSet<String> = HashSet::new();
    let (mut added, mut finished) = (0, 0);
    let (mut aborted_running, mut aborted_waiting) = (0, 0);
    let mut steps = 0;
    while added < REQUESTS || !live.is_empty() {
        if added < REQUESTS && rng.random_bool(0.5) {
            for _ in 0..rng.random_range(1..=3).min(REQUESTS - added) {
                let id = format!("r{added}");
                let len = rng.random_range(1..=24);
                // 20 prompt families, so prompts share prefix blocks.
                let family = rng.random_range(0..20);
                let params = SamplingParams {
                    temperature: if rng.random_bool(0.5) { 1.0 } else { 0.0 },
                    ..fixed_length(rng.random_range(1..=40))
                };
                engine
                    .add_request(request(&id, prompt(family, len), params))
                    .expect("accepted");
                live.push(id);
                added += 1;
            }
        }
        if !live.is_empty() && rng.random_bool(0.35) {
            let id = live.swap_remove(rng.random_range(0..live.len()));
            let before = engine.stats();
            assert!(engine.abort(&id), "{id} is unfinished, so abort finds it");
            let after = engine.stats();
            assert!(after.kv_blocks_used <= before.kv_blocks_used);
            aborted_running += before.running - after.running;
            aborted_waiting += before.waiting - after.waiting;
            assert_eq!(
                after.running + after.waiting + 1,
                before.running + before.waiting
            );
            if after.running == 0 {
                assert_eq!(after.kv_blocks_used, 0, "nothing running holds no blocks");
            }
            aborted.insert(id);
        }
        for o in engine.step().expect("step runs") {
            assert!(
                !aborted.contains(o.request_id()),
                "{}: output after abort",
                o.request_id()
            );
            if o.finish_reason().is_some() {
                live.retain(|id| *id != o.request_id());
                finished += 1;
            }
        }
        let s = engine.stats();
        assert!(s.running <= MAX_NUM_SEQS);
        assert!(s.kv_blocks_used + s.kv_blocks_cached <= s.kv_blocks_total);
        assert_eq!(s.running + s.waiting, live.len(), "step {steps}");
        if s.running == 0 {
            assert_eq!(
                s.kv_blocks_used, 0,
                "step {steps}: nothing running holds no blocks"
            );
        }
        steps += 1;
        assert!(steps < 20_000, "the engine makes progress");
    }
    assert_idle(&engine, "after 200 requests");
    assert_eq!(finished + aborted.len(), REQUESTS);
    let hits = engine.stats().prefix_hit_tokens;
    assert_eq!(hits > 0, prefix_caching, "{hits} prefix-hit tokens");
    assert!(
        aborted_running > 0 && aborted_waiting > 0,
        "both kinds were aborted: {aborted_running} running, {aborted_waiting} waiting"
    );
    eprintln!(
        "prefix caching {prefix_caching}: {steps} steps, {finished} finished, {aborted_running} aborted running, \
         {aborted_waiting} aborted waiting, {} preemptions",
        engine.stats().preemptions
    );
}
