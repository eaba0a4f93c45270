//! Linear layers: dense weights in the compute dtype, or FP8 weights with per-channel scales.
//! FP8 runs through `_scaled_mm` on CUDA (inputs quantized per token on the fly, the
//! "dynamic" scheme of compressed-tensors); CPU has no FP8 matmul, so there it is dequantized.

use tch::{Device, Kind, Tensor};

use crate::weights::WeightTensor;

/// Largest finite float8_e4m3fn value.
const FP8_E4M3_MAX: f64 = 448.0;

pub enum Linear {
    /// `[out, in]`, as `F.linear` takes it (f32: MKL's sgemm/sgemv are fastest this way).
    Dense { weight: Tensor },
    /// `[in, out]` contiguous: for bf16/f16 on CPU, oneDNN then skips re-laying out the
    /// weight on every call (~20% faster at decode batch sizes).
    DenseT { weight_t: Tensor },
    /// `[in, out]` column-major FP8 weight (the layout `_scaled_mm` wants) and `[1, out]` scales.
    Fp8 { weight_t: Tensor, scale: Tensor },
}

impl Linear {
    /// The same layer over the same weight storage (no copy).
    pub fn share(&self) -> Linear {
        match self {
            Linear::Dense { weight } => Linear::Dense {
                weight: weight.shallow_clone(),
            },
            Linear::DenseT { weight_t } => Linear::DenseT {
                weight_t: weight_t.shallow_clone(),
            },
            Linear::Fp8 { weight_t, scale } => Linear::Fp8 {
                weight_t: weight_t.shallow_clone(),
                scale: scale.shallow_clone(),
            },
        }
    }

    /// Builds a layer from several `[out_i, in]` weights stacked along the output dimension
    /// (fused q/k/v or gate/up: one matmul instead of several per step).
    pub fn fused(parts: Vec<WeightTensor>, kind: Kind, device: Device) -> Linear {
        let all_fp8 = parts.iter().all(|p| matches!(p, WeightTensor::Fp8 { .. }));
        if all_fp8 && device.is_cuda() {
            let (ws, ss): (Vec<Tensor>, Vec<Tensor>) = parts
                .into_iter()
                .map(|p| match p {
                    WeightTensor::Fp8 { weight, scale } => (weight, scale),
                    WeightTensor::Dense(_) => unreachable!("checked above"),
                })
                .unzip();
            let w = Tensor::cat(&ws, 0).to_device(device);
            let s = Tensor::cat(&ss, 0).to_kind(Kind::Float).to_device(device);
            // `[out, in]` row-major transposed is `[in, out]` column-major, as `_scaled_mm` needs.
            return Linear::Fp8 {
                weight_t: w.tr(),
                scale: s.reshape([1, -1]),
            };
        }
        let ws: Vec<Tensor> = parts.iter().map(|p| p.dequantize(kind)).collect();
        let w = Tensor::cat(&ws, 0).to_device(device);
        if kind == Kind::Float || device.is_cuda() {
            Linear::Dense { weight: w }
        } else {
            Linear::DenseT {
                weight_t: w.tr().contiguous(),
            }
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        match self {
            Linear::Dense { weight } => x.linear(weight, None::<Tensor>),
            Linear::DenseT { weight_t } => x.matmul(weight_t),
            Linear::Fp8 { weight_t, scale } => {
                let out_kind = x.kind();
                let xf = x.to_kind(Kind::Float);
                let amax = xf.abs().amax([-1].as_slice(), true).clamp_min(1e-12);
                let x_scale = &amax / FP8_E4M3_MAX;
                let xq = (xf / &x_scale).to_kind(Kind::Float8e4m3fn);
                xq.internal_scaled_mm(
                    weight_t,
                    &x_scale,
                    scale,
                    None::<Tensor>,
                    None::<Tensor>,
                    out_kind,
                    false,
                )
            }
        }
    }

    /// The weight as `[out, in]` (a view, no copy), unless it is FP8.
    pub fn dense_out_in(&self) -> Option<Tensor> {
        match self {
            Linear::Dense { weight } => Some(weight.shallow_clone()),
            Linear::DenseT { weight_t } => Some(weight_t.tr()),
            Linear::Fp8 { .. } => None,
        }
    }

    /// Bytes of weight read per forward step (for bandwidth arithmetic).
    pub fn weight_bytes(&self) -> usize {
        let t = match self {
            Linear::Dense { weight } => weight,
            Linear::DenseT { weight_t } | Linear::Fp8 { weight_t, .. } => weight_t,
        };
        t.numel() * t.kind().elt_size_in_bytes()
    }

    pub fn out_features(&self) -> i64 {
        match self {
            Linear::Dense { weight } => weight.size()[0],
            Linear::DenseT { weight_t } | Linear::Fp8 { weight_t, .. } => weight_t.size()[1],
        }
    }
}
