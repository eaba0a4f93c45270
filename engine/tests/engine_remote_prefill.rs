//! The remote-prefill seam on the tiny Llama: reserved blocks, completion from a given first
//! token, and a second engine filled with a first engine's KV blocks through the block
//! read/write API decoding exactly what the first one does.

mod common;

use std::collections::HashSet;

use common::engine_fixture::*;
use engine::{AdmissionError, Engine, EngineError, EngineOptions, FinishReason, RequestOutput};

// ---------------------------------------------------------------------------------------------
// Remote prefill (disaggregation seam)
// ---------------------------------------------------------------------------------------------

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
    assert!(
        matches!(&err, AdmissionError::NoFreeBlocks(id) if id == "too-many"),
        "{err:?}"
    );
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
    assert_eq!(first.tokens()[0].token, 77);
    assert_eq!(first.tokens()[0].logprob, -0.5);
    assert_eq!(first.finish_reason(), None);
    assert_eq!(first.usage().unwrap().prompt_tokens, p.len());
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
    assert_eq!(done.finish_reason(), Some(FinishReason::Length));
    assert_eq!(engine.stats().kv_blocks_used, used - 1);

    let rest = collect(&engine.run_to_completion().expect("runs"));
    assert!(!rest.contains_key("twin"), "no output after it finished");
    let mut tokens = vec![77];
    tokens.extend(&rest["remote"].tokens);
    assert_eq!(tokens.len(), max_tokens);
    assert_eq!(rest["remote"].finish, Some(FinishReason::Length));
    assert_idle(&engine, "after the remote requests finished");
}

/// Greedy tokens of `id` from `first` on: `first`'s own token, then what the engine runs.
fn tokens_after(engine: &mut Engine, id: &str, first: &RequestOutput) -> Vec<u32> {
    let mut tokens: Vec<u32> = first.tokens().iter().map(|t| t.token).collect();
    tokens.extend(&collect(&engine.run_to_completion().expect("runs"))[id].tokens);
    tokens
}

#[test]
fn a_second_engine_filled_with_the_first_engines_kv_decodes_the_same_tokens() {
    let p = prompt(50, 10);
    let params = fixed_length(8);

    // Engine A prefills locally; its prompt blocks are read out after the prefill step.
    let mut a = tiny_engine(options());
    a.add_request(request("r", p.clone(), params.clone()))
        .expect("accepted");
    let prefill = a.step().expect("prefill step");
    assert_eq!(prefill.len(), 1, "the whole prompt fits one step");
    let first = prefill[0].tokens()[0].clone();
    let blocks = a.block_table("r").expect("running");
    let prompt_blocks = &blocks[..p.len().div_ceil(BLOCK_SIZE)];
    let kv = a.read_kv_blocks(prompt_blocks).expect("blocks read");
    assert!(a.kv_block_bytes() > 0);
    assert!(kv.iter().all(|b| b.len() == a.kv_block_bytes()));
    let reference = tokens_after(&mut a, "r", &prefill[0]);
    assert_eq!(reference.len(), 8);

    // Engine B never runs the prompt: the blocks it reserved receive A's KV.
    let mut b = tiny_engine(options());
    let slot = b
        .add_remote_prefill_request(request("r", p.clone(), params.clone()))
        .expect("accepted");
    assert_eq!(slot.cached_tokens, 0);
    assert_eq!(slot.block_ids.len(), kv.len());
    b.write_kv_blocks(&slot.block_ids, &kv)
        .expect("blocks written");
    assert_eq!(
        b.read_kv_blocks(&slot.block_ids).expect("read back"),
        kv,
        "what was written reads back"
    );
    let resumed = b
        .complete_remote_prefill("r", first.clone())
        .expect("completes");
    assert_eq!(tokens_after(&mut b, "r", &resumed), reference);
    assert_idle(&b, "after the transferred request finished");

    // Without the transfer the same reservation decodes over an empty cache and goes astray:
    // the copied KV is what made B agree.
    let mut c = tiny_engine(options());
    c.add_remote_prefill_request(request("r", p, params))
        .expect("accepted");
    let resumed = c.complete_remote_prefill("r", first).expect("completes");
    assert_ne!(tokens_after(&mut c, "r", &resumed), reference);

    // Bad block ids and sizes are refused with what is wrong.
    let err = b
        .write_kv_blocks(&[9999], &kv[..1])
        .expect_err("no such block");
    assert!(
        matches!(
            err,
            EngineError::NoSuchBlock {
                block: 9999,
                num_blocks: 256
            }
        ),
        "{err:?}"
    );
    let err = b
        .write_kv_blocks(&[0], &[vec![0u8; 3]])
        .expect_err("wrong size");
    assert!(
        matches!(err, EngineError::BlockDataSize { got: 3, .. }),
        "{err:?}"
    );
    assert!(matches!(
        b.read_kv_blocks(&[256]),
        Err(EngineError::NoSuchBlock { block: 256, .. })
    ));
}

/// What a prefill worker does: a prefill-only request, its blocks read out while held.
fn prefill_elsewhere(
    p: &[u32],
    params: &engine::SamplingParams,
) -> (engine::SampledToken, Vec<Vec<u8>>) {
    let mut prefill = tiny_engine(options());
    prefill
        .add_prefill_request(request("job", p.to_vec(), params.clone()))
        .expect("accepted");
    let mut outputs = Vec::new();
    while outputs.is_empty() {
        outputs = prefill.step().expect("prefill steps");
    }
    let RequestOutput::Prefilled {
        token, block_ids, ..
    } = outputs.remove(0)
    else {
        panic!("expected Prefilled");
    };
    assert_eq!(block_ids.len(), p.len().div_ceil(BLOCK_SIZE));
    assert!(prefill.has_unfinished(), "held until released");
    assert!(!prefill.has_work(), "a held request is not stepped");
    assert!(prefill.step().expect("idle step").is_empty());
    let kv = prefill.read_kv_blocks(&block_ids).expect("read");
    assert!(prefill.abort("job"), "released");
    assert_idle(&prefill, "after the prefill worker released its job");
    (token, kv)
}

#[test]
fn prefill_only_then_transfer_decodes_what_an_aggregated_run_does_greedy_and_seeded() {
    let p = prompt(60, 11);
    let seeded = engine::SamplingParams {
        temperature: 0.9,
        top_p: 0.95,
        seed: Some(7),
        ignore_eos: true,
        ..engine::SamplingParams::greedy(8)
    };
    for params in [fixed_length(8), seeded] {
        let reference = run_one(&mut tiny_engine(options()), p.clone(), params.clone()).tokens;
        let (first, kv) = prefill_elsewhere(&p, &params);
        assert_eq!(
            first.token, reference[0],
            "the prefill worker's first token"
        );

        let mut decode = tiny_engine(options());
        let slot = decode
            .add_remote_prefill_request(request("r", p.clone(), params.clone()))
            .expect("accepted");
        decode
            .write_kv_blocks(&slot.block_ids, &kv)
            .expect("written");
        let resumed = decode
            .complete_remote_prefill("r", first)
            .expect("completes");
        assert_eq!(
            tokens_after(&mut decode, "r", &resumed),
            reference,
            "{params:?}"
        );
        assert_idle(&decode, "after the disaggregated request");
    }
}

#[test]
fn a_remote_prefill_given_up_on_prefills_locally_with_the_same_tokens() {
    let p = prompt(61, 10);
    let reference = run_one(&mut tiny_engine(options()), p.clone(), fixed_length(5)).tokens;
    let mut engine = tiny_engine(options());
    assert!(!engine.prefill_locally("nobody"));
    let slot = engine
        .add_remote_prefill_request(request("r", p.clone(), fixed_length(5)))
        .expect("accepted");
    assert_eq!(engine.stats().kv_blocks_used, slot.block_ids.len());
    assert!(!engine.has_work(), "waiting for the remote prefill");
    assert!(engine.prefill_locally("r"));
    assert_eq!(engine.stats().kv_blocks_used, 0, "reservation freed");
    assert!(!engine.prefill_locally("r"), "only once");
    assert!(engine.has_work());
    let out = collect(&engine.run_to_completion().expect("runs"));
    assert_eq!(out["r"].tokens, reference);
    // A completion arriving after the fallback is refused.
    assert!(engine.complete_remote_prefill("r", token(3)).is_err());
    assert_idle(&engine, "after the local fallback");
}

#[test]
fn the_cached_prefix_seen_by_the_disaggregation_rule_has_no_side_effects() {
    let mut engine = tiny_engine(options());
    let p = prompt(62, 13);
    assert_eq!(engine.cached_prefix_len(&p), 0);
    run_one(&mut engine, p.clone(), fixed_length(2));
    let before = engine.stats();
    assert_eq!(engine.cached_prefix_len(&p), 12, "three full blocks of 4");
    assert_eq!(
        engine.stats().prefix_query_tokens,
        before.prefix_query_tokens
    );
}
