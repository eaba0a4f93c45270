//! Decode steps on CPU through hand-written kernels instead of libtorch ops. A decode step's
//! tensors are tiny (a few rows), so libtorch spends more time dispatching its ~30 ops per
//! layer, and forking its OpenMP team for each, than computing; and its decode attention has
//! to gather the block table into a padded copy. Here a step is one pass over weights repacked
//! for streaming ([`matmul`]), attention reads the paged cache in place ([`attention`]), and
//! the element-wise pieces are fused into the loops around them. Prefill chunks still run
//! through libtorch (its GEMMs win at hundreds of rows); [`super::Llama`] routes single-token
//! chunks here when the model is on CPU in bf16 or f32.

mod attention;
mod isa;
mod matmul;
mod team;
mod vector;

#[cfg(test)]
mod tests;

use half::bf16;
use tch::{Kind, Tensor};

use self::attention::{CacheLayer, Query};
pub use self::isa::Isa;
use self::matmul::PackedWeight;
use self::team::{SyncPtr, Team};
use self::vector::Elem;
use super::SeqChunk;
use crate::config::LlamaConfig;
use crate::kv_cache::KvCache;

/// Most rows one kernel step takes; bigger decode batches are cut into several.
pub const MAX_ROWS: usize = 64;

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
pub struct DecodeWeights {
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

impl DecodeWeights {
    /// `kind` must be bf16 or f32 (anything else keeps decode on libtorch).
    pub fn new(config: &LlamaConfig, kind: Kind, t: &ModelTensors<'_>) -> Option<DecodeWeights> {
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
        Some(DecodeWeights {
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

/// One engine thread's use of [`DecodeWeights`]: its thread team and instruction set.
pub struct DecodeKernels {
    team: Team,
    isa: Isa,
}

impl DecodeKernels {
    pub fn new(threads: usize, isa: Isa) -> DecodeKernels {
        DecodeKernels {
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

    /// Whether this step's chunks can run here: single tokens, positions the tables cover,
    /// a cache this layout describes.
    pub fn accepts(w: &DecodeWeights, chunks: &[&SeqChunk<'_>], cache: &KvCache) -> bool {
        cache.layer(0).kind() == w.kind
            && cache.layer(0).is_contiguous()
            && chunks
                .iter()
                .all(|c| c.tokens.len() == 1 && c.context_len < w.max_positions())
    }

    /// Runs the chunks (see [`DecodeKernels::accepts`]), writing their K/V into `cache`.
    /// Returns logits `[samples, vocab]`, one row per chunk with `sample`, in chunk order.
    pub fn forward(
        &self,
        w: &DecodeWeights,
        chunks: &[&SeqChunk<'_>],
        cache: &mut KvCache,
    ) -> Vec<f32> {
        let layers: Vec<usize> = (0..w.layers.len())
            .map(|i| cache.layer_mut(i).data_ptr() as usize)
            .collect();
        let bs = cache.block_size();
        let mut logits = Vec::new();
        for part in chunks.chunks(MAX_ROWS) {
            let out = self.team.run(|| match w.kind {
                Kind::BFloat16 => self.step::<u16>(w, part, &layers, bs),
                _ => self.step::<f32>(w, part, &layers, bs),
            });
            logits.extend(out);
        }
        logits
    }

    fn step<E: Elem>(
        &self,
        w: &DecodeWeights,
        chunks: &[&SeqChunk<'_>],
        layers: &[usize],
        bs: usize,
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
        let b = chunks.len();
        let nqkv = (heads + 2 * kvh) * d;
        let mut x = vec![0f32; b * hd];
        for (row, ch) in x.chunks_exact_mut(hd).zip(chunks) {
            let t = ch.tokens[0] as usize;
            match &w.embed {
                Embed::Bf16(e) => row
                    .iter_mut()
                    .zip(&e[t * hd..(t + 1) * hd])
                    .for_each(|(o, v)| *o = v.to_f32()),
                Embed::F32(e) => row.copy_from_slice(&e[t * hd..(t + 1) * hd]),
            }
        }
        let mut h = vec![0f32; b * hd];
        let mut qkv = vec![0f32; b * nqkv];
        let mut attn = vec![0f32; b * heads * d];
        let mut gu = vec![0f32; b * 2 * inter];
        let mut act = vec![0f32; b * inter];
        let mut xb = Vec::new();
        let queries: Vec<Query<'_>> = chunks
            .iter()
            .map(|ch| Query {
                table: ch.block_table,
                len: ch.context_len + 1,
            })
            .collect();
        for (lw, &base) in w.layers.iter().zip(layers) {
            let cache = CacheLayer {
                ptr: SyncPtr(base as *mut E),
                block_size: bs,
                kv_heads: kvh,
                head_dim: d,
            };
            for (xr, hr) in x.chunks_exact(hd).zip(h.chunks_exact_mut(hd)) {
                vector::rms_norm(xr, &lw.input_norm, c.rms_norm_eps, hr);
            }
            lw.qkv
                .matmul(team, isa, &h, b, hd, &mut qkv, nqkv, false, &mut xb);
            for (row, ch) in qkv.chunks_exact_mut(nqkv).zip(chunks) {
                let p = ch.context_len;
                let (cos, sin) = (&w.cos[p * d..(p + 1) * d], &w.sin[p * d..(p + 1) * d]);
                vector::rope(&mut row[..(heads + kvh) * d], d, cos, sin);
                let (k, v) = row[heads * d..].split_at(kvh * d);
                cache.write(ch.block_table[p / bs], p % bs, k, v);
            }
            attention::decode(team, isa, &qkv, nqkv, heads, &queries, cache, &mut attn);
            lw.o_proj
                .matmul(team, isa, &attn, b, heads * d, &mut x, hd, true, &mut xb);
            for (xr, hr) in x.chunks_exact(hd).zip(h.chunks_exact_mut(hd)) {
                vector::rms_norm(xr, &lw.post_norm, c.rms_norm_eps, hr);
            }
            lw.gate_up
                .matmul(team, isa, &h, b, hd, &mut gu, 2 * inter, false, &mut xb);
            for (g, a) in gu.chunks_exact(2 * inter).zip(act.chunks_exact_mut(inter)) {
                vector::silu_mul(&g[..inter], &g[inter..], a);
            }
            lw.down
                .matmul(team, isa, &act, b, inter, &mut x, hd, true, &mut xb);
        }
        let sampled: Vec<usize> = (0..b).filter(|&i| chunks[i].sample).collect();
        let mut hs = vec![0f32; sampled.len() * hd];
        for (hr, &i) in hs.chunks_exact_mut(hd).zip(&sampled) {
            vector::rms_norm(&x[i * hd..(i + 1) * hd], &w.final_norm, c.rms_norm_eps, hr);
        }
        let vocab = w.lm_head.n;
        let mut logits = vec![0f32; sampled.len() * vocab];
        if !sampled.is_empty() {
            w.lm_head.matmul(
                team,
                isa,
                &hs,
                sampled.len(),
                hd,
                &mut logits,
                vocab,
                false,
                &mut xb,
            );
        }
        logits
    }
}
