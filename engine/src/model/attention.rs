//! Attention over paged KV: single-token chunks (decodes) are batched into one
//! `scaled_dot_product_attention` call over their padded block tables with a length mask;
//! longer chunks (prefills) run one call each with a causal mask offset by their context.

use tch::{Device, Kind, Tensor};

use super::cpu::CpuKernels;
use super::SeqChunk;

/// Longest prefill chunk whose attention runs in f32 when the model is bf16 on a CPU without
/// AMX.
const F32_SDPA_MAX: i64 = 1024;

/// With AMX, libtorch's bf16 flash SDPA is the faster one: served 512-token prefill steps took
/// 150 ms with it against 230–270 ms upcast to f32 (Xeon with amx_bf16, 2026-12-06).
fn f32_sdpa_max() -> i64 {
    static MAX: std::sync::OnceLock<i64> = std::sync::OnceLock::new();
    *MAX.get_or_init(|| {
        if super::cpu::Isa::amx_bf16() {
            0
        } else {
            F32_SDPA_MAX
        }
    })
}

/// Index tensors for one step, built once and shared by every layer.
pub struct AttentionPlan {
    block_size: i64,
    /// Decode group: `[B * max_blocks]` block ids and a `[B, 1, 1, max_blocks * bs]` mask.
    decode: Option<(i64, i64, Tensor, Tensor)>,
    /// The decode mask as an additive bias (0 / -inf) in the compute kind, for the
    /// non-SDPA path.
    decode_bias: Option<Tensor>,
    /// Prefill chunks in flat-token order: (first flat row, len, context, block ids, mask).
    prefills: Vec<PrefillPlan>,
    /// K slot (flat row into `[num_blocks * 2 * bs]`) of every new token; V is `+ block_size`.
    pub k_slots: Tensor,
    /// The same K slots, for the CPU kernels' cache write.
    pub k_slot_list: Vec<i64>,
    pub v_slots: Tensor,
}

struct PrefillPlan {
    start: i64,
    len: i64,
    context: i64,
    blocks: Tensor,
    /// The same block ids, for the CPU kernels' attention.
    table: Vec<u32>,
    mask: Option<Tensor>,
}

impl AttentionPlan {
    /// `chunks` must list single-token chunks first (the flat token order).
    pub fn new(chunks: &[&SeqChunk<'_>], block_size: usize, kind: Kind, device: Device) -> Self {
        let bs = block_size as i64;
        let mut slots = Vec::new();
        for c in chunks {
            for p in c.context_len..c.context_len + c.tokens.len() {
                let block = c.block_table[p / block_size] as i64;
                slots.push(block * 2 * bs + (p % block_size) as i64);
            }
        }
        let k_slots = Tensor::from_slice(&slots).to_device(device);
        let v_slots = &k_slots + bs;

        let n_decode = chunks.iter().take_while(|c| c.tokens.len() == 1).count();
        let decode = (n_decode > 0).then(|| {
            let lens: Vec<usize> = chunks[..n_decode]
                .iter()
                .map(|c| c.context_len + 1)
                .collect();
            let max_blocks = lens
                .iter()
                .map(|l| l.div_ceil(block_size))
                .max()
                .unwrap_or(1);
            let mut table = Vec::with_capacity(n_decode * max_blocks);
            let mut mask = Vec::with_capacity(n_decode * max_blocks * block_size);
            for (c, len) in chunks[..n_decode].iter().zip(&lens) {
                let used = len.div_ceil(block_size);
                table.extend(c.block_table[..used].iter().map(|&b| b as i64));
                // Padding points at block 0; the mask keeps it out of the softmax.
                table.extend(std::iter::repeat_n(0i64, max_blocks - used));
                mask.extend((0..max_blocks * block_size).map(|j| j < *len));
            }
            let b = n_decode as i64;
            let l = (max_blocks * block_size) as i64;
            let mask = Tensor::from_slice(&mask)
                .reshape([b, 1, 1, l])
                .to_device(device);
            let table = Tensor::from_slice(&table).to_device(device);
            (b, max_blocks as i64, table, mask)
        });

        let decode_bias = decode
            .as_ref()
            .filter(|_| kind != Kind::Float)
            .map(|(_, _, _, mask)| {
                Tensor::zeros(mask.size(), (kind, device))
                    .masked_fill(&mask.logical_not(), f64::NEG_INFINITY)
            });

        let mut prefills = Vec::new();
        let mut start = n_decode as i64;
        for c in &chunks[n_decode..] {
            let len = c.tokens.len() as i64;
            let context = c.context_len as i64;
            let total = context + len;
            let used = (total as usize).div_ceil(block_size);
            let table = c.block_table[..used].to_vec();
            let blocks: Vec<i64> = table.iter().map(|&b| b as i64).collect();
            // Query i (absolute position context+i) sees keys 0..=context+i.
            let mask = (context > 0).then(|| {
                let q = Tensor::arange(len, (Kind::Int64, device)).unsqueeze(1) + context;
                let k = Tensor::arange(total, (Kind::Int64, device)).unsqueeze(0);
                k.le_tensor(&q)
            });
            prefills.push(PrefillPlan {
                start,
                len,
                context,
                blocks: Tensor::from_slice(&blocks).to_device(device),
                table,
                mask,
            });
            start += len;
        }
        AttentionPlan {
            block_size: bs,
            decode,
            decode_bias,
            prefills,
            k_slots,
            v_slots,
            k_slot_list: slots,
        }
    }

    /// `q`: `[T, heads, d]`; `k`, `v`: this step's `[T, kv_heads, d]` (already in `cache`);
    /// `cache`: the layer's `[num_blocks, 2, bs, kv_heads, d]`. Returns `[T, heads * d]`.
    /// Prompt chunks attend on `kernels`' AMX tiles where it takes them
    /// ([`CpuKernels::prefill_attention`]), else through libtorch's SDPA.
    pub fn attend(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        cache: &Tensor,
        kernels: Option<&CpuKernels>,
    ) -> Tensor {
        let (kvh, d) = (cache.size()[3], cache.size()[4]);
        let heads = q.size()[1];
        let mut outs = Vec::with_capacity(1 + self.prefills.len());
        if let Some((b, max_blocks, table, mask)) = &self.decode {
            let l = max_blocks * self.block_size;
            // One copy lays out K and V as [B, 2, kv_heads, L, d]; both are views of it.
            let kv = cache
                .index_select(0, table)
                .view([*b, *max_blocks, 2, self.block_size, kvh, d])
                .permute([0, 2, 4, 1, 3, 5])
                .reshape([*b, 2, kvh, l, d]);
            let keys = kv.select(1, 0);
            let values = kv.select(1, 1);
            let qd = q.narrow(0, 0, *b);
            let o = if q.kind() == Kind::Float {
                Tensor::scaled_dot_product_attention(
                    &qd.unsqueeze(2),
                    &keys,
                    &values,
                    Some(mask),
                    0.0,
                    false,
                    None,
                    true,
                )
            } else {
                // libtorch's CPU SDPA is ~10x slower in bf16 than this for one query token:
                // query heads grouped per KV head make it one small batched matmul each way.
                let g = heads / kvh;
                let qg = qd.view([*b, kvh, g, d]) * (1.0 / (d as f64).sqrt());
                let bias = self.decode_bias.as_ref().expect("built for non-f32 kinds");
                let scores = qg.matmul(&keys.transpose(2, 3)) + bias;
                let probs = scores.softmax(-1, Kind::Float).to_kind(q.kind());
                probs.matmul(&values)
            };
            outs.push(o.reshape([*b, heads * d]));
        }
        for p in &self.prefills {
            let qc = q.narrow(0, p.start, p.len);
            let tiles =
                kernels.and_then(|k| k.prefill_attention(&qc, cache, &p.table, p.context as usize));
            if let Some(o) = tiles {
                outs.push(o.to_kind(q.kind()));
                continue;
            }
            // Without AMX, libtorch's bf16 flash SDPA on CPU is up to 1.8× slower than its f32
            // one below ~1 000 queries (AMD EPYC with avx512_bf16, 2026-12-03: 569 against
            // 311 µs at 128, 5.9 against 4.1 ms at 512), so short chunks attend in f32 there.
            let up = |t: Tensor| {
                if p.len <= f32_sdpa_max() && t.kind() == Kind::BFloat16 {
                    t.to_kind(Kind::Float)
                } else {
                    t
                }
            };
            let qp = up(q.narrow(0, p.start, p.len).transpose(0, 1).unsqueeze(0));
            let o = if p.context == 0 {
                // Nothing cached before the chunk: attend to this step's K/V directly.
                let kp = up(k.narrow(0, p.start, p.len).transpose(0, 1).unsqueeze(0));
                let vp = up(v.narrow(0, p.start, p.len).transpose(0, 1).unsqueeze(0));
                Tensor::scaled_dot_product_attention(
                    &qp,
                    &kp,
                    &vp,
                    None::<Tensor>,
                    0.0,
                    true,
                    None,
                    true,
                )
            } else {
                let total = p.context + p.len;
                let kv = cache.index_select(0, &p.blocks);
                let nb = kv.size()[0];
                let keys = up(kv
                    .select(1, 0)
                    .reshape([nb * self.block_size, kvh, d])
                    .narrow(0, 0, total)
                    .transpose(0, 1)
                    .unsqueeze(0));
                let values = up(kv
                    .select(1, 1)
                    .reshape([nb * self.block_size, kvh, d])
                    .narrow(0, 0, total)
                    .transpose(0, 1)
                    .unsqueeze(0));
                Tensor::scaled_dot_product_attention(
                    &qp,
                    &keys,
                    &values,
                    p.mask.as_ref(),
                    0.0,
                    false,
                    None,
                    true,
                )
            };
            let o = o.squeeze_dim(0).transpose(0, 1).reshape([p.len, heads * d]);
            outs.push(o.to_kind(q.kind()));
        }
        if outs.len() == 1 {
            outs.pop().expect("one output")
        } else {
            Tensor::cat(&outs, 0)
        }
    }
}
