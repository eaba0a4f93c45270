//! Logits processors that run before the choice: vLLM's repetition, frequency and presence
//! penalties, then the tokens the scheduler forbids this step (EOS before `min_tokens`).
//!
//! Every processor works on the whole `[rows, vocab]` batch at once: the host only lists
//! `(row, token)` coordinates, so the cost on the device is a few kernels whatever the batch size.

use tch::{Device, Kind, Tensor};

use super::{column, SamplerRow};
use crate::error::{EngineError, Result};

/// Applies the penalties and suppressions of `rows` to `logits` (`[rows, vocab]`, f32).
/// Returns `None` when no row asks for any, so the caller can keep the raw logits.
pub(super) fn apply(logits: &Tensor, rows: &[SamplerRow<'_>]) -> Result<Option<Tensor>> {
    let (n_rows, vocab) = logits.size2()?;
    let device = logits.device();
    let mut processed: Option<Tensor> = None;

    if rows.iter().any(|row| row.params.repetition_penalty != 1.0) {
        let mut seen = Coords::default();
        let mut penalty = vec![1f32; rows.len()];
        for (i, row) in rows.iter().enumerate() {
            if row.params.repetition_penalty != 1.0 {
                penalty[i] = row.params.repetition_penalty;
                seen.extend(i, row.prompt_tokens.iter().chain(row.output_tokens), vocab)?;
            }
        }
        let current = processed.as_ref().unwrap_or(logits);
        let mut mask = Tensor::f_zeros([n_rows, vocab], (Kind::Bool, device))?;
        let _ = mask.f_index_put_(
            &seen.indices(device)?,
            &Tensor::f_scalar_tensor(1i64, (Kind::Bool, device))?,
            false,
        )?;
        let penalty = column(&penalty, device)?;
        // vLLM's rule: dividing a negative logit would make the token likelier, so those are
        // multiplied instead.
        let penalized = current
            .f_div(&penalty)?
            .f_where_self(&current.f_gt(0.0)?, &current.f_mul(&penalty)?)?;
        processed = Some(penalized.f_where_self(&mask, current)?);
    }

    if rows.iter().any(|row| row.params.has_output_penalties()) {
        let mut output = Coords::default();
        let mut frequency = vec![0f32; rows.len()];
        let mut presence = vec![0f32; rows.len()];
        for (i, row) in rows.iter().enumerate() {
            if row.params.has_output_penalties() {
                frequency[i] = row.params.frequency_penalty;
                presence[i] = row.params.presence_penalty;
                output.extend(i, row.output_tokens, vocab)?;
            }
        }
        let current = processed.as_ref().unwrap_or(logits);
        let mut counts = Tensor::f_zeros([n_rows, vocab], (Kind::Float, device))?;
        let _ = counts.f_index_put_(
            &output.indices(device)?,
            &Tensor::f_scalar_tensor(1.0, (Kind::Float, device))?,
            true,
        )?;
        let present = counts.f_gt(0.0)?.f_to_kind(Kind::Float)?;
        let frequency = column(&frequency, device)?;
        let presence = column(&presence, device)?;
        processed = Some(
            current
                .f_sub(&counts.f_mul(&frequency)?)?
                .f_sub(&present.f_mul(&presence)?)?,
        );
    }

    if rows.iter().any(|row| !row.suppressed_tokens.is_empty()) {
        let mut suppressed = Coords::default();
        for (i, row) in rows.iter().enumerate() {
            suppressed.extend(i, row.suppressed_tokens, vocab)?;
        }
        let current = processed.as_ref().unwrap_or(logits);
        let masked = current.f_index_put(
            &suppressed.indices(device)?,
            &Tensor::f_scalar_tensor(f64::NEG_INFINITY, (Kind::Float, device))?,
            false,
        )?;
        processed = Some(masked);
    }

    Ok(processed)
}

/// `(row, token)` pairs for `index_put_`, gathered on the host.
#[derive(Default)]
struct Coords {
    rows: Vec<i64>,
    tokens: Vec<i64>,
}

impl Coords {
    fn extend<'t>(
        &mut self,
        row: usize,
        tokens: impl IntoIterator<Item = &'t u32>,
        vocab: i64,
    ) -> Result<()> {
        for &token in tokens {
            // An out-of-range index would be a libtorch error at best and a device assert at
            // worst; say which token is wrong instead.
            if i64::from(token) >= vocab {
                return Err(EngineError::TokenOutOfVocab {
                    token,
                    vocab_size: vocab as usize,
                });
            }
            self.rows.push(row as i64);
            self.tokens.push(i64::from(token));
        }
        Ok(())
    }

    fn indices(&self, device: Device) -> Result<[Option<Tensor>; 2]> {
        Ok([
            Some(Tensor::f_from_slice(&self.rows)?.f_to_device(device)?),
            Some(Tensor::f_from_slice(&self.tokens)?.f_to_device(device)?),
        ])
    }
}
