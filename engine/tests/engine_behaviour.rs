//! The engine's request lifecycle on a tiny random Llama (f32, CPU, 4-token blocks): abort,
//! preemption by recompute, `max_num_seqs`, stop conditions, input validation, the
//! remote-prefill seam, seeded sampling and prefix-cache accounting. Expected tokens come from
//! reference runs of the same model (alone, on a big cache), never from hard-coded ids.

mod common;

use std::collections::{HashMap, HashSet};

use baton_engine::{
    build_engine, loader, Engine, EngineError, EngineOptions, FinishReason, ModelCard, Request,
    RequestOutput, SampledToken, SamplingParams,
};
use common::tiny_llama::{write_tiny_llama, TinyLlamaOptions, EOS_ID, EOT_ID, VOCAB_SIZE};
use common::ScratchDir;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tch::Kind;

const BLOCK_SIZE: usize = 4;

fn options() -> EngineOptions {
    EngineOptions {
        kind: Kind::Float,
        block_size: BLOCK_SIZE,
        num_blocks: Some(256),
        max_num_batched_tokens: 512,
        ..EngineOptions::default()
    }
}

fn tiny_engine(opts: EngineOptions) -> Engine {
    tiny_engine_with_card(opts, |_| {})
}

/// The tiny Llama (seed 0) as an engine, after `edit` changed its card (say, its EOS ids).
fn tiny_engine_with_card(opts: EngineOptions, edit: impl FnOnce(&mut ModelCard)) -> Engine {
    let scratch = ScratchDir::new("behaviour");
    let model = write_tiny_llama(&scratch.join("tiny"), TinyLlamaOptions::default());
    let mut loaded =
        loader::load(model.dir.to_str().expect("utf-8 path")).expect("tiny model loads");
    assert_eq!(loaded.card.eos_token_ids, vec![EOS_ID, EOT_ID]);
    edit(&mut loaded.card);
    build_engine(loaded, &opts).expect("engine builds").0
}

/// `len` byte-range ids, different for each `salt` from the first token on (so two salts share
/// no prefix block).
fn prompt(salt: u32, len: usize) -> Vec<u32> {
    (0..len as u32)
        .map(|i| (salt * 37 + i * 11 + 5) % 256)
        .collect()
}

fn request(id: &str, prompt_token_ids: Vec<u32>, params: SamplingParams) -> Request {
    Request {
        request_id: id.to_string(),
        prompt_token_ids,
        params,
    }
}

/// Greedy, `max_tokens` long whatever the model picks.
fn fixed_length(max_tokens: usize) -> SamplingParams {
    SamplingParams {
        ignore_eos: true,
        ..SamplingParams::greedy(max_tokens)
    }
}

/// What one request produced over a run.
#[derive(Clone, Debug, PartialEq)]
struct Outcome {
    tokens: Vec<u32>,
    finish: Option<FinishReason>,
    cached_tokens: usize,
}

/// Gathers step outputs by request, checking nothing follows a finished output.
fn collect(outputs: &[RequestOutput]) -> HashMap<String, Outcome> {
    let mut by_id: HashMap<String, Outcome> = HashMap::new();
    for o in outputs {
        let entry = by_id
            .entry(o.request_id.clone())
            .or_insert_with(|| Outcome {
                tokens: Vec::new(),
                finish: None,
                cached_tokens: o.cached_tokens,
            });
        assert!(
            entry.finish.is_none(),
            "{}: output after it finished",
            o.request_id
        );
        assert_eq!(
            o.new_tokens.len(),
            1,
            "{}: one token per step",
            o.request_id
        );
        entry.tokens.extend(o.new_tokens.iter().map(|t| t.token));
        entry.finish = o.finish_reason;
    }
    by_id
}

/// Queues `requests` together and runs them to completion.
fn run(engine: &mut Engine, requests: Vec<Request>) -> HashMap<String, Outcome> {
    for r in requests {
        engine.add_request(r).expect("request accepted");
    }
    let outcomes = collect(&engine.run_to_completion().expect("engine runs"));
    for (id, o) in &outcomes {
        assert!(o.finish.is_some(), "{id} finished");
    }
    outcomes
}

fn run_one(engine: &mut Engine, prompt: Vec<u32>, params: SamplingParams) -> Outcome {
    run(engine, vec![request("one", prompt, params)])
        .remove("one")
        .expect("the request produced output")
}

/// Nothing queued, running or holding a block.
fn assert_idle(engine: &Engine, context: &str) {
    let s = engine.stats();
    assert_eq!(s.kv_blocks_used, 0, "{context}: KV blocks still used");
    assert_eq!(
        (s.running, s.waiting),
        (0, 0),
        "{context}: running, waiting"
    );
    assert!(
        !engine.has_unfinished(),
        "{context}: unfinished requests left"
    );
}

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
        rest.iter().all(|o| !o.request_id.starts_with("doomed")),
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
                !aborted.contains(&o.request_id),
                "{}: output after abort",
                o.request_id
            );
            if o.finish_reason.is_some() {
                live.retain(|id| *id != o.request_id);
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
// Bad input
// ---------------------------------------------------------------------------------------------

#[test]
fn bad_requests_are_refused_with_a_named_reason_and_leave_nothing_allocated() {
    let mut engine = tiny_engine(EngineOptions {
        num_blocks: Some(8),
        max_model_len: Some(40),
        ..options()
    });
    let vocab = VOCAB_SIZE as u32;
    let cases: Vec<(&str, Request, &[&str])> = vec![
        (
            "empty prompt",
            request("empty", vec![], SamplingParams::greedy(4)),
            &["prompt is empty"],
        ),
        (
            "token outside the vocabulary",
            request("oov", vec![1, 2, vocab], SamplingParams::greedy(4)),
            &["token id 320", "vocabulary of 320"],
        ),
        (
            "prompt + max_tokens over max_model_len",
            request("long", prompt(1, 30), SamplingParams::greedy(11)),
            &["30 tokens", "`max_tokens` 11", "context of 40"],
        ),
        (
            "negative temperature",
            request(
                "hot",
                prompt(1, 4),
                SamplingParams {
                    temperature: -1.0,
                    ..SamplingParams::greedy(4)
                },
            ),
            &["`temperature`", "-1"],
        ),
        (
            "more blocks than the whole cache",
            request("huge", prompt(1, 20), SamplingParams::greedy(16)),
            &["8 blocks", "needing 9 blocks"],
        ),
    ];
    for (what, req, parts) in cases {
        for remote in [false, true] {
            let err = if remote {
                engine.add_remote_prefill_request(req.clone()).map(|_| ())
            } else {
                engine.add_request(req.clone())
            }
            .expect_err(what);
            let ok_variant = match what {
                "empty prompt" => matches!(err, EngineError::EmptyPrompt),
                "token outside the vocabulary" => matches!(
                    err,
                    EngineError::TokenOutOfVocab {
                        token: 320,
                        vocab_size: 320
                    }
                ),
                "prompt + max_tokens over max_model_len" => matches!(
                    err,
                    EngineError::ContextExceeded {
                        prompt_tokens: 30,
                        max_tokens: 11,
                        context: 40
                    }
                ),
                "negative temperature" => matches!(
                    err,
                    EngineError::InvalidParameter {
                        param: "temperature",
                        ..
                    }
                ),
                "more blocks than the whole cache" => matches!(
                    err,
                    EngineError::SequenceTooLong {
                        needed_blocks: 9,
                        total_blocks: 8
                    }
                ),
                _ => unreachable!(),
            };
            assert!(
                ok_variant,
                "{what} (remote {remote}): wrong variant {err:?}"
            );
            let message = err.to_string();
            for part in parts {
                assert!(message.contains(part), "{what}: `{message}` lacks `{part}`");
            }
            assert_idle(&engine, what);
        }
    }

    // A duplicate id is refused while the first is in flight, and accepted once it finished.
    engine
        .add_request(request("dup", prompt(2, 4), SamplingParams::greedy(3)))
        .expect("first accepted");
    let used = engine.stats().kv_blocks_used;
    for remote in [false, true] {
        let again = request("dup", prompt(3, 4), SamplingParams::greedy(3));
        let err = if remote {
            engine.add_remote_prefill_request(again).map(|_| ())
        } else {
            engine.add_request(again)
        }
        .expect_err("duplicate refused");
        assert!(
            matches!(&err, EngineError::DuplicateRequest(id) if id == "dup"),
            "{err:?}"
        );
        assert!(err.to_string().contains("`dup` already exists"), "{err}");
        assert_eq!(engine.stats().kv_blocks_used, used);
        assert_eq!(engine.stats().waiting, 1);
    }
    let first = collect(&engine.run_to_completion().expect("runs"));
    assert_eq!(first["dup"].tokens.len(), 3, "the first `dup` is unharmed");
    assert_idle(&engine, "after the duplicate");
    engine
        .add_request(request("dup", prompt(3, 4), SamplingParams::greedy(3)))
        .expect("a finished id can be reused");
    engine.run_to_completion().expect("runs");
    assert_idle(&engine, "at the end");
}

// ---------------------------------------------------------------------------------------------
// Remote prefill (disaggregation seam)
// ---------------------------------------------------------------------------------------------

// The KV cache has no public accessor, so these tests cannot fill the reserved blocks with a
// second engine's KV; they check the bookkeeping around the seam.

#[test]
fn remote_prefill_reserves_blocks_and_abort_frees_them() {
    let mut engine = tiny_engine(EngineOptions {
        num_blocks: Some(8),
        ..options()
    });
    let p = prompt(30, 10);
    let slot = engine
        .add_remote_prefill_request(request("remote", p.clone(), fixed_length(4)))
        .expect("accepted");
    assert_eq!(slot.block_ids.len(), p.len().div_ceil(BLOCK_SIZE));
    assert_eq!(slot.cached_tokens, 0);
    let distinct: HashSet<u32> = slot.block_ids.iter().copied().collect();
    assert_eq!(distinct.len(), slot.block_ids.len(), "distinct blocks");
    assert!(slot.block_ids.iter().all(|&b| b < 8));
    let s = engine.stats();
    assert_eq!(s.kv_blocks_used, slot.block_ids.len());
    assert_eq!((s.running, s.waiting), (0, 0), "outside the batch");
    assert!(engine.has_unfinished());
    assert!(
        engine.step().expect("empty step").is_empty(),
        "not scheduled"
    );

    // A second reservation that does not fit is refused and leaves nothing behind.
    let err = engine
        .add_remote_prefill_request(request("too-many", prompt(31, 24), fixed_length(4)))
        .expect_err("out of blocks");
    assert!(matches!(err, EngineError::Block(_)), "{err:?}");
    assert_eq!(engine.stats().kv_blocks_used, slot.block_ids.len());
    assert!(
        matches!(
            engine.complete_remote_prefill("too-many", token(1)),
            Err(EngineError::NotAwaitingPrefill(_))
        ),
        "a refused reservation is unknown"
    );

    assert!(engine.abort("remote"));
    assert_idle(&engine, "after aborting the remote prefill");
    match engine.complete_remote_prefill("remote", token(1)) {
        Err(EngineError::NotAwaitingPrefill(id)) => assert_eq!(id, "remote"),
        other => panic!("completing an aborted request: {other:?}"),
    }
    // The id and the blocks can be used again.
    let again = engine
        .add_remote_prefill_request(request("remote", p, fixed_length(4)))
        .expect("accepted again");
    assert_eq!(again.block_ids.len(), slot.block_ids.len());
    assert!(engine.abort("remote"));
    assert_idle(&engine, "after the second abort");
}

fn token(id: u32) -> SampledToken {
    SampledToken {
        token: id,
        logprob: -0.5,
        top_logprobs: Vec::new(),
    }
}

#[test]
fn completed_remote_prefill_decodes_from_the_given_first_token() {
    let mut engine = tiny_engine(options());
    let err = engine
        .complete_remote_prefill("nobody", token(1))
        .expect_err("unknown id");
    assert!(matches!(&err, EngineError::NotAwaitingPrefill(id) if id == "nobody"));
    assert!(err.to_string().contains("`nobody`"), "{err}");

    // A request in the ordinary queue is not awaiting a remote prefill either.
    engine
        .add_request(request("local", prompt(40, 6), fixed_length(3)))
        .expect("accepted");
    assert!(matches!(
        engine.complete_remote_prefill("local", token(1)),
        Err(EngineError::NotAwaitingPrefill(_))
    ));
    engine.run_to_completion().expect("runs");

    let p = prompt(41, 10);
    let max_tokens = 6;
    let slot = engine
        .add_remote_prefill_request(request("remote", p.clone(), fixed_length(max_tokens)))
        .expect("accepted");
    let first = engine
        .complete_remote_prefill("remote", token(77))
        .expect("completes");
    assert_eq!(first.new_tokens[0].token, 77);
    assert_eq!(first.new_tokens[0].logprob, -0.5);
    assert_eq!(first.finish_reason, None);
    assert_eq!(first.prompt_tokens, p.len());
    assert_eq!(engine.stats().running, 1, "decoding in the batch");
    assert!(
        matches!(
            engine.complete_remote_prefill("remote", token(78)),
            Err(EngineError::NotAwaitingPrefill(_))
        ),
        "a duplicate completion is refused"
    );

    // Completion registered the prompt's full blocks at once (before any step): the same
    // prompt now hits them.
    let twin = engine
        .add_remote_prefill_request(request("twin", p.clone(), fixed_length(1)))
        .expect("accepted");
    let full = (p.len() - 1) / BLOCK_SIZE;
    assert_eq!(twin.cached_tokens, full * BLOCK_SIZE);
    assert_eq!(
        twin.block_ids[..full],
        slot.block_ids[..full],
        "shared blocks"
    );
    assert_ne!(
        twin.block_ids[full], slot.block_ids[full],
        "a partial block is not shared"
    );
    // max_tokens 1: the first token finishes it, and its own block is released.
    let used = engine.stats().kv_blocks_used;
    let done = engine
        .complete_remote_prefill("twin", token(5))
        .expect("completes");
    assert_eq!(done.finish_reason, Some(FinishReason::Length));
    assert_eq!(engine.stats().kv_blocks_used, used - 1);

    let rest = collect(&engine.run_to_completion().expect("runs"));
    assert!(!rest.contains_key("twin"), "no output after it finished");
    let mut tokens = vec![77];
    tokens.extend(&rest["remote"].tokens);
    assert_eq!(tokens.len(), max_tokens);
    assert_eq!(rest["remote"].finish, Some(FinishReason::Length));
    assert_idle(&engine, "after the remote requests finished");
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
