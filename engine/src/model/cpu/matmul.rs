//! `y (+)= x · W` for the few rows of a decode step, over weights repacked once at load into
//! strips of 32 output columns. A strip is one contiguous run of memory, so a thread streaming
//! its strips reads the weight exactly once at full bandwidth, and every row of the batch is
//! multiplied against a strip while it is still in L2.
//!
//! bf16 weights interleave each pair of input rows (`[K/2][32][2]` per strip): that is the
//! operand layout of AVX-512-BF16's `vdpbf16ps`, and elsewhere the pair unpacks into two f32
//! vectors with two shifts. f32 weights are `[K][32]` per strip.

use half::bf16;

#[cfg(target_arch = "x86_64")]
use super::amx;
use super::buffer::WeightBuffer;
use super::isa::Isa;
use super::team::{SyncPtr, Team};

/// Output columns per strip.
pub const STRIP: usize = 32;
/// Rows multiplied against a strip at once (accumulators: ROWS × 2 vectors of 16).
const ROWS: usize = 8;
/// Fewest rows that go to AMX tiles where the CPU has them. Below, `vdpbf16ps` streams the
/// weights as fast and wastes no tile rows.
const AMX_MIN_ROWS: usize = 4;

/// Pairs of inputs a bf16 strip holds per column: K / 2 rounded up to whole AMX K blocks.
fn padded_pairs(k: usize) -> usize {
    k.div_ceil(2).div_ceil(K_BLOCK_PAIRS) * K_BLOCK_PAIRS
}

/// AMX's K block in pairs (16 × 4 bytes, one tile row), kept on every target so the packed
/// layout is the same everywhere; [`super::amx`] walks the strips by it.
pub const K_BLOCK_PAIRS: usize = 16;

pub enum Packed {
    /// Per strip `[kpp][STRIP][2]` bf16 bits, `kpp` = [`padded_pairs`]`(K)` (the pairs past K
    /// are zeros).
    Bf16(WeightBuffer<u16>),
    /// Per strip `[K][STRIP]`.
    F32(WeightBuffer<f32>),
}

/// Resizes `xb` to at least `len` zeros past its first cache-line boundary and returns that
/// part (the scratch stays a plain `Vec` for the callers; why the line: [`super::buffer`]).
fn aligned_scratch(xb: &mut Vec<u32>, len: usize) -> &mut [u32] {
    xb.clear();
    xb.resize(len + 16, 0);
    let start = xb.as_ptr().align_offset(64);
    &mut xb[start..start + len]
}

pub struct PackedWeight {
    /// Input features.
    pub k: usize,
    /// Output features.
    pub n: usize,
    data: Packed,
}

impl PackedWeight {
    /// Packs a row-major `[k, n]` (input-major, the `DenseT` layout) bf16 weight.
    pub fn from_bf16_in_out(w: &[bf16], k: usize, n: usize) -> Self {
        assert_eq!(w.len(), k * n, "weight of {k} x {n}");
        let kpp = padded_pairs(k);
        let strips = n.div_ceil(STRIP);
        let mut packed = WeightBuffer::zeroed(strips * kpp * STRIP * 2);
        let data = packed.as_mut_slice();
        for s in 0..strips {
            let base = s * kpp * STRIP * 2;
            for kk in 0..k {
                let row = &w[kk * n..(kk + 1) * n];
                let dst = base + (kk / 2) * STRIP * 2 + (kk % 2);
                for c in 0..STRIP.min(n - s * STRIP) {
                    data[dst + 2 * c] = row[s * STRIP + c].to_bits();
                }
            }
        }
        PackedWeight {
            k,
            n,
            data: Packed::Bf16(packed),
        }
    }

    /// Packs a row-major `[n, k]` (output-major, as checkpoints store it) f32 weight.
    pub fn from_f32_out_in(w: &[f32], n: usize, k: usize) -> Self {
        assert_eq!(w.len(), k * n, "weight of {n} x {k}");
        let strips = n.div_ceil(STRIP);
        let mut packed = WeightBuffer::zeroed(strips * k * STRIP);
        let data = packed.as_mut_slice();
        for (o, row) in w.chunks_exact(k).enumerate() {
            let (s, c) = (o / STRIP, o % STRIP);
            let base = s * k * STRIP;
            for (kk, &v) in row.iter().enumerate() {
                data[base + kk * STRIP + c] = v;
            }
        }
        PackedWeight {
            k,
            n,
            data: Packed::F32(packed),
        }
    }

    pub fn bytes(&self) -> usize {
        match &self.data {
            Packed::Bf16(d) => d.len() * 2,
            Packed::F32(d) => d.len() * 4,
        }
    }

    fn strips(&self) -> usize {
        self.n.div_ceil(STRIP)
    }

    /// `y[m][n] = x[m][k] · W` (or `+=` with `accumulate`), rows of `x` and `y` `ldx` / `ldy`
    /// apart. `xb` is scratch for the bf16 copy of `x` the dpbf16 kernel reads.
    #[allow(clippy::too_many_arguments)]
    pub fn matmul(
        &self,
        team: &Team,
        isa: Isa,
        x: &[f32],
        m: usize,
        ldx: usize,
        y: &mut [f32],
        ldy: usize,
        accumulate: bool,
        xb: &mut Vec<u32>,
    ) {
        assert!(ldx >= self.k && ldy >= self.n, "row strides {ldx}, {ldy}");
        assert!(x.len() >= (m - 1) * ldx + self.k && y.len() >= (m - 1) * ldy + self.n);
        let strips = self.strips();
        let yp = SyncPtr(y.as_mut_ptr());
        match &self.data {
            Packed::Bf16(w) if matches!(isa, Isa::Amx | Isa::Avx512Bf16) => {
                // x as bf16 pairs: one u32 per two inputs, the broadcast operand of vdpbf16ps
                // and the rows of AMX's A tiles; padded to the strips' pairs, and for tiles to
                // whole tiles of rows, with zeros.
                let kpp = padded_pairs(self.k);
                // `available` again, though `Isa::Amx` implies it: it is what grants the tiles.
                #[cfg(target_arch = "x86_64")]
                let tiles = isa == Isa::Amx && m >= AMX_MIN_ROWS && amx::available();
                #[cfg(not(target_arch = "x86_64"))]
                let tiles = false;
                let rows = if tiles { m.next_multiple_of(16) } else { m };
                let xa = aligned_scratch(xb, rows * kpp);
                for r in 0..m {
                    let row = &x[r * ldx..r * ldx + self.k];
                    let out = &mut xa[r * kpp..(r + 1) * kpp];
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: Avx512Bf16 (implied by Amx) was detected at run time.
                    let done = unsafe { dpbf16::to_pairs(row, out) };
                    #[cfg(not(target_arch = "x86_64"))]
                    let done = 0;
                    for (p, out) in out.iter_mut().enumerate().skip(done) {
                        let half = |i: usize| {
                            row.get(i)
                                .map_or(0, |&v| bf16::from_f32(v).to_bits() as u32)
                        };
                        *out = half(2 * p) | (half(2 * p + 1) << 16);
                    }
                }
                let xbp = SyncPtr(xa.as_mut_ptr());
                let wp = SyncPtr(w.as_slice().as_ptr() as *mut u16);
                team.split(strips, |s0, s1| {
                    // SAFETY: each task writes only its own strips' columns of `y`; `x`, `w`
                    // outlive the call, and Avx512Bf16 (and for tiles AMX, granted to the
                    // process) was detected at run time.
                    #[cfg(target_arch = "x86_64")]
                    unsafe {
                        let (x, w, y) = (xbp.get(), wp.get(), yp.get());
                        if tiles {
                            amx::strips(x, m, kpp, w, s0, s1, self.n, y, ldy, accumulate)
                        } else {
                            dpbf16::strips(x, m, kpp, w, s0, s1, self.n, y, ldy, accumulate)
                        }
                    }
                    #[cfg(not(target_arch = "x86_64"))]
                    unreachable!("{s0}{s1}{:?}", (xbp, wp, tiles))
                });
            }
            Packed::Bf16(w) => {
                let xp = SyncPtr(x.as_ptr() as *mut f32);
                let wp = SyncPtr(w.as_slice().as_ptr() as *mut u16);
                team.split(strips, |s0, s1| {
                    // SAFETY: as above; the portable kernel needs no CPU feature.
                    unsafe {
                        portable::dispatch_bf16(
                            isa,
                            xp.get(),
                            m,
                            ldx,
                            self.k,
                            wp.get(),
                            s0,
                            s1,
                            self.n,
                            yp.get(),
                            ldy,
                            accumulate,
                        )
                    }
                });
            }
            Packed::F32(w) => {
                let xp = SyncPtr(x.as_ptr() as *mut f32);
                let wp = SyncPtr(w.as_slice().as_ptr() as *mut f32);
                team.split(strips, |s0, s1| {
                    // SAFETY: as above.
                    unsafe {
                        portable::dispatch_f32(
                            isa,
                            xp.get(),
                            m,
                            ldx,
                            self.k,
                            wp.get(),
                            s0,
                            s1,
                            self.n,
                            yp.get(),
                            ldy,
                            accumulate,
                        )
                    }
                });
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod dpbf16 {
    use std::arch::x86_64::*;

    use super::{ROWS, STRIP};

    /// Rounds `x` to bf16 pairs (little-endian, so pair p is `x[2p] | x[2p+1] << 16`) 32 values
    /// at a time; returns how many pairs it wrote (the rest is left to the caller).
    #[target_feature(enable = "avx512f,avx512bf16,avx512bw,avx512vl")]
    pub unsafe fn to_pairs(x: &[f32], out: &mut [u32]) -> usize {
        let n = (x.len() / 16).min(out.len() / 8);
        for c in 0..n {
            unsafe {
                let v = _mm512_loadu_ps(x.as_ptr().add(16 * c));
                let h: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(v));
                _mm256_storeu_si256(out.as_mut_ptr().add(8 * c) as *mut __m256i, h);
            }
        }
        n * 8
    }

    /// Strips `s0..s1` of `y (+)= x · W`; `x` is `[m][kp]` bf16 pairs, `kp` the strips'
    /// padded pairs.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bf16,avx512bw,avx512vl")]
    pub unsafe fn strips(
        x: *const u32,
        m: usize,
        kp: usize,
        w: *const u16,
        s0: usize,
        s1: usize,
        n: usize,
        y: *mut f32,
        ldy: usize,
        accumulate: bool,
    ) {
        for s in s0..s1 {
            let ws = unsafe { w.add(s * kp * STRIP * 2) };
            let cols = STRIP.min(n - s * STRIP);
            let mut r0 = 0;
            while r0 < m {
                let rows = ROWS.min(m - r0);
                let xr = unsafe { x.add(r0 * kp) };
                let yr = unsafe { y.add(r0 * ldy + s * STRIP) };
                unsafe {
                    match rows {
                        1 => block::<1>(xr, kp, ws, yr, ldy, cols, accumulate),
                        2 => block::<2>(xr, kp, ws, yr, ldy, cols, accumulate),
                        3 => block::<3>(xr, kp, ws, yr, ldy, cols, accumulate),
                        4 => block::<4>(xr, kp, ws, yr, ldy, cols, accumulate),
                        5 => block::<5>(xr, kp, ws, yr, ldy, cols, accumulate),
                        6 => block::<6>(xr, kp, ws, yr, ldy, cols, accumulate),
                        7 => block::<7>(xr, kp, ws, yr, ldy, cols, accumulate),
                        _ => block::<8>(xr, kp, ws, yr, ldy, cols, accumulate),
                    }
                }
                r0 += rows;
            }
        }
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx512bf16,avx512bw,avx512vl")]
    unsafe fn block<const R: usize>(
        x: *const u32,
        kp: usize,
        w: *const u16,
        y: *mut f32,
        ldy: usize,
        cols: usize,
        accumulate: bool,
    ) {
        let mut acc = [[_mm512_setzero_ps(); 2]; R];
        for p in 0..kp {
            let (w0, w1): (__m512bh, __m512bh) = unsafe {
                let wp = w.add(p * STRIP * 2) as *const __m512i;
                (
                    std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(wp)),
                    std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(wp.add(1))),
                )
            };
            for (r, a) in acc.iter_mut().enumerate() {
                let xv = unsafe {
                    std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(
                        *x.add(r * kp + p) as i32
                    ))
                };
                a[0] = _mm512_dpbf16_ps(a[0], xv, w0);
                a[1] = _mm512_dpbf16_ps(a[1], xv, w1);
            }
        }
        for (r, a) in acc.iter().enumerate() {
            let yr = unsafe { y.add(r * ldy) };
            for (h, &v) in a.iter().enumerate() {
                let lanes = cols.saturating_sub(h * 16).min(16);
                if lanes == 0 {
                    continue;
                }
                let mask: __mmask16 = if lanes == 16 {
                    0xffff
                } else {
                    (1u16 << lanes) - 1
                };
                unsafe {
                    let dst = yr.add(h * 16);
                    let v = if accumulate {
                        _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, dst))
                    } else {
                        v
                    };
                    _mm512_mask_storeu_ps(dst, mask, v);
                }
            }
        }
    }
}

/// Kernels in plain Rust that LLVM vectorizes for whichever target features the wrapper
/// enables: the path for CPUs without AVX-512-BF16, and for f32 weights.
mod portable {
    use super::super::isa::Isa;
    use super::{ROWS, STRIP};

    macro_rules! versions {
        ($name:ident, $body:ident, $wt:ty) => {
            #[allow(clippy::too_many_arguments)]
            pub unsafe fn $name(
                isa: Isa,
                x: *const f32,
                m: usize,
                ldx: usize,
                k: usize,
                w: *const $wt,
                s0: usize,
                s1: usize,
                n: usize,
                y: *mut f32,
                ldy: usize,
                acc: bool,
            ) {
                #[cfg(target_arch = "x86_64")]
                {
                    #[target_feature(enable = "avx512f,avx512bw,avx512vl,fma")]
                    #[allow(clippy::too_many_arguments)]
                    unsafe fn avx512(
                        x: *const f32,
                        m: usize,
                        ldx: usize,
                        k: usize,
                        w: *const $wt,
                        s0: usize,
                        s1: usize,
                        n: usize,
                        y: *mut f32,
                        ldy: usize,
                        acc: bool,
                    ) {
                        unsafe { $body(x, m, ldx, k, w, s0, s1, n, y, ldy, acc) }
                    }
                    #[target_feature(enable = "avx2,fma")]
                    #[allow(clippy::too_many_arguments)]
                    unsafe fn avx2(
                        x: *const f32,
                        m: usize,
                        ldx: usize,
                        k: usize,
                        w: *const $wt,
                        s0: usize,
                        s1: usize,
                        n: usize,
                        y: *mut f32,
                        ldy: usize,
                        acc: bool,
                    ) {
                        unsafe { $body(x, m, ldx, k, w, s0, s1, n, y, ldy, acc) }
                    }
                    match isa {
                        Isa::Amx | Isa::Avx512Bf16 | Isa::Avx512 => {
                            return unsafe { avx512(x, m, ldx, k, w, s0, s1, n, y, ldy, acc) };
                        }
                        Isa::Avx2 => {
                            return unsafe { avx2(x, m, ldx, k, w, s0, s1, n, y, ldy, acc) };
                        }
                        Isa::Generic => {}
                    }
                }
                let _ = isa;
                unsafe { $body(x, m, ldx, k, w, s0, s1, n, y, ldy, acc) }
            }
        };
    }

    versions!(dispatch_bf16, strips_bf16, u16);
    versions!(dispatch_f32, strips_f32, f32);

    #[inline(always)]
    fn widen(b: u16) -> f32 {
        f32::from_bits((b as u32) << 16)
    }

    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn strips_bf16(
        x: *const f32,
        m: usize,
        ldx: usize,
        k: usize,
        w: *const u16,
        s0: usize,
        s1: usize,
        n: usize,
        y: *mut f32,
        ldy: usize,
        accumulate: bool,
    ) {
        let (kp, kpp) = (k.div_ceil(2), super::padded_pairs(k));
        for s in s0..s1 {
            let ws =
                unsafe { std::slice::from_raw_parts(w.add(s * kpp * STRIP * 2), kp * STRIP * 2) };
            let cols = STRIP.min(n - s * STRIP);
            let mut r0 = 0;
            while r0 < m {
                let rows = ROWS.min(m - r0);
                let mut acc = [[0f32; STRIP]; ROWS];
                for p in 0..kp {
                    let wp: &[u16; STRIP * 2] = ws[p * STRIP * 2..(p + 1) * STRIP * 2]
                        .try_into()
                        .expect("strip row");
                    let mut even = [0f32; STRIP];
                    let mut odd = [0f32; STRIP];
                    for c in 0..STRIP {
                        even[c] = widen(wp[2 * c]);
                        odd[c] = widen(wp[2 * c + 1]);
                    }
                    for (r, a) in acc.iter_mut().enumerate().take(rows) {
                        let xr = unsafe { x.add((r0 + r) * ldx) };
                        let x0 = unsafe { *xr.add(2 * p) };
                        let x1 = if 2 * p + 1 < k {
                            unsafe { *xr.add(2 * p + 1) }
                        } else {
                            0.0
                        };
                        for c in 0..STRIP {
                            a[c] += x0 * even[c] + x1 * odd[c];
                        }
                    }
                }
                unsafe { store(&acc, rows, r0, s, cols, y, ldy, accumulate) };
                r0 += rows;
            }
        }
    }

    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn strips_f32(
        x: *const f32,
        m: usize,
        ldx: usize,
        k: usize,
        w: *const f32,
        s0: usize,
        s1: usize,
        n: usize,
        y: *mut f32,
        ldy: usize,
        accumulate: bool,
    ) {
        for s in s0..s1 {
            let ws = unsafe { std::slice::from_raw_parts(w.add(s * k * STRIP), k * STRIP) };
            let cols = STRIP.min(n - s * STRIP);
            let mut r0 = 0;
            while r0 < m {
                let rows = ROWS.min(m - r0);
                let mut acc = [[0f32; STRIP]; ROWS];
                for kk in 0..k {
                    let wk: &[f32; STRIP] = ws[kk * STRIP..(kk + 1) * STRIP]
                        .try_into()
                        .expect("strip row");
                    for (r, a) in acc.iter_mut().enumerate().take(rows) {
                        let xv = unsafe { *x.add((r0 + r) * ldx + kk) };
                        for c in 0..STRIP {
                            a[c] += xv * wk[c];
                        }
                    }
                }
                unsafe { store(&acc, rows, r0, s, cols, y, ldy, accumulate) };
                r0 += rows;
            }
        }
    }

    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn store(
        acc: &[[f32; STRIP]; ROWS],
        rows: usize,
        r0: usize,
        s: usize,
        cols: usize,
        y: *mut f32,
        ldy: usize,
        accumulate: bool,
    ) {
        for (r, a) in acc.iter().enumerate().take(rows) {
            let yr =
                unsafe { std::slice::from_raw_parts_mut(y.add((r0 + r) * ldy + s * STRIP), cols) };
            if accumulate {
                for (o, v) in yr.iter_mut().zip(a) {
                    *o += v;
                }
            } else {
                yr.copy_from_slice(&a[..cols]);
            }
        }
    }
}
