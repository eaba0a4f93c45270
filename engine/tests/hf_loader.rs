//! The Hugging Face loader against tiny Llama folders written here: dense (f32, bf16, f16),
//! sharded, tied, compressed-tensors FP8 against its dequantized twin, the tokenizer and config
//! files, and each way a folder can be broken.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::tiny_llama::{
    self, write_json, write_tiny_llama, StoredTensor, TinyLlama, TinyLlamaOptions,
};
use common::ScratchDir;
use engine::loader::{self, hf, LoadedModel};
use engine::weights::{WeightTensor, Weights};
use engine::{EngineError, RopeScaling};
use safetensors::Dtype;
use serde_json::{json, Value};
use tch::{Kind, Tensor};

fn load(dir: &Path) -> LoadedModel {
    hf::load(dir).unwrap_or_else(|e| panic!("{} loads: {e}", dir.display()))
}

fn load_err(dir: &Path) -> EngineError {
    match hf::load(dir) {
        Ok(_) => panic!("{} should not load", dir.display()),
        Err(e) => e,
    }
}

fn edit_json(path: &Path, edit: impl FnOnce(&mut Value)) {
    let mut value: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    edit(&mut value);
    write_json(path, &value);
}

/// A scratch folder holding a tiny model in its `tiny-llama` sub-folder.
fn tiny(options: TinyLlamaOptions) -> (ScratchDir, TinyLlama) {
    let scratch = ScratchDir::new("hf");
    let model = write_tiny_llama(&scratch.join("tiny-llama"), options);
    (scratch, model)
}

/// Takes every weight, checking names and shapes against what was written.
fn take_all(
    mut weights: Weights,
    expected: &BTreeMap<String, Vec<i64>>,
) -> BTreeMap<String, WeightTensor> {
    let mut names: Vec<String> = weights.names().map(str::to_string).collect();
    names.sort();
    assert_eq!(
        names,
        expected.keys().cloned().collect::<Vec<_>>(),
        "tensor names"
    );
    expected
        .iter()
        .map(|(name, shape)| {
            (
                name.clone(),
                weights.take(name, shape).expect("shape as written"),
            )
        })
        .collect()
}

fn dense(t: &WeightTensor) -> &Tensor {
    match t {
        WeightTensor::Dense(t) => t,
        WeightTensor::Fp8 { .. } => panic!("expected a dense tensor"),
    }
}

/// Loads `model` and checks each tensor is dense, of `kind`, and equal to what was written.
fn check_dense(model: &TinyLlama, kind: Kind) {
    let loaded = load(&model.dir);
    for (name, t) in take_all(loaded.weights, &model.expected_shapes()) {
        let t = dense(&t);
        assert_eq!(t.kind(), kind, "{name}");
        let StoredTensor::Dense(written) = &model.weights[&name] else {
            unreachable!()
        };
        assert!(t.equal(written), "{name} differs from what was written");
    }
}

// ---------------------------------------------------------------------------------------------
// Dense folders.

#[test]
fn dense_f32_folder_loads_config_card_and_weights() {
    let (_scratch, model) = tiny(TinyLlamaOptions::default());
    let card = hf::load_card(&model.dir).expect("card loads");
    let c = &card.config;
    assert_eq!(
        (c.hidden_size, c.intermediate_size, c.num_hidden_layers),
        (64, 128, 2)
    );
    assert_eq!(
        (c.num_attention_heads, c.num_key_value_heads, c.head_dim),
        (4, 2, 16)
    );
    assert_eq!((c.vocab_size, c.max_position_embeddings), (320, 256));
    assert_eq!((c.rope_theta, c.rms_norm_eps), (10_000.0, 1e-5));
    assert_eq!(c.rope_scaling, None);
    assert!(!c.tie_word_embeddings);

    assert_eq!(card.name, "tiny-llama");
    assert_eq!(card.bos_token_id, Some(tiny_llama::BOS_ID));
    // `eos_token_id` of config.json, then the extra one of generation_config.json.
    assert_eq!(
        card.eos_token_ids,
        vec![tiny_llama::EOS_ID, tiny_llama::EOT_ID]
    );
    assert_eq!(
        card.chat_template.as_deref(),
        Some(tiny_llama::CHAT_TEMPLATE)
    );
    assert!(card.add_bos_token);
    assert_eq!(card.max_context, 256);

    check_dense(&model, Kind::Float);
}

#[test]
fn bf16_and_f16_folders_keep_their_dtype() {
    for kind in [Kind::BFloat16, Kind::Half] {
        let (_scratch, model) = tiny(TinyLlamaOptions {
            dtype: kind,
            ..Default::default()
        });
        check_dense(&model, kind);
    }
}

#[test]
fn sharded_folder_loads_the_same_weights() {
    let (_scratch, model) = tiny(TinyLlamaOptions {
        sharded: true,
        ..Default::default()
    });
    assert!(model.dir.join("model.safetensors.index.json").exists());
    assert!(!model.dir.join("model.safetensors").exists());
    check_dense(&model, Kind::Float);
}

#[test]
fn tied_and_untied_embeddings() {
    let (_a, untied) = tiny(TinyLlamaOptions::default());
    let (_b, tied) = tiny(TinyLlamaOptions {
        tied_embeddings: true,
        ..Default::default()
    });
    let untied_model = load(&untied.dir);
    let tied_model = load(&tied.dir);
    assert!(!untied_model.card.config.tie_word_embeddings);
    assert!(untied_model.weights.contains("lm_head.weight"));
    assert!(tied_model.card.config.tie_word_embeddings);
    assert!(!tied_model.weights.contains("lm_head.weight"));
    assert_eq!(tied_model.weights.len() + 1, untied_model.weights.len());
    // 2 layers × (2 norms + 7 projections) + embeddings + final norm (+ lm_head).
    assert_eq!(untied_model.weights.len(), 2 * 9 + 3);
    check_dense(&tied, Kind::Float);
}

#[test]
fn loader_load_dispatches_a_folder_to_hf() {
    let (_scratch, model) = tiny(TinyLlamaOptions::default());
    let loaded = loader::load(model.dir.to_str().unwrap()).expect("loads");
    assert_eq!(loaded.card.name, "tiny-llama");
    assert_eq!(loaded.weights.len(), model.weights.len());
}

// ---------------------------------------------------------------------------------------------
// FP8 (compressed-tensors).

fn check_fp8(model: &TinyLlama, twin: &TinyLlama) {
    let fp8 = take_all(load(&model.dir).weights, &model.expected_shapes());
    let dense_twin = take_all(load(&twin.dir).weights, &twin.expected_shapes());
    let mut projections = 0;
    for (name, t) in &fp8 {
        let is_projection = tiny_llama::LINEAR_LAYERS
            .iter()
            .any(|l| name.ends_with(&format!("{l}.weight")));
        match t {
            WeightTensor::Fp8 { weight, scale } => {
                assert!(is_projection, "{name} should be dense");
                projections += 1;
                assert_eq!(weight.kind(), Kind::Float8e4m3fn, "{name}");
                assert_eq!(scale.kind(), Kind::Float, "{name}");
                assert_eq!(scale.size(), vec![weight.size()[0], 1], "{name}");
            }
            WeightTensor::Dense(t) => {
                assert!(!is_projection, "{name} should be FP8");
                assert_eq!(t.kind(), model.options.dtype, "{name}");
            }
        }
        let twin_weight = dense(&dense_twin[name]);
        assert_eq!(twin_weight.kind(), Kind::Float);
        assert!(
            t.dequantize(Kind::Float).equal(twin_weight),
            "{name}: the dequantized FP8 weight differs from the twin's"
        );
    }
    assert_eq!(projections, 2 * 7);
}

#[test]
fn fp8_folder_loads_fp8_projections_equal_to_the_dequantized_twin() {
    let (scratch, model) = tiny(TinyLlamaOptions {
        dtype: Kind::BFloat16,
        fp8: true,
        ..Default::default()
    });
    let twin = model.write_dequantized_twin(&scratch.join("twin"));
    assert!(twin.config.get("quantization_config").is_none());
    let card = hf::load_card(&model.dir).expect("card");
    assert_eq!(
        card.config,
        hf::load_card(&twin.dir).expect("twin card").config
    );
    check_fp8(&model, &twin);
}

#[test]
fn sharded_tied_fp8_folder_loads() {
    let (scratch, model) = tiny(TinyLlamaOptions {
        fp8: true,
        sharded: true,
        tied_embeddings: true,
        ..Default::default()
    });
    let twin = model.write_dequantized_twin(&scratch.join("twin"));
    check_fp8(&model, &twin);
}

#[test]
fn fp8_scales_may_be_bf16_and_one_dimensional() {
    let (_scratch, model) = tiny(TinyLlamaOptions {
        fp8: true,
        ..Default::default()
    });
    let name = "model.layers.0.self_attn.q_proj.weight";
    let StoredTensor::Fp8 { weight, scale } = &model.weights[name] else {
        unreachable!()
    };
    // Rewrite the file with this one scale as bf16 `[out]`, as some checkpoints store it.
    let bf16_scale = scale.to_kind(Kind::BFloat16).reshape([-1]);
    rewrite_tensor(&model.dir, &format!("{name}_scale"), &bf16_scale);
    let mut weights = load(&model.dir).weights;
    let loaded = weights.take(name, &weight.size()).unwrap();
    let expected = weight.to_kind(Kind::Float) * bf16_scale.to_kind(Kind::Float).reshape([-1, 1]);
    assert!(loaded.dequantize(Kind::Float).equal(&expected));
}

/// Rewrites `model.safetensors` with `name` replaced by (or set to) `tensor`.
fn rewrite_tensor(dir: &Path, name: &str, tensor: &Tensor) {
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = file
        .tensors()
        .into_iter()
        .filter(|(n, _)| n != name)
        .map(|(n, v)| (n, v.dtype(), v.shape().to_vec(), v.data().to_vec()))
        .collect();
    let shape = tensor.size().iter().map(|&d| d as usize).collect();
    tensors.push((
        name.to_string(),
        tiny_llama::dtype_of(tensor.kind()),
        shape,
        tiny_llama::tensor_bytes(tensor),
    ));
    tiny_llama::write_safetensors(&path, &tensors);
}

/// Rewrites `model.safetensors` without `name`.
fn remove_tensor(dir: &Path, name: &str) {
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = file
        .tensors()
        .into_iter()
        .filter(|(n, _)| n != name)
        .map(|(n, v)| (n, v.dtype(), v.shape().to_vec(), v.data().to_vec()))
        .collect();
    tiny_llama::write_safetensors(&path, &tensors);
}

#[test]
fn static_input_scales_are_skipped() {
    let (_scratch, model) = tiny(TinyLlamaOptions {
        fp8: true,
        ..Default::default()
    });
    rewrite_tensor(
        &model.dir,
        "model.layers.0.self_attn.q_proj.input_scale",
        &Tensor::from_slice(&[0.01f32]),
    );
    let loaded = load(&model.dir);
    assert!(!loaded
        .weights
        .contains("model.layers.0.self_attn.q_proj.input_scale"));
    assert_eq!(loaded.weights.len(), model.weights.len());
}

// ---------------------------------------------------------------------------------------------
// Config variants.

#[test]
fn config_defaults_and_rope_scaling() {
    let (_scratch, model) = tiny(TinyLlamaOptions::default());
    let config = model.dir.join("config.json");
    edit_json(&config, |c| {
        let c = c.as_object_mut().unwrap();
        for key in [
            "num_key_value_heads",
            "head_dim",
            "rope_theta",
            "tie_word_embeddings",
        ] {
            c.remove(key);
        }
        c.insert(
            "rope_scaling".into(),
            json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
        );
    });
    let c = hf::load_card(&model.dir).expect("card").config;
    assert_eq!((c.num_key_value_heads, c.head_dim), (4, 16));
    assert_eq!(c.rope_theta, 10_000.0);
    assert!(!c.tie_word_embeddings);
    assert_eq!(
        c.rope_scaling,
        Some(RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        })
    );

    edit_json(&config, |c| {
        c["rope_scaling"] = json!({"type": "linear", "factor": 2.0})
    });
    let c = hf::load_card(&model.dir).expect("card").config;
    assert_eq!(c.rope_scaling, Some(RopeScaling::Linear { factor: 2.0 }));

    // An architecture list is enough without `model_type`, and `model_type` without the list.
    edit_json(&config, |c| {
        c.as_object_mut().unwrap().remove("model_type");
    });
    hf::load_card(&model.dir).expect("architectures alone");
    edit_json(&config, |c| {
        c.as_object_mut().unwrap().remove("architectures");
        c["model_type"] = json!("llama");
    });
    hf::load_card(&model.dir).expect("model_type alone");
}

#[test]
fn special_tokens_fall_back_to_tokenizer_config() {
    let (_scratch, model) = tiny(TinyLlamaOptions::default());
    edit_json(&model.dir.join("config.json"), |c| {
        let c = c.as_object_mut().unwrap();
        c.remove("bos_token_id");
        c.insert("eos_token_id".into(), Value::Null);
    });
    std::fs::remove_file(model.dir.join("generation_config.json")).unwrap();
    let card = hf::load_card(&model.dir).expect("card");
    assert_eq!(card.bos_token_id, Some(tiny_llama::BOS_ID));
    assert_eq!(card.eos_token_ids, vec![tiny_llama::EOS_ID]);

    // A list in config.json wins over tokenizer_config.json.
    edit_json(&model.dir.join("config.json"), |c| {
        c["eos_token_id"] = json!([tiny_llama::EOT_ID, tiny_llama::EOS_ID]);
    });
    let card = hf::load_card(&model.dir).expect("card");
    assert_eq!(
        card.eos_token_ids,
        vec![tiny_llama::EOT_ID, tiny_llama::EOS_ID]
    );
}

#[test]
fn chat_template_list_takes_default_and_tokenizer_encodes() {
    let (_scratch, model) = tiny(TinyLlamaOptions::default());
    edit_json(&model.dir.join("tokenizer_config.json"), |c| {
        c["chat_template"] = json!([
            {"name": "tool_use", "template": "{{ tools }}"},
            {"name": "default", "template": "{{ messages }}"},
        ]);
    });
    let card = hf::load_card(&model.dir).expect("card");
    assert_eq!(card.chat_template.as_deref(), Some("{{ messages }}"));

    let ids = |text: &str, special: bool| {
        card.tokenizer
            .encode(text, special)
            .unwrap()
            .get_ids()
            .to_vec()
    };
    // "the" is `t` + `he`; " the" merges fully (ids 256.. are the merges in order).
    assert_eq!(ids(" the", false), vec![258]);
    assert_eq!(ids("the", false), vec![b't' as u32, 257]);
    assert_eq!(ids("the", true), vec![tiny_llama::BOS_ID, b't' as u32, 257]);
    assert_eq!(ids("a</s>", false), vec![b'a' as u32, tiny_llama::EOS_ID]);
    assert_eq!(card.tokenizer.decode(&[258, 259], false).unwrap(), " thell");
}

#[test]
fn add_bos_token_adds_a_processor_when_tokenizer_json_has_none() {
    let (_scratch, model) = tiny(TinyLlamaOptions::default());
    let tokenizer_json = model.dir.join("tokenizer.json");
    edit_json(&tokenizer_json, |t| t["post_processor"] = Value::Null);
    let card = hf::load_card(&model.dir).expect("card");
    assert!(card.add_bos_token);
    let ids = card.tokenizer.encode("a", true).unwrap().get_ids().to_vec();
    assert_eq!(ids, vec![tiny_llama::BOS_ID, b'a' as u32]);

    edit_json(&model.dir.join("tokenizer_config.json"), |c| {
        c["add_bos_token"] = json!(false)
    });
    let card = hf::load_card(&model.dir).expect("card");
    assert!(!card.add_bos_token);
    assert_eq!(
        card.tokenizer.encode("a", true).unwrap().get_ids(),
        [b'a' as u32]
    );
}

#[test]
fn chat_template_jinja_file_is_read() {
    let (_scratch, model) = tiny(TinyLlamaOptions::default());
    edit_json(&model.dir.join("tokenizer_config.json"), |c| {
        c.as_object_mut().unwrap().remove("chat_template");
    });
    std::fs::write(model.dir.join("chat_template.jinja"), "{{ x }}").unwrap();
    let card = hf::load_card(&model.dir).expect("card");
    assert_eq!(card.chat_template.as_deref(), Some("{{ x }}"));
}

// ---------------------------------------------------------------------------------------------
// Errors: each names what is wrong.

fn assert_names(err: &EngineError, parts: &[&str]) {
    let message = err.to_string();
    for part in parts {
        assert!(message.contains(part), "`{message}` should name `{part}`");
    }
}

#[test]
fn unsupported_architecture_is_named() {
    let (_scratch, model) = tiny(TinyLlamaOptions::default());
    edit_json(&model.dir.join("config.json"), |c| {
        c["architectures"] = json!(["MistralForCausalLM"]);
        c["model_type"] = json!("mistral");
    });
    let err = load_err(&model.dir);
    assert!(
        matches!(err, EngineError::UnsupportedArchitecture(_)),
        "{err}"
    );
    assert_names(&err, &["MistralForCausalLM"]);
}

#[test]
fn unsupported_rope_scaling_is_named() {
    let (_scratch, model) = tiny(TinyLlamaOptions::default());
    edit_json(&model.dir.join("config.json"), |c| {
        c["rope_scaling"] =
            json!({"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768});
    });
    let err = load_err(&model.dir);
    assert!(matches!(err, EngineError::InvalidConfig(_)), "{err}");
    assert_names(&err, &["rope_scaling", "yarn"]);
}

#[test]
fn unsupported_quantization_is_named() {
    let (_scratch, model) = tiny(TinyLlamaOptions::default());
    let config = model.dir.join("config.json");
    edit_json(&config, |c| {
        c["quantization_config"] = json!({"quant_method": "gptq", "bits": 4, "group_size": 128});
    });
    let err = load_err(&model.dir);
    assert!(
        matches!(err, EngineError::UnsupportedQuantization(_)),
        "{err}"
    );
    assert_names(&err, &["gptq"]);

    // compressed-tensors, but int4 per-group weights.
    let (_scratch2, fp8) = tiny(TinyLlamaOptions {
        fp8: true,
        ..Default::default()
    });
    edit_json(&fp8.dir.join("config.json"), |c| {
        let w = &mut c["quantization_config"]["config_groups"]["group_0"]["weights"];
        w["num_bits"] = json!(4);
        w["type"] = json!("int");
        w["strategy"] = json!("group");
    });
    let err = load_err(&fp8.dir);
    assert!(
        matches!(err, EngineError::UnsupportedQuantization(_)),
        "{err}"
    );
    assert_names(&err, &["compressed-tensors", "4-bit int", "group"]);
}

#[test]
fn unsupported_tensor_dtype_is_named() {
    let (_scratch, model) = tiny(TinyLlamaOptions::default());
    rewrite_tensor(
        &model.dir,
        "model.norm.weight",
        &Tensor::from_slice(&[1i32; 64]),
    );
    let err = load_err(&model.dir);
    assert!(
        matches!(err, EngineError::UnsupportedTensorType { .. }),
        "{err}"
    );
    assert_names(&err, &["I32", "model.norm.weight"]);
}

#[test]
fn fp8_weight_without_scale_or_config_is_refused() {
    let (_scratch, model) = tiny(TinyLlamaOptions {
        fp8: true,
        ..Default::default()
    });
    let scale = "model.layers.1.mlp.down_proj.weight_scale";
    remove_tensor(&model.dir, scale);
    let err = load_err(&model.dir);
    assert!(matches!(err, EngineError::MissingTensor(_)), "{err}");
    assert_names(&err, &[scale]);

    let (_scratch2, model) = tiny(TinyLlamaOptions {
        fp8: true,
        ..Default::default()
    });
    edit_json(&model.dir.join("config.json"), |c| {
        c.as_object_mut().unwrap().remove("quantization_config");
    });
    let err = load_err(&model.dir);
    assert!(
        matches!(err, EngineError::UnsupportedTensorType { .. }),
        "{err}"
    );
    assert_names(&err, &["F8_E4M3", "quantization_config"]);
}

#[test]
fn missing_weight_files_are_named() {
    let (_scratch, model) = tiny(TinyLlamaOptions {
        sharded: true,
        ..Default::default()
    });
    let shard = "model-00002-of-00002.safetensors";
    std::fs::remove_file(model.dir.join(shard)).unwrap();
    let err = load_err(&model.dir);
    assert!(matches!(err, EngineError::Io { .. }), "{err}");
    assert_names(&err, &[shard]);

    let (_scratch2, model) = tiny(TinyLlamaOptions::default());
    std::fs::remove_file(model.dir.join("model.safetensors")).unwrap();
    let err = load_err(&model.dir);
    assert!(matches!(err, EngineError::Io { .. }), "{err}");
    assert_names(&err, &["model.safetensors"]);
    // The card does not need the weights.
    hf::load_card(&model.dir).expect("card without weights");
}

#[test]
fn index_entries_missing_from_their_shard_are_named() {
    let (_scratch, model) = tiny(TinyLlamaOptions {
        sharded: true,
        ..Default::default()
    });
    edit_json(&model.dir.join("model.safetensors.index.json"), |i| {
        i["weight_map"]["model.extra.weight"] = json!("model-00001-of-00002.safetensors");
    });
    let err = load_err(&model.dir);
    assert!(
        matches!(err, EngineError::InvalidSafetensors { .. }),
        "{err}"
    );
    assert_names(
        &err,
        &["model-00001-of-00002.safetensors", "model.extra.weight"],
    );
}

#[test]
fn truncated_or_garbled_safetensors_are_named() {
    let (_scratch, model) = tiny(TinyLlamaOptions::default());
    let path = model.dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 100]).unwrap();
    let err = load_err(&model.dir);
    assert!(
        matches!(err, EngineError::InvalidSafetensors { .. }),
        "{err}"
    );
    assert_names(&err, &["model.safetensors"]);

    std::fs::write(&path, b"not a safetensors file at all").unwrap();
    let err = load_err(&model.dir);
    assert!(
        matches!(err, EngineError::InvalidSafetensors { .. }),
        "{err}"
    );
    assert_names(&err, &["model.safetensors"]);

    std::fs::write(&path, b"").unwrap();
    let err = load_err(&model.dir);
    assert!(
        matches!(err, EngineError::InvalidSafetensors { .. }),
        "{err}"
    );
}

#[test]
fn missing_config_json_is_named() {
    let (_scratch, model) = tiny(TinyLlamaOptions::default());
    std::fs::remove_file(model.dir.join("config.json")).unwrap();
    let err = load_err(&model.dir);
    assert!(matches!(err, EngineError::Io { .. }), "{err}");
    assert_names(&err, &["config.json"]);
}

#[test]
fn bad_config_values_name_the_key() {
    let (_scratch, model) = tiny(TinyLlamaOptions::default());
    let config = model.dir.join("config.json");
    edit_json(&config, |c| c["hidden_size"] = json!("sixty-four"));
    let err = load_err(&model.dir);
    assert!(matches!(err, EngineError::InvalidConfig(_)), "{err}");
    assert_names(&err, &["hidden_size", "sixty-four"]);

    edit_json(&config, |c| {
        c["hidden_size"] = json!(64);
        c.as_object_mut().unwrap().remove("vocab_size");
    });
    assert_names(&load_err(&model.dir), &["vocab_size", "missing"]);

    edit_json(&config, |c| {
        c["vocab_size"] = json!(320);
        c["rope_scaling"] = json!({"rope_type": "llama3", "factor": 8.0});
    });
    assert_names(&load_err(&model.dir), &["rope_scaling.low_freq_factor"]);

    edit_json(&config, |c| {
        c["rope_scaling"] = Value::Null;
        c["num_key_value_heads"] = json!(3);
    });
    assert_names(&load_err(&model.dir), &["num_key_value_heads"]);

    edit_json(&config, |c| {
        c["num_key_value_heads"] = json!(2);
        c["eos_token_id"] = json!(1000);
    });
    assert_names(&load_err(&model.dir), &["eos_token_id", "1000"]);

    std::fs::write(&config, "{ not json").unwrap();
    let err = load_err(&model.dir);
    assert!(matches!(err, EngineError::InvalidConfig(_)), "{err}");
    assert_names(&err, &["config.json"]);
}

#[test]
fn missing_or_broken_tokenizer_is_named() {
    let (_scratch, model) = tiny(TinyLlamaOptions::default());
    let path = model.dir.join("tokenizer.json");
    std::fs::write(&path, "{}").unwrap();
    let err = load_err(&model.dir);
    assert!(matches!(err, EngineError::Tokenizer(_)), "{err}");
    assert_names(&err, &["tokenizer.json"]);

    std::fs::remove_file(&path).unwrap();
    let err = load_err(&model.dir);
    assert!(matches!(err, EngineError::Tokenizer(_)), "{err}");
    assert_names(&err, &["tokenizer.json"]);

    let (_scratch2, model) = tiny(TinyLlamaOptions::default());
    edit_json(&model.dir.join("config.json"), |c| {
        c.as_object_mut().unwrap().remove("bos_token_id");
    });
    edit_json(&model.dir.join("tokenizer_config.json"), |c| {
        c["bos_token"] = json!("<bos>")
    });
    assert_names(&load_err(&model.dir), &["bos_token", "<bos>"]);
}
