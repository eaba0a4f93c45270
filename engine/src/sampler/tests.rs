//! Sampler tests, by concern: greedy, random draws and their filters, penalties and suppression,
//! logprobs, bad input. Logits are built on the host from fixed seeds, so nothing can flake.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tch::{Device, Kind, Tensor};

use super::*;

/// Owns what a [`SamplerRow`] borrows, across steps.
struct Case {
    params: SamplingParams,
    rng: SequenceRng,
    prompt: Vec<u32>,
    output: Vec<u32>,
    suppressed: Vec<u32>,
}

impl Case {
    fn new(params: SamplingParams) -> Self {
        Self {
            rng: SequenceRng::new(params.seed),
            params,
            prompt: Vec::new(),
            output: Vec::new(),
            suppressed: Vec::new(),
        }
    }

    fn greedy() -> Self {
        Self::new(SamplingParams::default())
    }

    fn sampled(temperature: f32, seed: u64) -> Self {
        Self::new(SamplingParams {
            temperature,
            seed: Some(seed),
            ..SamplingParams::default()
        })
    }
}

fn run(logits: &Tensor, cases: &mut [Case]) -> Result<Vec<SampledToken>> {
    let mut rows: Vec<SamplerRow<'_>> = cases
        .iter_mut()
        .map(|case| SamplerRow {
            params: &case.params,
            rng: &mut case.rng,
            prompt_tokens: &case.prompt,
            output_tokens: &case.output,
            suppressed_tokens: &case.suppressed,
        })
        .collect();
    sample(logits, &mut rows)
}

fn tokens(logits: &Tensor, cases: &mut [Case]) -> Vec<u32> {
    run(logits, cases)
        .unwrap()
        .into_iter()
        .map(|sampled| sampled.token)
        .collect()
}

fn logits(rows: &[Vec<f32>]) -> Tensor {
    let vocab = rows[0].len() as i64;
    Tensor::from_slice(&rows.concat()).view([rows.len() as i64, vocab])
}

fn repeated(row: &[f32], n_rows: usize) -> Tensor {
    logits(&vec![row.to_vec(); n_rows])
}

fn random_rows(n_rows: usize, vocab: usize, seed: u64) -> Vec<Vec<f32>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n_rows)
        .map(|_| (0..vocab).map(|_| rng.random_range(-6.0..6.0)).collect())
        .collect()
}

fn argmax(row: &[f32]) -> u32 {
    (0..row.len()).fold(0, |best, i| if row[i] > row[best] { i } else { best }) as u32
}

fn log_softmax(row: &[f32]) -> Vec<f64> {
    let max = row
        .iter()
        .fold(f64::NEG_INFINITY, |m, &x| m.max(f64::from(x)));
    let sum: f64 = row.iter().map(|&x| (f64::from(x) - max).exp()).sum();
    row.iter().map(|&x| f64::from(x) - max - sum.ln()).collect()
}

/// Share of each token among `draws`.
fn frequencies(draws: &[u32], vocab: usize) -> Vec<f64> {
    let mut counts = vec![0usize; vocab];
    for &token in draws {
        counts[token as usize] += 1;
    }
    counts
        .iter()
        .map(|&count| count as f64 / draws.len() as f64)
        .collect()
}

/// `steps` steps of `n_rows` rows sampling `row` with `params`, each row seeded by its index.
fn many_draws(row: &[f32], params: &SamplingParams, n_rows: usize, steps: usize) -> Vec<u32> {
    let batch = repeated(row, n_rows);
    let mut cases: Vec<Case> = (0..n_rows as u64)
        .map(|seed| {
            Case::new(SamplingParams {
                seed: Some(seed),
                ..params.clone()
            })
        })
        .collect();
    (0..steps)
        .flat_map(|_| tokens(&batch, &mut cases))
        .collect()
}

// --- greedy -------------------------------------------------------------------------------------

#[test]
fn greedy_picks_the_argmax() {
    let rows = vec![
        vec![0.1, 2.0, -1.0, 0.5],
        vec![3.0, 2.9, -1.0, 0.5],
        vec![-5.0, -4.0, -3.0, -2.5],
    ];
    let mut cases: Vec<Case> = (0..3).map(|_| Case::greedy()).collect();
    assert_eq!(tokens(&logits(&rows), &mut cases), vec![1, 0, 3]);
}

#[test]
fn batched_greedy_fast_path_matches_each_row_alone() {
    let rows = random_rows(8, 1000, 1);
    let batch = logits(&rows);
    let mut cases: Vec<Case> = (0..8).map(|_| Case::greedy()).collect();
    let batched = run(&batch, &mut cases).unwrap();
    for (i, row) in rows.iter().enumerate() {
        let alone = run(&batch.narrow(0, i as i64, 1), &mut [Case::greedy()]).unwrap();
        assert_eq!(alone[0], batched[i]);
        assert_eq!(batched[i].token, argmax(row));
        let expected = log_softmax(row)[argmax(row) as usize];
        assert!((f64::from(batched[i].logprob) - expected).abs() < 1e-4);
        assert!(batched[i].top_logprobs.is_empty());
    }
}

#[test]
fn greedy_rows_do_not_advance_their_stream() {
    let row = vec![0.0f32; 32];
    let mut greedy_then_sampled = Case::sampled(1.0, 9);
    greedy_then_sampled.params.temperature = 0.0;
    tokens(
        &logits(std::slice::from_ref(&row)),
        std::slice::from_mut(&mut greedy_then_sampled),
    );
    greedy_then_sampled.params.temperature = 1.0;
    let mut fresh = Case::sampled(1.0, 9);
    for _ in 0..10 {
        assert_eq!(
            tokens(
                &logits(std::slice::from_ref(&row)),
                std::slice::from_mut(&mut greedy_then_sampled)
            ),
            tokens(
                &logits(std::slice::from_ref(&row)),
                std::slice::from_mut(&mut fresh)
            ),
        );
    }
}

#[test]
fn bf16_logits_are_accepted() {
    let rows = vec![vec![0.25, 4.0, -1.0, 2.0], vec![8.0, -8.0, 0.0, 1.0]];
    let batch = logits(&rows).to_kind(Kind::BFloat16);
    let mut cases = vec![Case::greedy(), Case::sampled(1.0, 3)];
    cases[1].params.top_k = 1;
    assert_eq!(tokens(&batch, &mut cases), vec![1, 0]);
}

// --- random draws -------------------------------------------------------------------------------

#[test]
fn top_k_one_at_temperature_one_is_greedy() {
    let rows = random_rows(6, 500, 2);
    let batch = logits(&rows);
    let mut cases: Vec<Case> = (0..6)
        .map(|seed| {
            Case::new(SamplingParams {
                temperature: 1.0,
                top_k: 1,
                seed: Some(seed),
                ..SamplingParams::default()
            })
        })
        .collect();
    let expected: Vec<u32> = rows.iter().map(|row| argmax(row)).collect();
    for _ in 0..5 {
        assert_eq!(tokens(&batch, &mut cases), expected);
    }
}

/// 50 draws for `case` sampling `row` at `position` of a batch with unrelated neighbours, which
/// cover both the sorted and the unsorted draw and the penalty path.
fn draws_at(position: usize, row: &[f32], case: Case) -> Vec<u32> {
    let mut rows = random_rows(4, row.len(), 3);
    rows.insert(position, row.to_vec());
    let batch = logits(&rows);
    let mut repeating = Case::new(SamplingParams {
        temperature: 1.0,
        min_p: 0.1,
        top_k: 5,
        repetition_penalty: 1.2,
        seed: Some(4),
        ..SamplingParams::default()
    });
    repeating.prompt = vec![0, 1, 2];
    let mut cases = vec![
        Case::greedy(),
        Case::new(SamplingParams {
            temperature: 0.7,
            top_p: 0.9,
            seed: Some(1),
            ..SamplingParams::default()
        }),
        Case::sampled(1.3, 2),
        repeating,
    ];
    cases.insert(position, case);
    (0..50)
        .map(|_| tokens(&batch, &mut cases)[position])
        .collect()
}

fn matches(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).filter(|(x, y)| x == y).count()
}

#[test]
fn seeded_draws_do_not_depend_on_batch_position() {
    let flat = vec![0.0f32; 64];
    let first = draws_at(0, &flat, Case::sampled(1.0, 42));
    assert_eq!(draws_at(2, &flat, Case::sampled(1.0, 42)), first);
    assert_eq!(draws_at(4, &flat, Case::sampled(1.0, 42)), first);
    let alone: Vec<u32> = {
        let mut case = Case::sampled(1.0, 42);
        (0..50)
            .map(|_| {
                tokens(
                    &logits(std::slice::from_ref(&flat)),
                    std::slice::from_mut(&mut case),
                )[0]
            })
            .collect()
    };
    assert_eq!(alone, first);
    // Two streams agree on a flat 64-token draw 1 time in 64; 50 draws give ~0.8 matches.
    let other_seed = draws_at(0, &flat, Case::sampled(1.0, 43));
    assert!(
        matches(&first, &other_seed) < 10,
        "{first:?} vs {other_seed:?}"
    );
    assert!(frequencies(&first, 64).iter().all(|&share| share < 0.2));
}

#[test]
fn seeded_filtered_draws_do_not_depend_on_batch_position() {
    let row = random_rows(1, 300, 5).remove(0);
    let filtered = || {
        Case::new(SamplingParams {
            temperature: 2.0,
            top_p: 0.95,
            top_k: 100,
            min_p: 0.01,
            seed: Some(7),
            ..SamplingParams::default()
        })
    };
    let first = draws_at(0, &row, filtered());
    assert_eq!(draws_at(3, &row, filtered()), first);
    assert!(first.iter().any(|&token| token != first[0]), "{first:?}");
}

#[test]
fn unseeded_streams_differ() {
    let flat = vec![0.0f32; 64];
    let a = draws_at(
        1,
        &flat,
        Case::new(SamplingParams {
            temperature: 1.0,
            ..SamplingParams::default()
        }),
    );
    let b = draws_at(
        1,
        &flat,
        Case::new(SamplingParams {
            temperature: 1.0,
            ..SamplingParams::default()
        }),
    );
    assert!(matches(&a, &b) < 10, "{a:?} vs {b:?}");
}

#[test]
fn frequencies_follow_the_softmax() {
    let row = [1.0f32, 2.0, 0.5, -1.0];
    for temperature in [1.0f32, 0.5] {
        let scaled: Vec<f32> = row.iter().map(|&x| x / temperature).collect();
        let expected: Vec<f64> = log_softmax(&scaled).iter().map(|lp| lp.exp()).collect();
        let params = SamplingParams {
            temperature,
            ..SamplingParams::default()
        };
        let shares = frequencies(&many_draws(&row, &params, 1000, 20), 4);
        for (share, expected) in shares.iter().zip(&expected) {
            assert!(
                (share - expected).abs() < 0.02,
                "temperature {temperature}: {shares:?} vs {expected:?}"
            );
        }
    }
}

#[test]
fn filters_exclude_the_tail() {
    // Probabilities 0.5, 0.3, 0.15, 0.05.
    let row: Vec<f32> = [0.5f32, 0.3, 0.15, 0.05].iter().map(|p| p.ln()).collect();
    let sampled = |change: fn(&mut SamplingParams)| {
        let mut params = SamplingParams {
            temperature: 1.0,
            ..SamplingParams::default()
        };
        change(&mut params);
        frequencies(&many_draws(&row, &params, 200, 10), 4)
    };
    // 0.5 + 0.3 reaches 0.7; the renormalised shares are 0.625 and 0.375.
    let top_p = sampled(|p| p.top_p = 0.7);
    assert_eq!(&top_p[2..], &[0.0, 0.0], "{top_p:?}");
    assert!((top_p[0] - 0.625).abs() < 0.05, "{top_p:?}");
    // Everything at or above 0.2 · 0.5 = 0.1 stays.
    let min_p = sampled(|p| p.min_p = 0.2);
    assert_eq!(min_p[3], 0.0, "{min_p:?}");
    assert!(min_p[2] > 0.08, "{min_p:?}");
    let top_k = sampled(|p| p.top_k = 2);
    assert_eq!(&top_k[2..], &[0.0, 0.0], "{top_k:?}");
    assert!(top_k[1] > 0.3, "{top_k:?}");
    // top_p just above a boundary keeps the next token.
    let wide = sampled(|p| p.top_p = 0.81);
    assert!(wide[2] > 0.1 && wide[3] == 0.0, "{wide:?}");
}

#[test]
fn top_p_applies_to_what_top_k_left() {
    // Renormalised over the top 3, the shares are 0.526, 0.316, 0.158: 0.83 is reached at the
    // second token. Without renormalising it would take the third.
    let row: Vec<f32> = [0.5f32, 0.3, 0.15, 0.05].iter().map(|p| p.ln()).collect();
    let params = SamplingParams {
        temperature: 1.0,
        top_k: 3,
        top_p: 0.83,
        ..SamplingParams::default()
    };
    let shares = frequencies(&many_draws(&row, &params, 200, 10), 4);
    assert_eq!(&shares[2..], &[0.0, 0.0], "{shares:?}");
    // A k beyond the vocabulary is no filter.
    let params = SamplingParams {
        temperature: 1.0,
        top_k: 100,
        ..SamplingParams::default()
    };
    let shares = frequencies(&many_draws(&row, &params, 200, 10), 4);
    assert!(shares[3] > 0.02, "{shares:?}");
}

#[test]
fn top_k_keeps_tokens_tied_with_the_kth() {
    let row = [1.0f32, 0.0, 1.0, 1.0, -1.0];
    let params = SamplingParams {
        temperature: 1.0,
        top_k: 2,
        ..SamplingParams::default()
    };
    let shares = frequencies(&many_draws(&row, &params, 100, 10), 5);
    assert!(
        shares[0] > 0.2 && shares[2] > 0.2 && shares[3] > 0.2,
        "{shares:?}"
    );
    assert_eq!((shares[1], shares[4]), (0.0, 0.0), "{shares:?}");
}

#[test]
fn wide_nucleus_beyond_the_candidates_is_exact() {
    // 4096 tokens with slowly falling logits, scattered over the vocabulary: the 0.5 nucleus
    // holds ~1600 tokens, more than `CANDIDATES`, so its row is redone with every logit.
    let vocab = 4096usize;
    let rank = |token: usize| (token * 7919) % vocab;
    let wide: Vec<f32> = (0..vocab).map(|t| -(rank(t) as f32) * 0.0002).collect();
    let probs: Vec<f64> = log_softmax(&wide).iter().map(|lp| lp.exp()).collect();
    let mut by_rank: Vec<usize> = (0..vocab).collect();
    by_rank.sort_by_key(|&t| rank(t));
    let mut mass = 0.0;
    let nucleus = by_rank
        .iter()
        .position(|&t| {
            mass += probs[t];
            mass >= 0.5
        })
        .unwrap()
        + 1;
    assert!(nucleus > 1024);

    let narrow = random_rows(1, vocab, 8).remove(0);
    let batch = logits(&[narrow, wide]);
    let top_p = |seed| {
        Case::new(SamplingParams {
            temperature: 1.0,
            top_p: 0.5,
            seed: Some(seed),
            ..SamplingParams::default()
        })
    };
    let mut cases: Vec<Case> = vec![top_p(0), top_p(1)];
    let draws: Vec<usize> = (0..500)
        .map(|_| rank(tokens(&batch, &mut cases)[1] as usize))
        .collect();
    assert!(
        draws.iter().all(|&r| r < nucleus),
        "a token outside the nucleus"
    );
    assert!(
        draws.iter().any(|&r| r >= 1024),
        "never beyond the candidates"
    );
    assert!(draws.iter().any(|&r| r >= nucleus * 9 / 10));
}

// --- penalties and suppression ------------------------------------------------------------------

fn greedy_token(row: &[f32], change: impl FnOnce(&mut Case)) -> u32 {
    let mut case = Case::greedy();
    change(&mut case);
    tokens(&logits(&[row.to_vec()]), std::slice::from_mut(&mut case))[0]
}

#[test]
fn repetition_penalty_divides_positive_and_multiplies_negative_logits() {
    let positive = [2.0f32, 1.8, 0.0];
    assert_eq!(greedy_token(&positive, |_| {}), 0);
    // 2.0 / 1.2 = 1.67 < 1.8, whether token 0 was in the prompt or the output.
    assert_eq!(
        greedy_token(&positive, |c| {
            c.params.repetition_penalty = 1.2;
            c.prompt = vec![0];
        }),
        1
    );
    assert_eq!(
        greedy_token(&positive, |c| {
            c.params.repetition_penalty = 1.2;
            c.output = vec![0];
        }),
        1
    );
    // -1.0 · 1.2 = -1.2 < -1.1.
    let negative = [-1.0f32, -1.1, -5.0];
    assert_eq!(
        greedy_token(&negative, |c| {
            c.params.repetition_penalty = 1.2;
            c.output = vec![0];
        }),
        1
    );
}

#[test]
fn frequency_penalty_grows_with_the_count() {
    let row = [2.0f32, 1.5, 0.0];
    let with_output = |output: Vec<u32>| {
        greedy_token(&row, move |c| {
            c.params.frequency_penalty = 0.2;
            c.output = output;
        })
    };
    assert_eq!(with_output(vec![0]), 0); // 1.8
    assert_eq!(with_output(vec![0, 0, 0]), 1); // 1.4
                                               // Prompt tokens do not count.
    assert_eq!(
        greedy_token(&row, |c| {
            c.params.frequency_penalty = 2.0;
            c.prompt = vec![0, 0, 0];
        }),
        0
    );
}

#[test]
fn presence_penalty_counts_once() {
    let row = [2.0f32, 1.5, 0.0];
    let with_penalty = |penalty: f32| {
        greedy_token(&row, move |c| {
            c.params.presence_penalty = penalty;
            c.output = vec![0, 0, 0, 2];
        })
    };
    assert_eq!(with_penalty(0.4), 0); // 1.6, however often token 0 appeared
    assert_eq!(with_penalty(0.6), 1); // 1.4
}

#[test]
fn penalties_stay_in_their_row_and_leave_the_logits_alone() {
    let batch = repeated(&[2.0, 1.5, 0.0], 2);
    let before = batch.copy();
    let mut cases = vec![Case::greedy(), Case::greedy()];
    cases[0].params.repetition_penalty = 2.0;
    cases[0].params.frequency_penalty = 1.0;
    cases[0].output = vec![0];
    cases[1].suppressed = vec![1];
    assert_eq!(tokens(&batch, &mut cases), vec![1, 0]);
    assert!(batch.equal(&before));
}

#[test]
fn suppressed_tokens_are_never_chosen() {
    let row = [1.0f32, 3.0, 2.0, 0.0];
    assert_eq!(greedy_token(&row, |c| c.suppressed = vec![1]), 2);

    let flat = vec![0.0f32; 16];
    let batch = repeated(&flat, 100);
    let mut cases: Vec<Case> = (0..100)
        .map(|seed| {
            let mut case = Case::sampled(1.0, seed);
            case.suppressed = (0..8).collect();
            case
        })
        .collect();
    let draws: Vec<u32> = (0..10).flat_map(|_| tokens(&batch, &mut cases)).collect();
    assert!(draws.iter().all(|&token| token >= 8));
    assert!(frequencies(&draws, 16)[8..]
        .iter()
        .all(|&share| share > 0.05));
}

// --- logprobs -----------------------------------------------------------------------------------

#[test]
fn logprobs_come_from_the_raw_logits_sorted() {
    let rows = random_rows(3, 50, 6);
    let mut penalized = Case::new(SamplingParams {
        temperature: 0.8,
        seed: Some(11),
        repetition_penalty: 1.5,
        logprobs: Some(5),
        ..SamplingParams::default()
    });
    penalized.prompt = vec![argmax(&rows[0]), 3, 4];
    let mut cases = vec![
        penalized,
        Case::greedy(),
        Case::new(SamplingParams {
            logprobs: Some(0),
            ..SamplingParams::default()
        }),
    ];
    let sampled = run(&logits(&rows), &mut cases).unwrap();
    for (row, sampled) in rows.iter().zip(&sampled) {
        let expected = log_softmax(row);
        assert!((f64::from(sampled.logprob) - expected[sampled.token as usize]).abs() < 1e-4);
        for &(token, logprob) in &sampled.top_logprobs {
            assert!((f64::from(logprob) - expected[token as usize]).abs() < 1e-4);
        }
    }
    let top = &sampled[0].top_logprobs;
    assert_eq!(top.len(), 5);
    assert!(top.windows(2).all(|pair| pair[0].1 >= pair[1].1), "{top:?}");
    let mut by_logprob: Vec<u32> = (0..50).collect();
    by_logprob.sort_by(|&a, &b| rows[0][b as usize].total_cmp(&rows[0][a as usize]));
    let top_ids: Vec<u32> = top.iter().map(|&(token, _)| token).collect();
    assert_eq!(top_ids, by_logprob[..5]);
    assert!(sampled[1].top_logprobs.is_empty());
    assert!(sampled[2].top_logprobs.is_empty());
}

// --- bad input ----------------------------------------------------------------------------------

fn invalid_row(rows: Vec<Vec<f32>>, mut cases: Vec<Case>) -> usize {
    match run(&logits(&rows), &mut cases) {
        Err(EngineError::InvalidLogits { row, .. }) => row,
        other => panic!("expected InvalidLogits, got {other:?}"),
    }
}

#[test]
fn unusable_logits_name_their_row() {
    let good = vec![0.0f32, 1.0, 2.0];
    let pair = || vec![Case::greedy(), Case::sampled(1.0, 1)];
    assert_eq!(
        invalid_row(vec![good.clone(), vec![0.0, f32::NAN, 1.0]], pair()),
        1
    );
    assert_eq!(
        invalid_row(vec![vec![f32::NAN; 3], good.clone()], pair()),
        0
    );
    assert_eq!(
        invalid_row(vec![good.clone(), vec![0.0, f32::INFINITY, 1.0]], pair()),
        1
    );
    assert_eq!(
        invalid_row(vec![vec![f32::NEG_INFINITY; 3], good.clone()], pair()),
        0
    );
    let mut all_suppressed = pair();
    all_suppressed[1].suppressed = vec![0, 1, 2];
    assert_eq!(
        invalid_row(vec![good.clone(), good.clone()], all_suppressed),
        1
    );
    // -inf entries alone are fine: they are masked tokens.
    let masked = vec![f32::NEG_INFINITY, 1.0, f32::NEG_INFINITY];
    assert_eq!(
        tokens(&logits(&[masked.clone(), masked]), &mut pair()),
        vec![1, 1]
    );
}

#[test]
fn bad_shapes_tokens_and_params_are_errors() {
    let batch = repeated(&[0.0, 1.0], 2);
    assert!(matches!(
        run(&batch, &mut [Case::greedy()]),
        Err(EngineError::ShapeMismatch { .. })
    ));
    assert!(matches!(
        run(&batch.view([4]), &mut [Case::greedy()]),
        Err(EngineError::ShapeMismatch { .. })
    ));
    assert!(
        run(&Tensor::zeros([0, 2], (Kind::Float, Device::Cpu)), &mut [])
            .unwrap()
            .is_empty()
    );

    let mut out_of_vocab = vec![Case::greedy(), Case::greedy()];
    out_of_vocab[1].params.repetition_penalty = 1.1;
    out_of_vocab[1].prompt = vec![2];
    assert!(matches!(
        run(&batch, &mut out_of_vocab),
        Err(EngineError::TokenOutOfVocab {
            token: 2,
            vocab_size: 2
        })
    ));

    let mut bad_param = vec![Case::greedy(), Case::sampled(1.0, 0)];
    bad_param[1].params.top_p = 0.0;
    assert!(matches!(
        run(&batch, &mut bad_param),
        Err(EngineError::InvalidParameter { param: "top_p", .. })
    ));
}
