//! `baton serve` over real HTTP: odd bodies of every kind get exactly the status they should
//! (OpenAI's error body naming the parameter at fault for a 4xx, a well-formed answer for a
//! 200), never a 5xx, and the server still serves afterwards.
//!
//! The server is a real child process (see `common`): (A) the shared main server.

mod common;

use common::*;
use serde_json::{json, Value};

/// Each odd body gets the status it states, with OpenAI's error body and the `param` it names
/// (null where it names none) for a 4xx, or a well-formed answer for a 200; the server still
/// serves afterwards.
#[tokio::test]
async fn user_errors_never_give_5xx() {
    let Api {
        server: a,
        client,
        chat,
        cmpl,
    } = api(main_server());
    let c = |extra: Value| with(chat_body("hi", 2), extra);
    let p = |extra: Value| with(completion_body(json!("hi"), 2), extra);
    let cases: Vec<(&String, Value, u16, Option<&str>)> = vec![
        (
            &chat,
            json!({"model": MODEL, "messages": []}),
            400,
            Some("messages"),
        ),
        // A missing required parameter is named, as OpenAI names it.
        (&chat, json!({"model": MODEL}), 400, Some("messages")),
        (
            &chat,
            json!({"messages": [{"role": "user", "content": "hi"}]}),
            400,
            Some("model"),
        ),
        (
            &chat,
            json!({"model": MODEL, "messages": [{"content": "hi"}]}),
            400,
            Some("messages[0].role"),
        ),
        (
            &chat,
            json!({"model": MODEL, "messages": [{"role": "user", "content": 5}]}),
            400,
            Some("messages[0].content"),
        ),
        (
            &chat,
            json!({"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}], "max_tokens": 2}),
            400,
            Some("messages[0].role"),
        ),
        // OpenAI answers 400 "Missing required parameter: 'messages[0].content'" here.
        (
            &chat,
            json!({"model": MODEL, "messages": [{"role": "user"}], "max_tokens": 2}),
            200,
            None,
        ),
        (
            &chat,
            json!({"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "max_tokens": 2}),
            400,
            Some("messages[0].content"),
        ),
        (
            &chat,
            json!({"model": MODEL, "messages": "hi"}),
            400,
            Some("messages"),
        ),
        (&chat, json!([]), 400, None),
        (&chat, json!(null), 400, None),
        (&chat, json!("string"), 400, None),
        (&chat, c(json!({"max_tokens": -1})), 400, Some("max_tokens")),
        (&chat, c(json!({"max_tokens": 0})), 400, Some("max_tokens")),
        (
            &chat,
            c(json!({"max_tokens": "ten"})),
            400,
            Some("max_tokens"),
        ),
        (
            &chat,
            c(json!({"temperature": "hot"})),
            400,
            Some("temperature"),
        ),
        (
            &chat,
            c(json!({"temperature": 1e300})),
            400,
            Some("temperature"),
        ),
        (&chat, c(json!({"top_p": 2.0})), 400, Some("top_p")),
        (&chat, c(json!({"top_p": 0.0})), 400, Some("top_p")),
        (&chat, c(json!({"top_k": -5})), 400, Some("top_k")),
        (&chat, c(json!({"min_p": 2.0})), 400, Some("min_p")),
        (
            &chat,
            c(json!({"repetition_penalty": 0.0})),
            400,
            Some("repetition_penalty"),
        ),
        (
            &chat,
            c(json!({"presence_penalty": 5.0})),
            400,
            Some("presence_penalty"),
        ),
        (
            &chat,
            c(json!({"frequency_penalty": -5.0})),
            400,
            Some("frequency_penalty"),
        ),
        (
            &chat,
            c(json!({"temperature": []})),
            400,
            Some("temperature"),
        ),
        (&chat, c(json!({"stop": 5})), 400, Some("stop")),
        (&chat, c(json!({"stop": vec!["x"; 65]})), 400, Some("stop")),
        (&chat, c(json!({"stop": vec!["x"; 64]})), 200, None),
        (
            &chat,
            c(json!({"stop": "x".repeat(1025)})),
            400,
            Some("stop"),
        ),
        (
            &chat,
            c(json!({"stop": ["x", "x".repeat(1025)]})),
            400,
            Some("stop[1]"),
        ),
        (&chat, c(json!({"stop": ["", "x"]})), 200, None),
        (&chat, c(json!({"seed": -1})), 400, Some("seed")),
        (&chat, c(json!({"n": -1})), 400, Some("n")),
        (
            &chat,
            c(json!({"logprobs": true, "top_logprobs": 1000})),
            400,
            Some("top_logprobs"),
        ),
        (
            &chat,
            c(json!({"logprobs": true, "top_logprobs": -1})),
            400,
            Some("top_logprobs"),
        ),
        (&chat, c(json!({"min_tokens": 10})), 400, Some("min_tokens")),
        (&chat, c(json!({"stream": "yes"})), 400, Some("stream")),
        // OpenAI (and vLLM) answer 400: `stream_options` is only allowed with `stream`.
        (
            &chat,
            c(json!({"stream_options": {"include_usage": true}})),
            200,
            None,
        ),
        (&chat, c(json!({"nvext": "x"})), 400, Some("nvext")),
        (&cmpl, json!({"model": MODEL}), 400, Some("prompt")),
        (&cmpl, p(json!({"prompt": ""})), 400, Some("prompt")),
        (&cmpl, p(json!({"prompt": []})), 400, Some("prompt")),
        (&cmpl, p(json!({"prompt": [[]]})), 400, Some("prompt[0]")),
        (&cmpl, p(json!({"prompt": [-1]})), 400, Some("prompt")),
        (
            &cmpl,
            p(json!({"prompt": [999999999]})),
            400,
            Some("prompt"),
        ),
        (&cmpl, p(json!({"prompt": [1.5]})), 400, Some("prompt")),
        (&cmpl, p(json!({"prompt": [["a"]]})), 400, Some("prompt")),
        (&cmpl, p(json!({"prompt": {"a": 1}})), 400, Some("prompt")),
        // Prompts × n is bounded (2048): the prompts alone, or with n.
        (
            &cmpl,
            p(json!({"prompt": vec![[1]; 2049]})),
            400,
            Some("prompt"),
        ),
        (
            &cmpl,
            p(json!({"prompt": vec![[1]; 17], "n": 128})),
            400,
            Some("n"),
        ),
        (&cmpl, p(json!({"logprobs": 1000})), 400, Some("logprobs")),
        (&cmpl, p(json!({"logprobs": -1})), 400, Some("logprobs")),
        (&cmpl, p(json!({"echo": "yes"})), 400, Some("echo")),
        (&cmpl, p(json!({"prompt": "\u{0}\u{FFFF}"})), 200, None),
    ];
    for (url, body, want, param) in cases {
        let (status, v) = post_json(&client, url, &body).await;
        let what = format!("{url} {body}");
        if want == 200 {
            assert_eq!(status, 200, "{what}: {v}");
            check_answer(&v, url == &chat);
        } else {
            assert_error(status, &v, want, param, &what);
        }
    }

    // Bodies that are not JSON name no parameter; numbers JSON can write but no field holds
    // name theirs. The content type is not checked (curl's `-d` sends a form type).
    let msgs = r#""messages": [{"role": "user", "content": "hi"}]"#;
    for (ctype, raw, param) in [
        ("application/json", "".to_string(), None),
        ("application/json", "\u{FEFF}{}".to_string(), None),
        ("application/json", r#"{"model": NaN}"#.to_string(), None),
        ("text/plain", "{}".to_string(), Some("model")),
        (
            "application/json",
            format!(r#"{{"model": "{MODEL}", {msgs}, "max_tokens": 1e999}}"#),
            Some("max_tokens"),
        ),
        (
            "application/json",
            format!(r#"{{"model": "{MODEL}", {msgs}, "max_tokens": 18446744073709551616}}"#),
            Some("max_tokens"),
        ),
        (
            "application/json",
            format!(
                r#"{{"model": "{MODEL}", {msgs}, "stop": {}"x"{}}}"#,
                "[".repeat(1000),
                "]".repeat(1000)
            ),
            Some("stop"),
        ),
    ] {
        let (status, v) = post_raw(&client, &chat, ctype, raw.as_bytes()).await;
        assert_error(status, &v, 400, param, &format!("{ctype} body {raw:.80}"));
    }
    let (status, v) = post_raw(&client, &chat, "application/json", b"\xff\xfe{").await;
    assert_error(status, &v, 400, None, "a body that is not UTF-8");
    let (status, body) = get_text(&client, &a.url("/v1/no-such-route")).await;
    let v: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    assert_error(status, &v, 404, None, "GET /v1/no-such-route");

    // Still healthy and serving.
    let (status, body) = get_text(&client, &a.url("/health")).await;
    assert_eq!(status, 200, "{body}\n{}", a.log_tail());
    check_chat(&ok_json(&client, &chat, &chat_body("hi", 2)).await);
}
