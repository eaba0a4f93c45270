//! Causal attention of a prompt chunk on AMX tiles, over its cached context and itself, read
//! from the paged bf16 cache: flash attention (online softmax, nothing of size queries × keys
//! kept). libtorch's bf16 flash SDPA took 32 ms of a 512-token prefill step of SmolLM2 (~1.1 ms
//! a layer); the first version of this took 25, this one less again (its share of a 2 048-token
//! prefill's CPU time went from 31 % to 26 %, prefill 5–10 % faster at 2 048 tokens; Xeon with
//! AMX, 2026-12-06, benches/README.md). What bounds it now is the chain Sᵀ → softmax → Pᵀ →
//! (P·V)ᵀ: its tile loads wait on the multiplies before them, as eight tiles leave no room to
//! compute one block's Sᵀ while the previous one's softmax runs.
//!
//! A task takes 16 query rows of one head and computes everything transposed, keys × rows:
//! Sᵀ = K·Qᵀ, so each vector of scores is one key for the 16 rows and the online softmax
//! (running maximum, sum, rescale) is lane-wise, with no horizontal reduction and one vector
//! exp per 16 rows; and Oᵀ = Vᵀ·Pᵀ, so the rescale of the running sums is lane-wise too. A
//! first version in row order spent its time in per-row horizontal maxima and sums and ran no
//! faster than libtorch.
//!
//! Per layer the keys and values are first packed per KV head in blocks of 32 keys: K rows
//! gathered from the pages (`[32 keys][64]`: A tiles as they are) and V transposed
//! (`[64][32 keys]`). Head dim 64 only (SmolLM2's); other shapes stay on libtorch.
//!
//! Tiles: 0–3 hold (P·V)ᵀ for the task's whole run (a quarter of d each), so the sums never
//! leave the tiles: the running maximum is lazy ([`LAZY_MAX`]) and the sums are rescaled through
//! memory only when a block raises a row's maximum by more than that. 4–5 take each block's Sᵀ
//! (keys 0–15, 16–31) and, once it is stored, three of Vᵀ's four tiles; 6–7 are the operands
//! (Qᵀ is reloaded from L1 for each block). The next block's K and Vᵀ are prefetched while
//! the softmax runs.

use std::arch::asm;
use std::arch::x86_64::*;

use super::amx;
use super::team::{SyncPtr, Team};

/// The head dim the kernel handles.
pub const HEAD_DIM: usize = 64;
/// Keys per block (P·V's inner dimension: one tile row of 32 bf16).
const KEYS: usize = 32;
/// Query rows per task (the lanes of a vector, the columns of a tile).
const ROWS: usize = 16;

/// One layer's paged cache as the kernel reads it: `[blocks][2][block_size][kv_heads][d]` bf16.
#[derive(Clone, Copy)]
pub struct PagedKv {
    pub ptr: SyncPtr<u16>,
    pub block_size: usize,
    pub kv_heads: usize,
}

impl PagedKv {
    /// Key (`which` 0) or value (1) of position `pos` for KV head `h`.
    ///
    /// # Safety
    /// `table` maps `pos` to a block of the cache.
    unsafe fn row(&self, table: &[u32], pos: usize, which: usize, h: usize) -> *const u16 {
        let block = table[pos / self.block_size] as usize;
        let slot = pos % self.block_size;
        let at = (((block * 2 + which) * self.block_size + slot) * self.kv_heads + h) * HEAD_DIM;
        unsafe { self.ptr.get().add(at) }
    }
}

/// bf16 values per packed block of K, and of V.
const BLOCK_U16: usize = KEYS * HEAD_DIM;

/// Attention of `len` queries at positions `context..context + len`, each over keys
/// `0..=` its own position, read from `kv` through `table` (this chunk's K/V already written).
/// `q`: `[len][heads][64]` bf16 bits; `out`: `[len][heads * 64]` bf16 bits.
///
/// # Safety
/// AMX was granted to the process ([`super::amx::available`]) and the CPU has AVX-512-BF16;
/// `kv` and `table` cover positions `0..context + len` of every KV head.
#[allow(clippy::too_many_arguments)]
pub unsafe fn prefill(
    team: &Team,
    q: &[u16],
    heads: usize,
    kv: PagedKv,
    table: &[u32],
    context: usize,
    len: usize,
    out: &mut [u16],
) {
    let total = context + len;
    let blocks = total.div_ceil(KEYS);
    let kvh = kv.kv_heads;
    assert!(heads.is_multiple_of(kvh) && q.len() == len * heads * HEAD_DIM);
    assert_eq!(out.len(), len * heads * HEAD_DIM);
    // Per KV head: K `[blocks][32][64]`, then Vᵀ `[blocks][64][32]`; keys past `total` zero.
    let per_head = 2 * blocks * BLOCK_U16;
    let mut packed = vec![0u16; kvh * per_head];
    let pp = SyncPtr(packed.as_mut_ptr());
    team.split(kvh * blocks, |a, b| {
        for i in a..b {
            let (h, blk) = (i / blocks, i % blocks);
            // SAFETY: task i writes block `blk` of head `h` only; the cache rows it reads exist.
            unsafe {
                let base = pp.get().add(h * per_head);
                let (k, vt) = (
                    base.add(blk * BLOCK_U16),
                    base.add((blocks + blk) * BLOCK_U16),
                );
                pack_block(&kv, table, total, h, blk, k, vt);
            }
        }
    });
    let qblocks = len.div_ceil(ROWS);
    let op = SyncPtr(out.as_mut_ptr());
    let packed = &packed;
    let group = heads / kvh;
    // Later query blocks attend to more keys: hand them out first.
    team.each(heads * qblocks, |i| {
        let (qb, head) = (qblocks - 1 - i / heads, i % heads);
        let base = &packed[(head / group) * per_head..][..per_head];
        let (k, vt) = base.split_at(blocks * BLOCK_U16);
        // SAFETY: task (head, qb) writes its own rows of `out` in its head's columns; the CPU
        // features are the caller's promise.
        unsafe { task(q, heads, head, qb, context, len, k, vt, op) };
    });
}

/// Packs block `blk` (keys `32·blk..`) of KV head `h`: K rows into `k`, V transposed into `vt`.
///
/// # Safety
/// `k` and `vt` hold one block each, zeroed.
unsafe fn pack_block(
    kv: &PagedKv,
    table: &[u32],
    total: usize,
    h: usize,
    blk: usize,
    k: *mut u16,
    vt: *mut u16,
) {
    for j in 0..KEYS {
        let pos = blk * KEYS + j;
        if pos >= total {
            break;
        }
        unsafe {
            let (kr, vr) = (kv.row(table, pos, 0, h), kv.row(table, pos, 1, h));
            std::ptr::copy_nonoverlapping(kr, k.add(j * HEAD_DIM), HEAD_DIM);
            for c in 0..HEAD_DIM {
                *vt.add(c * KEYS + j) = *vr.add(c);
            }
        }
    }
}

/// How far (in natural-log units) a row's running maximum may fall behind its true one
/// before the sums are rescaled: probabilities then reach e^8 ≈ 3 000, harmless in f32 sums and
/// bf16's exponent range, and the sums in the tiles are rescaled only when a block raises a
/// row's maximum by more than this (in practice the first block or two).
const LAZY_MAX: f32 = 8.0;

/// 16 query rows (`qb`) of one head against every key they see.
///
/// # Safety
/// As [`prefill`]; `k` and `vt` are the head's packed blocks, `out` is `[len][heads * 64]`.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16,avx512vl")]
unsafe fn task(
    q: &[u16],
    heads: usize,
    head: usize,
    qb: usize,
    context: usize,
    len: usize,
    k: &[u16],
    vt: &[u16],
    out: SyncPtr<u16>,
) {
    let r0 = qb * ROWS;
    let rows = ROWS.min(len - r0);
    // Qᵀ as B tiles: `[32 d pairs][16 rows]` u32 (the first 16 pairs, then the second).
    let mut qt = Pairs([0; (HEAD_DIM / 2) * ROWS]);
    for r in 0..rows {
        let src = &q[((r0 + r) * heads + head) * HEAD_DIM..][..HEAD_DIM];
        for p in 0..HEAD_DIM / 2 {
            qt.0[p * ROWS + r] = src[2 * p] as u32 | (src[2 * p + 1] as u32) << 16;
        }
    }
    // Scores stay unscaled; the scale folds into the exponent's subtraction (one fmsub).
    let scale = _mm512_set1_ps(1.0 / (HEAD_DIM as f32).sqrt());
    // The keys any row of this block sees end here (exclusive); row r sees keys <= base + r.
    let base = context + r0;
    let nblocks = (base + rows).div_ceil(KEYS);
    let mut st = Scores([0.0; KEYS * ROWS]);
    let mut pt = Pairs([0; (KEYS / 2) * ROWS]);
    let mut ot = Part([0.0; HEAD_DIM * ROWS]);
    let ninf = _mm512_set1_ps(f32::NEG_INFINITY);
    let mut m = ninf;
    let mut l = _mm512_setzero_ps();
    // Lane r of the bf16 pair interleave: (key 2p row r, key 2p + 1 row r).
    let interleave = _mm512_set_epi16(
        31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20, 4,
        19, 3, 18, 2, 17, 1, 16, 0,
    );
    let (qp, op) = (qt.0.as_ptr(), ot.0.as_mut_ptr());
    // Tiles 0–3 hold (P·V)ᵀ across the blocks (zeroed by the configuration), 4–5 the block's
    // Sᵀ, 6–7 the operands.
    unsafe { amx::configure() };
    for blk in 0..nblocks {
        let kb = unsafe { k.as_ptr().add(blk * BLOCK_U16) };
        let sp = st.0.as_mut_ptr();
        // Sᵀ[key][row]: K rows (A) times Qᵀ (B), each half of d in turn.
        unsafe {
            asm!(
                "tilezero tmm4",
                "tilezero tmm5",
                "tileloadd tmm7, [{q0} + {s64}*1]",
                "tileloadd tmm6, [{k00} + {s128}*1]",
                "tdpbf16ps tmm4, tmm6, tmm7",
                "tileloadd tmm6, [{k10} + {s128}*1]",
                "tdpbf16ps tmm5, tmm6, tmm7",
                "tileloadd tmm7, [{q1} + {s64}*1]",
                "tileloadd tmm6, [{k01} + {s128}*1]",
                "tdpbf16ps tmm4, tmm6, tmm7",
                "tileloadd tmm6, [{k11} + {s128}*1]",
                "tdpbf16ps tmm5, tmm6, tmm7",
                "tilestored [{s0} + {s64}*1], tmm4",
                "tilestored [{s1} + {s64}*1], tmm5",
                q0 = in(reg) qp,
                q1 = in(reg) qp.add(16 * ROWS),
                k00 = in(reg) kb,
                k01 = in(reg) kb.add(32),
                k10 = in(reg) kb.add(16 * HEAD_DIM),
                k11 = in(reg) kb.add(16 * HEAD_DIM + 32),
                s0 = in(reg) sp,
                s1 = in(reg) sp.add(16 * ROWS),
                s64 = in(reg) 64usize,
                s128 = in(reg) HEAD_DIM * 2,
                options(nostack)
            );
        }
        // Key j is seen by rows r >= key - base: lanes from that one on. Every row sees all of
        // a block that ends at or before `base`, as all but the last few blocks do.
        let whole = blk * KEYS + KEYS - 1 <= base;
        let seen = |j: usize| -> __mmask16 {
            let from = (blk * KEYS + j).saturating_sub(base);
            if whole || from == 0 {
                0xffff
            } else if from >= ROWS {
                0
            } else {
                (0xffffu32 << from) as u16
            }
        };
        // The next block's K and Vᵀ (from L2: a KV head's blocks outgrow L1 from a few
        // hundred keys on) come in while this one's softmax runs.
        if blk + 1 < nblocks {
            for line in (0..BLOCK_U16).step_by(32) {
                unsafe {
                    _mm_prefetch::<_MM_HINT_T0>(
                        k.as_ptr().add((blk + 1) * BLOCK_U16 + line) as *const i8
                    );
                    _mm_prefetch::<_MM_HINT_T0>(
                        vt.as_ptr().add((blk + 1) * BLOCK_U16 + line) as *const i8
                    );
                }
            }
        }
        let mut s = [_mm512_setzero_ps(); KEYS];
        let mut top = ninf;
        for (j, v) in s.iter_mut().enumerate() {
            let raw = unsafe { _mm512_load_ps(st.0.as_ptr().add(j * ROWS)) };
            *v = if whole {
                raw
            } else {
                _mm512_mask_mov_ps(ninf, seen(j), raw)
            };
            top = _mm512_max_ps(top, *v);
        }
        let top = _mm512_mul_ps(top, scale);
        // Rows whose maximum rose by more than LAZY_MAX move it, shrinking their sums so far
        // by e^(old - new): l here, (P·V)ᵀ through memory (not at the first block, where
        // they are still zero and every row moves from -∞).
        let far = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(top, _mm512_add_ps(m, _mm512_set1_ps(LAZY_MAX)));
        if far != 0 {
            let new = _mm512_mask_mov_ps(m, far, top);
            if blk > 0 {
                let alpha = exp16(_mm512_sub_ps(m, new));
                l = _mm512_mul_ps(l, alpha);
                unsafe {
                    store_sums(op);
                    for c in 0..HEAD_DIM {
                        let at = op.add(c * ROWS);
                        _mm512_store_ps(at, _mm512_mul_ps(_mm512_load_ps(at), alpha));
                    }
                    asm!(
                        "tileloadd tmm0, [{o0} + {s64}*1]",
                        "tileloadd tmm1, [{o1} + {s64}*1]",
                        "tileloadd tmm2, [{o2} + {s64}*1]",
                        "tileloadd tmm3, [{o3} + {s64}*1]",
                        o0 = in(reg) op,
                        o1 = in(reg) op.add(256),
                        o2 = in(reg) op.add(512),
                        o3 = in(reg) op.add(768),
                        s64 = in(reg) 64usize,
                        options(nostack, readonly)
                    );
                }
            }
            m = new;
        }
        // Masked scores are -∞ and come out of exp as 0 (exp16 clamps below).
        for (p, pair) in s.chunks_exact(2).enumerate() {
            let e0 = exp16(_mm512_fmsub_ps(pair[0], scale, m));
            let e1 = exp16(_mm512_fmsub_ps(pair[1], scale, m));
            let (e0, e1) = if whole {
                (e0, e1)
            } else {
                (
                    _mm512_maskz_mov_ps(seen(2 * p), e0),
                    _mm512_maskz_mov_ps(seen(2 * p + 1), e1),
                )
            };
            l = _mm512_add_ps(l, _mm512_add_ps(e0, e1));
            let both: __m512i = unsafe { std::mem::transmute(_mm512_cvtne2ps_pbh(e1, e0)) };
            let row = _mm512_permutexvar_epi16(interleave, both);
            unsafe { _mm512_store_si512(pt.0.as_mut_ptr().add(p * ROWS) as *mut __m512i, row) };
        }
        // (P·V)ᵀ += Vᵀ rows (A) times Pᵀ (B), a quarter of d into each of tiles 0–3; Sᵀ's
        // tiles are free again, so three Vᵀ tiles load ahead of their multiplies.
        let vb = unsafe { vt.as_ptr().add(blk * BLOCK_U16) };
        unsafe {
            asm!(
                "tileloadd tmm7, [{p} + {s64}*1]",
                "tileloadd tmm4, [{v0} + {s64}*1]",
                "tileloadd tmm5, [{v1} + {s64}*1]",
                "tileloadd tmm6, [{v2} + {s64}*1]",
                "tdpbf16ps tmm0, tmm4, tmm7",
                "tdpbf16ps tmm1, tmm5, tmm7",
                "tdpbf16ps tmm2, tmm6, tmm7",
                "tileloadd tmm4, [{v3} + {s64}*1]",
                "tdpbf16ps tmm3, tmm4, tmm7",
                p = in(reg) pt.0.as_ptr(),
                v0 = in(reg) vb,
                v1 = in(reg) vb.add(16 * KEYS),
                v2 = in(reg) vb.add(32 * KEYS),
                v3 = in(reg) vb.add(48 * KEYS),
                s64 = in(reg) 64usize,
                options(nostack, readonly)
            );
        }
    }
    unsafe {
        store_sums(op);
        amx::release();
    }
    let inv = _mm512_div_ps(_mm512_set1_ps(1.0), l);
    // Oᵀ (d-major) scaled into `st`, read back row-major into `rows_out`, rounded 16 at a time.
    let mut rows_out = Scores([0.0; KEYS * ROWS]);
    let width = heads * HEAD_DIM;
    for side in 0..2 {
        for c in 0..KEYS {
            let o = unsafe { _mm512_load_ps(ot.0.as_ptr().add((side * KEYS + c) * ROWS)) };
            unsafe { _mm512_store_ps(st.0.as_mut_ptr().add(c * ROWS), _mm512_mul_ps(o, inv)) };
        }
        for r in 0..rows {
            for c in 0..KEYS {
                rows_out.0[r * KEYS + c] = st.0[c * ROWS + r];
            }
        }
        for r in 0..rows {
            // SAFETY: row r0 + r, this head's columns: this task's alone.
            unsafe {
                let dst = out
                    .get()
                    .add((r0 + r) * width + head * HEAD_DIM + side * KEYS);
                let src = rows_out.0.as_ptr().add(r * KEYS);
                let lo = _mm512_load_ps(src);
                let hi = _mm512_load_ps(src.add(16));
                let both: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
                _mm512_storeu_si512(dst as *mut __m512i, both);
            }
        }
    }
}

/// Stores the (P·V)ᵀ sums of tiles 0–3 into `op` (`[64 d][16 rows]` f32, a quarter of d per
/// tile).
///
/// # Safety
/// The tiles are configured; `op` holds `HEAD_DIM * ROWS` f32.
#[inline(always)]
unsafe fn store_sums(op: *mut f32) {
    unsafe {
        asm!(
            "tilestored [{o0} + {s64}*1], tmm0",
            "tilestored [{o1} + {s64}*1], tmm1",
            "tilestored [{o2} + {s64}*1], tmm2",
            "tilestored [{o3} + {s64}*1], tmm3",
            o0 = in(reg) op,
            o1 = in(reg) op.add(256),
            o2 = in(reg) op.add(512),
            o3 = in(reg) op.add(768),
            s64 = in(reg) 64usize,
            options(nostack)
        );
    }
}

#[repr(C, align(64))]
struct Pairs<const N: usize>([u32; N]);
#[repr(C, align(64))]
struct Scores([f32; KEYS * ROWS]);
#[repr(C, align(64))]
struct Part([f32; HEAD_DIM * ROWS]);

/// e^x for 16 lanes: the polynomial of [`super::vector::exp`], scaled by 2^n with `vscalefps`.
#[inline]
#[target_feature(enable = "avx512f")]
pub(super) fn exp16(x: __m512) -> __m512 {
    let x = _mm512_min_ps(
        _mm512_max_ps(x, _mm512_set1_ps(-87.0)),
        _mm512_set1_ps(88.0),
    );
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
        _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
    );
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_145_75), x);
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428_606_8e-6), r);
    let mut p = _mm512_set1_ps(1.0 / 720.0);
    for c in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
    }
    _mm512_scalef_ps(p, n)
}
