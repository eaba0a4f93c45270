//! Llama weights and the forward step: RMSNorm, fused QKV with RoPE, paged GQA attention,
//! SwiGLU MLP, tied or untied LM head.

use std::cell::OnceCell;
use std::sync::Arc;

use tch::{Device, Kind, Tensor};

use super::attention::AttentionPlan;
use super::cpu::{CpuKernels, Isa, KernelWeights, LayerTensors, ModelTensors, Norm};
use super::linear::Linear;
use super::rope::{self, Rope};
use super::{ForwardBatch, SeqChunk};
use crate::config::LlamaConfig;
use crate::error::Result;
use crate::kv_cache::KvCache;
use crate::weights::{WeightTensor, Weights};

/// Prompt chunks up to this long run on the CPU kernels with the decodes.
const KERNEL_CHUNK_TOKENS: usize = 64;

struct Layer {
    input_norm: Tensor,
    qkv: Linear,
    o_proj: Linear,
    post_norm: Tensor,
    gate_up: Linear,
    down: Linear,
}

pub struct Llama {
    config: LlamaConfig,
    kind: Kind,
    device: Device,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    /// `[vocab, hidden]` projection; a copy of the embedding when tied.
    lm_head: Linear,
    rope: Rope,
    /// The CPU kernels' copy of the weights (CPU, bf16 or f32).
    kernel_weights: Option<Arc<KernelWeights>>,
    /// Whether steps go to the kernels (see [`Llama::use_cpu_kernels`]).
    cpu_kernels: bool,
    /// This handle's kernel threads, started at its first step, on the engine thread
    /// (so they match that thread's libtorch thread count).
    kernels: OnceCell<CpuKernels>,
}

impl Llama {
    /// Takes the weights it needs out of `weights`, checking every shape.
    pub fn new(
        config: &LlamaConfig,
        weights: &mut Weights,
        kind: Kind,
        device: Device,
    ) -> Result<Self> {
        config.validate()?;
        let h = config.hidden_size as i64;
        let q_out = (config.num_attention_heads * config.head_dim) as i64;
        let kv_out = (config.num_key_value_heads * config.head_dim) as i64;
        let inter = config.intermediate_size as i64;
        let vocab = config.vocab_size as i64;

        let dense = |w: WeightTensor| w.dequantize(kind).to_device(device);
        let embed = dense(weights.take("model.embed_tokens.weight", &[vocab, h])?);
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let mut take = |name: &str, shape: &[i64]| weights.take(&format!("{p}.{name}"), shape);
            let input_norm = dense(take("input_layernorm.weight", &[h])?);
            let q = take("self_attn.q_proj.weight", &[q_out, h])?;
            let k = take("self_attn.k_proj.weight", &[kv_out, h])?;
            let v = take("self_attn.v_proj.weight", &[kv_out, h])?;
            let o = take("self_attn.o_proj.weight", &[h, q_out])?;
            let post_norm = dense(take("post_attention_layernorm.weight", &[h])?);
            let gate = take("mlp.gate_proj.weight", &[inter, h])?;
            let up = take("mlp.up_proj.weight", &[inter, h])?;
            let down = take("mlp.down_proj.weight", &[h, inter])?;
            layers.push(Layer {
                input_norm,
                qkv: Linear::fused(vec![q, k, v], kind, device),
                o_proj: Linear::fused(vec![o], kind, device),
                post_norm,
                gate_up: Linear::fused(vec![gate, up], kind, device),
                down: Linear::fused(vec![down], kind, device),
            });
        }
        let norm = dense(weights.take("model.norm.weight", &[h])?);
        let lm_head = if config.tie_word_embeddings && !weights.contains("lm_head.weight") {
            WeightTensor::Dense(embed.shallow_clone())
        } else {
            weights.take("lm_head.weight", &[vocab, h])?
        };
        let lm_head = Linear::fused(vec![lm_head], kind, device);
        let rope = Rope::new(config, config.max_position_embeddings, device);
        let kernel_weights = (device == Device::Cpu)
            .then(|| kernel_weights(config, kind, &embed, &layers, &norm, &lm_head, &rope))
            .flatten()
            .map(Arc::new);
        Ok(Llama {
            config: config.clone(),
            kind,
            device,
            embed,
            layers,
            norm,
            lm_head,
            rope,
            kernel_weights,
            cpu_kernels: true,
            kernels: OnceCell::new(),
        })
    }

    /// Routes steps to the CPU kernels (the default where they exist) or keeps every step on
    /// libtorch ops (`false`: the reference the kernels are tested and measured
    /// against).
    pub fn use_cpu_kernels(&mut self, on: bool) {
        self.cpu_kernels = on;
    }

    /// Another handle on the same weights: the tensors share storage, so workers in one process
    /// hold one copy of the model. Each handle is owned by one engine thread; the weights are
    /// only read after loading, which libtorch allows from several threads at once.
    pub fn share(&self) -> Llama {
        Llama {
            config: self.config.clone(),
            kind: self.kind,
            device: self.device,
            embed: self.embed.shallow_clone(),
            layers: self
                .layers
                .iter()
                .map(|l| Layer {
                    input_norm: l.input_norm.shallow_clone(),
                    qkv: l.qkv.share(),
                    o_proj: l.o_proj.share(),
                    post_norm: l.post_norm.shallow_clone(),
                    gate_up: l.gate_up.share(),
                    down: l.down.share(),
                })
                .collect(),
            norm: self.norm.shallow_clone(),
            lm_head: self.lm_head.share(),
            rope: self.rope.share(),
            kernel_weights: self.kernel_weights.clone(),
            cpu_kernels: self.cpu_kernels,
            kernels: OnceCell::new(),
        }
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    pub fn device(&self) -> Device {
        self.device
    }

    /// Bytes of weights one decode step reads (embedding rows aside).
    pub fn weight_bytes_per_step(&self) -> usize {
        let layer_bytes: usize = self
            .layers
            .iter()
            .map(|l| {
                l.qkv.weight_bytes()
                    + l.o_proj.weight_bytes()
                    + l.gate_up.weight_bytes()
                    + l.down.weight_bytes()
            })
            .sum();
        layer_bytes + self.lm_head.weight_bytes()
    }

    fn rms_norm(&self, x: &Tensor, weight: &Tensor) -> Tensor {
        x.rms_norm(
            [self.config.hidden_size as i64].as_slice(),
            Some(weight),
            self.config.rms_norm_eps,
        )
    }

    /// Runs one step, writing the chunks' K/V into `cache`. Returns f32 logits
    /// `[num_samples, vocab]`, one row per chunk with `sample`, in chunk order.
    pub fn forward(&self, batch: &ForwardBatch<'_>, cache: &mut KvCache) -> Tensor {
        let _guard = tch::no_grad_guard();
        let weights = self.kernel_weights.as_ref().filter(|_| self.cpu_kernels);
        let Some(weights) = weights else {
            return self.forward_torch(&batch.chunks.iter().collect::<Vec<_>>(), cache);
        };
        // Short chunks (decodes, short prompts) run on the kernels, single tokens first as
        // they want them; longer prompt chunks on libtorch, whose GEMMs match the kernels'
        // from a few hundred rows on and whose per-op cost no longer shows there.
        let len = |i: usize| batch.chunks[i].tokens.len();
        let mut order: Vec<usize> = (0..batch.chunks.len()).collect();
        order.sort_by_key(|&i| (len(i) > 1, len(i) > KERNEL_CHUNK_TOKENS));
        let n_short = order
            .iter()
            .take_while(|&&i| len(i) <= KERNEL_CHUNK_TOKENS)
            .count();
        let sorted: Vec<&SeqChunk<'_>> = order.iter().map(|&i| &batch.chunks[i]).collect();
        let (short, long) = sorted.split_at(n_short);
        if short.is_empty() || !CpuKernels::accepts(weights, short, cache) {
            return self.forward_torch(&batch.chunks.iter().collect::<Vec<_>>(), cache);
        }
        let kernels = self.kernels();
        let vocab = self.config.vocab_size as i64;
        let rows = kernels.forward(weights, short, cache);
        let mut logits = Tensor::from_slice(&rows).view([-1, vocab]);
        if !long.is_empty() {
            logits = Tensor::cat(&[logits, self.forward_torch(long, cache)], 0);
        }
        // The rows are the sampling chunks in sorted order; put them back in chunk order.
        let mut back: Vec<(usize, i64)> = order
            .iter()
            .filter(|&&i| batch.chunks[i].sample)
            .enumerate()
            .map(|(r, &i)| (i, r as i64))
            .collect();
        back.sort_unstable();
        if back.iter().enumerate().all(|(r, &(_, at))| at == r as i64) {
            return logits;
        }
        let index: Vec<i64> = back.into_iter().map(|(_, r)| r).collect();
        logits.index_select(0, &Tensor::from_slice(&index))
    }

    /// This handle's kernels, started on the calling (engine) thread at the first use.
    fn kernels(&self) -> &CpuKernels {
        self.kernels.get_or_init(|| {
            let k = CpuKernels::new(tch::get_num_threads().max(1) as usize, Isa::detect());
            tracing::info!(
                isa = k.isa().name(),
                threads = k.threads(),
                on = k.team_backing(),
                weight_copy_mib = self.kernel_weights.as_ref().map_or(0, |w| w.bytes() >> 20),
                "decode steps and short prompt chunks run on the CPU kernels"
            );
            k
        })
    }

    /// [`Llama::forward`] through libtorch ops (with the kernels on, a prompt chunk's attention
    /// on their AMX tiles where the CPU has them).
    fn forward_torch(&self, input: &[&SeqChunk<'_>], cache: &mut KvCache) -> Tensor {
        // Single-token chunks go first so attention can batch them.
        let mut order: Vec<usize> = (0..input.len()).collect();
        order.sort_by_key(|&i| input[i].tokens.len() > 1);
        let chunks: Vec<&SeqChunk<'_>> = order.iter().map(|&i| input[i]).collect();

        let num_tokens: usize = input.iter().map(|c| c.tokens.len()).sum();
        let mut ids = Vec::with_capacity(num_tokens);
        let mut positions = Vec::with_capacity(num_tokens);
        let mut last_row = vec![None; input.len()];
        for (&orig, c) in order.iter().zip(&chunks) {
            ids.extend(c.tokens.iter().map(|&t| t as i64));
            positions.extend((c.context_len..c.context_len + c.tokens.len()).map(|p| p as i64));
            if c.sample {
                last_row[orig] = Some(ids.len() as i64 - 1);
            }
        }
        let dev = self.device;
        let ids = Tensor::from_slice(&ids).to_device(dev);
        let plan = AttentionPlan::new(&chunks, cache.block_size(), self.kind, dev);
        // Prompt chunks' attention on the kernels' AMX tiles where they run (not on the
        // libtorch-only reference path, `use_cpu_kernels(false)`).
        let kernels = (self.cpu_kernels && self.kernel_weights.is_some()).then(|| self.kernels());
        // bf16 on CPU with the kernels on: the element-wise pieces around libtorch's GEMMs
        // run fused on the kernels' team (`cpu::rows`).
        let fused = kernels
            .zip(self.kernel_weights.as_deref())
            .filter(|(_, w)| dev == Device::Cpu && CpuKernels::fuses_rows(w));

        let mut x = self.embed.index_select(0, &ids);
        // The fused path carries each residual addition into the next norm: the last one
        // comes out beside x.
        let fused = fused.map(|(k, w)| {
            let delta = self.layers_fused(k, w, &mut x, &positions, &plan, cache);
            (k, w, delta)
        });
        if fused.is_none() {
            self.layers_torch(&mut x, &positions, &plan, cache, kernels);
        }
        let rows: Vec<i64> = last_row.into_iter().flatten().collect();
        if rows.is_empty() {
            return Tensor::zeros([0, self.config.vocab_size as i64], (Kind::Float, dev));
        }
        let rows = Tensor::from_slice(&rows).to_device(dev);
        let mut x = x.index_select(0, &rows);
        let h = match fused {
            Some((k, w, delta)) => {
                k.add_norm(w, Norm::Final, &mut x, Some(&delta.index_select(0, &rows)))
            }
            None => self.rms_norm(&x, &self.norm),
        };
        self.lm_head.forward(&h).to_kind(Kind::Float)
    }

    /// Query heads, KV heads and head dim, as tensor sizes.
    fn head_shape(&self) -> (i64, i64, i64) {
        let c = &self.config;
        (
            c.num_attention_heads as i64,
            c.num_key_value_heads as i64,
            c.head_dim as i64,
        )
    }

    /// The layers as libtorch ops, adding each into the residual stream `x`.
    fn layers_torch(
        &self,
        x: &mut Tensor,
        positions: &[i64],
        plan: &AttentionPlan,
        cache: &mut KvCache,
        kernels: Option<&CpuKernels>,
    ) {
        let c = &self.config;
        let (heads, kvh, d) = self.head_shape();
        let t = positions.len() as i64;
        let positions = Tensor::from_slice(positions).to_device(self.device);
        let (cos, sin) = self.rope.tables(&positions, self.kind);
        for (i, layer) in self.layers.iter().enumerate() {
            let h = self.rms_norm(x, &layer.input_norm);
            let qkv = layer.qkv.forward(&h);
            // Q and K heads are adjacent in the fused output: rotate them in one go.
            let qk = rope::apply(
                &qkv.narrow(1, 0, (heads + kvh) * d)
                    .view([t, heads + kvh, d]),
                &cos,
                &sin,
            );
            let q = qk.narrow(1, 0, heads);
            let k = qk.narrow(1, heads, kvh);
            let v = qkv.narrow(1, (heads + kvh) * d, kvh * d).view([t, kvh, d]);
            let layer_cache = cache.layer_mut(i);
            let mut flat = layer_cache.view([-1, kvh, d]);
            let _ = flat.index_copy_(0, &plan.k_slots, &k);
            let _ = flat.index_copy_(0, &plan.v_slots, &v);
            let attn = plan.attend(&q, &k, &v, layer_cache, kernels);
            *x += layer.o_proj.forward(&attn);
            let h = self.rms_norm(x, &layer.post_norm);
            let gu = layer.gate_up.forward(&h);
            let inter = c.intermediate_size as i64;
            let act = gu.narrow(1, 0, inter).silu() * gu.narrow(1, inter, inter);
            *x += layer.down.forward(&act);
        }
    }

    /// The layers with libtorch's GEMMs and the kernels' fused element-wise pieces (bf16 on
    /// CPU, [`CpuKernels::fuses_rows`]). Returns the last layer's output, not yet added to
    /// `x` (the final norm adds it, for the sampled rows only).
    fn layers_fused(
        &self,
        k: &CpuKernels,
        w: &KernelWeights,
        x: &mut Tensor,
        positions: &[i64],
        plan: &AttentionPlan,
        cache: &mut KvCache,
    ) -> Tensor {
        let (heads, kvh, d) = self.head_shape();
        let t = positions.len() as i64;
        let mut pending: Option<Tensor> = None;
        for (i, layer) in self.layers.iter().enumerate() {
            let h = k.add_norm(w, Norm::Input(i), x, pending.as_ref());
            let mut qkv = layer.qkv.forward(&h).contiguous();
            let layer_cache = cache.layer_mut(i);
            k.rope_into_cache(w, &mut qkv, positions, &plan.k_slot_list, layer_cache);
            let q = qkv.narrow(1, 0, heads * d).view([t, heads, d]);
            let kk = qkv.narrow(1, heads * d, kvh * d).view([t, kvh, d]);
            let v = qkv.narrow(1, (heads + kvh) * d, kvh * d).view([t, kvh, d]);
            let attn = plan.attend(&q, &kk, &v, layer_cache, Some(k));
            let o = layer.o_proj.forward(&attn);
            let h = k.add_norm(w, Norm::Post(i), x, Some(&o));
            let act = k.silu_mul(&layer.gate_up.forward(&h).contiguous());
            pending = Some(layer.down.forward(&act));
        }
        pending.expect("a model has layers")
    }
}

/// The CPU kernels' copy of the weights, when every linear is dense.
fn kernel_weights(
    config: &LlamaConfig,
    kind: Kind,
    embed: &Tensor,
    layers: &[Layer],
    norm: &Tensor,
    lm_head: &Linear,
    rope: &Rope,
) -> Option<KernelWeights> {
    let dense: Option<Vec<[Tensor; 4]>> = layers
        .iter()
        .map(|l| {
            Some([
                l.qkv.dense_out_in()?,
                l.o_proj.dense_out_in()?,
                l.gate_up.dense_out_in()?,
                l.down.dense_out_in()?,
            ])
        })
        .collect();
    let dense = dense?;
    let tensors: Vec<LayerTensors<'_>> = layers
        .iter()
        .zip(&dense)
        .map(|(l, [qkv, o_proj, gate_up, down])| LayerTensors {
            input_norm: &l.input_norm,
            qkv,
            o_proj,
            post_norm: &l.post_norm,
            gate_up,
            down,
        })
        .collect();
    let (cos, sin) = rope.tables_f32();
    let lm_head = lm_head.dense_out_in()?;
    let tensors = ModelTensors {
        embed,
        layers: tensors,
        final_norm: norm,
        lm_head: &lm_head,
        cos,
        sin,
    };
    KernelWeights::new(config, kind, &tensors)
}
