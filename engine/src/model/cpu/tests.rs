//! Contract tests of the kernels, once per instruction set this CPU runs, against plain f64
//! arithmetic; then whole steps against the libtorch path.

use half::bf16;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::attention::{self, CacheLayer, Query};
use super::isa::Isa;
use super::matmul::PackedWeight;
use super::team::{SyncPtr, Team};
use super::vector::Elem;

fn randn(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

fn round_bf16(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| bf16::from_f32(x).to_f32()).collect()
}

#[test]
fn matmul_matches_f64_on_every_isa_shape_and_thread_count() {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let teams = [
        Team::new(1),
        Team::new(2),
        Team::with(3, false),
        Team::with(2, false),
    ];
    for isa in Isa::available_for("matmul_matches_f64_on_every_isa_shape_and_thread_count") {
        for &(m, k, n) in &[
            (1, 64, 32),
            (3, 577, 100),
            (9, 128, 33),
            (17, 31, 64),
            (8, 2, 1),
            // AMX tiles: a full tile of rows, two row blocks of 32 with a ragged third, K of
            // several tile blocks with a padded tail.
            (16, 64, 32),
            (70, 200, 50),
            (4, 33, 96),
        ] {
            let x = randn(&mut rng, m * k);
            let w_out_in = randn(&mut rng, n * k);
            let prior = randn(&mut rng, m * n);
            for bf in [false, true] {
                let packed = if bf {
                    let mut w_in_out = vec![bf16::ZERO; k * n];
                    for o in 0..n {
                        for i in 0..k {
                            w_in_out[i * n + o] = bf16::from_f32(w_out_in[o * k + i]);
                        }
                    }
                    PackedWeight::from_bf16_in_out(&w_in_out, k, n)
                } else {
                    PackedWeight::from_f32_out_in(&w_out_in, n, k)
                };
                // The dpbf16 kernel rounds x to bf16 as well; others multiply it in f32.
                let (xr, wr) = if bf {
                    let xr = if matches!(isa, Isa::Amx | Isa::Avx512Bf16) {
                        round_bf16(&x)
                    } else {
                        x.clone()
                    };
                    (xr, round_bf16(&w_out_in))
                } else {
                    (x.clone(), w_out_in.clone())
                };
                for team in &teams {
                    for accumulate in [false, true] {
                        let mut y = prior.clone();
                        let mut scratch = Vec::new();
                        team.run(|| {
                            packed.matmul(team, isa, &x, m, k, &mut y, n, accumulate, &mut scratch)
                        });
                        for r in 0..m {
                            for o in 0..n {
                                let mut want: f64 = (0..k)
                                    .map(|i| xr[r * k + i] as f64 * wr[o * k + i] as f64)
                                    .sum();
                                if accumulate {
                                    want += prior[r * n + o] as f64;
                                }
                                let got = y[r * n + o] as f64;
                                assert!(
                                    (got - want).abs() < 1e-4 * (k as f64).sqrt(),
                                    "{isa:?} bf16={bf} m={m} k={k} n={n} acc={accumulate} \
                                     threads={}: [{r},{o}] {got} vs {want}",
                                    team.threads()
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Softmax attention of one query head over `len` positions, in f64.
fn reference_head(q: &[f32], keys: &[Vec<f32>], values: &[Vec<f32>]) -> Vec<f64> {
    let d = q.len();
    let scale = 1.0 / (d as f64).sqrt();
    let s: Vec<f64> = keys
        .iter()
        .map(|k| {
            q.iter()
                .zip(k)
                .map(|(a, b)| *a as f64 * *b as f64)
                .sum::<f64>()
                * scale
        })
        .collect();
    let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let p: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
    let sum: f64 = p.iter().sum();
    (0..d)
        .map(|i| {
            p.iter()
                .zip(values)
                .map(|(p, v)| p * v[i] as f64)
                .sum::<f64>()
                / sum
        })
        .collect()
}

fn attention_case<E: Elem>(
    isa: Isa,
    team: &Team,
    rng: &mut ChaCha8Rng,
    shape: (usize, usize, usize),
) {
    let (kvh, d, heads) = shape;
    let (bs, num_blocks) = (16, 64);
    let g = heads / kvh;
    let mut cache = vec![E::from_f32(0.0); num_blocks * 2 * bs * kvh * d];
    let layer = CacheLayer {
        ptr: SyncPtr(cache.as_mut_ptr()),
        block_size: bs,
        kv_heads: kvh,
        head_dim: d,
    };
    // Lengths inside one block, at a block edge, and across several pieces.
    let lens = [1usize, 16, 17, 70, 200];
    let mut free: Vec<u32> = (0..num_blocks as u32).collect();
    let mut tables = Vec::new();
    let mut kv = Vec::new();
    for &len in &lens {
        let table: Vec<u32> = (0..len.div_ceil(bs))
            .map(|_| free.swap_remove(rng.random_range(0..free.len())))
            .collect();
        let mut rows = Vec::new();
        for p in 0..len {
            let (k, v) = (randn(rng, kvh * d), randn(rng, kvh * d));
            layer.write(table[p / bs], p % bs, &k, &v);
            // What the cache holds after rounding to its element type.
            let stored = |x: &[f32]| {
                x.iter()
                    .map(|&a| E::from_f32(a).to_f32())
                    .collect::<Vec<_>>()
            };
            rows.push((stored(&k), stored(&v)));
        }
        tables.push(table);
        kv.push(rows);
    }
    let ldq = heads * d + 5;
    let q = randn(rng, lens.len() * ldq);
    let queries: Vec<Query<'_>> = tables
        .iter()
        .zip(&lens)
        .map(|(t, &len)| Query { table: t, len })
        .collect();
    let mut out = vec![f32::NAN; lens.len() * heads * d];
    team.run(|| attention::decode(team, isa, &q, ldq, heads, &queries, layer, &mut out));
    for (b, rows) in kv.iter().enumerate() {
        for h in 0..heads {
            let kh = h / g;
            let keys: Vec<Vec<f32>> = rows
                .iter()
                .map(|(k, _)| k[kh * d..(kh + 1) * d].to_vec())
                .collect();
            let values: Vec<Vec<f32>> = rows
                .iter()
                .map(|(_, v)| v[kh * d..(kh + 1) * d].to_vec())
                .collect();
            let want = reference_head(&q[b * ldq + h * d..][..d], &keys, &values);
            for (i, w) in want.iter().enumerate() {
                let got = out[b * heads * d + h * d + i] as f64;
                assert!(
                    (got - w).abs() < 1e-5,
                    "{isa:?} seq {b} head {h}[{i}]: {got} vs {w}"
                );
            }
        }
    }
}

/// The AMX prefill attention ([`super::flash`]) against an f64 softmax: chunks with and without
/// cached context, lengths off the 16-row and 32-key blocks, GQA groups of 3, scattered blocks.
#[cfg(target_arch = "x86_64")]
#[test]
fn prefill_attention_on_tiles_matches_f64_softmax() {
    use super::flash::{self, PagedKv, HEAD_DIM};
    if !Isa::available().contains(&Isa::Amx) {
        eprintln!("no AMX on this CPU: the tile kernel is not run here");
        return;
    }
    let d = HEAD_DIM;
    let (kvh, heads, bs, num_blocks) = (2, 6, 16, 40);
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    for team in [Team::new(1), Team::new(2)] {
        // `loud`: keys from position 40 on are 16× larger, so later blocks raise rows' maxima
        // far past the first block's (the kernel's lazy rescale of its sums in the tiles).
        let cases = [
            (0usize, 45usize, false),
            (37, 20, false),
            (0, 16, false),
            (64, 97, false),
            (5, 1, false),
            (0, 97, true),
            (30, 50, true),
        ];
        for &(context, len, loud) in &cases {
            let total = context + len;
            let mut cache = vec![0u16; num_blocks * 2 * bs * kvh * d];
            let mut free: Vec<u32> = (0..num_blocks as u32).collect();
            let table: Vec<u32> = (0..total.div_ceil(bs))
                .map(|_| free.swap_remove(rng.random_range(0..free.len())))
                .collect();
            // keys[pos][h], values[pos][h] as the cache holds them (bf16).
            let mut keys = vec![vec![Vec::new(); kvh]; total];
            let mut values = vec![vec![Vec::new(); kvh]; total];
            for pos in 0..total {
                for h in 0..kvh {
                    for (which, store) in [(0, &mut keys), (1, &mut values)] {
                        let gain = if loud && which == 0 && pos >= 40 {
                            16.0
                        } else {
                            1.0
                        };
                        let x: Vec<f32> = randn(&mut rng, d).iter().map(|v| v * gain).collect();
                        let x = round_bf16(&x);
                        let (blk, slot) = (table[pos / bs] as usize, pos % bs);
                        let at = (((blk * 2 + which) * bs + slot) * kvh + h) * d;
                        for (c, &v) in x.iter().enumerate() {
                            cache[at + c] = bf16::from_f32(v).to_bits();
                        }
                        store[pos][h] = x;
                    }
                }
            }
            let q = round_bf16(&randn(&mut rng, len * heads * d));
            let qb: Vec<u16> = q.iter().map(|&v| bf16::from_f32(v).to_bits()).collect();
            let mut out = vec![0u16; len * heads * d];
            let kv = PagedKv {
                ptr: SyncPtr(cache.as_mut_ptr()),
                block_size: bs,
                kv_heads: kvh,
            };
            // SAFETY: AMX is available (checked above); the table covers every position.
            team.run(|| unsafe {
                flash::prefill(&team, &qb, heads, kv, &table, context, len, &mut out)
            });
            for i in 0..len {
                let pos = context + i;
                for h in 0..heads {
                    let kh = h / (heads / kvh);
                    let ks: Vec<Vec<f32>> = (0..=pos).map(|p| keys[p][kh].clone()).collect();
                    let vs: Vec<Vec<f32>> = (0..=pos).map(|p| values[p][kh].clone()).collect();
                    let want = reference_head(&q[(i * heads + h) * d..][..d], &ks, &vs);
                    for (c, w) in want.iter().enumerate() {
                        let got = bf16::from_bits(out[(i * heads + h) * d + c]).to_f32() as f64;
                        // P and the output are rounded to bf16.
                        assert!(
                            (got - w).abs() < 2e-2,
                            "context {context} len {len} loud {loud} row {i} head {h}[{c}] \
                             threads {}: {got} vs {w}",
                            team.threads()
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn decode_attention_matches_f64_softmax_on_every_isa() {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    for isa in Isa::available_for("decode_attention_matches_f64_softmax_on_every_isa") {
        for team in [Team::new(1), Team::new(2), Team::with(2, false)] {
            // (kv heads, head dim, query heads): SmolLM2's group of 3 at d 64, another in
            // registers, and one the kernels take with accumulators in memory.
            for shape in [(3, 64, 9), (2, 32, 6), (2, 48, 10)] {
                attention_case::<f32>(isa, &team, &mut rng, shape);
                attention_case::<u16>(isa, &team, &mut rng, shape);
            }
        }
    }
}

mod step {
    use rand::SeedableRng;
    use tch::{Device, Kind, Tensor};

    use crate::config::LlamaConfig;
    use crate::kv_cache::KvCache;
    use crate::model::{ForwardBatch, Llama, SeqChunk};
    use crate::weights::{WeightTensor, Weights};

    fn config() -> LlamaConfig {
        LlamaConfig {
            hidden_size: 64,
            intermediate_size: 96,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            head_dim: 16,
            vocab_size: 97,
            max_position_embeddings: 256,
            rope_theta: 10000.0,
            rope_scaling: None,
            rms_norm_eps: 1e-5,
            tie_word_embeddings: true,
        }
    }

    fn weights(c: &LlamaConfig) -> Weights {
        // Not libtorch's generator: tests run in parallel and would share it.
        let mut rng = super::ChaCha8Rng::seed_from_u64(3);
        let (h, i, d) = (
            c.hidden_size as i64,
            c.intermediate_size as i64,
            c.head_dim as i64,
        );
        let (q, kv) = (
            c.num_attention_heads as i64 * d,
            c.num_key_value_heads as i64 * d,
        );
        let mut w = Weights::default();
        let mut put = |name: String, shape: &[i64], norm: bool| {
            let n = shape.iter().product::<i64>() as usize;
            let t = Tensor::from_slice(&super::randn(&mut rng, n)).view(shape) * 0.3;
            let t = if norm { t + 1.0 } else { t };
            w.insert(name, WeightTensor::Dense(t));
        };
        put(
            "model.embed_tokens.weight".into(),
            &[c.vocab_size as i64, h],
            false,
        );
        put("model.norm.weight".into(), &[h], true);
        for l in 0..c.num_hidden_layers {
            let p = format!("model.layers.{l}");
            put(format!("{p}.input_layernorm.weight"), &[h], true);
            put(format!("{p}.post_attention_layernorm.weight"), &[h], true);
            put(format!("{p}.self_attn.q_proj.weight"), &[q, h], false);
            put(format!("{p}.self_attn.k_proj.weight"), &[kv, h], false);
            put(format!("{p}.self_attn.v_proj.weight"), &[kv, h], false);
            put(format!("{p}.self_attn.o_proj.weight"), &[h, q], false);
            put(format!("{p}.mlp.gate_proj.weight"), &[i, h], false);
            put(format!("{p}.mlp.up_proj.weight"), &[i, h], false);
            put(format!("{p}.mlp.down_proj.weight"), &[h, i], false);
        }
        w
    }

    fn model(kind: Kind, kernels: bool) -> Llama {
        let c = config();
        let mut m = Llama::new(&c, &mut weights(&c), kind, Device::Cpu).expect("tiny model");
        m.use_cpu_kernels(kernels);
        m
    }

    struct Seq {
        tokens: Vec<u32>,
        computed: usize,
        table: Vec<u32>,
    }

    /// Runs the same schedule (prefills, decodes, a step mixing both) through each model and
    /// returns every step's logits per model.
    fn run(models: &[(Llama, Kind)]) -> Vec<Vec<Tensor>> {
        let c = config();
        let bs = 16;
        let mut caches: Vec<KvCache> = models
            .iter()
            .map(|(_, kind)| KvCache::new(&c, 40, bs, *kind, Device::Cpu))
            .collect();
        let mut seqs: Vec<Seq> = [(5usize, 0u32), (20, 6), (40, 12), (90, 20)]
            .iter()
            .map(|&(len, first_block)| Seq {
                tokens: (0..len as u32)
                    .map(|t| (t * 7 + first_block) % 97)
                    .collect(),
                computed: 0,
                table: (first_block..first_block + 8).collect(),
            })
            .collect();
        let mut steps: Vec<Vec<Tensor>> = models.iter().map(|_| Vec::new()).collect();
        for step in 0..8 {
            // The last sequence arrives at step 3, so that step mixes decodes with its prefill;
            // it goes first, so the logits' rows must come back in chunk order, not by kind.
            let order: Vec<usize> = if step < 3 {
                vec![0, 1, 2]
            } else {
                vec![3, 0, 1, 2]
            };
            let chunks: Vec<SeqChunk<'_>> = order
                .iter()
                .map(|&i| {
                    let s = &seqs[i];
                    // The new prompt is chunked: 70 tokens at step 3 (over the kernels'
                    // chunk size, so libtorch's), the rest (attending to those through the
                    // cache, on the kernels) at step 4.
                    let end = if i == 3 && step == 3 {
                        70
                    } else {
                        s.tokens.len()
                    };
                    SeqChunk {
                        tokens: &s.tokens[s.computed..end],
                        context_len: s.computed,
                        block_table: &s.table,
                        sample: end == s.tokens.len(),
                    }
                })
                .collect();
            let batch = ForwardBatch { chunks };
            let outs: Vec<Tensor> = models
                .iter()
                .zip(caches.iter_mut())
                .map(|((m, _), cache)| m.forward(&batch, cache))
                .collect();
            // Everyone continues with the first model's greedy tokens.
            let next: Vec<i64> = Vec::try_from(outs[0].argmax(-1, false)).expect("ids");
            let ends: Vec<(usize, bool)> = batch
                .chunks
                .iter()
                .map(|c| (c.context_len + c.tokens.len(), c.sample))
                .collect();
            drop(batch);
            let mut next = next.into_iter();
            for (&i, (end, sample)) in order.iter().zip(ends) {
                let s = &mut seqs[i];
                s.computed = end;
                if sample {
                    s.tokens
                        .push(next.next().expect("a row per sampling chunk") as u32);
                }
            }
            for (all, o) in steps.iter_mut().zip(outs) {
                all.push(o);
            }
        }
        steps
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).abs().max().double_value(&[])
    }

    #[test]
    fn f32_kernel_steps_match_libtorch_steps_row_for_row() {
        let steps = run(&[
            (model(Kind::Float, false), Kind::Float),
            (model(Kind::Float, true), Kind::Float),
        ]);
        for (i, (t, k)) in steps[0].iter().zip(&steps[1]).enumerate() {
            assert_eq!(t.size(), k.size(), "step {i}");
            let d = max_diff(t, k);
            assert!(d < 1e-4, "step {i}: logits differ by {d}");
        }
    }

    #[test]
    fn bf16_kernel_steps_are_no_further_from_f32_than_libtorch_bf16() {
        let steps = run(&[
            (model(Kind::Float, false), Kind::Float),
            (model(Kind::BFloat16, false), Kind::BFloat16),
            (model(Kind::BFloat16, true), Kind::BFloat16),
        ]);
        for (i, ((f, t), k)) in steps[0].iter().zip(&steps[1]).zip(&steps[2]).enumerate() {
            let (torch_err, kernel_err) = (max_diff(f, t), max_diff(f, k));
            eprintln!("step {i}: libtorch bf16 {torch_err:.4}, kernels {kernel_err:.4}");
            assert!(
                kernel_err <= torch_err * 1.5 + 0.02,
                "step {i}: kernels {kernel_err} from f32, libtorch bf16 {torch_err}"
            );
        }
    }
}
