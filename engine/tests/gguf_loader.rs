//! The GGUF loader: the real SmolLM2 file, and small files written here to pin down every
//! tensor type, the Q/K row order, the config keys and each way a file can be broken.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use engine::loader::gguf::{self, GgufFile, MetadataValue};
use engine::loader::smollm2_path;
use engine::weights::{WeightTensor, Weights};
use engine::{EngineError, RopeScaling};
use half::{bf16, f16};

// ---------------------------------------------------------------------------------------------
// A minimal GGUF writer.

#[derive(Clone)]
enum Meta {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    Str(String),
    /// Element type id and elements.
    Array(u32, Vec<Meta>),
}

impl Meta {
    fn type_id(&self) -> u32 {
        match self {
            Meta::U8(_) => 0,
            Meta::I8(_) => 1,
            Meta::U16(_) => 2,
            Meta::I16(_) => 3,
            Meta::U32(_) => 4,
            Meta::I32(_) => 5,
            Meta::F32(_) => 6,
            Meta::Bool(_) => 7,
            Meta::Str(_) => 8,
            Meta::Array(..) => 9,
            Meta::U64(_) => 10,
            Meta::I64(_) => 11,
            Meta::F64(_) => 12,
        }
    }

    fn write(&self, out: &mut Vec<u8>) {
        match self {
            Meta::U8(v) => out.extend(v.to_le_bytes()),
            Meta::I8(v) => out.extend(v.to_le_bytes()),
            Meta::U16(v) => out.extend(v.to_le_bytes()),
            Meta::I16(v) => out.extend(v.to_le_bytes()),
            Meta::U32(v) => out.extend(v.to_le_bytes()),
            Meta::I32(v) => out.extend(v.to_le_bytes()),
            Meta::U64(v) => out.extend(v.to_le_bytes()),
            Meta::I64(v) => out.extend(v.to_le_bytes()),
            Meta::F32(v) => out.extend(v.to_le_bytes()),
            Meta::F64(v) => out.extend(v.to_le_bytes()),
            Meta::Bool(v) => out.push(u8::from(*v)),
            Meta::Str(s) => write_str(out, s),
            Meta::Array(ty, items) => {
                out.extend(ty.to_le_bytes());
                out.extend((items.len() as u64).to_le_bytes());
                for item in items {
                    item.write(out);
                }
            }
        }
    }
}

fn write_str(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

fn strs(items: &[&str]) -> Meta {
    Meta::Array(8, items.iter().map(|s| Meta::Str(s.to_string())).collect())
}

struct Tensor {
    name: String,
    dims: Vec<u64>,
    ggml_type: u32,
    data: Vec<u8>,
    /// Overrides the offset the writer would compute.
    offset: Option<u64>,
}

struct Gguf {
    magic: [u8; 4],
    version: u32,
    meta: Vec<(String, Meta)>,
    tensors: Vec<Tensor>,
}

const ALIGN: usize = 32;

impl Gguf {
    /// A one-layer Llama with a six-token byte-level vocabulary and no tensors yet.
    fn tiny_llama() -> Self {
        let meta = [
            ("general.architecture", Meta::Str("llama".into())),
            ("general.name", Meta::Str("tiny".into())),
            ("llama.embedding_length", Meta::U32(8)),
            ("llama.feed_forward_length", Meta::U32(16)),
            ("llama.block_count", Meta::U32(1)),
            ("llama.attention.head_count", Meta::U32(2)),
            ("llama.attention.head_count_kv", Meta::U32(1)),
            ("llama.context_length", Meta::U32(64)),
            ("llama.attention.layer_norm_rms_epsilon", Meta::F32(1e-5)),
            ("tokenizer.ggml.model", Meta::Str("gpt2".into())),
            (
                "tokenizer.ggml.tokens",
                strs(&["<s>", "</s>", "a", "b", "ab", "Ġ"]),
            ),
            (
                "tokenizer.ggml.token_type",
                Meta::Array(5, [3, 3, 1, 1, 1, 1].map(Meta::I32).to_vec()),
            ),
            ("tokenizer.ggml.merges", strs(&["a b"])),
            ("tokenizer.ggml.bos_token_id", Meta::U32(0)),
            ("tokenizer.ggml.eos_token_id", Meta::U32(1)),
        ];
        Gguf {
            magic: *b"GGUF",
            version: 3,
            meta: meta.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
            tensors: Vec::new(),
        }
    }

    fn set(mut self, key: &str, value: Meta) -> Self {
        self.meta.retain(|(k, _)| k != key);
        self.meta.push((key.to_string(), value));
        self
    }

    fn tensor(mut self, name: &str, dims: &[u64], ggml_type: u32, data: Vec<u8>) -> Self {
        self.tensors.push(Tensor {
            name: name.to_string(),
            dims: dims.to_vec(),
            ggml_type,
            data,
            offset: None,
        });
        self
    }

    fn f32_tensor(self, name: &str, dims: &[u64], values: &[f32]) -> Self {
        let data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.tensor(name, dims, 0, data)
    }

    fn bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend(self.magic);
        out.extend(self.version.to_le_bytes());
        out.extend((self.tensors.len() as u64).to_le_bytes());
        out.extend((self.meta.len() as u64).to_le_bytes());
        for (key, value) in &self.meta {
            write_str(&mut out, key);
            out.extend(value.type_id().to_le_bytes());
            value.write(&mut out);
        }
        let mut data = Vec::new();
        for t in &self.tensors {
            write_str(&mut out, &t.name);
            out.extend((t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                out.extend(d.to_le_bytes());
            }
            out.extend(t.ggml_type.to_le_bytes());
            // Padding only between tensors, so that any cut of the file loses tensor data.
            data.resize(data.len().next_multiple_of(ALIGN), 0);
            out.extend(t.offset.unwrap_or(data.len() as u64).to_le_bytes());
            data.extend(&t.data);
        }
        out.resize(out.len().next_multiple_of(ALIGN), 0);
        out.extend(data);
        out
    }

    fn write(&self) -> TempFile {
        write_file(&self.bytes())
    }
}

/// A file under the test target's temp folder, removed when dropped.
struct TempFile(PathBuf);

impl std::ops::Deref for TempFile {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for TempFile {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        std::fs::remove_file(&self.0).ok();
    }
}

fn write_file(bytes: &[u8]) -> TempFile {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("gguf-loader-{}-{n}.gguf", std::process::id()));
    std::fs::write(&path, bytes).expect("temp file written");
    TempFile(path)
}

/// Takes `name` out of `weights`, checking its torch shape, as flat f32 values.
fn take(weights: &mut Weights, name: &str, shape: &[i64]) -> Vec<f32> {
    match weights
        .take(name, shape)
        .expect("tensor present with that shape")
    {
        WeightTensor::Dense(t) => Vec::<f32>::try_from(&t.flatten(0, -1)).expect("f32 tensor"),
        WeightTensor::Fp8 { .. } => panic!("GGUF gives dense tensors"),
    }
}

fn load_err(bytes: &[u8]) -> EngineError {
    match gguf::load(&write_file(bytes)) {
        Ok(_) => panic!("loading should fail"),
        Err(e) => e,
    }
}

// ---------------------------------------------------------------------------------------------
// Encoders for the block types, written from ggml's block structs.

fn f16_bytes(v: f32) -> [u8; 2] {
    f16::from_f32(v).to_bits().to_le_bytes()
}

/// `block_q8_0`: f16 scale, 32 × i8.
fn q8_0(d: f32, qs: &[i8]) -> Vec<u8> {
    qs.chunks(32)
        .flat_map(|block| {
            let mut b = f16_bytes(d).to_vec();
            b.extend(block.iter().map(|&q| q as u8));
            b
        })
        .collect()
}

/// Packs 32 4-bit quants: byte j = q[j] | q[j + 16] << 4.
fn pack_nibbles(qs: &[u8]) -> Vec<u8> {
    (0..16).map(|j| qs[j] | (qs[j + 16] << 4)).collect()
}

/// `block_q4_0`: f16 scale, 16 bytes of nibbles.
fn q4_0(d: f32, qs: &[u8]) -> Vec<u8> {
    qs.chunks(32)
        .flat_map(|block| [f16_bytes(d).to_vec(), pack_nibbles(block)].concat())
        .collect()
}

/// `block_q4_1`: f16 scale, f16 min, 16 bytes of nibbles.
fn q4_1(d: f32, m: f32, qs: &[u8]) -> Vec<u8> {
    qs.chunks(32)
        .flat_map(|block| {
            [
                f16_bytes(d).to_vec(),
                f16_bytes(m).to_vec(),
                pack_nibbles(block),
            ]
            .concat()
        })
        .collect()
}

/// llama.cpp's converter (`LlamaModel.permute`): `w.reshape(n_head, 2, d/2, cols).swapaxes(1, 2)`.
fn llama_cpp_permute(w: &[f32], rows: usize, n_head: usize) -> Vec<f32> {
    let cols = w.len() / rows;
    let (d, half) = (rows / n_head, rows / n_head / 2);
    let mut out = vec![0f32; w.len()];
    for h in 0..n_head {
        for s in 0..2 {
            for i in 0..half {
                let src = (h * d + s * half + i) * cols;
                let dst = (h * d + 2 * i + s) * cols;
                out[dst..dst + cols].copy_from_slice(&w[src..src + cols]);
            }
        }
    }
    out
}

fn golden() -> serde_json::Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../shared/golden/smollm2-135m-instruct-q4_1.json"
    );
    serde_json::from_str(&std::fs::read_to_string(path).expect("golden file")).expect("JSON")
}

// ---------------------------------------------------------------------------------------------
// The real model.

#[test]
fn smollm2_loads_with_the_golden_config() {
    let path = smollm2_path().expect("SmolLM2 GGUF installed");
    let start = std::time::Instant::now();
    let mut model = gguf::load(&path).expect("SmolLM2 loads");
    eprintln!("SmolLM2 GGUF loaded in {:?}", start.elapsed());

    let golden = golden();
    let g = &golden["config"];
    let c = &model.card.config;
    let n = |key: &str| g[key].as_u64().unwrap() as usize;
    assert_eq!(c.hidden_size, n("hidden_size"));
    assert_eq!(c.intermediate_size, n("intermediate_size"));
    assert_eq!(c.num_hidden_layers, n("num_hidden_layers"));
    assert_eq!(c.num_attention_heads, n("num_attention_heads"));
    assert_eq!(c.num_key_value_heads, n("num_key_value_heads"));
    assert_eq!(c.head_dim, n("head_dim"));
    assert_eq!(c.vocab_size, n("vocab_size"));
    assert_eq!(c.max_position_embeddings, n("max_position_embeddings"));
    assert_eq!(c.rope_theta, g["rope_theta"].as_f64().unwrap());
    assert_eq!(c.rms_norm_eps, g["rms_norm_eps"].as_f64().unwrap());
    assert_eq!(
        c.tie_word_embeddings,
        g["tie_word_embeddings"].as_bool().unwrap()
    );
    assert_eq!(c.rope_scaling, None);
    assert_eq!(model.card.name, "Smollm2 135M 8k Lc100K Mix1 Ep2");

    let w = &mut model.weights;
    assert_eq!(
        w.len(),
        2 + 9 * c.num_hidden_layers,
        "embed, final norm, 9 per layer"
    );
    assert!(!w.contains("lm_head.weight"));
    let (h, kv) = (
        c.hidden_size as i64,
        (c.num_key_value_heads * c.head_dim) as i64,
    );
    let ffn = c.intermediate_size as i64;
    for layer in 0..c.num_hidden_layers {
        let p = format!("model.layers.{layer}");
        for (name, shape) in [
            ("input_layernorm", vec![h]),
            ("post_attention_layernorm", vec![h]),
            ("self_attn.q_proj", vec![h, h]),
            ("self_attn.k_proj", vec![kv, h]),
            ("self_attn.v_proj", vec![kv, h]),
            ("self_attn.o_proj", vec![h, h]),
            ("mlp.gate_proj", vec![ffn, h]),
            ("mlp.up_proj", vec![ffn, h]),
            ("mlp.down_proj", vec![h, ffn]),
        ] {
            w.take(&format!("{p}.{name}.weight"), &shape)
                .expect("layer tensor");
        }
    }
    let embed = take(w, "model.embed_tokens.weight", &[c.vocab_size as i64, h]);
    assert!(embed.iter().all(|v| v.is_finite()) && embed.iter().any(|&v| v != 0.0));
    let norm = take(w, "model.norm.weight", &[h]);
    assert!(norm.iter().all(|v| v.is_finite()));
    assert!(w.is_empty());
}

#[test]
fn truncated_real_file_is_invalid() {
    let path = smollm2_path().expect("SmolLM2 GGUF installed");
    let bytes = std::fs::read(&path).unwrap();
    match load_err(&bytes[..bytes.len() / 2]) {
        EngineError::InvalidGguf { reason, .. } => {
            assert!(reason.contains("past the end of the file"), "{reason}")
        }
        other => panic!("expected InvalidGguf, got {other}"),
    }
    // Cut inside the vocabulary: the metadata itself is truncated.
    match load_err(&bytes[..1_000_000]) {
        EngineError::InvalidGguf { reason, .. } => {
            assert!(reason.contains("truncated"), "{reason}")
        }
        other => panic!("expected InvalidGguf, got {other}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Tensor types.

#[test]
fn every_supported_type_dequantizes_to_the_encoded_values() {
    let f16_vals: Vec<f32> = (0..64).map(|i| (i as f32 - 20.0) * 0.125).collect();
    let bf16_vals: Vec<f32> = (0..64).map(|i| (i as f32 - 31.0) * 2.5).collect();
    let q8: Vec<i8> = (0..64).map(|i| (i * 4 - 128) as i8).collect();
    let q4: Vec<u8> = (0..64).map(|i| (i * 7 % 16) as u8).collect();
    let f32_vals: Vec<f32> = (0..8).map(|i| i as f32 * 0.3 - 1.0).collect();

    let file = Gguf::tiny_llama()
        .tensor(
            "token_embd.weight",
            &[32, 2],
            1,
            f16_vals.iter().flat_map(|&v| f16_bytes(v)).collect(),
        )
        .tensor(
            "blk.0.ffn_gate.weight",
            &[32, 2],
            30,
            bf16_vals
                .iter()
                .flat_map(|&v| bf16::from_f32(v).to_bits().to_le_bytes())
                .collect(),
        )
        .tensor("blk.0.ffn_up.weight", &[32, 2], 8, q8_0(0.5, &q8))
        .tensor("blk.0.ffn_down.weight", &[64], 2, q4_0(0.25, &q4))
        .tensor("output.weight", &[32, 2], 3, q4_1(0.5, -1.0, &q4))
        .f32_tensor("output_norm.weight", &[8], &f32_vals)
        .write();
    let mut model = gguf::load(&file).expect("loads");
    let w = &mut model.weights;
    assert!(
        !model.card.config.tie_word_embeddings,
        "output.weight present"
    );

    assert_eq!(take(w, "model.embed_tokens.weight", &[2, 32]), f16_vals);
    assert_eq!(
        take(w, "model.layers.0.mlp.gate_proj.weight", &[2, 32]),
        bf16_vals
    );
    let q8_expected: Vec<f32> = q8.iter().map(|&q| q as f32 * 0.5).collect();
    assert_eq!(
        take(w, "model.layers.0.mlp.up_proj.weight", &[2, 32]),
        q8_expected
    );
    let q4_0_expected: Vec<f32> = q4.iter().map(|&q| (q as f32 - 8.0) * 0.25).collect();
    assert_eq!(
        take(w, "model.layers.0.mlp.down_proj.weight", &[64]),
        q4_0_expected
    );
    let q4_1_expected: Vec<f32> = q4.iter().map(|&q| q as f32 * 0.5 - 1.0).collect();
    assert_eq!(take(w, "lm_head.weight", &[2, 32]), q4_1_expected);
    assert_eq!(take(w, "model.norm.weight", &[8]), f32_vals);
    assert!(w.is_empty());
}

#[test]
fn unsupported_type_is_named() {
    let file = Gguf::tiny_llama()
        .tensor("token_embd.weight", &[256], 14, vec![0; 210])
        .write();
    let err = gguf::load(&file).err().expect("Q6_K is refused");
    assert!(
        matches!(err, EngineError::UnsupportedTensorType { .. }),
        "{err}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("Q6_K") && msg.contains("token_embd.weight"),
        "{msg}"
    );
}

#[test]
fn unknown_tensors_are_skipped() {
    let file = Gguf::tiny_llama()
        .f32_tensor("output_norm.weight", &[8], &[1.0; 8])
        .f32_tensor("blk.0.attn_fancy.weight", &[8], &[1.0; 8])
        .tensor("not_a_llama_tensor", &[256], 14, vec![0; 210])
        .write();
    let model = gguf::load(&file).expect("loads");
    assert_eq!(
        model.weights.names().collect::<Vec<_>>(),
        ["model.norm.weight"]
    );
}

// ---------------------------------------------------------------------------------------------
// Q/K row order.

#[test]
fn unpermute_inverts_llama_cpp_permute() {
    let w: Vec<f32> = (0..24 * 5).map(|i| i as f32).collect();
    for n_head in [1, 2, 3, 6] {
        let permuted = llama_cpp_permute(&w, 24, n_head);
        assert_ne!(permuted, w, "the permutation moves rows ({n_head} heads)");
        assert_eq!(gguf::unpermute_rope_rows(&permuted, 24, n_head).unwrap(), w);
    }
    assert!(
        gguf::unpermute_rope_rows(&w, 24, 5).is_none(),
        "24 rows do not split into 5 heads"
    );
    assert!(gguf::unpermute_rope_rows(&w, 0, 1).is_none());
}

#[test]
fn q_and_k_come_back_in_hugging_face_order() {
    // HF layout: head h, half s, frequency i at row h·d + s·d/2 + i. With d = 4 and 8 columns.
    let (hidden, heads, kv_heads) = (8usize, 2usize, 1usize);
    let q: Vec<f32> = (0..hidden * hidden).map(|i| i as f32).collect();
    let k: Vec<f32> = (0..4 * hidden).map(|i| -(i as f32)).collect();
    let file = Gguf::tiny_llama()
        .f32_tensor(
            "blk.0.attn_q.weight",
            &[8, 8],
            &llama_cpp_permute(&q, hidden, heads),
        )
        .f32_tensor(
            "blk.0.attn_k.weight",
            &[8, 4],
            &llama_cpp_permute(&k, 4, kv_heads),
        )
        .f32_tensor("blk.0.attn_v.weight", &[8, 4], &k)
        .write();
    let mut model = gguf::load(&file).expect("loads");
    let w = &mut model.weights;
    assert_eq!(
        take(w, "model.layers.0.self_attn.q_proj.weight", &[8, 8]),
        q
    );
    assert_eq!(
        take(w, "model.layers.0.self_attn.k_proj.weight", &[4, 8]),
        k
    );
    assert_eq!(
        take(w, "model.layers.0.self_attn.v_proj.weight", &[4, 8]),
        k,
        "V is not permuted"
    );
}

// ---------------------------------------------------------------------------------------------
// Metadata and config.

#[test]
fn every_metadata_type_is_read_in_v2_and_v3() {
    for version in [2, 3] {
        let mut file = Gguf::tiny_llama()
            .set("t.u8", Meta::U8(200))
            .set("t.i8", Meta::I8(-5))
            .set("t.u16", Meta::U16(60_000))
            .set("t.i16", Meta::I16(-30_000))
            .set("t.i32", Meta::I32(-7))
            .set("t.u64", Meta::U64(1 << 40))
            .set("t.i64", Meta::I64(-(1 << 40)))
            .set("t.f64", Meta::F64(0.1))
            .set("t.bool", Meta::Bool(true))
            .set(
                "t.nested",
                Meta::Array(9, vec![Meta::Array(4, vec![Meta::U32(1), Meta::U32(2)])]),
            );
        file.version = version;
        let path = file.write();
        let gguf = GgufFile::open(&path).expect("opens");
        assert_eq!(gguf.version, version);
        let m = &gguf.metadata;
        assert_eq!(m.get("t.u8"), Some(&MetadataValue::U8(200)));
        assert_eq!(m.get("t.i8"), Some(&MetadataValue::I8(-5)));
        assert_eq!(m.get("t.u16"), Some(&MetadataValue::U16(60_000)));
        assert_eq!(m.get("t.i16"), Some(&MetadataValue::I16(-30_000)));
        assert_eq!(m.get("t.i32"), Some(&MetadataValue::I32(-7)));
        assert_eq!(m.u64("t.u64").unwrap(), Some(1 << 40));
        assert_eq!(m.get("t.i64"), Some(&MetadataValue::I64(-(1 << 40))));
        assert_eq!(m.f64("t.f64").unwrap(), Some(0.1));
        assert_eq!(m.bool("t.bool").unwrap(), Some(true));
        let nested = MetadataValue::Array(vec![MetadataValue::U32(1), MetadataValue::U32(2)]);
        assert_eq!(m.get("t.nested"), Some(&MetadataValue::Array(vec![nested])));
        assert_eq!(
            m.f64("llama.attention.layer_norm_rms_epsilon").unwrap(),
            Some(1e-5f32 as f64)
        );
        // A wrongly typed value is an error naming the key, not a silent default.
        let err = m.str("t.bool").unwrap_err().to_string();
        assert!(err.contains("t.bool"), "{err}");
        gguf::load(&path).expect("tiny model loads");
    }
}

#[test]
fn config_defaults_and_card_fields() {
    let path = Gguf::tiny_llama()
        .set("tokenizer.ggml.eot_token_id", Meta::U32(4))
        .write();
    let card = gguf::load_card(&path).expect("loads");
    let c = &card.config;
    assert_eq!(
        (c.hidden_size, c.num_attention_heads, c.num_key_value_heads),
        (8, 2, 1)
    );
    assert_eq!(c.head_dim, 4, "hidden / heads when no key_length is given");
    assert_eq!(
        c.vocab_size, 6,
        "the token list length when no vocab_size is given"
    );
    assert_eq!(c.rope_theta, 10_000.0);
    assert!(c.tie_word_embeddings);
    assert_eq!(card.name, "tiny");
    assert_eq!(card.bos_token_id, Some(0));
    assert_eq!(card.eos_token_ids, vec![1, 4], "EOT joins EOS");
    assert!(!card.add_bos_token);
    assert_eq!(card.max_context, 64);
    assert_eq!(card.chat_template, None);

    let ids = |text: &str, special: bool| {
        card.tokenizer
            .encode(text, special)
            .unwrap()
            .get_ids()
            .to_vec()
    };
    assert_eq!(ids("ab a", false), vec![4, 5, 2]);
    assert_eq!(
        ids("<s>ab</s>", false),
        vec![0, 4, 1],
        "control tokens match their text"
    );
    assert_eq!(ids("ab", true), vec![4], "no BOS unless add_bos_token");
}

#[test]
fn add_bos_token_prepends_bos() {
    let path = Gguf::tiny_llama()
        .set("tokenizer.ggml.add_bos_token", Meta::Bool(true))
        .write();
    let card = gguf::load_card(&path).expect("loads");
    assert!(card.add_bos_token);
    assert_eq!(card.tokenizer.encode("ab", true).unwrap().get_ids(), [0, 4]);
    assert_eq!(card.tokenizer.encode("ab", false).unwrap().get_ids(), [4]);
}

#[test]
fn rope_scaling_from_metadata_or_rope_freqs() {
    let path = Gguf::tiny_llama()
        .set("llama.rope.scaling.type", Meta::Str("linear".into()))
        .set("llama.rope.scaling.factor", Meta::F32(4.0))
        .write();
    let config = gguf::load_card(&path).unwrap().config;
    assert_eq!(
        config.rope_scaling,
        Some(RopeScaling::Linear { factor: 4.0 })
    );

    // What llama.cpp's converter writes for Llama 3.1 (`rope_type: llama3`, factor 8), with
    // head_dim 128 and theta 500000 so all three regimes of the formula occur.
    let (dim, theta, factor) = (128usize, 500_000f64, 8.0f64);
    let divisors: Vec<f32> = (0..dim / 2)
        .map(|i| {
            let freq = 1.0 / theta.powf((2 * i) as f64 / dim as f64);
            let wavelen = 2.0 * std::f64::consts::PI / freq;
            let (low, high) = (8192.0 / 1.0, 8192.0 / 4.0);
            let d = if wavelen < high {
                1.0
            } else if wavelen > low {
                factor
            } else {
                let smooth = (8192.0 / wavelen - 1.0) / (4.0 - 1.0);
                1.0 / ((1.0 - smooth) / factor + smooth)
            };
            d as f32
        })
        .collect();
    let llama3 = Gguf::tiny_llama()
        .set("llama.embedding_length", Meta::U32(256))
        .set("llama.rope.dimension_count", Meta::U32(128))
        .set("llama.rope.freq_base", Meta::F32(500_000.0))
        .f32_tensor("rope_freqs.weight", &[64], &divisors);
    let card = gguf::load_card(&llama3.write()).unwrap();
    assert_eq!(
        card.config.rope_scaling,
        Some(RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        })
    );
    let model = gguf::load(&llama3.write()).unwrap();
    assert!(
        model.weights.is_empty(),
        "rope_freqs.weight is config, not a weight"
    );

    let yarn = Gguf::tiny_llama().set("llama.rope.scaling.type", Meta::Str("yarn".into()));
    let err = gguf::load_card(&yarn.write()).unwrap_err().to_string();
    assert!(err.contains("yarn"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// Broken files: errors, never panics.

fn invalid_reason(err: EngineError) -> String {
    match err {
        EngineError::InvalidGguf { reason, .. } => reason,
        other => panic!("expected InvalidGguf, got {other}"),
    }
}

#[test]
fn wrong_magic_and_version_are_invalid() {
    let mut file = Gguf::tiny_llama();
    file.magic = *b"GGML";
    assert!(invalid_reason(load_err(&file.bytes())).contains("magic"));
    for version in [1, 4] {
        let mut file = Gguf::tiny_llama();
        file.version = version;
        let reason = invalid_reason(load_err(&file.bytes()));
        assert!(reason.contains(&format!("version {version}")), "{reason}");
    }
}

#[test]
fn every_cut_of_a_file_is_an_error() {
    let bytes = Gguf::tiny_llama()
        .f32_tensor("output_norm.weight", &[8], &[1.0; 8])
        .tensor("token_embd.weight", &[32, 2], 8, q8_0(1.0, &[3; 64]))
        .bytes();
    let path = write_file(&bytes);
    assert!(gguf::load(&path).is_ok(), "the whole file loads");
    for len in 0..bytes.len() {
        std::fs::write(&path, &bytes[..len]).unwrap();
        match gguf::load(&path) {
            Err(EngineError::InvalidGguf { .. }) => {}
            Err(other) => panic!("cut at {len}: expected InvalidGguf, got {other}"),
            Ok(_) => panic!("cut at {len} of {} loaded", bytes.len()),
        }
    }
}

#[test]
fn tensor_offset_past_the_end_is_invalid() {
    let mut file = Gguf::tiny_llama().f32_tensor("output_norm.weight", &[8], &[1.0; 8]);
    file.tensors[0].offset = Some(1 << 20);
    let reason = invalid_reason(load_err(&file.bytes()));
    assert!(
        reason.contains("output_norm.weight") && reason.contains("past the end"),
        "{reason}"
    );
    file.tensors[0].offset = Some(u64::MAX - 8);
    invalid_reason(load_err(&file.bytes()));
}

#[test]
fn forged_counts_and_shapes_are_invalid() {
    let mut file = Gguf::tiny_llama().f32_tensor("output_norm.weight", &[8], &[1.0; 8]);
    file.tensors[0].dims = vec![u64::MAX, 4];
    assert!(invalid_reason(load_err(&file.bytes())).contains("shape"));
    file.tensors[0].dims = vec![5];
    file.tensors[0].ggml_type = 8;
    assert!(invalid_reason(load_err(&file.bytes())).contains("blocks"));

    // A metadata array claiming 2^60 strings must fail on the data, not on allocation.
    let mut bytes = Gguf::tiny_llama().set("t.big", strs(&["x"])).bytes();
    let key_at = bytes.windows(5).position(|w| w == b"t.big").unwrap();
    let count_at = key_at + 5 + 4 + 4;
    bytes[count_at..count_at + 8].copy_from_slice(&(1u64 << 60).to_le_bytes());
    assert!(invalid_reason(load_err(&bytes)).contains("truncated"));
}

#[test]
fn wrong_architecture_is_named() {
    let path = Gguf::tiny_llama()
        .set("general.architecture", Meta::Str("gpt2".into()))
        .write();
    let err = gguf::load(&path).err().expect("gpt2 is refused");
    assert!(matches!(err, EngineError::UnsupportedArchitecture(_)));
    assert!(err.to_string().contains("gpt2"));
}

#[test]
fn unsupported_tokenizer_model_is_named() {
    let path = Gguf::tiny_llama()
        .set("tokenizer.ggml.model", Meta::Str("llama".into()))
        .write();
    let err = gguf::load_card(&path).unwrap_err();
    assert!(matches!(err, EngineError::Tokenizer(_)));
    assert!(err.to_string().contains("`llama`"), "{err}");
}

#[test]
fn missing_file_is_an_io_error() {
    let err = gguf::load(Path::new("/nonexistent/model.gguf"))
        .err()
        .unwrap();
    assert!(matches!(err, EngineError::Io { .. }), "{err}");
    assert!(err.to_string().contains("/nonexistent/model.gguf"));
}
