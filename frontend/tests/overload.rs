//! Admission and slow clients over real HTTP, against the frontend with no worker (every
//! request here ends before one would be needed): a full admission queue and a wait past
//! `--queue-timeout` answer 503 with `Retry-After` in OpenAI's error shape; a queued request
//! goes on when a slot frees; a client that sends its body or its headers too slowly is cut
//! after `--request-timeout`. Requests are written by hand on a TCP socket, so the tests
//! control exactly what the server receives and when.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use frontend::admission::Class;
use frontend::{AppState, FrontendConfig};
use processor::ServedModel;
use router::{policy_from_name, KvCostConfig, Router, RouterOptions};
use runtime::{PlaneSettings, Planes};
use tokio::net::TcpStream;

const MODEL: &str = "test-model";

/// Bounds on what must happen "soon": generous, so a loaded machine does not fail them.
const SOON: Duration = Duration::from_secs(10);

struct Frontend {
    state: Arc<AppState>,
    addr: SocketAddr,
    _planes: Planes,
}

async fn start(config: FrontendConfig) -> Frontend {
    let planes = Planes::in_process(PlaneSettings::new("overload-test", MODEL));
    let router = Router::new(
        &planes,
        runtime::discovery::decode_worker_endpoint("overload-test"),
        policy_from_name("round-robin", KvCostConfig::default()).unwrap(),
        RouterOptions::default(),
    )
    .await
    .unwrap();
    // An empty vocabulary: these requests never reach the tokenizer but through the 400 for
    // an out-of-vocabulary token id.
    let tokenizer = tokenizers::Tokenizer::new(tokenizers::models::wordlevel::WordLevel::default());
    let model = ServedModel {
        name: MODEL.into(),
        tokenizer: Arc::new(tokenizer),
        chat_template: None,
        eos_token_ids: vec![],
        add_bos_token: false,
        max_context: 1024,
        vocab_size: 0,
    };
    let config = FrontendConfig {
        addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        ..config
    };
    let state = Arc::new(AppState::new(Arc::new(model), Arc::new(router), config));
    let listener = frontend::bind(&state).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(frontend::serve(
        state.clone(),
        listener,
        std::future::pending(),
    ));
    Frontend {
        state,
        addr,
        _planes: planes,
    }
}

// Socket I/O through readiness, without tokio's `io-util` (not among the frontend's features).

async fn write_all(tcp: &TcpStream, mut bytes: &[u8]) {
    while !bytes.is_empty() {
        tcp.writable().await.unwrap();
        match tcp.try_write(bytes) {
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("writing the request: {e}"),
        }
    }
}

async fn read_to_end(tcp: &TcpStream, out: &mut Vec<u8>) -> std::io::Result<()> {
    let mut chunk = [0u8; 4096];
    loop {
        tcp.readable().await?;
        match tcp.try_read(&mut chunk) {
            Ok(0) => return Ok(()),
            Ok(n) => out.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
}

struct Reply {
    status: u16,
    head: String,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().find_map(|line| {
            let (n, v) = line.split_once(':')?;
            n.eq_ignore_ascii_case(name).then_some(v.trim())
        })
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }
}

/// Everything the server sends until it closes the connection.
async fn read_reply(tcp: &TcpStream) -> Reply {
    let mut raw = Vec::new();
    tokio::time::timeout(SOON, read_to_end(tcp, &mut raw))
        .await
        .expect("the server answers and closes within 10 s")
        .expect("reading the reply");
    let text = String::from_utf8(raw).expect("a UTF-8 reply");
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    Reply {
        status,
        head: head.to_string(),
        body: body.to_string(),
    }
}

async fn send(addr: SocketAddr, method: &str, path: &str, body: &str) -> Reply {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    write_all(&tcp, request.as_bytes()).await;
    read_reply(&tcp).await
}

/// A completion request that passes parsing and the model check, then waits for admission;
/// once admitted it fails fast (400: its token id is outside the empty vocabulary).
async fn completion(addr: SocketAddr) -> Reply {
    let body = format!(r#"{{"model":"{MODEL}","prompt":[1],"max_tokens":1}}"#);
    send(addr, "POST", "/v1/completions", &body).await
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in:\n{text}"))
}

fn assert_503(reply: &Reply, message_has: &str) {
    assert_eq!(reply.status, 503, "{}\n{}", reply.head, reply.body);
    let retry: u64 = reply
        .header("retry-after")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no Retry-After in {}", reply.head));
    assert!((1..=60).contains(&retry), "Retry-After {retry}");
    let v = reply.json();
    assert_eq!(v["error"]["type"], "service_unavailable", "{v}");
    let message = v["error"]["message"].as_str().unwrap();
    assert!(message.contains(message_has), "{message}");
}

async fn wait_until_queued(state: &AppState, n: usize) {
    let started = Instant::now();
    while state.admission().queued() < n {
        assert!(started.elapsed() < SOON, "{n} requests never queued");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// (b) A full queue answers 503 at once, with Retry-After; the queued request goes on when
/// the slot frees, and `/metrics` shows the queue and the waits.
#[tokio::test]
async fn full_queue_answers_503_and_the_queued_request_goes_on() {
    let f = start(FrontendConfig {
        max_inflight: 1,
        max_queued: 1,
        ..FrontendConfig::default()
    })
    .await;
    let held = f.state.admission().admit(Class::Default).await.unwrap();
    let queued = tokio::spawn(completion(f.addr));
    wait_until_queued(&f.state, 1).await;

    let started = Instant::now();
    let refused = completion(f.addr).await;
    assert_503(&refused, "1 queued");
    assert!(started.elapsed() < SOON);

    let metrics = send(f.addr, "GET", "/metrics", "").await;
    assert_eq!(metrics.status, 200);
    assert_eq!(metric(&metrics.body, "baton_admission_queued"), 1.0);

    drop(held);
    let served = tokio::time::timeout(SOON, queued).await.unwrap().unwrap();
    assert_eq!(
        served.status, 400,
        "admitted, then refused for its token id: {}",
        served.body
    );
    let metrics = send(f.addr, "GET", "/metrics", "").await;
    assert_eq!(metric(&metrics.body, "baton_admission_queued"), 0.0);
    assert_eq!(
        metric(&metrics.body, "baton_admission_wait_seconds_count"),
        1.0,
        "the queued request's wait"
    );
}

/// (c) A wait past `--queue-timeout` answers 503, with Retry-After.
#[tokio::test]
async fn wait_past_the_queue_timeout_answers_503() {
    let f = start(FrontendConfig {
        max_inflight: 1,
        max_queued: 4,
        queue_timeout: Duration::from_secs(1),
        ..FrontendConfig::default()
    })
    .await;
    let _held = f.state.admission().admit(Class::Default).await.unwrap();
    let started = Instant::now();
    let refused = completion(f.addr).await;
    assert_503(&refused, "queue timeout");
    // A timeout never fires early; the upper bound is `read_reply`'s.
    assert!(started.elapsed() >= Duration::from_millis(900));
    assert_eq!(f.state.admission().queued(), 0);
}

/// (d) A client that hangs up while queued leaves the queue (hyper drops its handler) and
/// takes no slot: the next request gets the freed one.
#[tokio::test]
async fn client_gone_while_queued_leaves_the_queue() {
    let f = start(FrontendConfig {
        max_inflight: 1,
        max_queued: 1,
        ..FrontendConfig::default()
    })
    .await;
    let held = f.state.admission().admit(Class::Default).await.unwrap();
    let body = format!(r#"{{"model":"{MODEL}","prompt":[1],"max_tokens":1}}"#);
    let tcp = TcpStream::connect(f.addr).await.unwrap();
    let request = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    write_all(&tcp, request.as_bytes()).await;
    wait_until_queued(&f.state, 1).await;
    drop(tcp);
    let started = Instant::now();
    while f.state.admission().queued() > 0 {
        assert!(
            started.elapsed() < SOON,
            "still queued 10 s after its client left"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    drop(held);
    let served = completion(f.addr).await;
    assert_eq!(served.status, 400, "admitted: {}", served.body);
}

/// (e) A body that stops arriving is cut after `--request-timeout` with a 408 in OpenAI's
/// shape, and the connection closes.
#[tokio::test]
async fn slow_body_is_cut_with_408() {
    let f = start(FrontendConfig {
        request_timeout: Duration::from_secs(1),
        ..FrontendConfig::default()
    })
    .await;
    let tcp = TcpStream::connect(f.addr).await.unwrap();
    let started = Instant::now();
    write_all(
        &tcp,
        b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n\
          Content-Length: 1000\r\n\r\n{\"model\":",
    )
    .await;
    // The rest of the body never comes.
    let reply = read_reply(&tcp).await;
    assert_eq!(reply.status, 408, "{}\n{}", reply.head, reply.body);
    assert!(started.elapsed() >= Duration::from_millis(900));
    assert_eq!(reply.header("connection"), Some("close"));
    let v = reply.json();
    assert_eq!(v["error"]["code"], "request_timeout", "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("--request-timeout"),
        "{v}"
    );
}

/// (e) Headers that stop arriving: hyper closes the connection after `--request-timeout`.
#[tokio::test]
async fn slow_headers_are_cut() {
    let f = start(FrontendConfig {
        request_timeout: Duration::from_secs(1),
        ..FrontendConfig::default()
    })
    .await;
    let tcp = TcpStream::connect(f.addr).await.unwrap();
    let started = Instant::now();
    write_all(
        &tcp,
        b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Le",
    )
    .await;
    let mut rest = Vec::new();
    let read = tokio::time::timeout(SOON, read_to_end(&tcp, &mut rest))
        .await
        .expect("the connection is closed within 10 s");
    // A close, or a reset: either way the connection is cut, with no request served.
    if read.is_ok() {
        assert!(
            rest.is_empty(),
            "unexpected reply: {:?}",
            String::from_utf8_lossy(&rest)
        );
    }
    assert!(started.elapsed() >= Duration::from_millis(900));

    // A client that sends its request promptly is served as before.
    let live = send(f.addr, "GET", "/live", "").await;
    assert_eq!(live.status, 200, "{}", live.body);
}
