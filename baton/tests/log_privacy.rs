//! At the default log level a server's log holds neither the API key nor any prompt text: a
//! `baton serve` (mock engine) with a key is sent good and bad requests that carry marked text
//! in every place a user can put it (messages, prompt, stop, model, the key itself), and its
//! log — read after it stopped — has none of the marks, while it does hold its usual lines.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::json;

const KEY: &str = "sk-baton-KEYMARK-5d1f";
const MARK: &str = "PROMPTMARK-zebra-4471";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_log_holds_no_key_and_no_prompt_text() {
    let log = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("log-privacy-{}.log", std::process::id()));
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_baton"));
    cmd.args([
        "serve",
        "--port",
        "0",
        "--executor",
        "mock",
        "--mock-speedup",
        "inf",
    ])
    .args(["--api-key", KEY])
    .env_remove("RUST_LOG")
    .env_remove("LD_LIBRARY_PATH")
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::from(std::fs::File::create(&log).unwrap()));
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("BATON_") {
            cmd.env_remove(k);
        }
    }
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
            Ok(())
        });
    }
    let mut child = cmd.spawn().expect("spawn baton serve");
    let stdout = child.stdout.take().unwrap();
    let base = tokio::task::spawn_blocking(move || {
        let mut lines = BufReader::new(stdout).lines();
        let url = lines
            .by_ref()
            .map_while(Result::ok)
            .find_map(|l| l.strip_prefix("baton: listening on ").map(str::to_string));
        std::thread::spawn(move || for _ in lines {});
        url
    })
    .await
    .unwrap()
    .expect("the listening line");

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
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "exits 0 on SIGTERM: {status:?}");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let written = std::fs::read_to_string(&log).unwrap();
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
