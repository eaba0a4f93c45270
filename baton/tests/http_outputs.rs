//! `baton serve` over real HTTP, what a response reports beyond its text: `n` choices and their
//! numbering, logprobs in both endpoints' shapes, and usage with prefix-cache hits.
//!
//! The servers are real child processes (see `common`): (A) the shared main server and (D) the
//! quiet one, for the prefix-cache test that needs the engine to itself (it holds `QUIET`).

mod common;

use common::*;
use serde_json::json;

// ---------------------------------------------------------------------------------------------
// n

#[tokio::test]
async fn n_choices() {
    let Api {
        server: a, client, ..
    } = api(main_server());
    let cmpl = a.url("/v1/completions");

    let body = json!({"model": MODEL, "prompt": "My favourite animal is", "max_tokens": 8,
                      "temperature": 0.8, "seed": 1234, "n": 2});
    let v = ok_json(&client, &cmpl, &body).await;
    check_completion(&v);
    assert_eq!(v["choices"].as_array().unwrap().len(), 2, "{v}");

    let body = with(
        chat_body("Tell me a random word.", 8),
        json!({"n": 2, "temperature": 0.8}),
    );
    let v = ok_json(&client, &a.url("/v1/chat/completions"), &body).await;
    check_chat(&v);
    assert_eq!(v["choices"].as_array().unwrap().len(), 2, "{v}");

    // Two prompts × n 2: index = prompt_index * n + i; echo shows which prompt each one had.
    let prompts = ["Red, green and", "One, two, three,"];
    let body = json!({"model": MODEL, "prompt": prompts, "max_tokens": 4, "temperature": 0.8,
                      "seed": 7, "n": 2, "echo": true});
    let v = ok_json(&client, &cmpl, &body).await;
    check_completion(&v);
    let choices = v["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 4, "{v}");
    for (k, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], k as u64, "{v}");
        let t = c["text"].as_str().unwrap();
        assert!(
            t.starts_with(prompts[k / 2]),
            "choice {k} is not of prompt {}: {v}",
            k / 2
        );
    }

    // Streamed n 2: both choices finish, each starting with its role delta.
    let body = with(
        chat_body("Name a fruit.", 6),
        json!({"n": 2, "temperature": 0.8, "stream": true}),
    );
    let s = stream(&client, &a.url("/v1/chat/completions"), &body).await;
    let (choices, _) = assemble(&s, true, false);
    assert_eq!(choices.len(), 2, "{:?}", s.chunks);
}

// ---------------------------------------------------------------------------------------------
// Logprobs

#[tokio::test]
async fn logprobs_shapes() {
    let Api {
        server: a, client, ..
    } = api(main_server());

    let body = with(
        chat_body("List three planets.", 10),
        json!({"logprobs": true, "top_logprobs": 3}),
    );
    let v = ok_json(&client, &a.url("/v1/chat/completions"), &body).await;
    let text = check_chat(&v);
    let content = v["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap_or_else(|| panic!("{v}"));
    assert_eq!(
        content.len() as u64,
        v["usage"]["completion_tokens"].as_u64().unwrap(),
        "{v}"
    );
    let mut joined = String::new();
    for e in content {
        let token = e["token"].as_str().expect("token");
        joined.push_str(token);
        let lp = e["logprob"].as_f64().expect("logprob");
        assert!(lp <= 0.0, "{e}");
        let bytes: Vec<u8> = e["bytes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b.as_u64().unwrap() as u8)
            .collect();
        assert_eq!(bytes, token.as_bytes(), "{e}");
        let top = e["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 3, "{e}");
        let tops: Vec<f64> = top.iter().map(|t| t["logprob"].as_f64().unwrap()).collect();
        assert!(tops.iter().all(|&l| l <= 0.0), "{e}");
        assert!(
            tops.windows(2).all(|w| w[0] >= w[1]),
            "top_logprobs not sorted: {e}"
        );
        assert!(
            (lp - tops[0]).abs() < 1e-4,
            "greedy token is not the most likely: {e}"
        );
        assert!(
            top.iter()
                .any(|t| t["token"] == token && (t["logprob"].as_f64().unwrap() - lp).abs() < 1e-4),
            "the chosen token is not among the top: {e}"
        );
        assert!(
            top.iter()
                .all(|t| t["token"].is_string() && t["bytes"].is_array()),
            "{e}"
        );
    }
    assert_eq!(joined, text, "logprob tokens do not make up the text");

    // Streamed: one logprob entry per token, across the chunks.
    let s = stream(
        &client,
        &a.url("/v1/chat/completions"),
        &streamed_with_usage(body),
    )
    .await;
    let (choices, usage) = assemble(&s, true, true);
    assert_eq!(
        choices[0].logprob_tokens as u64,
        usage.unwrap()["completion_tokens"].as_u64().unwrap()
    );

    let body = with(
        completion_body(json!("The capital of Italy is"), 10),
        json!({"logprobs": 3}),
    );
    let v = ok_json(&client, &a.url("/v1/completions"), &body).await;
    let text = check_completion(&v);
    let n = v["usage"]["completion_tokens"].as_u64().unwrap() as usize;
    let lp = &v["choices"][0]["logprobs"];
    for key in ["tokens", "token_logprobs", "top_logprobs", "text_offset"] {
        assert_eq!(
            lp[key]
                .as_array()
                .unwrap_or_else(|| panic!("{key}: {v}"))
                .len(),
            n,
            "{key}: {v}"
        );
    }
    let tokens = strings(&lp["tokens"]);
    assert_eq!(tokens.concat(), text, "{v}");
    let mut expect_offset = 0;
    for k in 0..n {
        assert_eq!(
            lp["text_offset"][k], expect_offset as u64,
            "text_offset {k}: {v}"
        );
        expect_offset += tokens[k].len();
        let l = lp["token_logprobs"][k].as_f64().unwrap();
        assert!(l <= 0.0, "{v}");
        let top = lp["top_logprobs"][k].as_object().unwrap();
        assert!((1..=3).contains(&top.len()), "{v}");
        let best = top
            .values()
            .map(|x| x.as_f64().unwrap())
            .fold(f64::MIN, f64::max);
        assert!(
            (l - best).abs() < 1e-4,
            "greedy token is not the most likely at {k}: {v}"
        );
        assert!(
            top.contains_key(tokens[k]),
            "token {k} not in its top_logprobs: {v}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Usage and cached tokens

#[tokio::test]
async fn repeated_prompt_hits_the_prefix_cache() {
    let _quiet = QUIET.lock().await;
    let Api {
        server: d, client, ..
    } = api(quiet_server());
    let url = d.url("/v1/completions");
    let mut prompt = format!("Record {} follows. ", nonce());
    for i in 0..40 {
        prompt.push_str(&format!(
            "The quick brown fox jumps over lazy dog number {i}. "
        ));
    }
    let body = completion_body(json!(prompt), 4);

    let v = ok_json(&client, &url, &body).await;
    check_completion(&v);
    let (p, _, cached) = check_usage(&v["usage"]);
    assert!(p > 300, "the prompt was meant to be over 300 tokens: {v}");
    assert_eq!(cached, 0, "a fresh prompt reported cached tokens: {v}");

    let v = ok_json(&client, &url, &body).await;
    let (p2, _, cached) = check_usage(&v["usage"]);
    assert_eq!(p2, p, "{v}");
    assert!(
        cached >= 256,
        "repeated {p}-token prompt: cached_tokens {cached}: {v}"
    );
    assert!(cached < p, "{v}");
    assert_eq!(
        cached % 128,
        0,
        "only whole 128-token blocks are cached: {v}"
    );

    let s = stream(&client, &url, &streamed_with_usage(body)).await;
    let (_, usage) = assemble(&s, false, true);
    let (_, _, cached) = check_usage(&usage.unwrap());
    assert!(cached >= 256, "streamed repeat: cached_tokens {cached}");
}
