//! The random choice for rows that sample: temperature, then vLLM's top-k, top-p and min-p
//! filters, then an inverse-CDF draw.
//!
//! Each filter becomes one logit threshold per row, and a token survives when its (scaled) logit
//! reaches every threshold: top-k's is the k-th largest logit (vLLM's `apply_top_k_only`), min-p's
//! is `max + ln(min_p)`, top-p's is the logit where the running mass of the likeliest tokens first
//! reaches `top_p` of the mass top-k left. Tokens tied with a threshold stay, so a filter may keep
//! a few more than k tokens when logits tie exactly (common in bf16).
//!
//! Thresholds need only the few likeliest logits ([`CANDIDATES`] of them, from `topk`), never a
//! sort of the whole vocabulary; a row whose nucleus is wider than that is redone with every
//! logit. The draw then walks the kept tokens in vocabulary order: the host sends one uniform
//! number per row, drawn from that row's own stream, and the device returns the first token whose
//! cumulative weight exceeds it. Since thresholds are values and the walk order is fixed, a row's
//! token depends only on its logits, parameters and number, never on the rest of the batch.

use tch::{Device, Kind, Tensor};

use super::column;
use super::SamplingParams;
use crate::error::Result;

/// How many of the likeliest logits the top-k and top-p thresholds are looked for in first. Big
/// enough for typical nuclei at temperatures up to ~1; a wider one costs a full sort of its row.
const CANDIDATES: i64 = 1024;

/// Draws one token per row of `logits` (`[rows, vocab]`, f32, penalties already applied), row `i`
/// using `uniforms[i]` in [0, 1). Returns `[rows, 1]` int64 token ids on the logits' device.
pub(super) fn draw(
    logits: &Tensor,
    params: &[&SamplingParams],
    uniforms: &[f64],
) -> Result<Tensor> {
    let (n_rows, vocab) = logits.size2()?;
    let device = logits.device();

    let temperature: Vec<f32> = params.iter().map(|p| p.temperature).collect();
    let scaled = logits.f_div(&column(&temperature, device)?)?;

    let uses_top_k = params.iter().any(|p| p.top_k > 0);
    let uses_top_p = params.iter().any(|p| p.top_p < 1.0);
    let vocab_size = vocab as usize;
    let largest_k = params
        .iter()
        .map(|p| p.top_k.min(vocab_size) as i64)
        .max()
        .unwrap_or(0);
    let candidates = if uses_top_k || uses_top_p {
        Some(Candidates::new(
            &scaled,
            CANDIDATES.max(largest_k).min(vocab),
        )?)
    } else {
        None
    };
    let max = match &candidates {
        Some(candidates) => candidates.values.f_narrow(1, 0, 1)?,
        None => scaled.f_amax([-1], true)?,
    };
    // Unnormalised probabilities: the draw scales its number by their sum, so dividing by it
    // would be a wasted pass.
    let weights = scaled.f_sub(&max)?.f_exp()?;

    // ln(0) = -inf: min-p off keeps everything.
    let log_min_p: Vec<f32> = params.iter().map(|p| p.min_p.ln()).collect();
    let mut threshold = max.f_add(&column(&log_min_p, device)?)?;

    if let Some(candidates) = &candidates {
        let top_k_threshold = if uses_top_k {
            let k: Vec<i64> = params
                .iter()
                .map(|p| p.top_k.clamp(1, vocab_size) as i64 - 1)
                .collect();
            let kth = candidates.values.f_gather(1, &column(&k, device)?, false)?;
            let on: Vec<bool> = params.iter().map(|p| p.top_k > 0).collect();
            let threshold = kth.f_where_self(&column(&on, device)?, &negative_infinity(device)?)?;
            Some(threshold)
        } else {
            None
        };
        if uses_top_p {
            // vLLM takes the nucleus of the distribution top-k already renormalised.
            let kept_mass = match &top_k_threshold {
                Some(top_k) => weights.f_masked_fill(&scaled.f_lt_tensor(top_k)?, 0.0)?,
                None => weights.shallow_clone(),
            }
            .f_sum_dim_intlist([-1i64].as_slice(), true, Kind::Double)?;
            let top_p: Vec<f64> = params.iter().map(|p| f64::from(p.top_p)).collect();
            let wanted = kept_mass.f_mul(&column(&top_p, device)?)?;
            let nucleus = candidates.nucleus_threshold(&scaled, &max, &wanted)?;
            let on: Vec<bool> = params.iter().map(|p| p.top_p < 1.0).collect();
            let nucleus =
                nucleus.f_where_self(&column(&on, device)?, &negative_infinity(device)?)?;
            threshold = threshold.f_maximum(&nucleus)?;
        }
        if let Some(top_k) = top_k_threshold {
            threshold = threshold.f_maximum(&top_k)?;
        }
    }
    let weights = weights.f_masked_fill(&scaled.f_lt_tensor(&threshold)?, 0.0)?;

    // f64: a running sum over 128k f32 weights would drift enough to bias the draw.
    let cumulative = weights.f_cumsum(-1, Kind::Double)?;
    let total = cumulative.f_narrow(1, vocab - 1, 1)?;
    // `u * total` may round up to `total`, which no position exceeds; stay just below it.
    let target = column(uniforms, device)?
        .f_mul(&total)?
        .f_minimum(&total.f_nextafter(&total.f_zeros_like()?)?)?;
    // The count of positions at or below the target is the first position above it, which
    // has positive weight, since the sum does not grow at a filtered token. The clamp only
    // matters for a NaN row, which the caller reports.
    let position = cumulative
        .f_le_tensor(&target)?
        .f_sum_dim_intlist([-1i64].as_slice(), true, Kind::Int64)?
        .f_clamp_max(vocab - 1)?;
    debug_assert_eq!(position.size(), [n_rows, 1]);
    Ok(position)
}

/// The likeliest scaled logits of each row, in descending order.
struct Candidates {
    values: Tensor,
    /// Every logit of the row is among them.
    complete: bool,
}

impl Candidates {
    fn new(scaled: &Tensor, count: i64) -> Result<Self> {
        let vocab = scaled.size2()?.1;
        let (values, _) = scaled.f_topk(count, -1, true, true)?;
        Ok(Self {
            values,
            complete: count == vocab,
        })
    }

    /// Per row, the logit of the token at which the descending running weight first reaches
    /// `wanted`: the nucleus is every token at or above it. A row whose candidates do not reach
    /// `wanted` is redone with all of its logits; this asks the host which rows those are.
    fn nucleus_threshold(&self, scaled: &Tensor, max: &Tensor, wanted: &Tensor) -> Result<Tensor> {
        let (threshold, reached) = nucleus_within(&self.values, max, wanted)?;
        if self.complete {
            return Ok(threshold);
        }
        let short: Vec<i64> = Vec::<bool>::try_from(&reached.f_logical_not()?.f_flatten(0, -1)?)?
            .iter()
            .enumerate()
            .filter(|(_, &short)| short)
            .map(|(row, _)| row as i64)
            .collect();
        if short.is_empty() {
            return Ok(threshold);
        }
        let rows = Tensor::f_from_slice(&short)?.f_to_device(scaled.device())?;
        let vocab = scaled.size2()?.1;
        let all = Candidates::new(&scaled.f_index_select(0, &rows)?, vocab)?;
        let (redone, _) = nucleus_within(
            &all.values,
            &max.f_index_select(0, &rows)?,
            &wanted.f_index_select(0, &rows)?,
        )?;
        Ok(threshold.f_index_copy(0, &rows, &redone)?)
    }
}

/// The nucleus threshold among `values` (descending), and whether the running weight reached
/// `wanted` within them at all.
fn nucleus_within(values: &Tensor, max: &Tensor, wanted: &Tensor) -> Result<(Tensor, Tensor)> {
    let count = values.size2()?.1;
    let running = values.f_sub(max)?.f_exp()?.f_cumsum(-1, Kind::Double)?;
    // Positions before the running weight reaches `wanted`; the next one is the last kept.
    let before =
        running
            .f_lt_tensor(wanted)?
            .f_sum_dim_intlist([-1i64].as_slice(), true, Kind::Int64)?;
    let reached = before.f_lt(count)?;
    let last = before.f_clamp_max(count - 1)?;
    Ok((values.f_gather(1, &last, false)?, reached))
}

fn negative_infinity(device: Device) -> Result<Tensor> {
    Ok(Tensor::f_scalar_tensor(
        f64::NEG_INFINITY,
        (Kind::Float, device),
    )?)
}
