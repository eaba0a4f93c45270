//! Rotary position embeddings (rotate-half layout, as Hugging Face Llama), with Llama-3 and
//! linear frequency scaling. Tables are built once per model, for every position it accepts.

use std::f64::consts::PI;

use tch::{Device, Kind, Tensor};

use crate::config::{LlamaConfig, RopeScaling};

pub struct Rope {
    /// `[max_positions, head_dim]` each, f32, already duplicated for the two halves.
    cos: Tensor,
    sin: Tensor,
}

/// Inverse frequencies in f32, computed as transformers does so the golden logits match.
pub fn inv_freq(config: &LlamaConfig) -> Vec<f32> {
    let dim = config.head_dim;
    let base: Vec<f32> = (0..dim / 2)
        .map(|i| {
            let exponent = (2 * i) as f32 / dim as f32;
            1.0 / (config.rope_theta as f32).powf(exponent)
        })
        .collect();
    match &config.rope_scaling {
        None => base,
        Some(RopeScaling::Linear { factor }) => base.iter().map(|f| f / *factor as f32).collect(),
        Some(RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        }) => {
            let old = *original_max_position_embeddings as f64;
            let low_wavelen = old / low_freq_factor;
            let high_wavelen = old / high_freq_factor;
            base.iter()
                .map(|&f| {
                    let f = f as f64;
                    let wavelen = 2.0 * PI / f;
                    let scaled = if wavelen < high_wavelen {
                        f
                    } else if wavelen > low_wavelen {
                        f / factor
                    } else {
                        // Between the two cut-offs, blend scaled and unscaled smoothly.
                        let smooth = (old / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * f / factor + smooth * f
                    };
                    scaled as f32
                })
                .collect()
        }
    }
}

impl Rope {
    /// The same tables over the same storage.
    pub fn share(&self) -> Rope {
        Rope {
            cos: self.cos.shallow_clone(),
            sin: self.sin.shallow_clone(),
        }
    }

    pub fn new(config: &LlamaConfig, max_positions: usize, device: Device) -> Self {
        let inv = Tensor::from_slice(&inv_freq(config));
        let pos = Tensor::arange(max_positions as i64, (Kind::Float, Device::Cpu));
        let freqs = pos.unsqueeze(1) * inv.unsqueeze(0);
        let emb = Tensor::cat(&[&freqs, &freqs], 1);
        Rope {
            cos: emb.cos().to_device(device),
            sin: emb.sin().to_device(device),
        }
    }

    /// cos and sin rows for `positions` (`[T]` int64), shaped `[T, 1, head_dim]` in `kind`.
    pub fn tables(&self, positions: &Tensor, kind: Kind) -> (Tensor, Tensor) {
        let cos = self
            .cos
            .index_select(0, positions)
            .unsqueeze(1)
            .to_kind(kind);
        let sin = self
            .sin
            .index_select(0, positions)
            .unsqueeze(1)
            .to_kind(kind);
        (cos, sin)
    }

    /// The whole `[max_positions, head_dim]` f32 cos and sin tables.
    pub fn tables_f32(&self) -> (&Tensor, &Tensor) {
        (&self.cos, &self.sin)
    }

    pub fn max_positions(&self) -> usize {
        self.cos.size()[0] as usize
    }
}

/// Applies the rotation to `x` of shape `[T, heads, head_dim]`.
pub fn apply(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
    let half = x.size()[2] / 2;
    let x1 = x.narrow(2, 0, half);
    let x2 = x.narrow(2, half, half);
    let rotated = Tensor::cat(&[&x2.neg(), &x1], 2);
    x * cos + rotated * sin
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(scaling: Option<RopeScaling>) -> LlamaConfig {
        LlamaConfig {
            hidden_size: 64,
            intermediate_size: 128,
            num_hidden_layers: 1,
            num_attention_heads: 1,
            num_key_value_heads: 1,
            head_dim: 128,
            vocab_size: 10,
            max_position_embeddings: 131072,
            rope_theta: 500000.0,
            rope_scaling: scaling,
            rms_norm_eps: 1e-5,
            tie_word_embeddings: true,
        }
    }

    #[test]
    fn llama3_scaling_keeps_high_and_divides_low_frequencies() {
        let plain = inv_freq(&config(None));
        let scaled = inv_freq(&config(Some(RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        })));
        // Highest frequency (wavelength 2π) is untouched; lowest is divided by the factor.
        assert_eq!(plain[0], scaled[0]);
        let last = plain.len() - 1;
        assert!((scaled[last] - plain[last] / 8.0).abs() < 1e-12);
        // Somewhere in between it is blended: strictly between f/8 and f.
        let mid = plain
            .iter()
            .zip(&scaled)
            .any(|(p, s)| *s < *p && *s > *p / 8.0 + 1e-9);
        assert!(mid, "no blended frequency found");
    }

    #[test]
    fn rotation_preserves_norm_and_position_zero_is_identity() {
        let cfg = config(None);
        let rope = Rope::new(&cfg, 16, Device::Cpu);
        let x = Tensor::randn([3, 2, 128], (Kind::Float, Device::Cpu));
        let pos = Tensor::from_slice(&[0i64, 5, 15]);
        let (cos, sin) = rope.tables(&pos, Kind::Float);
        let y = apply(&x, &cos, &sin);
        let diff0 = (y.get(0) - x.get(0)).abs().max().double_value(&[]);
        assert!(diff0 < 1e-6);
        let nx = x.square().sum_dim_intlist(2, false, Kind::Float);
        let ny = y.square().sum_dim_intlist(2, false, Kind::Float);
        assert!((nx - ny).abs().max().double_value(&[]) < 1e-3);
    }
}
