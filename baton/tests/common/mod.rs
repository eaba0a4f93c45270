//! Real `baton serve` child processes for the HTTP tests and the small HTTP helpers the
//! tests share; [`requests`] has the request bodies and answer checks, [`streams`] the SSE
//! reading and stream checks.
//!
//! Each server configuration starts once per test binary: every `tests/*.rs` file is its own
//! binary with its own copy of this module, so the `OnceLock`s of [`main_server`] and the others,
//! and the [`QUIET`] and [`LIMITED`] mutexes, are per binary. Cargo runs the binaries one after
//! another, so two binaries never share a server nor run at the same time. The child is spawned
//! from a dedicated thread that never exits, with `PR_SET_PDEATHSIG = SIGKILL`, so a child dies
//! with the test process however that ends (Linux sends the signal when the spawning *thread*
//! exits).

// Each binary uses only some of these helpers.
#![allow(dead_code)]

pub mod procs;
mod requests;
mod streams;

pub use requests::*;
pub use streams::*;

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;

/// The served model name every server uses.
pub const MODEL: &str = "smollm2";

/// How long a server may take to print its listening line.
const START_TIMEOUT: Duration = Duration::from_secs(120);

/// A running `baton serve`.
pub struct Server {
    /// `http://127.0.0.1:PORT`
    pub base: String,
    /// Where the child's stderr (its logs) goes.
    pub log: PathBuf,
    /// The child's process id.
    pub pid: u32,
}

impl Server {
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// The last lines of the server's log, for failure messages.
    pub fn log_tail(&self) -> String {
        log_tail(&self.log)
    }
}

fn log_tail(path: &std::path::Path) -> String {
    format!(
        "--- last lines of {} ---\n{}",
        path.display(),
        test_support::log_tail(path, 40)
    )
}

type Ready = Result<(String, u32), String>;

fn fail(tx: &mpsc::Sender<Ready>, msg: String) -> ! {
    let _ = tx.send(Err(msg));
    loop {
        std::thread::park();
    }
}

/// Starts `baton serve --port 0 ARGS` on a thread that lives as long as the test process and
/// waits for its listening line. The receiver gets the child's exit status, should it exit.
pub fn spawn_server(
    name: &'static str,
    args: &'static [&'static str],
) -> Result<(Server, mpsc::Receiver<std::process::ExitStatus>), String> {
    let log = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "{}-{name}-{}.log",
        env!("CARGO_CRATE_NAME"),
        std::process::id()
    ));
    let (tx, rx) = mpsc::channel::<Ready>();
    let (exit_tx, exit_rx) = mpsc::channel();
    let thread_log = log.clone();
    std::thread::Builder::new()
        .name(format!("baton-serve-{name}"))
        .spawn(move || {
            let stderr = match File::create(&thread_log) {
                Ok(f) => f,
                Err(e) => fail(&tx, format!("creating {}: {e}", thread_log.display())),
            };
            let mut cmd = Command::new(env!("CARGO_BIN_EXE_baton"));
            cmd.arg("serve")
                .args(["--host", "127.0.0.1", "--port", "0"])
                .args(args)
                .env_remove("LD_LIBRARY_PATH")
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::from(stderr));
            // Settings from the environment would change what the tests expect (a RUST_LOG
            // too: the servers log at the default level, as a user's does).
            cmd.env_remove("RUST_LOG");
            for (k, _) in std::env::vars_os() {
                if k.to_string_lossy().starts_with("BATON_") {
                    cmd.env_remove(k);
                }
            }
            // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
            unsafe {
                cmd.pre_exec(|| {
                    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
            let mut child = match cmd.spawn() {
                Ok(c) => c,
                Err(e) => fail(&tx, format!("spawning baton serve: {e}")),
            };
            let mut lines = BufReader::new(child.stdout.take().expect("piped stdout")).lines();
            let mut seen = Vec::new();
            let mut sent = false;
            for line in lines.by_ref() {
                let Ok(line) = line else { break };
                if let Some(url) = line.strip_prefix("baton: listening on ") {
                    let _ = tx.send(Ok((url.trim().to_string(), child.id())));
                    sent = true;
                    break;
                }
                seen.push(line);
            }
            if !sent {
                let status = child.wait();
                fail(
                    &tx,
                    format!(
                        "baton serve ({name}) ended without its listening line ({status:?}); \
                         stdout: {seen:?}\n{}",
                        log_tail(&thread_log)
                    ),
                );
            }
            // Keep draining stdout (it should stay silent), reap the child, and stay alive
            // forever: the death signal is tied to this thread.
            for _ in lines {}
            if let Ok(status) = child.wait() {
                let _ = exit_tx.send(status);
            }
            loop {
                std::thread::park();
            }
        })
        .map_err(|e| format!("spawning the server thread: {e}"))?;
    match rx.recv_timeout(START_TIMEOUT) {
        Ok(Ok((base, pid))) => {
            if !base.starts_with("http://127.0.0.1:") {
                return Err(format!("unexpected listening line: {base}"));
            }
            Ok((Server { base, log, pid }, exit_rx))
        }
        Ok(Err(e)) => Err(e),
        Err(_) => Err(format!(
            "baton serve ({name}) did not print its listening line within {START_TIMEOUT:?}\n{}",
            log_tail(&log)
        )),
    }
}

/// The server of `cell`, started with `args` on first use (and shared by the test binary's
/// tests from then on).
pub fn once_server(
    cell: &'static OnceLock<Result<Server, String>>,
    name: &'static str,
    args: &'static [&'static str],
) -> &'static Server {
    match cell.get_or_init(|| spawn_server(name, args).map(|(s, _)| s)) {
        Ok(s) => s,
        Err(e) => panic!("server {name} failed to start: {e}"),
    }
}

/// The aggregated reference of the disaggregation tests: embedded, f32, 16-token blocks (the
/// dtype and block size their graphs use), so greedy texts compare token for token.
pub fn f32_reference() -> &'static Server {
    static S: OnceLock<Result<Server, String>> = OnceLock::new();
    once_server(
        &S,
        "f32-reference",
        &["--dtype", "f32", "--block-size", "16"],
    )
}

/// (A) The shared main server: tests run on it concurrently.
pub fn main_server() -> &'static Server {
    static S: OnceLock<Result<Server, String>> = OnceLock::new();
    once_server(&S, "main", &["--num-kv-blocks", "128"])
}

/// (B) An API key, a 4 KiB body limit and one request in flight at most.
pub fn limited_server() -> &'static Server {
    static S: OnceLock<Result<Server, String>> = OnceLock::new();
    once_server(
        &S,
        "limited",
        &[
            "--num-kv-blocks",
            "96",
            "--api-key",
            "secret",
            "--max-body-bytes",
            "4096",
            "--max-inflight",
            "1",
            // No admission queue: the second request is refused at once (the queue has its
            // own tests in frontend/).
            "--max-queued",
            "0",
        ],
    )
}

/// (C) The frontend alone, no engine worker.
pub fn workerless_server() -> &'static Server {
    static S: OnceLock<Result<Server, String>> = OnceLock::new();
    once_server(&S, "workerless", &["--workers", "0"])
}

/// (D) A quiet server for tests that need the engine to themselves: exact greedy comparisons
/// (batch composition changes bf16 numerics), prefix-cache hits, and KV accounting. Tests on
/// it hold [`QUIET`] for their whole run.
pub fn quiet_server() -> &'static Server {
    static S: OnceLock<Result<Server, String>> = OnceLock::new();
    once_server(&S, "quiet", &["--num-kv-blocks", "96"])
}

/// (E) The mock engine (a simulated 70B on TP4 H100s, no weights; `--mock-speedup inf`: its
/// steps take no simulated time) behind the real frontend, router and scheduler, with
/// SmolLM2's tokenizer and every default limit (8 MiB bodies): for tests whose requests should
/// cost nothing to generate.
pub fn mock_server() -> &'static Server {
    static S: OnceLock<Result<Server, String>> = OnceLock::new();
    once_server(
        &S,
        "mock",
        &[
            "--executor",
            "mock",
            "--tensor-parallel-size",
            "4",
            "--mock-speedup",
            "inf",
        ],
    )
}

/// Serializes the tests of the quiet server (D).
pub static QUIET: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
/// Serializes the tests of the limited server (B): it admits one request at a time.
pub static LIMITED: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A server with a client and its two generation URLs: what most tests start from.
pub struct Api {
    pub server: &'static Server,
    pub client: reqwest::Client,
    pub chat: String,
    pub cmpl: String,
}

pub fn api(server: &'static Server) -> Api {
    Api {
        server,
        client: client(),
        chat: server.url("/v1/chat/completions"),
        cmpl: server.url("/v1/completions"),
    }
}

/// The limited server (held for the caller's whole test: its limits are shared state), a
/// client and its chat URL.
pub async fn limited() -> (
    tokio::sync::MutexGuard<'static, ()>,
    &'static Server,
    reqwest::Client,
    String,
) {
    let held = LIMITED.lock().await;
    let Api {
        server,
        client,
        chat,
        ..
    } = api(limited_server());
    (held, server, client, chat)
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .expect("reqwest client")
}

/// POSTs JSON; returns the status and the body parsed as JSON (Value::Null plus the raw text
/// in an `{"_raw": ...}` object when it is not JSON).
pub async fn post_json(client: &reqwest::Client, url: &str, body: &Value) -> (u16, Value) {
    read_json(send_json(client, url, None, body).await).await
}

pub async fn read_json(resp: reqwest::Response) -> (u16, Value) {
    let status = resp.status().as_u16();
    let text = resp.text().await.expect("response body");
    let v = serde_json::from_str(&text).unwrap_or_else(|_| serde_json::json!({ "_raw": text }));
    (status, v)
}

pub async fn get_text(client: &reqwest::Client, url: &str) -> (u16, String) {
    let resp = client
        .get(url)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url} failed: {e}"));
    let status = resp.status().as_u16();
    (status, resp.text().await.expect("response body"))
}

/// Asserts an OpenAI error body: `{"error": {"message", "type", "param", "code"}}`.
pub fn assert_openai_error(body: &Value, context: &str) {
    let e = &body["error"];
    assert!(e.is_object(), "{context}: not an OpenAI error body: {body}");
    assert!(
        e["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{context}: error without a message: {body}"
    );
    assert!(
        e["type"].is_string(),
        "{context}: error without a type: {body}"
    );
    let o = e.as_object().unwrap();
    assert!(
        o.contains_key("param"),
        "{context}: error without param: {body}"
    );
    assert!(
        o.contains_key("code"),
        "{context}: error without code: {body}"
    );
}

/// The value of an unlabelled metric line `name value`.
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// `baton_router_requests_total` by worker (hex instance id), from a `/metrics` text.
pub fn decisions_by_worker(text: &str) -> std::collections::HashMap<String, f64> {
    text.lines()
        .filter(|l| l.starts_with("baton_router_requests_total{"))
        .filter_map(|l| {
            let worker = l.split("worker=\"").nth(1)?.split('"').next()?.to_string();
            Some((worker, l.rsplit(' ').next()?.parse().ok()?))
        })
        .collect()
}

/// Polls `cond` every 200 ms until it holds or `deadline` passes; returns the last value.
pub async fn wait_for<T, F, Fut>(deadline: Duration, mut f: F) -> (bool, T)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = (bool, T)>,
{
    let start = Instant::now();
    loop {
        let (ok, v) = f().await;
        if ok || start.elapsed() > deadline {
            return (ok, v);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A fresh random number (for prompts the prefix cache cannot have seen).
pub fn nonce() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos(),
    );
    h.finish()
}
