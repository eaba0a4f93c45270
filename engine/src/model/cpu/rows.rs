//! The element-wise pieces of a bf16 prompt chunk's libtorch step, fused: residual add with
//! RMSNorm, RoPE with the K/V cache write, SiLU·mul. Long prompt chunks keep libtorch's GEMMs
//! (oneDNN's), but around them libtorch spent a third of a 512-token prefill: its bf16 RMSNorm
//! is seven ops (upcast, pow, mean, rsqrt, two muls, downcast), its RoPE six, the SiLU·mul and
//! the adds two more passes each, every op a pass over memory and an OpenMP fork and join.
//! Here each piece is one pass per row, split over the team's threads.
//!
//! Arithmetic is in f32 with one rounding to bf16 per stored value (round to nearest even),
//! where libtorch rounds after each op; the residual stream stays bf16 as libtorch keeps it.

use tch::{Kind, Tensor};

use super::team::SyncPtr;
use super::vector::{self, Elem};
use super::{CpuKernels, Isa, KernelWeights};

/// Which of the model's norms to apply.
#[derive(Clone, Copy, Debug)]
pub enum Norm {
    /// Before attention in layer `i`.
    Input(usize),
    /// Before the MLP in layer `i`.
    Post(usize),
    Final,
}

/// f32 to bf16 bits, round to nearest even; branch-free so loops over it vectorize.
#[inline(always)]
fn narrow(v: f32) -> u16 {
    let b = v.to_bits();
    let rounded = (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16;
    if v.is_nan() {
        0x7fc0
    } else {
        rounded
    }
}

/// Defines `$name(isa, args..)`: the body compiled for the widest vectors `isa` allows (its
/// callees are `inline(always)`, so LLVM vectorizes them inside each version; a closure
/// would not be inlined into a `target_feature` function, and would stay scalar SSE).
macro_rules! vectorized {
    ($(#[$m:meta])* fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        $(#[$m])*
        fn $name(isa: Isa, $($arg: $ty),*) {
            #[inline(always)]
            fn body($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512vl,fma")]
                unsafe fn avx512($($arg: $ty),*) {
                    body($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) {
                    body($($arg),*)
                }
                // SAFETY: `isa` was detected on this CPU (or is a lower one it also runs).
                match isa {
                    Isa::Amx | Isa::Avx512Bf16 | Isa::Avx512 => unsafe { avx512($($arg),*) },
                    Isa::Avx2 => unsafe { avx2($($arg),*) },
                    Isa::Generic => body($($arg),*),
                }
            }
            #[cfg(not(target_arch = "x86_64"))]
            {
                let _ = isa;
                body($($arg),*)
            }
        }
    };
}

vectorized! {
    /// [`add_norm_row`] over whole rows of `hd` values.
    fn add_norm_rows(
        x: &mut [u16],
        delta: Option<&[u16]>,
        w: &[f32],
        eps: f64,
        out: &mut [u16],
    ) {
        let hd = w.len();
        for (r, (xr, or)) in x.chunks_exact_mut(hd).zip(out.chunks_exact_mut(hd)).enumerate() {
            add_norm_row(xr, delta.map(|d| &d[r * hd..(r + 1) * hd]), w, eps, or);
        }
    }
}

vectorized! {
    /// [`silu_mul_row`] over whole rows of `gu` (`[rows][2·inter]`) into `out` (`[rows][inter]`).
    fn silu_mul_rows(gu: &[u16], out: &mut [u16], inter: usize) {
        for (g, o) in gu.chunks_exact(2 * inter).zip(out.chunks_exact_mut(inter)) {
            silu_mul_row(&g[..inter], &g[inter..], o);
        }
    }
}

vectorized! {
    /// [`rope_row`] of the first `rotated` values of one row, at table rows `cos`, `sin`.
    fn rope_one(row: &mut [u16], rotated: usize, d: usize, cos: &[f32], sin: &[f32]) {
        rope_row(&mut row[..rotated], d, cos, sin);
    }
}

/// `x += delta` (rounded to bf16), then `out = x / rms(x) * w`.
#[inline(always)]
fn add_norm_row(x: &mut [u16], delta: Option<&[u16]>, w: &[f32], eps: f64, out: &mut [u16]) {
    const LANES: usize = 16;
    if let Some(delta) = delta {
        for (v, &dv) in x.iter_mut().zip(delta) {
            *v = narrow(v.to_f32() + dv.to_f32());
        }
    }
    let mut lanes = [0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let mut ss: f32 = chunks
        .remainder()
        .iter()
        .map(|&v| v.to_f32() * v.to_f32())
        .sum();
    for c in chunks {
        for l in 0..LANES {
            let v = c[l].to_f32();
            lanes[l] += v * v;
        }
    }
    ss += vector::sum(&lanes);
    let inv = 1.0 / ((ss / x.len() as f32) as f64 + eps).sqrt() as f32;
    for ((o, &v), &g) in out.iter_mut().zip(x.iter()).zip(w) {
        *o = narrow(v.to_f32() * inv * g);
    }
}

/// Rotate-half RoPE of each `d`-wide head of `row`, with this position's `cos`/`sin` rows.
#[inline(always)]
fn rope_row(row: &mut [u16], d: usize, cos: &[f32], sin: &[f32]) {
    let h = d / 2;
    for head in row.chunks_exact_mut(d) {
        let (a, b) = head.split_at_mut(h);
        for i in 0..h {
            let (x1, x2) = (a[i].to_f32(), b[i].to_f32());
            a[i] = narrow(x1 * cos[i] - x2 * sin[i]);
            b[i] = narrow(x2 * cos[h + i] + x1 * sin[h + i]);
        }
    }
}

#[inline(always)]
fn silu_mul_row(gate: &[u16], up: &[u16], out: &mut [u16]) {
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        let g = g.to_f32();
        *o = narrow(g / (1.0 + vector::exp(-g)) * u.to_f32());
    }
}

/// The row pieces in AVX-512 intrinsics, for CPUs with AVX-512-BF16 (whose rounding
/// conversion, `vcvtneps2bf16`, is [`narrow`]'s). LLVM's vectorization of the portable loops
/// stays half scalar around `exp`'s saturating casts: SiLU·mul alone took 10 % of a 512-token
/// prefill that way, under 3 % here.
#[cfg(target_arch = "x86_64")]
mod bf16x16 {
    use std::arch::x86_64::*;

    use super::super::flash::exp16;

    /// 16 bf16 values at `p`, widened.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn load(p: &[u16]) -> __m512 {
        debug_assert!(p.len() >= 16);
        let v = unsafe { _mm256_loadu_si256(p.as_ptr() as *const __m256i) };
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(v)))
    }

    /// `v` rounded to bf16 into `p[..16]`; returns the rounded values.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    unsafe fn store(p: &mut [u16], v: __m512) -> __m512 {
        debug_assert!(p.len() >= 16);
        let b = _mm512_cvtneps_pbh(v);
        unsafe {
            _mm256_storeu_si256(
                p.as_mut_ptr() as *mut __m256i,
                std::mem::transmute::<__m256bh, __m256i>(b),
            )
        };
        _mm512_cvtpbh_ps(b)
    }

    /// [`super::silu_mul_rows`].
    ///
    /// # Safety
    /// The CPU has AVX-512-BF16; `inter` is a multiple of 16.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    pub unsafe fn silu_mul_rows(gu: &[u16], out: &mut [u16], inter: usize) {
        let one = _mm512_set1_ps(1.0);
        for (g, o) in gu.chunks_exact(2 * inter).zip(out.chunks_exact_mut(inter)) {
            for i in (0..inter).step_by(16) {
                let (gate, up) = unsafe { (load(&g[i..]), load(&g[inter + i..])) };
                let e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), gate));
                let v = _mm512_mul_ps(_mm512_div_ps(gate, _mm512_add_ps(one, e)), up);
                unsafe { store(&mut o[i..], v) };
            }
        }
    }

    /// [`super::add_norm_rows`].
    ///
    /// # Safety
    /// The CPU has AVX-512-BF16; `w.len()` is a multiple of 16.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    pub unsafe fn add_norm_rows(
        x: &mut [u16],
        delta: Option<&[u16]>,
        w: &[f32],
        eps: f64,
        out: &mut [u16],
    ) {
        let hd = w.len();
        for (r, (xr, or)) in x
            .chunks_exact_mut(hd)
            .zip(out.chunks_exact_mut(hd))
            .enumerate()
        {
            let mut ss = _mm512_setzero_ps();
            for i in (0..hd).step_by(16) {
                let mut v = unsafe { load(&xr[i..]) };
                if let Some(d) = delta {
                    let sum = _mm512_add_ps(v, unsafe { load(&d[r * hd + i..]) });
                    v = unsafe { store(&mut xr[i..], sum) };
                }
                ss = _mm512_fmadd_ps(v, v, ss);
            }
            let ms = _mm512_reduce_add_ps(ss) / hd as f32;
            let inv = _mm512_set1_ps(1.0 / (ms as f64 + eps).sqrt() as f32);
            for i in (0..hd).step_by(16) {
                let g = unsafe { _mm512_loadu_ps(w[i..].as_ptr()) };
                let v = _mm512_mul_ps(_mm512_mul_ps(unsafe { load(&xr[i..]) }, inv), g);
                unsafe { store(&mut or[i..], v) };
            }
        }
    }

    /// [`super::rope_one`].
    ///
    /// # Safety
    /// The CPU has AVX-512-BF16; `d` is a multiple of 32.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    pub unsafe fn rope_one(row: &mut [u16], rotated: usize, d: usize, cos: &[f32], sin: &[f32]) {
        let h = d / 2;
        for head in row[..rotated].chunks_exact_mut(d) {
            let (a, b) = head.split_at_mut(h);
            for i in (0..h).step_by(16) {
                unsafe {
                    let (x1, x2) = (load(&a[i..]), load(&b[i..]));
                    let (c1, s1) = (_mm512_loadu_ps(&cos[i]), _mm512_loadu_ps(&sin[i]));
                    let (c2, s2) = (_mm512_loadu_ps(&cos[h + i]), _mm512_loadu_ps(&sin[h + i]));
                    store(&mut a[i..], _mm512_fmsub_ps(x1, c1, _mm512_mul_ps(x2, s1)));
                    store(&mut b[i..], _mm512_fmadd_ps(x2, c2, _mm512_mul_ps(x1, s2)));
                }
            }
        }
    }
}

/// Whether `isa` has the intrinsics versions ([`bf16x16`]) for rows of `width` values.
fn intrinsics(isa: Isa, width: usize) -> bool {
    cfg!(target_arch = "x86_64")
        && matches!(isa, Isa::Amx | Isa::Avx512Bf16)
        && width.is_multiple_of(16)
}

fn is_cpu_bf16(t: &Tensor) -> bool {
    t.device() == tch::Device::Cpu && t.kind() == Kind::BFloat16 && t.is_contiguous()
}

impl CpuKernels {
    /// Whether a step of this model fuses its element-wise pieces here: bf16 weights on CPU.
    pub fn fuses_rows(w: &KernelWeights) -> bool {
        w.kind == Kind::BFloat16
    }

    /// `x += delta` in place (when given), then the `norm`ed `x` as a new tensor. `x`:
    /// `[t, hidden]` contiguous bf16 on CPU (the residual stream), `delta` the same shape.
    pub fn add_norm(
        &self,
        w: &KernelWeights,
        norm: Norm,
        x: &mut Tensor,
        delta: Option<&Tensor>,
    ) -> Tensor {
        let hd = w.config.hidden_size;
        assert!(
            is_cpu_bf16(x) && x.numel().is_multiple_of(hd),
            "x is [t, {hd}] bf16"
        );
        let delta = delta.map(Tensor::contiguous);
        if let Some(d) = &delta {
            assert_eq!(d.size(), x.size(), "delta's shape is x's");
            assert_eq!(d.kind(), Kind::BFloat16);
        }
        let weight = match norm {
            Norm::Input(i) => &w.layers[i].input_norm,
            Norm::Post(i) => &w.layers[i].post_norm,
            Norm::Final => &w.final_norm,
        };
        let eps = w.config.rms_norm_eps;
        let out = Tensor::empty(x.size(), (Kind::BFloat16, tch::Device::Cpu));
        let t = x.numel() / hd;
        let (xp, op) = (
            SyncPtr(x.data_ptr() as *mut u16),
            SyncPtr(out.data_ptr() as *mut u16),
        );
        let dp = delta.as_ref().map(|d| SyncPtr(d.data_ptr() as *mut u16));
        let isa = self.isa;
        self.team.split(t, |a, b| {
            let n = (b - a) * hd;
            // SAFETY: rows a..b of the three `[t, hd]` buffers are this part's alone.
            let (xr, or, dr) = unsafe {
                (
                    std::slice::from_raw_parts_mut(xp.get().add(a * hd), n),
                    std::slice::from_raw_parts_mut(op.get().add(a * hd), n),
                    dp.map(|p| std::slice::from_raw_parts(p.get().add(a * hd) as *const u16, n)),
                )
            };
            #[cfg(target_arch = "x86_64")]
            if intrinsics(isa, hd) {
                // SAFETY: the ISA has AVX-512-BF16; the width was checked.
                unsafe { bf16x16::add_norm_rows(xr, dr, weight, eps, or) };
                return;
            }
            add_norm_rows(isa, xr, dr, weight, eps, or);
        });
        out
    }

    /// Rotates the Q and K heads of `qkv` (`[t, (heads + 2·kv_heads)·d]` contiguous bf16, the
    /// fused projection) in place for each row's position, and writes each row's K and V into
    /// `cache` (the layer's `[blocks, 2, bs, kv_heads, d]` bf16) at its K slot (a flat row of
    /// `[blocks · 2 · bs]`; V is `bs` further).
    pub fn rope_into_cache(
        &self,
        w: &KernelWeights,
        qkv: &mut Tensor,
        positions: &[i64],
        k_slots: &[i64],
        cache: &mut Tensor,
    ) {
        let c = &w.config;
        let (heads, kvh, d) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let width = (heads + 2 * kvh) * d;
        let t = positions.len();
        assert!(
            is_cpu_bf16(qkv) && qkv.numel() == t * width,
            "qkv is [{t}, {width}] bf16"
        );
        assert!(is_cpu_bf16(cache) && cache.size()[3] as usize == kvh);
        assert_eq!(k_slots.len(), t);
        let bs = cache.size()[2] as usize;
        let cache_rows = cache.numel() / (kvh * d);
        assert!(k_slots
            .iter()
            .all(|&s| s >= 0 && (s as usize) + bs < cache_rows));
        assert!(positions
            .iter()
            .all(|&p| p >= 0 && (p as usize) < w.max_positions()));
        let (qp, cp) = (
            SyncPtr(qkv.data_ptr() as *mut u16),
            SyncPtr(cache.data_ptr() as *mut u16),
        );
        let isa = self.isa;
        let kv_width = kvh * d;
        let fast_rope = intrinsics(isa, d / 2);
        self.team.split(t, |a, b| {
            for r in a..b {
                let p = positions[r] as usize;
                let (cos, sin) = (&w.cos[p * d..(p + 1) * d], &w.sin[p * d..(p + 1) * d]);
                // SAFETY: row r of qkv is this part's alone; each row's slot is its own
                // token's, distinct from every other row's, and checked in bounds above.
                unsafe {
                    let row = std::slice::from_raw_parts_mut(qp.get().add(r * width), width);
                    #[cfg(target_arch = "x86_64")]
                    if fast_rope {
                        bf16x16::rope_one(row, (heads + kvh) * d, d, cos, sin);
                    } else {
                        rope_one(isa, row, (heads + kvh) * d, d, cos, sin);
                    }
                    #[cfg(not(target_arch = "x86_64"))]
                    rope_one(isa, row, (heads + kvh) * d, d, cos, sin);
                    let slot = k_slots[r] as usize;
                    let (k, v) = row[heads * d..].split_at(kv_width);
                    let kc = cp.get().add(slot * kv_width);
                    std::ptr::copy_nonoverlapping(k.as_ptr(), kc, kv_width);
                    let vc = cp.get().add((slot + bs) * kv_width);
                    std::ptr::copy_nonoverlapping(v.as_ptr(), vc, kv_width);
                }
            }
        });
    }

    /// `silu(gate) · up` of `gu` (`[t, 2·inter]`, gate then up, contiguous bf16): `[t, inter]`.
    pub fn silu_mul(&self, gu: &Tensor) -> Tensor {
        assert!(is_cpu_bf16(gu) && gu.dim() == 2, "gu is [t, 2·inter] bf16");
        let (t, two) = (gu.size()[0] as usize, gu.size()[1] as usize);
        let inter = two / 2;
        let out = Tensor::empty([t as i64, inter as i64], (Kind::BFloat16, tch::Device::Cpu));
        let (gp, op) = (
            SyncPtr(gu.data_ptr() as *mut u16),
            SyncPtr(out.data_ptr() as *mut u16),
        );
        let isa = self.isa;
        self.team.split(t, |a, b| {
            // SAFETY: rows a..b of `out` are this part's alone; `gu` is only read.
            let (g, o) = unsafe {
                (
                    std::slice::from_raw_parts(gp.get().add(a * two) as *const u16, (b - a) * two),
                    std::slice::from_raw_parts_mut(op.get().add(a * inter), (b - a) * inter),
                )
            };
            #[cfg(target_arch = "x86_64")]
            if intrinsics(isa, inter) {
                // SAFETY: the ISA has AVX-512-BF16; the width was checked.
                unsafe { bf16x16::silu_mul_rows(g, o, inter) };
                return;
            }
            silu_mul_rows(isa, g, o, inter);
        });
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bf16_tensor(v: &[f32], shape: &[i64]) -> Tensor {
        Tensor::from_slice(v).view(shape).to_kind(Kind::BFloat16)
    }

    fn values(t: &Tensor) -> Vec<f32> {
        Vec::<f32>::try_from(&t.to_kind(Kind::Float).contiguous().view(-1)).expect("f32")
    }

    #[test]
    fn narrow_rounds_to_nearest_even_and_keeps_nan() {
        for v in [
            0.0f32,
            -0.0,
            1.0,
            // Halfway between two bf16 values: ties go to the even one.
            f32::from_bits(0x3f80_8000),
            f32::from_bits(0x3f81_8000),
            -3.7,
            1e-40,
            3e38,
            f32::INFINITY,
        ] {
            let want = half::bf16::from_f32(v).to_bits();
            assert_eq!(narrow(v), want, "{v}");
            assert_eq!(narrow(v).to_f32(), half::bf16::from_bits(want).to_f32());
        }
        assert!(narrow(f32::NAN).to_f32().is_nan());
    }

    #[test]
    fn row_pieces_match_their_definitions_on_every_isa() {
        let hd = 40;
        let x: Vec<f32> = (0..hd)
            .map(|i| ((i * 37 % 23) as f32 - 11.0) / 5.0)
            .collect();
        let delta: Vec<f32> = (0..hd).map(|i| ((i * 11 % 7) as f32 - 3.0) / 9.0).collect();
        let w: Vec<f32> = (0..hd).map(|i| 0.5 + i as f32 / 40.0).collect();
        let bits = |v: &[f32]| v.iter().map(|&f| narrow(f)).collect::<Vec<u16>>();
        for isa in Isa::available_for("row_pieces_match_their_definitions_on_every_isa") {
            let (mut xb, db) = (bits(&x), bits(&delta));
            let mut out = vec![0u16; hd];
            add_norm_rows(isa, &mut xb, Some(&db), &w, 1e-5, &mut out);
            // The sum is rounded to bf16 first, as stored; then normed in f64.
            let sum: Vec<f64> = (0..hd)
                .map(|i| narrow(bits(&x)[i].to_f32() + db[i].to_f32()).to_f32() as f64)
                .collect();
            let ms = sum.iter().map(|v| v * v).sum::<f64>() / hd as f64;
            for i in 0..hd {
                assert_eq!(xb[i].to_f32() as f64, sum[i], "{isa:?} sum {i}");
                let want = sum[i] / (ms + 1e-5).sqrt() * w[i] as f64;
                let got = out[i].to_f32() as f64;
                assert!(
                    (got - want).abs() <= want.abs() / 128.0 + 1e-6,
                    "{isa:?} norm {i}"
                );
            }
            let (g, u) = (bits(&x), bits(&delta));
            let gu: Vec<u16> = g.iter().chain(&u).copied().collect();
            silu_mul_rows(isa, &gu, &mut out, hd);
            for i in 0..hd {
                let gv = g[i].to_f32() as f64;
                let want = gv / (1.0 + (-gv).exp()) * u[i].to_f32() as f64;
                let got = out[i].to_f32() as f64;
                assert!(
                    (got - want).abs() <= want.abs() / 128.0 + 1e-6,
                    "{isa:?} silu {i}"
                );
            }
        }
    }

    #[test]
    fn fused_pieces_match_libtorch_ops_on_tensors() {
        use crate::config::LlamaConfig;
        use crate::model::cpu::{LayerTensors, ModelTensors};
        let c = LlamaConfig {
            hidden_size: 32,
            intermediate_size: 48,
            num_hidden_layers: 1,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            // 32: RoPE's halves are one vector of 16 (the intrinsics' case).
            head_dim: 32,
            vocab_size: 11,
            max_position_embeddings: 64,
            rope_theta: 10000.0,
            rope_scaling: None,
            rms_norm_eps: 1e-5,
            tie_word_embeddings: true,
        };
        let lin = |o: i64, i: i64| Tensor::ones([o, i], (Kind::Float, tch::Device::Cpu));
        let norm_w: Vec<f32> = (0..32).map(|i| 0.5 + i as f32 / 32.0).collect();
        let norm = Tensor::from_slice(&norm_w);
        let rope = crate::model::rope::Rope::new(&c, 64, tch::Device::Cpu);
        let (cos, sin) = rope.tables_f32();
        let (embed, qkv_w, o_w, gu_w, down_w) = (
            lin(11, 32),
            lin(256, 32),
            lin(32, 128),
            lin(96, 32),
            lin(32, 48),
        );
        let tensors = ModelTensors {
            embed: &embed,
            layers: vec![LayerTensors {
                input_norm: &norm,
                qkv: &qkv_w,
                o_proj: &o_w,
                post_norm: &norm,
                gate_up: &gu_w,
                down: &down_w,
            }],
            final_norm: &norm,
            lm_head: &embed,
            cos,
            sin,
        };
        let w = KernelWeights::new(&c, Kind::BFloat16, &tensors).expect("bf16 weights");
        assert!(CpuKernels::fuses_rows(&w));
        for (isa, threads) in Isa::available_for("fused_pieces_match_libtorch_ops_on_tensors")
            .into_iter()
            .flat_map(|i| [(i, 1), (i, 3)])
        {
            let k = CpuKernels::new(threads, isa);
            let t = 7usize;
            let xs: Vec<f32> = (0..t * 32)
                .map(|i| ((i * 29 % 31) as f32 - 15.0) / 4.0)
                .collect();
            let ds: Vec<f32> = (0..t * 32)
                .map(|i| ((i * 13 % 17) as f32 - 8.0) / 8.0)
                .collect();
            let mut x = bf16_tensor(&xs, &[t as i64, 32]);
            let delta = bf16_tensor(&ds, &[t as i64, 32]);
            let want_x = (&x.to_kind(Kind::Float) + delta.to_kind(Kind::Float))
                .to_kind(Kind::BFloat16)
                .to_kind(Kind::Float);
            let want = want_x.rms_norm([32i64].as_slice(), Some(&norm), 1e-5);
            let h = k.add_norm(&w, Norm::Post(0), &mut x, Some(&delta));
            assert_eq!(
                values(&x),
                values(&want_x),
                "{isa:?}, {threads} threads: residual"
            );
            let err = (h.to_kind(Kind::Float) - &want)
                .abs()
                .max()
                .double_value(&[]);
            let scale = want.abs().max().double_value(&[]);
            assert!(
                err <= scale / 128.0,
                "{isa:?}, {threads} threads: norm off by {err}"
            );

            // RoPE and the cache write against rope::apply and index_copy_.
            let (heads, kvh, d, bs) = (4i64, 2i64, 32i64, 4i64);
            let width = (heads + 2 * kvh) * d;
            let qs: Vec<f32> = (0..t * width as usize)
                .map(|i| ((i * 7 % 19) as f32 - 9.0) / 3.0)
                .collect();
            let mut qkv = bf16_tensor(&qs, &[t as i64, width]);
            let reference = qkv.to_kind(Kind::Float);
            let positions: Vec<i64> = (0..t as i64).map(|i| 3 + i * 5).collect();
            let blocks = [2i64, 0, 3];
            let k_slots: Vec<i64> = positions
                .iter()
                .map(|&p| blocks[(p / bs) as usize % 3] * 2 * bs + p % bs)
                .collect();
            // Distinct slots (positions 3..33 step 5 fall in distinct (block, offset) pairs).
            let mut uniq = k_slots.clone();
            uniq.sort_unstable();
            uniq.dedup();
            assert_eq!(uniq.len(), t);
            let mut cache = Tensor::zeros([4, 2, bs, kvh, d], (Kind::BFloat16, tch::Device::Cpu));
            k.rope_into_cache(&w, &mut qkv, &positions, &k_slots, &mut cache);
            let (c_t, s_t) = rope.tables(&Tensor::from_slice(&positions), Kind::Float);
            let qk = crate::model::rope::apply(
                &reference
                    .narrow(1, 0, (heads + kvh) * d)
                    .view([t as i64, heads + kvh, d]),
                &c_t,
                &s_t,
            )
            .view([t as i64, (heads + kvh) * d]);
            let got = qkv.to_kind(Kind::Float);
            let err = (got.narrow(1, 0, (heads + kvh) * d) - &qk)
                .abs()
                .max()
                .double_value(&[]);
            assert!(err <= 0.05, "{isa:?}, {threads} threads: rope off by {err}");
            let flat = cache.view([-1, kvh * d]).to_kind(Kind::Float);
            let slots = Tensor::from_slice(&k_slots);
            let k_rows = flat.index_select(0, &slots);
            let v_rows = flat.index_select(0, &(&slots + bs));
            assert_eq!(values(&k_rows), values(&got.narrow(1, heads * d, kvh * d)));
            assert_eq!(
                values(&v_rows),
                values(&reference.narrow(1, (heads + kvh) * d, kvh * d))
            );

            let gs: Vec<f32> = (0..t * 96)
                .map(|i| ((i * 5 % 23) as f32 - 11.0) / 3.0)
                .collect();
            let gu = bf16_tensor(&gs, &[t as i64, 96]);
            let gf = gu.to_kind(Kind::Float);
            let want = gf.narrow(1, 0, 48).silu() * gf.narrow(1, 48, 48);
            let got = k.silu_mul(&gu).to_kind(Kind::Float);
            let err = (got - &want).abs().max().double_value(&[]);
            let scale = want.abs().max().double_value(&[]);
            assert!(
                err <= scale / 128.0,
                "{isa:?}, {threads} threads: silu_mul off by {err}"
            );
        }
    }
}
