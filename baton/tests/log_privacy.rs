//! At the default log level a server's log holds neither the API key nor any prompt text: a
//! `baton serve` (mock engine) with a key is sent good and bad requests that carry marked text
//! in every place a user can put it (messages, prompt, stop, model, the key itself), and its
//! log — read after it stopped — has none of the marks, while it does hold its usual lines.

mod common;

use std::time::Duration;

use serde_json::json;

const KEY: &str = "sk-baton-KEYMARK-5d1f";
const MARK: &str = "PROMPTMARK-zebra-4471";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_log_holds_no_key_and_no_prompt_text() {
    let (server, exited) = common::spawn_server(
        "log-privacy",
        &[
            "--executor",
            "mock",
            "--mock-speedup",
            "inf",
            "--api-key",
            KEY,
        ],
    )
    .expect("baton serve starts");
    let base = server.base.clone();
    let c = reqwest::Client::new();
    let bearer = format!("Bearer {KEY}");
    let chat = format!("{base}/v1/chat/completions");
    let cmpl = format!("{base}/v1/completions");
    let text = |suffix: &str| format!("{MARK} {suffix}");
    let cases = [
        (
            &chat,
            json!({"model": "smollm2", "messages": [{"role": "user", "content": text("hi")}], "max_tokens": 4}),
            200,
        ),
        (
            &chat,
            json!({"model": "smollm2", "messages": [{"role": "user", "content": text("s")}], "max_tokens": 4, "stream": true}),
            200,
        ),
        (
            &cmpl,
            json!({"model": "smollm2", "prompt": text("p"), "max_tokens": 4, "stop": [text("stop")]}),
            200,
        ),
        (
            &cmpl,
            json!({"model": text("model"), "prompt": text("p"), "max_tokens": 4}),
            404,
        ),
        (
            &cmpl,
            json!({"model": "smollm2", "prompt": text("p"), "temperature": text("t")}),
            400,
        ),
        (
            &chat,
            json!({"model": "smollm2", "messages": [{"role": text("role"), "content": "x"}]}),
            400,
        ),
        (
            &cmpl,
            json!({"model": "smollm2", "prompt": text("p"), "max_tokens": 100000000}),
            400,
        ),
    ];
    for (url, body, want) in cases.iter() {
        let resp = c
            .post(url.as_str())
            .header("authorization", &bearer)
            .json(body)
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let answer = resp.text().await.unwrap();
        assert_eq!(status, *want, "{body} → {answer}");
    }
    // A wrong key that carries the mark, and the right key on the wrong scheme.
    for auth in [format!("Bearer {MARK}"), format!("Basic {KEY}")] {
        let resp = c
            .post(&chat)
            .header("authorization", auth)
            .json(
                &json!({"model": "smollm2", "messages": [{"role": "user", "content": text("k")}]}),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 401);
    }

    // SAFETY: signalling our own child.
    unsafe {
        libc::kill(server.pid as i32, libc::SIGTERM);
    }
    let status = tokio::task::spawn_blocking(move || exited.recv_timeout(Duration::from_secs(30)))
        .await
        .unwrap()
        .expect("it exits on SIGTERM");
    assert!(status.success(), "exits 0 on SIGTERM: {status:?}");
    let written = std::fs::read_to_string(&server.log).unwrap();
    assert!(
        written.contains("INFO"),
        "the log has its usual lines at the default level:\n{written}"
    );
    for secret in [KEY, "KEYMARK", MARK, "PROMPTMARK"] {
        assert!(
            !written.contains(secret),
            "the log holds `{secret}`:\n{written}"
        );
    }
}
