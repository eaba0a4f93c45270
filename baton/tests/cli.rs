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
