//! Forward steps on CPU through hand-written kernels instead of libtorch ops, where the model
//! is on CPU in bf16 or f32 ([`super::Llama`] routes every step here then). A decode step's
//! tensors are tiny (a few rows), so libtorch spends more time dispatching its ~30 ops per
//! layer, and forking its OpenMP team for each, than computing; its decode attention has to
//! gather the block table into a padded copy; and its bf16 matmul without AMX is ~2× slower
//! than [`matmul`] even at 512 rows. Where the CPU has AMX, [`matmul`] multiplies steps of
//! several rows on tiles ([`amx`]). Here a step is one pass over weights repacked for
//! streaming ([`matmul`]), decode attention reads the paged cache in place ([`attention`]),
//! and the element-wise pieces are fused into the loops around them. Prompt chunks over 64
//! tokens keep libtorch's GEMMs; in bf16 their element-wise pieces run fused here too
//! ([`rows`]), and where the CPU has AMX their attention runs on tiles ([`flash`]), else on
//! libtorch's SDPA over the chunk's blocks of the cache.

#[cfg(target_arch = "x86_64")]
mod amx;
mod attention;
mod buffer;
#[cfg(target_arch = "x86_64")]
mod flash;
mod isa;
mod matmul;
mod rows;
mod team;
mod vector;

#[cfg(test)]
mod tests;

use half::bf16;
use tch::{Kind, Tensor};

use self::attention::{CacheLayer, Query};
pub use self::isa::Isa;
use self::matmul::PackedWeight;
pub use self::rows::Norm;
use self::team::{SyncPtr, Team};
use self::vector::Elem;
use super::SeqChunk;
use crate::config::LlamaConfig;
use crate::kv_cache::KvCache;

struct LayerWeights {
    input_norm: Vec<f32>,
    qkv: PackedWeight,
    o_proj: PackedWeight,
    post_norm: Vec<f32>,
    gate_up: PackedWeight,
    down: PackedWeight,
}

/// The model's weights as the kernels read them (a second copy beside libtorch's, which
/// prefill uses), shared by every handle on the model.
pub struct KernelWeights {
    config: LlamaConfig,
    /// bf16 or f32: the kind of the KV cache and of the weights this was built from.
    kind: Kind,
    layers: Vec<LayerWeights>,
    final_norm: Vec<f32>,
    lm_head: PackedWeight,
    /// `[vocab, hidden]`, bf16 bits or f32 as the model's kind.
    embed: Embed,
    /// `[max_positions, head_dim]` each.
    cos: Vec<f32>,
    sin: Vec<f32>,
}

enum Embed {
    Bf16(Vec<bf16>),
    F32(Vec<f32>),
}

/// The model's dense tensors as `Llama` holds them.
pub struct ModelTensors<'a> {
    /// `[vocab, hidden]`.
    pub embed: &'a Tensor,
    pub layers: Vec<LayerTensors<'a>>,
    pub final_norm: &'a Tensor,
    /// `[vocab, hidden]`.
    pub lm_head: &'a Tensor,
    /// RoPE tables, `[max_positions, head_dim]` f32.
    pub cos: &'a Tensor,
    pub sin: &'a Tensor,
}

/// The dense pieces of one layer as `Llama` holds them (libtorch tensors, any layout).
pub struct LayerTensors<'a> {
    pub input_norm: &'a Tensor,
    /// `[out, in]` each.
    pub qkv: &'a Tensor,
    pub o_proj: &'a Tensor,
    pub post_norm: &'a Tensor,
    pub gate_up: &'a Tensor,
    pub down: &'a Tensor,
}

fn f32_vec(t: &Tensor) -> Vec<f32> {
    let t = t.to_kind(Kind::Float).contiguous().view(-1);
    Vec::<f32>::try_from(&t).expect("f32 tensor to vec")
}

/// tch's own conversion cannot be used: it maps `half::bf16` to libtorch's f16 kind.
fn bf16_vec(t: &Tensor) -> Vec<bf16> {
    let t = t.to_kind(Kind::BFloat16).contiguous().view(-1);
    let n = t.numel();
    let mut out = vec![bf16::ZERO; n];
    // SAFETY: `t` is a contiguous CPU tensor of `n` bf16 values, alive for the copy.
    let src = unsafe { std::slice::from_raw_parts(t.data_ptr() as *const bf16, n) };
    out.copy_from_slice(src);
    out
}

/// Packs an `[out, in]` weight for [`matmul`].
fn pack(w: &Tensor, kind: Kind) -> PackedWeight {
    let (n, k) = (w.size()[0] as usize, w.size()[1] as usize);
    if kind == Kind::BFloat16 {
        PackedWeight::from_bf16_in_out(&bf16_vec(&w.tr()), k, n)
    } else {
        PackedWeight::from_f32_out_in(&f32_vec(w), n, k)
    }
}

impl KernelWeights {
    /// `kind` must be bf16 or f32 (anything else keeps decode on libtorch).
    pub fn new(config: &LlamaConfig, kind: Kind, t: &ModelTensors<'_>) -> Option<KernelWeights> {
        if !matches!(kind, Kind::BFloat16 | Kind::Float) || !config.head_dim.is_multiple_of(2) {
            return None;
        }
        let (embed, final_norm, lm_head) = (t.embed, t.final_norm, t.lm_head);
        let layers = t
            .layers
            .iter()
            .map(|l| LayerWeights {
                input_norm: f32_vec(l.input_norm),
                qkv: pack(l.qkv, kind),
                o_proj: pack(l.o_proj, kind),
                post_norm: f32_vec(l.post_norm),
                gate_up: pack(l.gate_up, kind),
                down: pack(l.down, kind),
            })
            .collect();
        Some(KernelWeights {
            config: config.clone(),
            kind,
            layers,
            final_norm: f32_vec(final_norm),
            lm_head: pack(lm_head, kind),
            embed: if kind == Kind::BFloat16 {
                Embed::Bf16(bf16_vec(embed))
            } else {
                Embed::F32(f32_vec(embed))
            },
            cos: f32_vec(t.cos),
            sin: f32_vec(t.sin),
        })
    }

    pub fn bytes(&self) -> usize {
        let layers: usize = self
            .layers
            .iter()
            .map(|l| l.qkv.bytes() + l.o_proj.bytes() + l.gate_up.bytes() + l.down.bytes())
            .sum();
        let embed = match &self.embed {
            Embed::Bf16(e) => e.len() * 2,
            Embed::F32(e) => e.len() * 4,
        };
        layers + self.lm_head.bytes() + embed + (self.cos.len() + self.sin.len()) * 4
    }

    pub fn max_positions(&self) -> usize {
        self.cos.len() / self.config.head_dim
    }
}

/// One engine thread's use of [`KernelWeights`]: its thread team and instruction set.
pub struct CpuKernels {
    team: Team,
    isa: Isa,
}

impl CpuKernels {
    pub fn new(threads: usize, isa: Isa) -> CpuKernels {
        CpuKernels {
            team: Team::new(threads),
            isa,
        }
    }

    pub fn isa(&self) -> Isa {
        self.isa
    }

    pub fn threads(&self) -> usize {
        self.team.threads()
    }

    pub fn team_backing(&self) -> &'static str {
        self.team.backing()
    }

    /// Causal attention of one bf16 prompt chunk (`q`: `[len, heads, d]`, positions `context..`)
    /// over `cache` (the layer's `[blocks, 2, bs, kv_heads, d]`, this chunk's K/V written)
    /// through `table`, on AMX tiles ([`flash`]): `[len, heads * d]` bf16, or `None` where
    /// the CPU has no tiles or the shape is not the kernel's (head dim 64, bf16, on CPU).
    pub fn prefill_attention(
        &self,
        q: &Tensor,
        cache: &Tensor,
        table: &[u32],
        context: usize,
    ) -> Option<Tensor> {
        #[cfg(target_arch = "x86_64")]
        {
            let fits = self.isa == Isa::Amx
                && q.device() == tch::Device::Cpu
                && q.kind() == Kind::BFloat16
                && cache.kind() == Kind::BFloat16
                && cache.is_contiguous()
                && q.size()[2] as usize == flash::HEAD_DIM
                && cache.size()[4] as usize == flash::HEAD_DIM;
            if !fits {
                return None;
            }
            let q = q.contiguous();
            let (len, heads) = (q.size()[0] as usize, q.size()[1] as usize);
            let (bs, kvh) = (cache.size()[2] as usize, cache.size()[3] as usize);
            let width = heads * flash::HEAD_DIM;
            let out = Tensor::empty(
                [len as i64, width as i64],
                (Kind::BFloat16, tch::Device::Cpu),
            );
            // SAFETY: contiguous CPU bf16 tensors of these sizes, alive for the call; `out` is
            // written only through this slice.
            let (qs, os) = unsafe {
                (
                    std::slice::from_raw_parts(q.data_ptr() as *const u16, len * width),
                    std::slice::from_raw_parts_mut(out.data_ptr() as *mut u16, len * width),
                )
            };
            let kv = flash::PagedKv {
                ptr: SyncPtr(cache.data_ptr() as *mut u16),
                block_size: bs,
                kv_heads: kvh,
            };
            // SAFETY: Isa::Amx means the tiles were granted; the caller's table covers the
            // chunk's positions.
            unsafe { flash::prefill(&self.team, qs, heads, kv, table, context, len, os) };
            Some(out)
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (q, cache, table, context);
            None
        }
    }

    /// Whether this step's chunks can run here: positions the tables cover, a cache this
    /// layout describes.
    pub fn accepts(w: &KernelWeights, chunks: &[&SeqChunk<'_>], cache: &KvCache) -> bool {
        cache.layer(0).kind() == w.kind
            && cache.layer(0).is_contiguous()
            && chunks.iter().all(|c| {
                !c.tokens.is_empty() && c.context_len + c.tokens.len() <= w.max_positions()
            })
    }

    /// Runs the chunks (see [`CpuKernels::accepts`]), writing their K/V into `cache`.
    /// `chunks` must list single-token chunks first (their rows and queries are then
    /// contiguous). Returns logits `[samples, vocab]`, one row per chunk with `sample`, in
    /// chunk order. A step of single tokens runs wholly on the team; with prefill chunks,
    /// their attention runs as libtorch's SDPA on this thread between the team's halves of
    /// each layer (on a team thread it would start a second OpenMP team).
    pub fn forward(
        &self,
        w: &KernelWeights,
        chunks: &[&SeqChunk<'_>],
        cache: &mut KvCache,
    ) -> Vec<f32> {
        let n_dec = chunks.iter().take_while(|c| c.tokens.len() == 1).count();
        assert!(
            chunks[n_dec..].iter().all(|c| c.tokens.len() > 1),
            "single-token chunks come first"
        );
        let prefill = n_dec < chunks.len();
        let mut step = |prefill| match w.kind {
            Kind::BFloat16 => self.step::<u16>(w, chunks, n_dec, cache, prefill),
            _ => self.step::<f32>(w, chunks, n_dec, cache, prefill),
        };
        if prefill {
            step(true)
        } else {
            self.team.run(|| step(false))
        }
    }

    /// Inside the team already unless `prefill` (then each half-layer enters it).
    fn step<E: Elem>(
        &self,
        w: &KernelWeights,
        chunks: &[&SeqChunk<'_>],
        n_dec: usize,
        cache: &mut KvCache,
        prefill: bool,
    ) -> Vec<f32> {
        let c = &w.config;
        let (hd, heads, kvh, d, inter) = (
            c.hidden_size,
            c.num_attention_heads,
            c.num_key_value_heads,
            c.head_dim,
            c.intermediate_size,
        );
        let (team, isa) = (&self.team, self.isa);
        let run = |f: &mut (dyn FnMut() + Send)| {
            if prefill {
                team.run(f)
            } else {
                f()
            }
        };
        let bs = cache.block_size();
        let nqkv = (heads + 2 * kvh) * d;
        // Each row's token, position and block table.
        let mut rows: Vec<(u32, usize, &[u32])> = Vec::new();
        for ch in chunks {
            for (i, &t) in ch.tokens.iter().enumerate() {
                rows.push((t, ch.context_len + i, ch.block_table));
            }
        }
        let m = rows.len();
        let mut x = vec![0f32; m * hd];
        for (row, &(t, _, _)) in x.chunks_exact_mut(hd).zip(&rows) {
            let t = t as usize;
            match &w.embed {
                Embed::Bf16(e) => row
                    .iter_mut()
                    .zip(&e[t * hd..(t + 1) * hd])
                    .for_each(|(o, v)| *o = v.to_f32()),
                Embed::F32(e) => row.copy_from_slice(&e[t * hd..(t + 1) * hd]),
            }
        }
        let mut h = vec![0f32; m * hd];
        let mut qkv = vec![0f32; m * nqkv];
        let mut attn = vec![0f32; m * heads * d];
        let mut gu = vec![0f32; m * 2 * inter];
        let mut act = vec![0f32; m * inter];
        let mut xb = Vec::new();
        let queries: Vec<Query<'_>> = chunks[..n_dec]
            .iter()
            .map(|ch| Query {
                table: ch.block_table,
                len: ch.context_len + 1,
            })
            .collect();
        for (i, lw) in w.layers.iter().enumerate() {
            let layer_cache = CacheLayer {
                ptr: SyncPtr(cache.layer_mut(i).data_ptr() as *mut E),
                block_size: bs,
                kv_heads: kvh,
                head_dim: d,
            };
            run(&mut || {
                for (xr, hr) in x.chunks_exact(hd).zip(h.chunks_exact_mut(hd)) {
                    vector::rms_norm(xr, &lw.input_norm, c.rms_norm_eps, hr);
                }
                lw.qkv
                    .matmul(team, isa, &h, m, hd, &mut qkv, nqkv, false, &mut xb);
                for (row, &(_, p, table)) in qkv.chunks_exact_mut(nqkv).zip(&rows) {
                    let (cos, sin) = (&w.cos[p * d..(p + 1) * d], &w.sin[p * d..(p + 1) * d]);
                    vector::rope(&mut row[..(heads + kvh) * d], d, cos, sin);
                    let (k, v) = row[heads * d..].split_at(kvh * d);
                    layer_cache.write(table[p / bs], p % bs, k, v);
                }
                if n_dec > 0 {
                    let out = &mut attn[..n_dec * heads * d];
                    attention::decode(team, isa, &qkv, nqkv, heads, &queries, layer_cache, out);
                }
            });
            let mut start = n_dec;
            for ch in &chunks[n_dec..] {
                let len = ch.tokens.len();
                let q = &qkv[start * nqkv..(start + len) * nqkv];
                let out = &mut attn[start * heads * d..(start + len) * heads * d];
                prefill_attention(q, nqkv, heads, d, ch, cache.layer(i), bs, out);
                start += len;
            }
            run(&mut || {
                lw.o_proj
                    .matmul(team, isa, &attn, m, heads * d, &mut x, hd, true, &mut xb);
                for (xr, hr) in x.chunks_exact(hd).zip(h.chunks_exact_mut(hd)) {
                    vector::rms_norm(xr, &lw.post_norm, c.rms_norm_eps, hr);
                }
                lw.gate_up
                    .matmul(team, isa, &h, m, hd, &mut gu, 2 * inter, false, &mut xb);
                for (g, a) in gu.chunks_exact(2 * inter).zip(act.chunks_exact_mut(inter)) {
                    vector::silu_mul(&g[..inter], &g[inter..], a);
                }
                lw.down
                    .matmul(team, isa, &act, m, inter, &mut x, hd, true, &mut xb);
            });
        }
        // The last row of each sampling chunk.
        let mut last_rows = Vec::new();
        let mut end = 0;
        for ch in chunks {
            end += ch.tokens.len();
            if ch.sample {
                last_rows.push(end - 1);
            }
        }
        let mut hs = vec![0f32; last_rows.len() * hd];
        for (hr, &r) in hs.chunks_exact_mut(hd).zip(&last_rows) {
            vector::rms_norm(&x[r * hd..(r + 1) * hd], &w.final_norm, c.rms_norm_eps, hr);
        }
        let vocab = w.lm_head.n;
        let mut logits = vec![0f32; last_rows.len() * vocab];
        if !last_rows.is_empty() {
            let n = last_rows.len();
            run(&mut || {
                w.lm_head
                    .matmul(team, isa, &hs, n, hd, &mut logits, vocab, false, &mut xb)
            });
        }
        logits
    }
}

/// Causal attention of one short prompt chunk through libtorch's SDPA, in f32, over the chunk's context and itself read from `cache`, where this
/// step's K/V already are. `q`: the chunk's qkv rows, `ldq` apart; `out`: `[len][heads * d]`.
#[allow(clippy::too_many_arguments)]
fn prefill_attention(
    q: &[f32],
    ldq: usize,
    heads: usize,
    d: usize,
    ch: &SeqChunk<'_>,
    cache: &Tensor,
    bs: usize,
    out: &mut [f32],
) {
    let (len, context) = (ch.tokens.len(), ch.context_len);
    let total = context + len;
    let kvh = cache.size()[3];
    let qt = Tensor::from_slice(q)
        .view([len as i64, ldq as i64])
        .narrow(1, 0, (heads * d) as i64)
        .view([len as i64, heads as i64, d as i64])
        .transpose(0, 1)
        .unsqueeze(0);
    let blocks: Vec<i64> = ch.block_table[..total.div_ceil(bs)]
        .iter()
        .map(|&b| b as i64)
        .collect();
    let kv = cache.index_select(0, &Tensor::from_slice(&blocks));
    let nb = blocks.len() as i64;
    let side = |which: i64| {
        kv.select(1, which)
            .reshape([nb * bs as i64, kvh, d as i64])
            .narrow(0, 0, total as i64)
            .transpose(0, 1)
            .unsqueeze(0)
            // In f32, as the queries: libtorch's f32 SDPA is the faster for short chunks.
            .to_kind(Kind::Float)
    };
    let (keys, values) = (side(0), side(1));
    // Query i (absolute position context + i) sees keys 0..=context + i.
    let mask = (context > 0).then(|| {
        let qp = Tensor::arange(len as i64, (Kind::Int64, tch::Device::Cpu)).unsqueeze(1)
            + context as i64;
        Tensor::arange(total as i64, (Kind::Int64, tch::Device::Cpu))
            .unsqueeze(0)
            .le_tensor(&qp)
    });
    let o = Tensor::scaled_dot_product_attention(
        &qt,
        &keys,
        &values,
        mask.as_ref(),
        0.0,
        context == 0,
        None,
        true,
    );
    let o = o
        .squeeze_dim(0)
        .transpose(0, 1)
        .reshape([len as i64, (heads * d) as i64])
        .to_kind(Kind::Float)
        .contiguous();
    // SAFETY: `o` is a contiguous CPU f32 tensor of len * heads * d values.
    let src = unsafe { std::slice::from_raw_parts(o.data_ptr() as *const f32, len * heads * d) };
    out.copy_from_slice(src);
}
