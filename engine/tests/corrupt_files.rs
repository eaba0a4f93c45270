//! Broken model files, made here from good ones, through the entry the binary uses
//! (`loader::load`, then `SharedModel::new`, which takes the weights into the model): the real
//! SmolLM2 GGUF cut inside its magic, header, metadata, tensor directory and data, and patched
//! with a bad magic, an unsupported version, a tensor running past the end, an unknown ggml
//! type, forged string / array / entry counts, non-UTF-8 strings and forged hyper-parameters
//! (2^32 layers or positions, which aborted or panicked before); and a tiny Hugging Face
//! folder whose safetensors file is cut, has a header length past the end, a header that is not
//! JSON or not an object, a tensor whose dtype and shape do not match its byte range, a missing
//! or misshapen tensor, and a missing or broken `config.json`. Each load returns an error whose
//! message names the file and the part at fault — never a panic — and random byte flips
//! anywhere before the GGUF's tensor data never panic either.

mod common;

use std::os::unix::fs::FileExt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use common::tiny_llama::{write_json, write_tiny_llama, TinyLlamaOptions};
use common::ScratchDir;
use engine::loader::{self, smollm2_path};
use engine::SharedModel;
use proptest::prelude::*;
use serde_json::{json, Value};
use tch::{Device, Kind};

/// Loads `path` as the binary does and returns the error's message; fails the test when the
/// model loads, and names `case` when anything panics.
fn load_error(case: &str, path: &Path) -> String {
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        let loaded = loader::load(path.to_str().expect("UTF-8 path"))?;
        SharedModel::new(loaded, Kind::Float, Device::Cpu).map(|_| ())
    }));
    match outcome {
        Err(_) => panic!("{case}: loading panicked"),
        Ok(Ok(())) => panic!("{case}: the broken model loaded"),
        Ok(Err(e)) => e.to_string(),
    }
}

fn assert_names(case: &str, message: &str, parts: &[&str]) {
    for part in parts {
        assert!(
            message.contains(part),
            "{case}: `{message}` should name `{part}`"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Where things are in a GGUF file (ggml's docs/gguf.md), found by walking it.

struct MetaEntry {
    key: String,
    /// The key's 8-byte length.
    key_at: usize,
    value_type: u32,
    /// The value (for a string, its 8-byte length; for an array, its element type).
    value_at: usize,
}

struct TensorEntry {
    name: String,
    /// The entry's first byte (the name's length).
    at: usize,
    dims_at: usize,
    type_at: usize,
    offset_at: usize,
    /// Relative to the data section.
    offset: u64,
}

struct Layout {
    meta: Vec<MetaEntry>,
    tensors: Vec<TensorEntry>,
    data_start: usize,
}

impl Layout {
    fn of(b: &[u8]) -> Layout {
        let u32_at = |p: usize| u32::from_le_bytes(b[p..p + 4].try_into().unwrap());
        let u64_at = |p: usize| u64::from_le_bytes(b[p..p + 8].try_into().unwrap());
        let string_end = |p: usize| p + 8 + u64_at(p) as usize;
        fn value_end(b: &[u8], ty: u32, p: usize) -> usize {
            let u32_at = |p: usize| u32::from_le_bytes(b[p..p + 4].try_into().unwrap());
            let u64_at = |p: usize| u64::from_le_bytes(b[p..p + 8].try_into().unwrap());
            match ty {
                0 | 1 | 7 => p + 1,
                2 | 3 => p + 2,
                4..=6 => p + 4,
                10..=12 => p + 8,
                8 => p + 8 + u64_at(p) as usize,
                9 => {
                    let (elem, count) = (u32_at(p), u64_at(p + 4));
                    (0..count).fold(p + 12, |at, _| value_end(b, elem, at))
                }
                other => panic!("the good file has value type {other}"),
            }
        }
        let (tensor_count, kv_count) = (u64_at(8), u64_at(16));
        let mut pos = 24;
        let mut meta = Vec::new();
        for _ in 0..kv_count {
            let key_at = pos;
            let key_end = string_end(pos);
            let key = String::from_utf8(b[pos + 8..key_end].to_vec()).unwrap();
            let value_type = u32_at(key_end);
            let value_at = key_end + 4;
            pos = value_end(b, value_type, value_at);
            meta.push(MetaEntry {
                key,
                key_at,
                value_type,
                value_at,
            });
        }
        let mut tensors = Vec::new();
        for _ in 0..tensor_count {
            let at = pos;
            let name_end = string_end(pos);
            let name = String::from_utf8(b[pos + 8..name_end].to_vec()).unwrap();
            let n_dims = u32_at(name_end) as usize;
            let dims_at = name_end + 4;
            let type_at = dims_at + 8 * n_dims;
            let offset_at = type_at + 4;
            tensors.push(TensorEntry {
                name,
                at,
                dims_at,
                type_at,
                offset_at,
                offset: u64_at(offset_at),
            });
            pos = offset_at + 8;
        }
        // SmolLM2 sets no `general.alignment`: the default 32.
        assert!(!meta.iter().any(|m| m.key == "general.alignment"));
        Layout {
            meta,
            tensors,
            data_start: pos.div_ceil(32) * 32,
        }
    }

    fn meta(&self, key: &str) -> &MetaEntry {
        self.meta
            .iter()
            .find(|m| m.key == key)
            .expect("key present")
    }

    fn tensor(&self, name: &str) -> &TensorEntry {
        self.tensors
            .iter()
            .find(|t| t.name == name)
            .expect("tensor present")
    }
}

/// The real SmolLM2 file, a scratch copy of it to patch in place, and its layout.
struct Gguf {
    bytes: Vec<u8>,
    layout: Layout,
    scratch: ScratchDir,
    copy: PathBuf,
    /// Tests run in parallel and share the copy: one patch at a time.
    patching: Mutex<()>,
}

impl Gguf {
    fn open() -> Gguf {
        let bytes = std::fs::read(smollm2_path().expect("SmolLM2 GGUF installed")).unwrap();
        let layout = Layout::of(&bytes);
        let scratch = ScratchDir::new("corrupt-gguf");
        let copy = scratch.join("patched.gguf");
        std::fs::write(&copy, &bytes).unwrap();
        Gguf {
            bytes,
            layout,
            scratch,
            copy,
            patching: Mutex::new(()),
        }
    }

    /// The copy with `patch` written at `at`, given to `f`; put back afterwards.
    fn patched<T>(&self, at: usize, patch: &[u8], f: impl FnOnce(&Path) -> T) -> T {
        let _one_at_a_time = self.patching.lock().unwrap_or_else(|e| e.into_inner());
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&self.copy)
            .unwrap();
        file.write_all_at(patch, at as u64).unwrap();
        let out = catch_unwind(AssertUnwindSafe(|| f(&self.copy)));
        file.write_all_at(&self.bytes[at..at + patch.len()], at as u64)
            .unwrap();
        out.unwrap_or_else(|p| std::panic::resume_unwind(p))
    }

    /// The error of the copy with `patch` at `at`.
    fn patched_error(&self, case: &str, at: usize, patch: &[u8]) -> String {
        self.patched(at, patch, |path| load_error(case, path))
    }

    /// The error of the file's first `len` bytes.
    fn cut_error(&self, case: &str, len: usize) -> String {
        let path = self.scratch.join(&format!("cut-{len}.gguf"));
        std::fs::write(&path, &self.bytes[..len]).unwrap();
        let message = load_error(case, &path);
        std::fs::remove_file(&path).unwrap();
        assert_names(case, &message, &[path.to_str().unwrap()]);
        message
    }
}

fn gguf() -> &'static Gguf {
    static FILE: OnceLock<Gguf> = OnceLock::new();
    FILE.get_or_init(Gguf::open)
}

#[test]
fn gguf_cut_anywhere_names_what_it_was_reading() {
    let g = gguf();
    let l = &g.layout;
    let tokens = l.meta("tokenizer.ggml.tokens");
    let tokens_end = l.meta[l.meta.iter().position(|m| m.key == tokens.key).unwrap() + 1].key_at;
    let table_entry = &l.tensors[10];
    let last = l.tensors.iter().max_by_key(|t| t.offset).unwrap();
    let cuts: [(&str, usize, Vec<&str>); 6] = [
        ("inside the magic", 2, vec!["truncated", "the magic number"]),
        (
            "inside the header",
            12,
            vec!["truncated", "the tensor count"],
        ),
        (
            "inside the metadata",
            (tokens.value_at + tokens_end) / 2,
            vec!["truncated", "`tokenizer.ggml.tokens`"],
        ),
        (
            "inside the tensor directory",
            table_entry.at + 5,
            vec!["truncated", "the name of tensor 10"],
        ),
        (
            "inside a directory entry's dimensions",
            table_entry.dims_at + 3,
            vec!["truncated", &table_entry.name],
        ),
        (
            "inside the data",
            l.data_start + last.offset as usize + 10,
            vec!["past the end of the file", &last.name],
        ),
    ];
    for (case, len, parts) in cuts {
        assert!(len < g.bytes.len());
        let message = g.cut_error(case, len);
        assert_names(case, &message, &parts);
        assert_names(case, &message, &["not a valid GGUF file"]);
    }
}

#[test]
fn gguf_bad_magic_version_offset_and_type_are_named() {
    let g = gguf();
    let l = &g.layout;
    let path = g.copy.to_str().unwrap();
    let message = g.patched_error("bad magic", 0, b"GGML");
    assert_names("bad magic", &message, &[path, "bad magic"]);

    let message = g.patched_error("version 7", 4, &7u32.to_le_bytes());
    assert_names("version 7", &message, &[path, "unsupported GGUF version 7"]);

    let embd = l.tensor("token_embd.weight");
    let past = (g.bytes.len() as u64).to_le_bytes();
    let message = g.patched_error("offset past the end", embd.offset_at, &past);
    assert_names(
        "offset past the end",
        &message,
        &[path, "`token_embd.weight`", "past the end of the file"],
    );
    let message = g.patched_error("offset overflowing", embd.offset_at, &[0xff; 8]);
    assert_names("offset overflowing", &message, &["`token_embd.weight`"]);

    let q = l.tensor("blk.0.attn_q.weight");
    let message = g.patched_error("unknown ggml type", q.type_at, &99u32.to_le_bytes());
    assert_names(
        "unknown ggml type",
        &message,
        &[path, "`blk.0.attn_q.weight`", "unknown ggml type 99"],
    );

    // A real type the loader does not dequantize (Q6_K) is refused by name, not as corrupt:
    // its 210-byte blocks of 256 make the tensor longer, but it still ends inside the file.
    let message = g.patched_error("Q6_K", q.type_at, &14u32.to_le_bytes());
    assert_names("Q6_K", &message, &["Q6_K", "blk.0.attn_q.weight"]);

    let norm = l.tensor("output_norm.weight");
    let message = g.patched_error("overflowing shape", norm.dims_at, &[0xff; 8]);
    assert_names(
        "overflowing shape",
        &message,
        &[path, "`output_norm.weight`", "shape"],
    );
}

#[test]
fn gguf_forged_lengths_and_counts_fail_without_allocating() {
    let g = gguf();
    let l = &g.layout;
    let huge = (1u64 << 62).to_le_bytes();
    let cases: [(&str, usize, Vec<&str>); 5] = [
        (
            "key length",
            l.meta[0].key_at,
            vec![
                "claims 4611686018427387904 bytes",
                "the key of metadata entry 0",
            ],
        ),
        (
            "string value length",
            l.meta("general.architecture").value_at,
            vec!["claims 4611686018427387904 bytes", "`general.architecture`"],
        ),
        (
            "array count",
            l.meta("tokenizer.ggml.tokens").value_at + 4,
            vec![
                "claims 4611686018427387904 elements",
                "`tokenizer.ggml.tokens`",
            ],
        ),
        (
            "metadata count",
            16,
            vec!["claims 4611686018427387904 metadata entries"],
        ),
        (
            "tensor count",
            8,
            vec!["claims 4611686018427387904 tensor directory entries"],
        ),
    ];
    for (case, at, parts) in cases {
        let message = g.patched_error(case, at, &huge);
        assert_names(case, &message, &parts);
        assert_names(
            case,
            &message,
            &[g.copy.to_str().unwrap(), "truncated or corrupt"],
        );
    }
    let name = l.tensor("output_norm.weight");
    let message = g.patched_error("tensor name length", name.at, &huge);
    assert_names(
        "tensor name length",
        &message,
        &["claims", "the name of tensor"],
    );
}

#[test]
fn gguf_non_utf8_strings_are_named() {
    let g = gguf();
    let l = &g.layout;
    let arch = l.meta("general.architecture");
    assert_eq!(arch.value_type, 8);
    let message = g.patched_error("value", arch.value_at + 8, &[0xff]);
    assert_names(
        "value",
        &message,
        &["`general.architecture`", "not valid UTF-8"],
    );

    let message = g.patched_error("key", arch.key_at + 8, &[0xc3]);
    assert_names(
        "key",
        &message,
        &["the key of metadata entry", "not valid UTF-8"],
    );

    // One token of the vocabulary: the array's first string.
    let tokens = l.meta("tokenizer.ggml.tokens");
    let message = g.patched_error("token", tokens.value_at + 12 + 8, &[0xfe]);
    assert_names(
        "token",
        &message,
        &["`tokenizer.ggml.tokens`", "not valid UTF-8"],
    );

    let name = l.tensor("output_norm.weight");
    let message = g.patched_error("tensor name", name.at + 8, &[0x80]);
    assert_names(
        "tensor name",
        &message,
        &["the name of tensor", "not valid UTF-8"],
    );
}

/// The hyper-parameters read as integers, each forged to 0, 2^20 and 2^32 − 1: the model
/// loads or the error names the key; a layer count or context length beyond what the file can
/// back is refused before the model reserves room for it (2^32 layers aborted on allocation,
/// a 2^32-position RoPE table panicked in libtorch).
#[test]
fn gguf_forged_hyper_parameters_are_refused_by_name() {
    let g = gguf();
    let keys: Vec<&MetaEntry> = g
        .layout
        .meta
        .iter()
        .filter(|m| m.key.starts_with("llama.") && m.value_type == 4)
        .collect();
    assert!(keys.len() >= 8, "SmolLM2 stores its config as u32 metadata");
    for m in keys {
        for value in [0, 1 << 20, u32::MAX] {
            let case = format!("{} = {value}", m.key);
            let outcome = g.patched(m.value_at, &value.to_le_bytes(), |path| {
                catch_unwind(AssertUnwindSafe(|| {
                    let loaded = loader::load(path.to_str().unwrap())?;
                    SharedModel::new(loaded, Kind::Float, Device::Cpu).map(|_| ())
                }))
            });
            let Ok(result) = outcome else {
                panic!("{case}: loading panicked")
            };
            if let Err(e) = result {
                assert!(!e.to_string().is_empty(), "{case}");
            }
        }
    }
    let refused = |key: &str, value: u32| {
        let at = g.layout.meta(key).value_at;
        g.patched_error(key, at, &value.to_le_bytes())
    };
    assert_names(
        "block count",
        &refused("llama.block_count", u32::MAX),
        &[
            "claims 4294967295 layers",
            "`llama.block_count`",
            "weights hold 30",
        ],
    );
    assert_names(
        "context length",
        &refused("llama.context_length", u32::MAX),
        &["`max_position_embeddings`", "4294967295"],
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Any byte before the tensor data replaced by any other: the card (which parses the whole
    /// header and directory, and builds the tokenizer) loads or fails, never panics.
    #[test]
    fn gguf_byte_flips_before_the_data_never_panic(at in 0usize..1 << 30, byte in any::<u8>()) {
        let g = gguf();
        let at = at % g.layout.data_start;
        let outcome = g.patched(at, &[byte], |path| {
            catch_unwind(AssertUnwindSafe(|| {
                loader::load_card(path.to_str().unwrap()).map(|_| ())
            }))
        });
        prop_assert!(outcome.is_ok(), "byte {byte:#04x} at {at} panicked");
    }
}

// ---------------------------------------------------------------------------------------------
// A Hugging Face folder.

/// A tiny model folder, and its `model.safetensors` split into header text and data.
struct Folder {
    _scratch: ScratchDir,
    dir: PathBuf,
    file: PathBuf,
    bytes: Vec<u8>,
    header: Value,
}

impl Folder {
    fn new() -> Folder {
        let scratch = ScratchDir::new("corrupt-hf");
        let dir = write_tiny_llama(&scratch.join("tiny-llama"), TinyLlamaOptions::default()).dir;
        let file = dir.join("model.safetensors");
        let bytes = std::fs::read(&file).unwrap();
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let header = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
        Folder {
            _scratch: scratch,
            dir,
            file,
            bytes,
            header,
        }
    }

    fn data(&self) -> &[u8] {
        let n = u64::from_le_bytes(self.bytes[..8].try_into().unwrap()) as usize;
        &self.bytes[8 + n..]
    }

    /// The error of the folder with `model.safetensors` replaced by `bytes`.
    fn error_with(&self, case: &str, bytes: &[u8]) -> String {
        std::fs::write(&self.file, bytes).unwrap();
        let message = load_error(case, &self.dir);
        std::fs::write(&self.file, &self.bytes).unwrap();
        message
    }

    /// As [`Folder::error_with`], for a file the safetensors reader refuses: the message names it.
    fn invalid_file(&self, case: &str, bytes: &[u8]) -> String {
        let message = self.error_with(case, bytes);
        let path = self.file.to_str().unwrap();
        assert_names(case, &message, &["not a valid safetensors file", path]);
        message
    }

    /// A file of `header` (any text) over the original data.
    fn with_header(&self, header: &str) -> Vec<u8> {
        let mut out = (header.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(self.data());
        out
    }

    /// A file whose header is the original edited by `edit`.
    fn with_edited_header(&self, edit: impl FnOnce(&mut Value)) -> Vec<u8> {
        let mut header = self.header.clone();
        edit(&mut header);
        self.with_header(&header.to_string())
    }

    /// The tensor whose data comes last.
    fn last_tensor(&self) -> String {
        let entries = self.header.as_object().unwrap();
        let end = |v: &Value| v["data_offsets"][1].as_u64().unwrap_or(0);
        let (name, _) = entries
            .iter()
            .filter(|(k, _)| *k != "__metadata__")
            .max_by_key(|(_, v)| end(v))
            .unwrap();
        name.clone()
    }
}

#[test]
fn safetensors_cut_or_with_a_bad_header_names_the_fault() {
    let f = Folder::new();
    let n = u64::from_le_bytes(f.bytes[..8].try_into().unwrap()) as usize;
    let last = f.last_tensor();
    let claimed = format!("header length {n} is larger than");
    let cases: Vec<(&str, Vec<u8>, Vec<&str>)> = vec![
        (
            "cut inside the header length",
            f.bytes[..4].to_vec(),
            vec!["4 bytes, fewer than the 8-byte header length"],
        ),
        (
            "cut inside the header",
            f.bytes[..8 + n / 2].to_vec(),
            vec![&claimed, "truncated"],
        ),
        (
            "cut inside the data",
            f.bytes[..f.bytes.len() - 100].to_vec(),
            vec![&last, "run past the end of the file"],
        ),
        (
            "header length past the end",
            {
                let mut b = f.bytes.clone();
                b[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
                b
            },
            vec!["header length 1099511627776 is larger than"],
        ),
        (
            "header not JSON",
            f.with_header("{\"model.norm.weight\": {\"dtype\": "),
            vec!["header", "not valid JSON"],
        ),
        (
            "header not an object",
            f.with_header("[1, 2, 3]"),
            vec!["the header is an array, not a JSON object"],
        ),
        (
            "trailing bytes",
            [&f.bytes[..], b"extra"].concat(),
            vec!["5 bytes after the last tensor's data"],
        ),
    ];
    for (case, bytes, parts) in cases {
        let message = f.invalid_file(case, &bytes);
        assert_names(case, &message, &parts);
    }
}

#[test]
fn safetensors_tensor_entries_that_do_not_fit_their_bytes_are_named() {
    let f = Folder::new();
    let norm = "model.norm.weight";
    let cases: Vec<(&str, Vec<u8>, Vec<&str>)> = vec![
        (
            "shape larger than the bytes",
            f.with_edited_header(|h| h[norm]["shape"] = json!([64, 2])),
            vec![norm, "F32 of shape [64, 2] takes 512 bytes", "span 256"],
        ),
        (
            "dtype narrower than the bytes",
            f.with_edited_header(|h| h[norm]["dtype"] = json!("F16")),
            vec![norm, "takes 128 bytes", "span 256"],
        ),
        (
            "unknown dtype",
            f.with_edited_header(|h| h[norm]["dtype"] = json!("Q9")),
            vec![norm, "unknown variant `Q9`"],
        ),
        (
            "offsets reversed",
            f.with_edited_header(|h| {
                let (s, e) = (
                    h[norm]["data_offsets"][0].clone(),
                    h[norm]["data_offsets"][1].clone(),
                );
                h[norm]["data_offsets"] = json!([e, s]);
            }),
            vec![norm, "data_offsets"],
        ),
        (
            "shape of a string",
            f.with_edited_header(|h| h[norm]["shape"] = json!("64")),
            vec![norm, "invalid type"],
        ),
    ];
    for (case, bytes, parts) in cases {
        let message = f.invalid_file(case, &bytes);
        assert_names(case, &message, &parts);
    }
}

/// Tensors the model needs are checked when `SharedModel::new` takes them, by name (the
/// weights no longer know their file by then).
#[test]
fn missing_or_misshapen_tensors_are_named() {
    let f = Folder::new();
    let down = "model.layers.1.mlp.down_proj.weight";
    let message = f.error_with(
        "missing tensor",
        &rewrite(&f, |tensors| tensors.retain(|(n, ..)| n != down)),
    );
    assert!(
        message.contains(down) && message.contains("missing"),
        "{message}"
    );

    let norm = "model.norm.weight";
    let message = f.error_with(
        "misshapen tensor",
        &rewrite(&f, |tensors| {
            let t = tensors.iter_mut().find(|(n, ..)| n == norm).unwrap();
            t.2 = vec![32];
            t.3.truncate(128);
        }),
    );
    assert_names("misshapen tensor", &message, &[norm, "[32]", "[64]"]);
}

/// `model.safetensors` rewritten with its tensors edited by `edit` (name, dtype, shape, bytes);
/// the file's path is named by `Folder::error_with`, so this file is only what it returns.
fn rewrite(
    f: &Folder,
    edit: impl FnOnce(&mut Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)>),
) -> Vec<u8> {
    let file = safetensors::SafeTensors::deserialize(&f.bytes).unwrap();
    let mut tensors: Vec<_> = file
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.dtype(), v.shape().to_vec(), v.data().to_vec()))
        .collect();
    edit(&mut tensors);
    let scratch = ScratchDir::new("rewrite");
    let path = scratch.join("model.safetensors");
    common::tiny_llama::write_safetensors(&path, &tensors);
    std::fs::read(&path).unwrap()
}

#[test]
fn missing_or_broken_config_json_is_named() {
    let f = Folder::new();
    let config = f.dir.join("config.json");
    let good = std::fs::read(&config).unwrap();
    let err = |case: &str| {
        let message = load_error(case, &f.dir);
        std::fs::write(&config, &good).unwrap();
        assert_names(case, &message, &["config.json"]);
        message
    };
    std::fs::remove_file(&config).unwrap();
    let message = err("missing");
    assert_names("missing", &message, &["cannot read"]);

    std::fs::write(&config, "{\"hidden_size\": 64,").unwrap();
    assert_names("invalid", &err("invalid"), &["not valid JSON"]);

    std::fs::write(&config, "[64]").unwrap();
    assert_names(
        "not an object",
        &err("not an object"),
        &["not a JSON object"],
    );

    let edited = |key: &str, v: Value| {
        let mut value: Value = serde_json::from_slice(&good).unwrap();
        value[key] = v;
        write_json(&config, &value);
        err(key)
    };
    assert_names(
        "negative layers",
        &edited("num_hidden_layers", json!(-2)),
        &["num_hidden_layers", "-2"],
    );
    // More layers than the weights hold is refused before the model reserves room for them.
    assert_names(
        "2^32 layers",
        &edited("num_hidden_layers", json!(u32::MAX)),
        &["claims 4294967295 layers", "weights hold 2"],
    );
    assert_names(
        "2^40 positions",
        &edited("max_position_embeddings", json!(1u64 << 40)),
        &["`max_position_embeddings`", "1099511627776"],
    );
}
