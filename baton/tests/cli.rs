//! `baton generate` as a user runs it: JSON output, and bad input ending in a message that
//! names the problem with a non-zero exit, never a panic.

use std::process::{Command, Output};

fn baton(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_baton"))
        .args(args)
        .env_remove("LD_LIBRARY_PATH")
        .output()
        .expect("baton runs")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn assert_clean_failure(out: &Output, needle: &str) {
    let err = stderr(out);
    assert!(
        !out.status.success(),
        "expected failure, got success: {err}"
    );
    assert!(err.contains(needle), "stderr lacks {needle:?}: {err}");
    assert!(!err.contains("panicked"), "panicked: {err}");
}

#[test]
fn json_output_reproduces_the_reference_first_tokens() {
    let golden: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../shared/golden/smollm2-135m-instruct-q4_1.json"
        ))
        .unwrap(),
    )
    .unwrap();
    let case = &golden["cases"][0];
    let prompt: Vec<String> = case["prompt_token_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.to_string())
        .collect();
    let out = baton(&[
        "generate",
        "--prompt-token-ids",
        &prompt.join(","),
        "--max-tokens",
        "6",
        "--dtype",
        "f32",
        "--json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert_eq!(v["prompt_token_ids"], case["prompt_token_ids"]);
    let want: Vec<_> = case["greedy_token_ids"].as_array().unwrap()[..6].to_vec();
    assert_eq!(v["token_ids"].as_array().unwrap(), &want);
    assert_eq!(v["finish_reason"], "length");
    assert!(!v["text"].as_str().unwrap().is_empty());
}

#[test]
fn chat_prompt_stops_at_eos() {
    let out = baton(&[
        "generate",
        "--chat",
        "--prompt",
        "Say hi.",
        "--json",
        "--max-tokens",
        "200",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["finish_reason"], "stop");
}

#[test]
fn bad_input_is_named_and_exits_non_zero() {
    assert_clean_failure(
        &baton(&["generate", "--model", "/no/such/model", "--prompt", "x"]),
        "/no/such/model",
    );
    assert_clean_failure(&baton(&["generate", "--prompt", ""]), "empty");
    assert_clean_failure(
        &baton(&["generate", "--prompt", "x", "--dtype", "f64"]),
        "f64",
    );
    assert_clean_failure(
        &baton(&["generate", "--prompt", "x", "--temperature=-1"]),
        "temperature",
    );
    assert_clean_failure(
        &baton(&["generate", "--prompt-token-ids", "1,99999999"]),
        "99999999",
    );
    let long = vec!["1"; 9000].join(",");
    assert_clean_failure(
        &baton(&["generate", "--prompt-token-ids", &long]),
        "context",
    );

    let dir = std::env::temp_dir().join(format!("baton-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let corrupt = dir.join("corrupt.gguf");
    std::fs::write(&corrupt, b"GGUF\x03\x00\x00\x00garbage").unwrap();
    assert_clean_failure(
        &baton(&[
            "generate",
            "--model",
            corrupt.to_str().unwrap(),
            "--prompt",
            "x",
        ]),
        "GGUF",
    );
    let truncated = dir.join("truncated.gguf");
    let real = std::fs::read(engine::loader::smollm2_path().unwrap()).unwrap();
    std::fs::write(&truncated, &real[..real.len() / 2]).unwrap();
    assert_clean_failure(
        &baton(&[
            "generate",
            "--model",
            truncated.to_str().unwrap(),
            "--prompt",
            "x",
        ]),
        "GGUF",
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn export_hf_writes_a_folder_that_generates_what_the_gguf_does() {
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("export-hf-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let out = baton(&[
        "export-hf",
        "--output",
        dir.to_str().unwrap(),
        "--dtype",
        "f32",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    for f in [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "generation_config.json",
        "model.safetensors",
    ] {
        assert!(dir.join(f).is_file(), "{f} missing");
    }
    // f32 weights and f32 compute: the same greedy tokens from either copy of the weights.
    let generate = |model: &str| {
        let out = baton(&[
            "generate",
            "--model",
            model,
            "--prompt",
            "The capital of France is",
            "--max-tokens",
            "16",
            "--dtype",
            "f32",
            "--json",
        ]);
        assert!(out.status.success(), "{}", stderr(&out));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["token_ids"].clone()
    };
    let from_gguf = generate("smollm2");
    assert_eq!(from_gguf.as_array().map(Vec::len), Some(16), "{from_gguf}");
    assert_eq!(generate(dir.to_str().unwrap()), from_gguf);
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["rms_norm_eps"], 1e-5);
    assert_eq!(config["torch_dtype"], "float32");

    let bare = dir.with_extension("bare");
    let out = baton(&[
        "export-hf",
        "--output",
        bare.to_str().unwrap(),
        "--no-weights",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(bare.join("tokenizer.json").is_file() && !bare.join("model.safetensors").exists());
    assert_clean_failure(
        &baton(&[
            "export-hf",
            "--output",
            bare.to_str().unwrap(),
            "--dtype",
            "int3",
        ]),
        "--dtype int3",
    );
    std::fs::remove_dir_all(&dir).ok();
    std::fs::remove_dir_all(&bare).ok();
}
