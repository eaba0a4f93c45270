//! Scheduling and stop conditions on the tiny Llama: preemption by recompute, `max_num_seqs`,
//! `max_tokens`, stop tokens, `min_tokens`, `ignore_eos`, seeded sampling across batches and
//! prefix-cache accounting. Expected tokens come from reference runs of the same model.

mod common;

use common::engine_fixture::*;
use common::tiny_llama::{EOS_ID, EOT_ID};
use engine::{Engine, EngineOptions, FinishReason, SamplingParams};

// ---------------------------------------------------------------------------------------------
// Scheduling
// ---------------------------------------------------------------------------------------------

#[test]
fn preemption_by_recompute_finishes_everything_with_unchanged_tokens() {
    let prompts: Vec<Vec<u32>> = (0..4).map(|i| prompt(10 + i, 8)).collect();
    let mut big = tiny_engine(options());
    let alone: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| run_one(&mut big, p.clone(), fixed_length(12)).tokens)
        .collect();

    for prefix_caching in [true, false] {
        // 6 blocks of 4: three 8-token prompts fit, and none of them can grow without evicting
        // another.
        let mut small = tiny_engine(EngineOptions {
            num_blocks: Some(6),
            enable_prefix_caching: prefix_caching,
            ..options()
        });
        for (i, p) in prompts.iter().enumerate() {
            small
                .add_request(request(&format!("r{i}"), p.clone(), fixed_length(12)))
                .expect("accepted");
        }
        let mut outputs = Vec::new();
        let mut steps = 0;
        while small.has_unfinished() {
            outputs.extend(small.step().expect("step runs"));
            let s = small.stats();
            assert!(s.kv_blocks_used <= 6);
            steps += 1;
            assert!(steps < 500, "prefix caching {prefix_caching}: no progress");
        }
        let s = small.stats();
        assert!(
            s.preemptions > 0,
            "prefix caching {prefix_caching}: the cache was too small, yet nothing was preempted"
        );
        let got = collect(&outputs);
        for (i, want) in alone.iter().enumerate() {
            let o = &got[&format!("r{i}")];
            assert_eq!(
                &o.tokens, want,
                "prefix caching {prefix_caching}: r{i} differs from its run alone"
            );
            assert_eq!(o.finish, Some(FinishReason::Length));
        }
        assert_idle(&small, "after preemptions");
    }
}

#[test]
fn max_num_seqs_caps_the_running_set() {
    let mut engine = tiny_engine(EngineOptions {
        max_num_seqs: 2,
        ..options()
    });
    for i in 0..5 {
        engine
            .add_request(request(&format!("r{i}"), prompt(i, 6), fixed_length(5)))
            .expect("accepted");
    }
    let mut outputs = Vec::new();
    let mut peak = 0;
    while engine.has_unfinished() {
        let out = engine.step().expect("step runs");
        assert!(out.len() <= 2, "{} requests sampled in one step", out.len());
        outputs.extend(out);
        let s = engine.stats();
        assert!(s.running <= 2, "{} running", s.running);
        let done = collect(&outputs)
            .values()
            .filter(|o| o.finish.is_some())
            .count();
        assert_eq!(s.running + s.waiting, 5 - done);
        peak = peak.max(s.running);
    }
    assert_eq!(peak, 2);
    let got = collect(&outputs);
    assert_eq!(got.len(), 5);
    assert!(got.values().all(|o| o.tokens.len() == 5));
}

// ---------------------------------------------------------------------------------------------
// Stop conditions
// ---------------------------------------------------------------------------------------------

/// A prompt whose 16-token greedy run ends on length (no EOS), with that run.
fn reference_run(engine: &mut Engine) -> (Vec<u32>, Vec<u32>) {
    let p = prompt(21, 7);
    let o = run_one(engine, p.clone(), SamplingParams::greedy(16));
    assert_eq!(o.finish, Some(FinishReason::Length), "{o:?}");
    assert_eq!(o.tokens.len(), 16);
    (p, o.tokens)
}

#[test]
fn max_tokens_ends_with_length() {
    let mut engine = tiny_engine(options());
    let (p, reference) = reference_run(&mut engine);
    for n in [1, 7] {
        let o = run_one(&mut engine, p.clone(), SamplingParams::greedy(n));
        assert_eq!(o.tokens, reference[..n], "max_tokens {n}");
        assert_eq!(o.finish, Some(FinishReason::Length));
    }
}

#[test]
fn stop_token_ends_with_stop_right_after_it() {
    let mut engine = tiny_engine(options());
    let (p, reference) = reference_run(&mut engine);
    // The first step k ≥ 2 whose token did not appear before it.
    let k = (2..reference.len())
        .find(|&k| !reference[..k].contains(&reference[k]))
        .expect("a fresh token in the reference run");
    let stop = reference[k];
    let o = run_one(
        &mut engine,
        p,
        SamplingParams {
            stop_token_ids: vec![stop],
            ..SamplingParams::greedy(16)
        },
    );
    assert_eq!(o.tokens, reference[..=k], "stops after {} tokens", k + 1);
    assert_eq!(o.finish, Some(FinishReason::Stop));
}

#[test]
fn min_tokens_suppresses_stop_and_eos_until_reached() {
    let mut engine = tiny_engine(options());
    let (p, reference) = reference_run(&mut engine);
    // The token greedy picks first: without min_tokens it would stop at once.
    let stop = reference[0];
    let unrestricted = run_one(
        &mut engine,
        p.clone(),
        SamplingParams {
            stop_token_ids: vec![stop],
            ..SamplingParams::greedy(16)
        },
    );
    assert_eq!(unrestricted.tokens, vec![stop]);
    assert_eq!(unrestricted.finish, Some(FinishReason::Stop));

    let min_tokens = 6;
    let o = run_one(
        &mut engine,
        p,
        SamplingParams {
            stop_token_ids: vec![stop],
            min_tokens,
            ..SamplingParams::greedy(16)
        },
    );
    assert!(o.tokens.len() >= min_tokens, "{o:?}");
    for banned in [stop, EOS_ID, EOT_ID] {
        assert!(
            !o.tokens[..min_tokens].contains(&banned),
            "{banned} sampled within min_tokens: {:?}",
            o.tokens
        );
    }
    match o.finish {
        Some(FinishReason::Stop) => {
            let last = *o.tokens.last().expect("tokens");
            assert!([stop, EOS_ID, EOT_ID].contains(&last), "{o:?}");
            assert!(o.tokens.len() > min_tokens);
        }
        Some(FinishReason::Length) => assert_eq!(o.tokens.len(), 16),
        None => panic!("unfinished"),
    }
}

#[test]
fn ignore_eos_runs_past_the_models_eos() {
    let mut plain = tiny_engine(options());
    let (p, reference) = reference_run(&mut plain);
    // Make the token greedy picks first the model's EOS.
    let eos = reference[0];
    let mut engine = tiny_engine_with_card(options(), |card| card.eos_token_ids = vec![eos]);

    let stopped = run_one(&mut engine, p.clone(), SamplingParams::greedy(8));
    assert_eq!(stopped.tokens, vec![eos], "EOS ends the request");
    assert_eq!(stopped.finish, Some(FinishReason::Stop));

    let o = run_one(&mut engine, p, fixed_length(8));
    assert_eq!(o.tokens, reference[..8], "EOS emitted as a normal token");
    assert_eq!(o.tokens[0], eos);
    assert_eq!(o.finish, Some(FinishReason::Length));
}

// ---------------------------------------------------------------------------------------------
// Sampling and prefix cache through the engine
// ---------------------------------------------------------------------------------------------

#[test]
fn seeded_sampling_does_not_depend_on_the_batch() {
    let sampled = |seed: Option<u64>| SamplingParams {
        temperature: 1.0,
        seed,
        ..fixed_length(12)
    };
    let p = prompt(50, 9);

    let mut engine = tiny_engine(options());
    let alone = run_one(&mut engine, p.clone(), sampled(Some(1234))).tokens;
    let again = run_one(&mut engine, p.clone(), sampled(Some(1234))).tokens;
    assert_eq!(alone, again, "same seed, same tokens");

    let batch = vec![
        request("other-0", prompt(51, 5), sampled(None)),
        request("seeded", p.clone(), sampled(Some(1234))),
        request("other-1", prompt(52, 13), sampled(None)),
        request("other-2", prompt(53, 3), sampled(None)),
    ];
    let got = run(&mut tiny_engine(options()), batch);
    assert_eq!(
        got["seeded"].tokens, alone,
        "seeded request in a batch of 4"
    );

    let other_seed = run_one(&mut engine, p, sampled(Some(1235))).tokens;
    assert_ne!(other_seed, alone, "different seeds, different tokens");
}

#[test]
fn repeated_prompt_reports_cached_tokens() {
    let mut engine = tiny_engine(options());
    for len in [10, 12] {
        let p = prompt(60 + len as u32, len);
        let first_stats = engine.stats();
        let first = run_one(&mut engine, p.clone(), fixed_length(3));
        assert_eq!(first.cached_tokens, 0, "len {len}: nothing cached yet");
        let mid = engine.stats();
        assert_eq!(mid.prefix_hit_tokens, first_stats.prefix_hit_tokens);

        let second = run_one(&mut engine, p.clone(), fixed_length(3));
        // Full blocks only, and at least one prompt token left to compute.
        let expected = (len - 1) / BLOCK_SIZE * BLOCK_SIZE;
        assert_eq!(second.cached_tokens, expected, "len {len}");
        assert!(second.cached_tokens > 0 && second.cached_tokens.is_multiple_of(BLOCK_SIZE));
        assert_eq!(
            second.tokens, first.tokens,
            "len {len}: a hit changes no token"
        );
        let end = engine.stats();
        assert_eq!(
            end.prefix_hit_tokens - mid.prefix_hit_tokens,
            expected as u64,
            "len {len}: hit counter"
        );
        assert!(end.prefix_query_tokens >= mid.prefix_query_tokens + len as u64);
        assert!(end.kv_blocks_cached > 0);
        assert_idle(&engine, "after the repeat");
    }
}
