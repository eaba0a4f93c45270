//! Admission on the tiny Llama: every refused request names its reason and the request field
//! at fault, and leaves nothing allocated.

mod common;

use common::engine_fixture::*;
use common::tiny_llama::VOCAB_SIZE;
use engine::{AdmissionError, EngineOptions, Request, SamplingParams};

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
            // The sum with the prompt wrapped to 29 before, which fit.
            "max_tokens of usize::MAX",
            request("wrap", prompt(1, 30), SamplingParams::greedy(usize::MAX)),
            &["30 tokens", "`max_tokens` 18446744073709551615"],
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
                "empty prompt" => matches!(err, AdmissionError::EmptyPrompt),
                "token outside the vocabulary" => matches!(
                    err,
                    AdmissionError::TokenOutOfVocab {
                        token: 320,
                        vocab_size: 320
                    }
                ),
                "prompt + max_tokens over max_model_len" => matches!(
                    err,
                    AdmissionError::ContextExceeded {
                        prompt_tokens: 30,
                        max_tokens: 11,
                        context: 40
                    }
                ),
                "max_tokens of usize::MAX" => matches!(
                    err,
                    AdmissionError::ContextExceeded {
                        prompt_tokens: 30,
                        max_tokens: usize::MAX,
                        context: 40
                    }
                ),
                "negative temperature" => matches!(
                    err,
                    AdmissionError::InvalidParameter {
                        param: "temperature",
                        ..
                    }
                ),
                "more blocks than the whole cache" => matches!(
                    err,
                    AdmissionError::SequenceTooLong {
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
            let param = match what {
                "empty prompt" | "token outside the vocabulary" => "prompt",
                "negative temperature" => "temperature",
                _ => "max_tokens",
            };
            assert_eq!(err.param(), Some(param), "{what}: the field at fault");
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
            matches!(&err, AdmissionError::DuplicateRequest(id) if id == "dup"),
            "{err:?}"
        );
        assert!(err.to_string().contains("`dup` already exists"), "{err}");
        assert_eq!(err.param(), None, "no request field is to blame");
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
