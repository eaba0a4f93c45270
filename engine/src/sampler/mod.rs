//! Sampling: turns the logits of one forward pass into the next token of each sequence.
//!
//! It runs once per engine step, right after the executor's forward pass: the executor hands over
//! one `[rows, vocab]` logits row per running sequence (the last position of each prefill chunk
//! that completes a prompt, and every decode), and gets back one token per row for the scheduler
//! to append. Each row carries its own [`SamplingParams`], token history and random stream, so one
//! batch mixes greedy and sampled requests freely.
//!
//! The pipeline follows vLLM's sampler: penalties (repetition over prompt and output, frequency
//! and presence over the output) and suppressed tokens, then either the argmax or temperature,
//! top-k, top-p and min-p and a draw from the row's [`SequenceRng`]. Logprobs come from the raw
//! model logits, before any of that, as vLLM returns them by default. Everything runs batched on
//! the logits' device; the host sends each sampling row one uniform number and receives a single
//! small `[rows, 4 + 2·top-n]` table (plus a list of rows when a top-p nucleus is unusually wide),
//! so a whole vocabulary never crosses to the host.

mod draw;
mod penalties;
#[cfg(test)]
mod tests;

pub use runtime::protocol::{SamplingParams, GREEDY_TEMPERATURE, MAX_LOGPROBS};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tch::{Device, Kind, Tensor};

use crate::error::{EngineError, Result};

/// A sequence's own random stream. Seeded, it makes the sequence's samples reproducible whatever
/// else shares its batches; each sampled (non-greedy) step consumes one number from it.
#[derive(Clone, Debug)]
pub struct SequenceRng(ChaCha8Rng);

impl SequenceRng {
    /// `Some(seed)` gives the same stream every time; `None` seeds from the thread's generator.
    pub fn new(seed: Option<u64>) -> Self {
        Self(match seed {
            Some(seed) => ChaCha8Rng::seed_from_u64(seed),
            None => ChaCha8Rng::from_rng(&mut rand::rng()),
        })
    }

    fn uniform(&mut self) -> f64 {
        self.0.random::<f64>()
    }

    /// Consumes the number a sampled step elsewhere (a prefill worker's first token) drew, so
    /// the rest of the stream matches the one an aggregated run would have used.
    pub fn skip_draw(&mut self) {
        self.uniform();
    }
}

/// What [`sample`] needs to know about one sequence for one step.
pub struct SamplerRow<'a> {
    pub params: &'a SamplingParams,
    /// Advanced by one number when the row samples, untouched when it is greedy.
    pub rng: &'a mut SequenceRng,
    /// Seen by the repetition penalty only.
    pub prompt_tokens: &'a [u32],
    /// Tokens generated so far; every penalty counts them.
    pub output_tokens: &'a [u32],
    /// Tokens that must not be sampled this step (EOS/stop ids while min_tokens is not reached).
    pub suppressed_tokens: &'a [u32],
}

/// The token chosen for one row.
#[derive(Clone, Debug, PartialEq)]
pub struct SampledToken {
    pub token: u32,
    /// `token`'s log-probability under the raw model logits (before penalties and temperature).
    /// Always filled: it costs one reduction, and the engine reports cumulative logprobs.
    pub logprob: f32,
    /// The `n` likeliest tokens under the raw logits, most likely first, when the row asked for
    /// `logprobs: Some(n)`; empty otherwise.
    pub top_logprobs: Vec<(u32, f32)>,
}

/// Chooses one token for each row of `logits` (`[rows.len(), vocab]`, any device, any float
/// kind; the maths runs in f32, probabilities in f64).
///
/// Row `i` of `logits` belongs to `rows[i]`; each row's parameters are validated again, since a
/// bad one would otherwise produce silent garbage rather than an error. A row whose logits hold
/// NaN or +inf, or are all -inf, or whose every token is suppressed, fails the whole call with
/// [`EngineError::InvalidLogits`] naming it: a NaN means the forward pass is broken, and streaming
/// a made-up token would hide that. Sampling rows have consumed their random number by then.
pub fn sample(logits: &Tensor, rows: &mut [SamplerRow<'_>]) -> Result<Vec<SampledToken>> {
    let shape = logits.size();
    if shape.len() != 2 || shape[0] != rows.len() as i64 || shape[1] == 0 {
        return Err(EngineError::ShapeMismatch {
            name: "logits".to_string(),
            expected: vec![rows.len() as i64, shape.last().copied().unwrap_or(0).max(1)],
            actual: shape,
        });
    }
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    for row in rows.iter() {
        row.params.validate()?;
    }
    let vocab = shape[1];
    let device = logits.device();

    // `to_kind` aliases an f32 input, so nothing below may write into `raw`.
    let raw = logits.f_to_kind(Kind::Float)?;
    let log_normalizer = raw.f_logsumexp([-1], true)?;
    let processed = penalties::apply(&raw, rows)?;
    let chosen_from = processed.as_ref().unwrap_or(&raw);

    // Greedy rows keep the argmax; sampling rows overwrite theirs below. Computing it for every
    // row is one cheap reduction and spares a gather/scatter for the common all-greedy batch.
    let mut tokens = chosen_from.f_argmax(-1, true)?;
    let sampling: Vec<usize> = (0..rows.len())
        .filter(|&i| !rows[i].params.is_greedy())
        .collect();
    if !sampling.is_empty() {
        let uniforms: Vec<f64> = sampling.iter().map(|&i| rows[i].rng.uniform()).collect();
        let params: Vec<&SamplingParams> = sampling.iter().map(|&i| rows[i].params).collect();
        let index: Vec<i64> = sampling.iter().map(|&i| i as i64).collect();
        let index = Tensor::f_from_slice(&index)?.f_to_device(device)?;
        let drawn = draw::draw(&chosen_from.f_index_select(0, &index)?, &params, &uniforms)?;
        tokens = tokens.f_index_copy(0, &index, &drawn)?;
    }

    let logprob = raw.f_gather(1, &tokens, false)?.f_sub(&log_normalizer)?;
    // Suppression can leave a row with nothing to sample (all -inf); unprocessed rows are
    // covered by the raw check.
    let processed_max = match &processed {
        Some(processed) => processed.f_amax([-1], true)?,
        None => log_normalizer.shallow_clone(),
    };
    let top_n = rows
        .iter()
        .filter_map(|row| row.params.logprobs)
        .max()
        .unwrap_or(0)
        .min(vocab as usize);
    let mut columns = vec![
        tokens,
        logprob,
        log_normalizer.shallow_clone(),
        processed_max,
    ];
    if top_n > 0 {
        let (values, ids) = raw.f_topk(top_n as i64, -1, true, true)?;
        columns.push(values.f_sub(&log_normalizer)?);
        columns.push(ids);
    }
    let columns = columns
        .iter()
        .map(|column| column.f_to_kind(Kind::Double))
        .collect::<Result<Vec<_>, _>>()?;
    // The one device→host copy of the step; f64 holds token ids exactly.
    let table = Tensor::f_cat(&columns, 1)?
        .f_to_device(Device::Cpu)?
        .f_flatten(0, -1)?;
    let table = Vec::<f64>::try_from(&table)?;

    let width = 4 + 2 * top_n;
    rows.iter()
        .zip(table.chunks_exact(width))
        .enumerate()
        .map(|(row_index, (row, cells))| {
            if !cells[2].is_finite() {
                return Err(EngineError::InvalidLogits {
                    row: row_index,
                    reason: "the model's logits hold NaN or +inf, or are all -inf",
                });
            }
            if !cells[3].is_finite() {
                return Err(EngineError::InvalidLogits {
                    row: row_index,
                    reason: "penalties and suppressed tokens leave no token to sample",
                });
            }
            let wanted = row.params.logprobs.unwrap_or(0).min(top_n);
            let (values, ids) = cells[4..].split_at(top_n);
            Ok(SampledToken {
                token: cells[0] as u32,
                logprob: cells[1] as f32,
                top_logprobs: ids[..wanted]
                    .iter()
                    .zip(&values[..wanted])
                    .map(|(&id, &value)| (id as u32, value as f32))
                    .collect(),
            })
        })
        .collect()
}

/// One value per row as a `[rows, 1]` column on `device`, to broadcast a per-row setting.
fn column<T: tch::kind::Element>(values: &[T], device: Device) -> Result<Tensor> {
    Ok(Tensor::f_from_slice(values)?
        .f_to_device(device)?
        .f_view([values.len() as i64, 1])?)
}
