//! Writes tiny random Llama checkpoints as Hugging Face folders, the way transformers and
//! llm-compressor lay them out: `config.json`, safetensors weights (one file, or two shards and an
//! index), a byte-level BPE `tokenizer.json`, `tokenizer_config.json` with a chat template, and
//! `generation_config.json`.
//!
//! Weights come from a seeded ChaCha generator (not torch's global RNG, which parallel tests
//! share), so the same seed gives the same model in any test. FP8 folders follow
//! neuralmagic/DeepSeek-R1-Distill-Llama-70B-FP8-dynamic (compressed-tensors, per-channel
//! `weight_scale`, `lm_head` ignored); [`TinyLlama::write_dequantized_twin`] writes the dense f32
//! model with exactly the values the FP8 one dequantizes to, for logits comparisons.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde_json::{json, Value};
use tch::{Kind, Tensor};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Merges, Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, Tokenizer};

pub const HIDDEN_SIZE: i64 = 64;
pub const NUM_LAYERS: i64 = 2;
pub const NUM_HEADS: i64 = 4;
pub const NUM_KV_HEADS: i64 = 2;
pub const HEAD_DIM: i64 = 16;
pub const INTERMEDIATE_SIZE: i64 = 128;
/// Larger than the tokenizer (262 tokens and 3 special ones), as real checkpoints pad it.
pub const VOCAB_SIZE: i64 = 320;
pub const MAX_POSITION_EMBEDDINGS: i64 = 256;
pub const RMS_NORM_EPS: f64 = 1e-5;
pub const ROPE_THETA: f64 = 10_000.0;

/// Special tokens, added after the 256 byte tokens and 6 merges.
pub const BOS: &str = "<s>";
pub const EOS: &str = "</s>";
pub const EOT: &str = "<|eot|>";
pub const BOS_ID: u32 = 262;
pub const EOS_ID: u32 = 263;
pub const EOT_ID: u32 = 264;

pub const CHAT_TEMPLATE: &str = "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|eot|>{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}";

/// The projections compressed-tensors quantizes (`targets: ["Linear"]`, minus `lm_head`).
pub const LINEAR_LAYERS: [&str; 7] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];

#[derive(Clone, Debug)]
pub struct TinyLlamaOptions {
    /// Stored dtype of the dense tensors: `Kind::Float`, `Kind::BFloat16` or `Kind::Half`.
    pub dtype: Kind,
    /// Store the linear projections as compressed-tensors FP8 (norms, embeddings and `lm_head`
    /// stay in `dtype`).
    pub fp8: bool,
    /// No `lm_head.weight`; `tie_word_embeddings: true`.
    pub tied_embeddings: bool,
    /// Two shards and `model.safetensors.index.json` instead of `model.safetensors`.
    pub sharded: bool,
    pub seed: u64,
}

impl Default for TinyLlamaOptions {
    fn default() -> Self {
        TinyLlamaOptions {
            dtype: Kind::Float,
            fp8: false,
            tied_embeddings: false,
            sharded: false,
            seed: 0,
        }
    }
}

/// One model weight as written.
pub enum StoredTensor {
    Dense(Tensor),
    /// `float8_e4m3fn` `[out, in]` weight and f32 `[out, 1]` scale (`x.weight_scale` in the file).
    Fp8 {
        weight: Tensor,
        scale: Tensor,
    },
}

impl StoredTensor {
    /// The f32 values the model means: FP8 multiplied out by its scale.
    pub fn dequantized(&self) -> Tensor {
        match self {
            StoredTensor::Dense(t) => t.to_kind(Kind::Float),
            StoredTensor::Fp8 { weight, scale } => weight.to_kind(Kind::Float) * scale,
        }
    }

    pub fn size(&self) -> Vec<i64> {
        match self {
            StoredTensor::Dense(t) => t.size(),
            StoredTensor::Fp8 { weight, .. } => weight.size(),
        }
    }
}

/// A folder written by [`write_tiny_llama`].
pub struct TinyLlama {
    pub dir: PathBuf,
    pub options: TinyLlamaOptions,
    /// `config.json` as written.
    pub config: Value,
    /// The model weights by Hugging Face name (scales folded into their `Fp8` weight).
    pub weights: BTreeMap<String, StoredTensor>,
}

impl TinyLlama {
    /// Name → shape of every model weight (what a loader should hand the model).
    pub fn expected_shapes(&self) -> BTreeMap<String, Vec<i64>> {
        self.weights
            .iter()
            .map(|(name, t)| (name.clone(), t.size()))
            .collect()
    }

    /// Writes the same model at `dir` as a dense f32 checkpoint (no `quantization_config`) whose
    /// weights are this one's dequantized values, bit for bit.
    pub fn write_dequantized_twin(&self, dir: &Path) -> TinyLlama {
        let weights = self
            .weights
            .iter()
            .map(|(name, t)| (name.clone(), StoredTensor::Dense(t.dequantized())))
            .collect();
        let options = TinyLlamaOptions {
            dtype: Kind::Float,
            fp8: false,
            ..self.options.clone()
        };
        write_folder(dir, options, weights)
    }
}

/// Writes a tiny random Llama (hidden 64, 2 layers, 4 heads, 2 KV heads, head_dim 16,
/// intermediate 128, vocab 320) to `dir`, creating it. Panics on any failure.
pub fn write_tiny_llama(dir: &Path, options: TinyLlamaOptions) -> TinyLlama {
    assert!(
        matches!(options.dtype, Kind::Float | Kind::BFloat16 | Kind::Half),
        "dtype must be f32, bf16 or f16"
    );
    let mut rng = ChaCha8Rng::seed_from_u64(options.seed);
    let mut weights = BTreeMap::new();
    let dense = |rng: &mut ChaCha8Rng, shape: &[i64], center: f32, spread: f32| {
        let n = shape.iter().product::<i64>() as usize;
        let values: Vec<f32> = (0..n)
            .map(|_| center + spread * rng.random_range(-1.0f32..1.0))
            .collect();
        Tensor::from_slice(&values).reshape(shape)
    };
    let (h, q, kv, ff) = (
        HIDDEN_SIZE,
        NUM_HEADS * HEAD_DIM,
        NUM_KV_HEADS * HEAD_DIM,
        INTERMEDIATE_SIZE,
    );
    let mut put = |name: String, t: Tensor| {
        weights.insert(name, StoredTensor::Dense(t.to_kind(options.dtype)));
    };
    put(
        "model.embed_tokens.weight".into(),
        dense(&mut rng, &[VOCAB_SIZE, h], 0.0, 0.5),
    );
    for layer in 0..NUM_LAYERS {
        let p = format!("model.layers.{layer}");
        put(
            format!("{p}.input_layernorm.weight"),
            dense(&mut rng, &[h], 1.0, 0.1),
        );
        put(
            format!("{p}.post_attention_layernorm.weight"),
            dense(&mut rng, &[h], 1.0, 0.1),
        );
        for (part, out, inp) in [
            ("self_attn.q_proj", q, h),
            ("self_attn.k_proj", kv, h),
            ("self_attn.v_proj", kv, h),
            ("self_attn.o_proj", h, q),
            ("mlp.gate_proj", ff, h),
            ("mlp.up_proj", ff, h),
            ("mlp.down_proj", h, ff),
        ] {
            let w = dense(&mut rng, &[out, inp], 0.0, 1.0 / (inp as f32).sqrt());
            put(format!("{p}.{part}.weight"), w);
        }
    }
    put("model.norm.weight".into(), dense(&mut rng, &[h], 1.0, 0.1));
    if !options.tied_embeddings {
        put(
            "lm_head.weight".into(),
            dense(&mut rng, &[VOCAB_SIZE, h], 0.0, 0.1),
        );
    }
    if options.fp8 {
        for (name, t) in weights.iter_mut() {
            if LINEAR_LAYERS
                .iter()
                .any(|l| name.ends_with(&format!("{l}.weight")))
            {
                if let StoredTensor::Dense(w) = t {
                    *t = quantize_fp8(&w.to_kind(Kind::Float));
                }
            }
        }
    }
    write_folder(dir, options, weights)
}

/// Per-output-channel FP8: `scale = absmax(row) / 448`, `weight = (w / scale) as float8_e4m3fn`.
pub fn quantize_fp8(w: &Tensor) -> StoredTensor {
    let scale = w.abs().amax([1], true) / 448.0;
    let weight = (w / &scale).to_kind(Kind::Float8e4m3fn);
    StoredTensor::Fp8 { weight, scale }
}

fn write_folder(
    dir: &Path,
    options: TinyLlamaOptions,
    weights: BTreeMap<String, StoredTensor>,
) -> TinyLlama {
    std::fs::create_dir_all(dir).expect("create model dir");
    let config = config_json(&options);
    write_json(&dir.join("config.json"), &config);
    write_weights(dir, &weights, options.sharded);
    write_tokenizer(&dir.join("tokenizer.json"));
    write_json(
        &dir.join("tokenizer_config.json"),
        &json!({
            "add_bos_token": true,
            "add_eos_token": false,
            "bos_token": BOS,
            "eos_token": {"content": EOS, "lstrip": false, "normalized": false, "rstrip": false, "single_word": false},
            "chat_template": CHAT_TEMPLATE,
            "clean_up_tokenization_spaces": false,
            "model_max_length": MAX_POSITION_EMBEDDINGS,
            "tokenizer_class": "PreTrainedTokenizerFast",
        }),
    );
    write_json(
        &dir.join("generation_config.json"),
        &json!({"bos_token_id": BOS_ID, "eos_token_id": [EOS_ID, EOT_ID], "do_sample": false}),
    );
    TinyLlama {
        dir: dir.to_path_buf(),
        options,
        config,
        weights,
    }
}

fn config_json(options: &TinyLlamaOptions) -> Value {
    let torch_dtype = match options.dtype {
        Kind::BFloat16 => "bfloat16",
        Kind::Half => "float16",
        _ => "float32",
    };
    let mut config = json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "attention_bias": false,
        "attention_dropout": 0.0,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "head_dim": HEAD_DIM,
        "hidden_act": "silu",
        "hidden_size": HIDDEN_SIZE,
        "initializer_range": 0.02,
        "intermediate_size": INTERMEDIATE_SIZE,
        "max_position_embeddings": MAX_POSITION_EMBEDDINGS,
        "mlp_bias": false,
        "num_attention_heads": NUM_HEADS,
        "num_hidden_layers": NUM_LAYERS,
        "num_key_value_heads": NUM_KV_HEADS,
        "pretraining_tp": 1,
        "rms_norm_eps": RMS_NORM_EPS,
        "rope_scaling": null,
        "rope_theta": ROPE_THETA,
        "tie_word_embeddings": options.tied_embeddings,
        "torch_dtype": torch_dtype,
        "transformers_version": "4.47.1",
        "use_cache": true,
        "vocab_size": VOCAB_SIZE,
    });
    if options.fp8 {
        config["quantization_config"] = json!({
            "config_groups": {
                "group_0": {
                    "input_activations": {
                        "actorder": null, "block_structure": null, "dynamic": true,
                        "group_size": null, "num_bits": 8, "observer": null,
                        "observer_kwargs": {}, "strategy": "token", "symmetric": true,
                        "type": "float"
                    },
                    "output_activations": null,
                    "targets": ["Linear"],
                    "weights": {
                        "actorder": null, "block_structure": null, "dynamic": false,
                        "group_size": null, "num_bits": 8, "observer": "minmax",
                        "observer_kwargs": {}, "strategy": "channel", "symmetric": true,
                        "type": "float"
                    }
                }
            },
            "format": "float-quantized",
            "global_compression_ratio": 1.2,
            "ignore": ["lm_head"],
            "kv_cache_scheme": null,
            "quant_method": "compressed-tensors",
            "quantization_status": "compressed"
        });
    }
    config
}

pub fn write_json(path: &Path, value: &Value) {
    let text = serde_json::to_string_pretty(value).expect("serialize JSON");
    std::fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// The safetensors dtype of a tch kind.
pub fn dtype_of(kind: Kind) -> Dtype {
    match kind {
        Kind::Float => Dtype::F32,
        Kind::Half => Dtype::F16,
        Kind::BFloat16 => Dtype::BF16,
        Kind::Float8e4m3fn => Dtype::F8_E4M3,
        Kind::Int => Dtype::I32,
        other => panic!("no safetensors dtype for {other:?}"),
    }
}

/// The raw little-endian bytes of a tensor.
pub fn tensor_bytes(t: &Tensor) -> Vec<u8> {
    Vec::<u8>::try_from(t.contiguous().view_dtype(Kind::Uint8).flatten(0, -1))
        .expect("tensor bytes")
}

/// The file tensors (an FP8 weight is two: `x.weight` and `x.weight_scale`) with their bytes.
fn file_tensors(
    weights: &BTreeMap<String, StoredTensor>,
) -> Vec<(String, Dtype, Vec<usize>, Vec<u8>)> {
    let entry = |name: String, t: &Tensor| {
        let shape = t.size().iter().map(|&d| d as usize).collect();
        (name, dtype_of(t.kind()), shape, tensor_bytes(t))
    };
    let mut out = Vec::new();
    for (name, t) in weights {
        match t {
            StoredTensor::Dense(t) => out.push(entry(name.clone(), t)),
            StoredTensor::Fp8 { weight, scale } => {
                out.push(entry(name.clone(), weight));
                out.push(entry(format!("{name}_scale"), scale));
            }
        }
    }
    out
}

/// Writes `tensors` (name, dtype, shape, bytes) as one safetensors file with `format: pt`.
pub fn write_safetensors(path: &Path, tensors: &[(String, Dtype, Vec<usize>, Vec<u8>)]) {
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(name, dtype, shape, bytes)| {
            let view = TensorView::new(*dtype, shape.clone(), bytes).expect("tensor view");
            (name.clone(), view)
        })
        .collect();
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(views, Some(metadata), path)
        .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

fn write_weights(dir: &Path, weights: &BTreeMap<String, StoredTensor>, sharded: bool) {
    let tensors = file_tensors(weights);
    if !sharded {
        write_safetensors(&dir.join("model.safetensors"), &tensors);
        return;
    }
    // Split in the middle of the sorted names, so a weight and its scale may land apart.
    let (first, second) = tensors.split_at(tensors.len() / 2);
    let files = [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ];
    let mut weight_map = serde_json::Map::new();
    let mut total_size = 0;
    for (file, part) in files.iter().zip([first, second]) {
        write_safetensors(&dir.join(file), part);
        for (name, _, _, bytes) in part {
            weight_map.insert(name.clone(), json!(file));
            total_size += bytes.len();
        }
    }
    write_json(
        &dir.join("model.safetensors.index.json"),
        &json!({"metadata": {"total_size": total_size}, "weight_map": weight_map}),
    );
}

/// GPT-2's byte-to-character table: printable bytes stand for themselves, the others for
/// characters from U+0100 on.
fn byte_chars() -> Vec<char> {
    let printable = |b: u32| {
        (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b)
    };
    let mut next = 256;
    (0..256u32)
        .map(|b| {
            let c = if printable(b) {
                b
            } else {
                next += 1;
                next - 1
            };
            char::from_u32(c).expect("valid char")
        })
        .collect()
}

/// The tiny tokenizer: byte-level BPE over the 256 byte tokens (id = byte value) and six merges
/// (ids 256..=261), the special tokens `<s>`, `</s>`, `<|eot|>` (262..=264), and a Llama-3 style
/// post-processor that prepends `<s>` when special tokens are added.
pub fn build_tokenizer() -> Tokenizer {
    let chars = byte_chars();
    let mut vocab: Vec<(String, u32)> = chars
        .iter()
        .enumerate()
        .map(|(id, c)| (c.to_string(), id as u32))
        .collect();
    let merges: Merges = [
        ("Ġ", "t"),
        ("h", "e"),
        ("Ġt", "he"),
        ("l", "l"),
        ("e", "r"),
        ("i", "n"),
    ]
    .iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    for (i, (a, b)) in merges.iter().enumerate() {
        vocab.push((format!("{a}{b}"), 256 + i as u32));
    }
    let vocab: Vocab = vocab.into_iter().collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .expect("build BPE");
    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
    let specials: Vec<AddedToken> = [BOS, EOS, EOT]
        .iter()
        .map(|t| AddedToken::from(*t, true))
        .collect();
    tokenizer.add_special_tokens(&specials);
    assert_eq!(tokenizer.token_to_id(BOS), Some(BOS_ID));
    assert_eq!(tokenizer.token_to_id(EOT), Some(EOT_ID));
    let processor = TemplateProcessing::builder()
        .try_single(format!("{BOS} $A"))
        .expect("single template")
        .try_pair(format!("{BOS} $A {BOS}:1 $B:1"))
        .expect("pair template")
        .special_tokens(vec![(BOS.to_string(), BOS_ID)])
        .build()
        .expect("post-processor");
    tokenizer.with_post_processor(Some(processor));
    tokenizer
}

fn write_tokenizer(path: &Path) {
    build_tokenizer()
        .save(path, false)
        .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}
