//! Decode attention straight off the paged cache: each query token reads its sequence's K/V
//! rows where the block table says they are, with an online softmax, so nothing is gathered
//! or re-laid out. Work is cut into (sequence, run of blocks) pieces — a long context
//! is split across threads even at batch 1 — whose partial softmax states are merged after.

use super::isa::Isa;
use super::team::{SyncPtr, Team};
use super::vector::{self, dot, exp, Elem};

/// Most blocks one piece covers (1 024 positions at 128-token blocks).
const MAX_PIECE_BLOCKS: usize = 8;

/// One layer's cache: `[num_blocks, 2, block_size, kv_heads, head_dim]`, K then V per block.
#[derive(Clone, Copy)]
pub struct CacheLayer<E> {
    pub ptr: SyncPtr<E>,
    pub block_size: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

impl<E: Elem> CacheLayer<E> {
    /// Start of the K (`which` = 0) or V (1) row of `pos` (within `block`) for `head`.
    fn row(&self, block: u32, which: usize, pos: usize, head: usize) -> *mut E {
        let row = (block as usize * 2 + which) * self.block_size + pos;
        let off = (row * self.kv_heads + head) * self.head_dim;
        // SAFETY: callers pass block ids from the block table and pos < block_size.
        unsafe { self.ptr.get().add(off) }
    }

    /// Writes one position's K and V (`[kv_heads * head_dim]` each).
    pub fn write(&self, block: u32, pos: usize, k: &[f32], v: &[f32]) {
        let w = self.kv_heads * self.head_dim;
        // SAFETY: one row of `w` elements inside the block; the step owns the cache.
        let (kd, vd) = unsafe {
            (
                std::slice::from_raw_parts_mut(self.row(block, 0, pos, 0), w),
                std::slice::from_raw_parts_mut(self.row(block, 1, pos, 0), w),
            )
        };
        for (d, &s) in kd.iter_mut().zip(k) {
            *d = E::from_f32(s);
        }
        for (d, &s) in vd.iter_mut().zip(v) {
            *d = E::from_f32(s);
        }
    }
}

/// One decoding sequence: its block table and how many positions it attends to (the new one
/// included, already written).
pub struct Query<'a> {
    pub table: &'a [u32],
    pub len: usize,
}

struct Piece {
    seq: usize,
    blocks: (usize, usize),
}

/// `out[b] = softmax(q[b] Kᵀ / √d) V` per query head. `q` holds `heads * d` per sequence, rows
/// `ldq` apart; `out` is `[B][heads * d]`.
#[allow(clippy::too_many_arguments)]
pub fn decode<E: Elem>(
    team: &Team,
    isa: Isa,
    q: &[f32],
    ldq: usize,
    heads: usize,
    seqs: &[Query<'_>],
    cache: CacheLayer<E>,
    out: &mut [f32],
) {
    let (d, bs) = (cache.head_dim, cache.block_size);
    // A piece reads every KV head of its positions, so it walks its blocks' memory in order.
    // Enough pieces for every thread, even for one long sequence; not so many that merging
    // them costs more than it spreads.
    let total: usize = seqs.iter().map(|s| s.len.div_ceil(bs)).sum();
    let per_piece = (total / (4 * team.threads())).clamp(1, MAX_PIECE_BLOCKS);
    let mut pieces = Vec::new();
    for (b, s) in seqs.iter().enumerate() {
        let nb = s.len.div_ceil(bs);
        let mut b0 = 0;
        while b0 < nb {
            let b1 = (b0 + per_piece).min(nb);
            pieces.push(Piece {
                seq: b,
                blocks: (b0, b1),
            });
            b0 = b1;
        }
    }
    // Per piece and query head: running max, running sum, then the d accumulators.
    let state = heads * (2 + d);
    let mut partial = vec![0f32; pieces.len() * state];
    let pp = SyncPtr(partial.as_mut_ptr());
    team.each(pieces.len(), |i| {
        let p = &pieces[i];
        let qs = &q[p.seq * ldq..][..heads * d];
        // SAFETY: each piece writes its own `state` floats.
        let st = unsafe { std::slice::from_raw_parts_mut(pp.get().add(i * state), state) };
        piece(isa, qs, heads, &seqs[p.seq], p.blocks, &cache, st);
    });
    // Merge the pieces of each sequence; they are consecutive in `pieces`.
    let mut i = 0;
    while i < pieces.len() {
        let b = pieces[i].seq;
        let mut j = i;
        while j < pieces.len() && pieces[j].seq == b {
            j += 1;
        }
        for h in 0..heads {
            let m = (i..j)
                .map(|k| partial[k * state + h])
                .fold(f32::NEG_INFINITY, f32::max);
            let o = &mut out[(b * heads + h) * d..][..d];
            o.fill(0.0);
            let mut l = 0.0;
            for k in i..j {
                let st = &partial[k * state..(k + 1) * state];
                let c = exp(st[h] - m);
                l += st[heads + h] * c;
                for (o, &a) in o.iter_mut().zip(&st[2 * heads + h * d..][..d]) {
                    *o += a * c;
                }
            }
            let inv = 1.0 / l;
            o.iter_mut().for_each(|v| *v *= inv);
        }
        i = j;
    }
}

/// Runs one piece: `q` is the sequence's `heads * d` queries, `st` its state (see `decode`).
fn piece<E: Elem>(
    isa: Isa,
    q: &[f32],
    heads: usize,
    s: &Query<'_>,
    blocks: (usize, usize),
    cache: &CacheLayer<E>,
    st: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2<E: Elem>(
            q: &[f32],
            heads: usize,
            s: &Query<'_>,
            blocks: (usize, usize),
            cache: &CacheLayer<E>,
            st: &mut [f32],
        ) {
            piece_body(q, heads, s, blocks, cache, st)
        }
        // SAFETY: the variant was detected on this CPU.
        match isa {
            Isa::Amx | Isa::Avx512Bf16 | Isa::Avx512 if cache.head_dim.is_multiple_of(16) => {
                return unsafe { avx512::piece(q, heads, s, blocks, cache, st) };
            }
            Isa::Amx | Isa::Avx512Bf16 | Isa::Avx512 | Isa::Avx2 => {
                return unsafe { avx2(q, heads, s, blocks, cache, st) };
            }
            Isa::Generic => {}
        }
    }
    let _ = isa;
    piece_body(q, heads, s, blocks, cache, st)
}

#[inline(always)]
fn piece_body<E: Elem>(
    q: &[f32],
    heads: usize,
    s: &Query<'_>,
    blocks: (usize, usize),
    cache: &CacheLayer<E>,
    st: &mut [f32],
) {
    let (d, bs, kvh) = (cache.head_dim, cache.block_size, cache.kv_heads);
    let g = heads / kvh;
    let row_stride = kvh * d;
    let scale = 1.0 / (d as f32).sqrt();
    let (ms, ls, acc) = fresh_state(st, heads);
    let mut scores = vec![0f32; heads * bs];
    for blk in blocks.0..blocks.1 {
        let n = bs.min(s.len - blk * bs);
        let block = s.table[blk];
        // SAFETY: n ≤ block_size rows of this block, `row_stride` apart.
        let (kb, vb) = unsafe {
            (
                std::slice::from_raw_parts(cache.row(block, 0, 0, 0), n * row_stride),
                std::slice::from_raw_parts(cache.row(block, 1, 0, 0), n * row_stride),
            )
        };
        for j in 0..n {
            for h in 0..heads {
                let k = &kb[j * row_stride + (h / g) * d..][..d];
                scores[h * bs + j] = dot(&q[h * d..(h + 1) * d], k) * scale;
            }
        }
        softmax_step(&mut scores, bs, n, d, ms, ls, acc);
        for j in 0..n {
            for h in 0..heads {
                let v = &vb[j * row_stride + (h / g) * d..][..d];
                let p = scores[h * bs + j];
                for (a, &x) in acc[h * d..(h + 1) * d].iter_mut().zip(v) {
                    *a += p * x.to_f32();
                }
            }
        }
    }
}

/// A piece's state (see `decode`) split into running maxima, running sums and accumulators,
/// set to "nothing seen yet".
#[inline(always)]
fn fresh_state(st: &mut [f32], heads: usize) -> (&mut [f32], &mut [f32], &mut [f32]) {
    let (ms, rest) = st.split_at_mut(heads);
    let (ls, acc) = rest.split_at_mut(heads);
    ms.fill(f32::NEG_INFINITY);
    ls.fill(0.0);
    acc.fill(0.0);
    (ms, ls, acc)
}

/// Turns one block's scores (`[heads][bs]`, `n` used) into weights against the running max,
/// rescaling the running sums and accumulators to it.
#[inline(always)]
fn softmax_step(
    scores: &mut [f32],
    bs: usize,
    n: usize,
    d: usize,
    ms: &mut [f32],
    ls: &mut [f32],
    acc: &mut [f32],
) {
    for h in 0..ms.len() {
        let sc = &mut scores[h * bs..h * bs + n];
        let m_new = vector::max(sc, ms[h]);
        let corr = exp(ms[h] - m_new);
        ms[h] = m_new;
        sc.iter_mut().for_each(|v| *v = exp(*v - m_new));
        ls[h] = ls[h] * corr + vector::sum(sc);
        acc[h * d..(h + 1) * d].iter_mut().for_each(|a| *a *= corr);
    }
}

/// The same piece with AVX-512 intrinsics: LLVM's own vectorization of the portable loops
/// came out 4 lanes wide, without FMA.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::super::vector::Elem;
    use super::{CacheLayer, Query};

    /// 16 elements at `p` as f32.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,fma")]
    unsafe fn load<E: Elem>(p: *const E) -> __m512 {
        unsafe {
            if E::BF16 {
                let h = _mm256_loadu_si256(p as *const __m256i);
                _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))
            } else {
                _mm512_loadu_ps(p as *const f32)
            }
        }
    }

    /// Asks for the cache lines of `d` elements at `p` (an address past the cache is fine:
    /// prefetches do not fault).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,fma")]
    fn prefetch<E: Elem>(p: *const E, d: usize) {
        let bytes = d * std::mem::size_of::<E>();
        for off in (0..bytes).step_by(64) {
            _mm_prefetch::<_MM_HINT_T0>((p as *const i8).wrapping_add(off));
        }
    }

    /// Lane j of the result is the sum of `v[j]`'s lanes: 16 dot products finished at once
    /// (a transpose-and-add tree, not 16 separate horizontal reductions).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,fma")]
    fn sum16(v: &[__m512; 16]) -> __m512 {
        let mut t = [_mm512_setzero_ps(); 8];
        for i in 0..8 {
            let (a, b) = (v[2 * i], v[2 * i + 1]);
            t[i] = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
        }
        let mut u = [_mm512_setzero_ps(); 4];
        for k in 0..4 {
            let (c, d) = (_mm512_castps_pd(t[2 * k]), _mm512_castps_pd(t[2 * k + 1]));
            u[k] = _mm512_add_ps(
                _mm512_castpd_ps(_mm512_unpacklo_pd(c, d)),
                _mm512_castpd_ps(_mm512_unpackhi_pd(c, d)),
            );
        }
        let w01 = _mm512_add_ps(
            _mm512_shuffle_f32x4::<0x88>(u[0], u[1]),
            _mm512_shuffle_f32x4::<0xDD>(u[0], u[1]),
        );
        let w23 = _mm512_add_ps(
            _mm512_shuffle_f32x4::<0x88>(u[2], u[3]),
            _mm512_shuffle_f32x4::<0xDD>(u[2], u[3]),
        );
        _mm512_add_ps(
            _mm512_shuffle_f32x4::<0x88>(w01, w23),
            _mm512_shuffle_f32x4::<0xDD>(w01, w23),
        )
    }

    /// `head_dim` must be a multiple of 16.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,fma")]
    pub unsafe fn piece<E: Elem>(
        q: &[f32],
        heads: usize,
        s: &Query<'_>,
        blocks: (usize, usize),
        cache: &CacheLayer<E>,
        st: &mut [f32],
    ) {
        let g = heads / cache.kv_heads;
        // The accumulators of one KV head's query heads in registers where they fit.
        unsafe {
            match (g, cache.head_dim / 16) {
                (1, 4) => piece_g::<E, 1, 4>(q, heads, s, blocks, cache, st),
                (2, 4) => piece_g::<E, 2, 4>(q, heads, s, blocks, cache, st),
                (3, 4) => piece_g::<E, 3, 4>(q, heads, s, blocks, cache, st),
                (4, 4) => piece_g::<E, 4, 4>(q, heads, s, blocks, cache, st),
                (1, 8) => piece_g::<E, 1, 8>(q, heads, s, blocks, cache, st),
                (2, 8) => piece_g::<E, 2, 8>(q, heads, s, blocks, cache, st),
                (3, 2) => piece_g::<E, 3, 2>(q, heads, s, blocks, cache, st),
                _ => piece_any(q, heads, s, blocks, cache, st),
            }
        }
    }

    /// Scores of query head `h` against positions `j0..j0 + 16` of a block at `kb`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,fma")]
    unsafe fn scores16<E: Elem>(
        qh: *const f32,
        kb: *const E,
        j0: usize,
        row_stride: usize,
        d: usize,
        scale: f32,
        out: *mut f32,
    ) {
        let mut acc = [_mm512_setzero_ps(); 16];
        // The next 16 keys' rows, ahead of their use: rows are `row_stride` apart (every KV
        // head's), and the loads of this head's part otherwise wait on memory.
        for j in 16..32 {
            prefetch(kb.wrapping_add((j0 + j) * row_stride), d);
        }
        for (j, a) in acc.iter_mut().enumerate() {
            let k = unsafe { kb.add((j0 + j) * row_stride) };
            for c in (0..d).step_by(16) {
                unsafe {
                    *a = _mm512_fmadd_ps(_mm512_loadu_ps(qh.add(c)), load(k.add(c)), *a);
                }
            }
        }
        let r = _mm512_mul_ps(sum16(&acc), _mm512_set1_ps(scale));
        unsafe { _mm512_storeu_ps(out, r) };
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,fma")]
    unsafe fn piece_g<E: Elem, const G: usize, const DC: usize>(
        q: &[f32],
        heads: usize,
        s: &Query<'_>,
        blocks: (usize, usize),
        cache: &CacheLayer<E>,
        st: &mut [f32],
    ) {
        let (d, bs, kvh) = (cache.head_dim, cache.block_size, cache.kv_heads);
        let row_stride = kvh * d;
        let scale = 1.0 / (d as f32).sqrt();
        let (ms, ls, acc) = super::fresh_state(st, heads);
        let mut scores = vec![0f32; heads * bs];
        for blk in blocks.0..blocks.1 {
            let n = bs.min(s.len - blk * bs);
            let block = s.table[blk];
            for kh in 0..kvh {
                let kb = cache.row(block, 0, 0, kh);
                for gi in 0..G {
                    let h = kh * G + gi;
                    let qh = unsafe { q.as_ptr().add(h * d) };
                    let mut j = 0;
                    while j + 16 <= n {
                        unsafe {
                            scores16(
                                qh,
                                kb,
                                j,
                                row_stride,
                                d,
                                scale,
                                scores.as_mut_ptr().add(h * bs + j),
                            )
                        };
                        j += 16;
                    }
                    for j in j..n {
                        let k = unsafe { kb.add(j * row_stride) };
                        let mut a = _mm512_setzero_ps();
                        for c in 0..DC {
                            unsafe {
                                a = _mm512_fmadd_ps(
                                    _mm512_loadu_ps(qh.add(16 * c)),
                                    load(k.add(16 * c)),
                                    a,
                                );
                            }
                        }
                        scores[h * bs + j] = _mm512_reduce_add_ps(a) * scale;
                    }
                }
            }
            super::softmax_step(&mut scores, bs, n, d, ms, ls, acc);
            for kh in 0..kvh {
                let vb = cache.row(block, 1, 0, kh);
                let mut r = [[_mm512_setzero_ps(); DC]; G];
                for (gi, rg) in r.iter_mut().enumerate() {
                    for (c, rc) in rg.iter_mut().enumerate() {
                        *rc = unsafe {
                            _mm512_loadu_ps(acc.as_ptr().add((kh * G + gi) * d + 16 * c))
                        };
                    }
                }
                for j in 0..n {
                    prefetch(vb.wrapping_add((j + 16) * row_stride), d);
                    let v = unsafe { vb.add(j * row_stride) };
                    let mut x = [_mm512_setzero_ps(); DC];
                    for (c, xc) in x.iter_mut().enumerate() {
                        *xc = unsafe { load(v.add(16 * c)) };
                    }
                    for (gi, rg) in r.iter_mut().enumerate() {
                        let p = _mm512_set1_ps(scores[(kh * G + gi) * bs + j]);
                        for (rc, &xc) in rg.iter_mut().zip(&x) {
                            *rc = _mm512_fmadd_ps(p, xc, *rc);
                        }
                    }
                }
                for (gi, rg) in r.iter().enumerate() {
                    for (c, &rc) in rg.iter().enumerate() {
                        unsafe {
                            _mm512_storeu_ps(acc.as_mut_ptr().add((kh * G + gi) * d + 16 * c), rc)
                        };
                    }
                }
            }
        }
    }

    /// Any GQA group and head size (a multiple of 16), accumulators in memory.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,fma")]
    unsafe fn piece_any<E: Elem>(
        q: &[f32],
        heads: usize,
        s: &Query<'_>,
        blocks: (usize, usize),
        cache: &CacheLayer<E>,
        st: &mut [f32],
    ) {
        let (d, bs, kvh) = (cache.head_dim, cache.block_size, cache.kv_heads);
        let g = heads / kvh;
        let row_stride = kvh * d;
        let scale = 1.0 / (d as f32).sqrt();
        let (ms, ls, acc) = super::fresh_state(st, heads);
        let mut scores = vec![0f32; heads * bs];
        for blk in blocks.0..blocks.1 {
            let n = bs.min(s.len - blk * bs);
            let block = s.table[blk];
            let (kb, vb) = (cache.row(block, 0, 0, 0), cache.row(block, 1, 0, 0));
            for j in 0..n {
                for h in 0..heads {
                    // SAFETY: row j of this block, head h / g: d elements inside the cache.
                    let k = unsafe { kb.add(j * row_stride + (h / g) * d) };
                    let mut a = _mm512_setzero_ps();
                    for c in (0..d).step_by(16) {
                        unsafe {
                            let qv = _mm512_loadu_ps(q.as_ptr().add(h * d + c));
                            a = _mm512_fmadd_ps(qv, load(k.add(c)), a);
                        }
                    }
                    scores[h * bs + j] = _mm512_reduce_add_ps(a) * scale;
                }
            }
            super::softmax_step(&mut scores, bs, n, d, ms, ls, acc);
            for j in 0..n {
                for h in 0..heads {
                    let v = unsafe { vb.add(j * row_stride + (h / g) * d) };
                    let pv = _mm512_set1_ps(scores[h * bs + j]);
                    for c in (0..d).step_by(16) {
                        unsafe {
                            let p = acc.as_mut_ptr().add(h * d + c);
                            let x = load(v.add(c));
                            _mm512_storeu_ps(p, _mm512_fmadd_ps(pv, x, _mm512_loadu_ps(p)));
                        }
                    }
                }
            }
        }
    }
}
