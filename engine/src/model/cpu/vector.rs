//! Row-wise pieces of a layer on f32 activations: RMSNorm, rotary embedding, SiLU·mul, and an
//! `exp` that vectorizes. Written as fixed-width lane loops so LLVM emits SIMD for them
//! without fast-math; each is a few µs per step, so they need no per-ISA versions.

/// Lanes the reductions accumulate in (one AVX-512 register of f32).
const LANES: usize = 16;

/// Cache and activation element types the kernels read: bf16 bits or f32.
pub trait Elem: Copy + Send + Sync + 'static {
    /// bf16 bits (`u16`) rather than f32: SIMD code widens it on load.
    const BF16: bool;
    fn to_f32(self) -> f32;
    fn from_f32(v: f32) -> Self;
}

impl Elem for f32 {
    const BF16: bool = false;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        v
    }
}

/// bf16 as its bits.
impl Elem for u16 {
    const BF16: bool = true;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f32::from_bits((self as u32) << 16)
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        half::bf16::from_f32(v).to_bits()
    }
}

/// `e^x` to ~2 ulp for the range softmax and SiLU meet; branch-free so loops over it vectorize.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Round to nearest by adding 1.5 · 2^23 (no `floor`, which SSE2 lacks and would call libm).
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let n = (x * LOG2E + ROUND) - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.0 / 720.0;
    let p = p * r + 1.0 / 120.0;
    let p = p * r + 1.0 / 24.0;
    let p = p * r + 1.0 / 6.0;
    let p = p * r + 0.5;
    let p = p * r + 1.0;
    let p = p * r + 1.0;
    f32::from_bits(((n as i32 + 127) as u32) << 23) * p
}

/// Σ a·b in lane order (a fixed order, so results do not depend on the thread).
#[inline(always)]
pub fn dot<E: Elem>(a: &[f32], b: &[E]) -> f32 {
    let mut lanes = [0f32; LANES];
    let (ac, bc) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ar, br) = (ac.remainder(), bc.remainder());
    for (x, y) in ac.zip(bc) {
        let (x, y): (&[f32; LANES], &[E; LANES]) = (x.try_into().unwrap(), y.try_into().unwrap());
        for l in 0..LANES {
            lanes[l] += x[l] * y[l].to_f32();
        }
    }
    let mut s = hsum(&lanes);
    for (x, y) in ar.iter().zip(br) {
        s += x * y.to_f32();
    }
    s
}

#[inline(always)]
fn hsum(lanes: &[f32; LANES]) -> f32 {
    // Pairwise, as a register reduction does it.
    let mut v = *lanes;
    let mut w = LANES / 2;
    while w > 0 {
        for l in 0..w {
            v[l] += v[l + w];
        }
        w /= 2;
    }
    v[0]
}

/// Σ x, vectorized.
#[inline(always)]
pub fn sum(x: &[f32]) -> f32 {
    let mut lanes = [0f32; LANES];
    let c = x.chunks_exact(LANES);
    let rest: f32 = c.remainder().iter().sum();
    for x in c {
        let x: &[f32; LANES] = x.try_into().unwrap();
        for l in 0..LANES {
            lanes[l] += x[l];
        }
    }
    hsum(&lanes) + rest
}

/// max(x, floor), vectorized.
#[inline(always)]
pub fn max(x: &[f32], floor: f32) -> f32 {
    let mut lanes = [floor; LANES];
    let c = x.chunks_exact(LANES);
    let rest = c.remainder().iter().copied().fold(floor, f32::max);
    for x in c {
        let x: &[f32; LANES] = x.try_into().unwrap();
        for l in 0..LANES {
            lanes[l] = if x[l] > lanes[l] { x[l] } else { lanes[l] };
        }
    }
    lanes.iter().copied().fold(rest, f32::max)
}

/// `out = x / rms(x) * w`.
pub fn rms_norm(x: &[f32], w: &[f32], eps: f64, out: &mut [f32]) {
    let mut lanes = [0f32; LANES];
    let chunks = x.len() / LANES;
    for c in 0..chunks {
        for l in 0..LANES {
            let v = x[c * LANES + l];
            lanes[l] += v * v;
        }
    }
    let mut ss: f32 = lanes.iter().sum();
    for &v in &x[chunks * LANES..] {
        ss += v * v;
    }
    let inv = 1.0 / ((ss / x.len() as f32) as f64 + eps).sqrt() as f32;
    for ((o, &v), &g) in out.iter_mut().zip(x).zip(w) {
        *o = v * inv * g;
    }
}

/// Rotate-half RoPE of each `d`-wide head in `x`, with this position's `cos`/`sin` rows
/// (each `d` wide, the two halves equal).
pub fn rope(x: &mut [f32], d: usize, cos: &[f32], sin: &[f32]) {
    let h = d / 2;
    for head in x.chunks_exact_mut(d) {
        let (a, b) = head.split_at_mut(h);
        for i in 0..h {
            let (x1, x2) = (a[i], b[i]);
            a[i] = x1 * cos[i] - x2 * sin[i];
            b[i] = x2 * cos[h + i] + x1 * sin[h + i];
        }
    }
}

/// `out = silu(gate) * up`.
pub fn silu_mul(gate: &[f32], up: &[f32], out: &mut [f32]) {
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = g / (1.0 + exp(-g)) * u;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_close_to_std_over_the_softmax_range() {
        let mut worst = 0f32;
        for i in -8700..=8800 {
            let x = i as f32 / 100.0;
            let want = x.exp();
            let rel = ((exp(x) - want) / want).abs();
            worst = worst.max(rel);
        }
        assert!(worst < 1e-6, "worst relative error {worst}");
        assert!(exp(-1e30) < 1e-37 && exp(f32::NEG_INFINITY) < 1e-37);
        assert!(exp(1e30).is_finite());
    }

    #[test]
    fn rms_norm_and_silu_match_their_definitions() {
        let x: Vec<f32> = (0..37).map(|i| (i as f32 - 18.0) / 7.0).collect();
        let w: Vec<f32> = (0..37).map(|i| 1.0 + i as f32 / 50.0).collect();
        let mut out = vec![0.0; 37];
        rms_norm(&x, &w, 1e-5, &mut out);
        let ms = x.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / 37.0;
        for i in 0..37 {
            let want = x[i] as f64 / (ms + 1e-5).sqrt() * w[i] as f64;
            assert!(
                (out[i] as f64 - want).abs() < 1e-5,
                "{i}: {} vs {want}",
                out[i]
            );
        }
        silu_mul(&x, &w, &mut out);
        for i in 0..37 {
            let g = x[i] as f64;
            let want = g / (1.0 + (-g).exp()) * w[i] as f64;
            assert!((out[i] as f64 - want).abs() < 1e-5);
        }
    }

    #[test]
    fn bf16_bits_round_trip_through_f32() {
        for v in [0.0f32, 1.0, -2.5, 3.140625, 1e-3] {
            let b = <u16 as Elem>::from_f32(v);
            assert!((b.to_f32() - v).abs() <= v.abs() / 128.0);
        }
    }
}
