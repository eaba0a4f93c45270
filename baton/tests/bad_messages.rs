//! Garbage on every subject the distributed graph listens on, and corrupt values in etcd, are
//! logged and dropped — never a panic, never a stall. Real NATS and etcd; a frontend, a decode
//! worker with remote prefill and a prefill worker as `baton run` processes on the mock engine.
//! Empty, random, truncated, wrongly shaped, deeply nested and near-1 MB payloads go to the
//! event-plane subjects (`load`, `kv_events`, `router_load`), the worker's request-plane
//! addresses (generate, KV state, prefill notices; with and without a reply inbox) and the
//! JetStream prefill queue, and well-formed generate requests with values no frontend sends (a
//! token outside the vocabulary, 2^64 − 1 `max_tokens`) are refused; etcd gets keys under the instance prefix that are not hex, not
//! JSON, an instance with a wrongly typed field, a well-formed instance without a lease, one
//! whose value names another id, and a garbage disaggregation setting. Afterwards every process
//! is alive, `/health` still counts one worker, chat completions still return their tokens,
//! each prefilled by the prefill worker, each kind of drop is named in the log of the process that
//! dropped it, and a flood of 2 000 bad load reports leaves only a few warning lines.

mod common;

use std::time::Duration;

use common::procs::Proc;
use common::{client, get_text, metric, post_json, wait_for};
use etcd_client::{GetOptions, PutOptions};
use futures::StreamExt;
use serde_json::{json, Value};
use test_support::{EtcdServer, NatsServer};

const NS: &str = "badmsg";
/// Bounds on waits that must not hang; none is a timing assertion.
const PATIENCE: Duration = Duration::from_secs(60);

fn flags(component: &str) -> Vec<&str> {
    let mut v = vec![
        "run",
        component,
        "--namespace",
        NS,
        "--executor",
        "mock",
        "--mock-speedup",
        "inf",
        "--remote-prefill",
        "true",
        "--conditional-disagg",
        "false",
        "--remote-prefill-timeout",
        "4",
    ];
    if component == "frontend" {
        v.extend(["--port", "0"]);
    }
    v
}

/// Every kind of bad payload, each tagged for failure messages.
fn garbage() -> Vec<(&'static str, Vec<u8>)> {
    // A fixed pseudo-random sequence (xorshift), so a failure reproduces.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut random = |n: usize| -> Vec<u8> {
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    };
    let nested = format!("{}{}", "[".repeat(50_000), "]".repeat(50_000));
    let long = format!("{{\"instance_id\": \"{}\"}}", "a".repeat(900_000));
    vec![
        ("empty", Vec::new()),
        ("random bytes", random(256)),
        ("invalid UTF-8", b"{\"a\": \"\xff\xfe\"}".to_vec()),
        (
            "truncated JSON",
            b"{\"instance_id\": 1, \"kv_blocks_used\": 3".to_vec(),
        ),
        ("an array", b"[1, 2, 3]".to_vec()),
        ("null", b"null".to_vec()),
        ("a string", b"\"hello\"".to_vec()),
        ("an empty object", b"{}".to_vec()),
        (
            "wrongly typed",
            b"{\"instance_id\": \"seven\", \"worker_id\": -1}".to_vec(),
        ),
        (
            "huge numbers",
            b"{\"instance_id\": 1e400, \"event_id\": 18446744073709551616}".to_vec(),
        ),
        ("deep nesting", nested.into_bytes()),
        ("900 KB string", long.into_bytes()),
        ("900 KB random", random(900_000)),
    ]
}

fn alive(procs: &mut [&mut Proc]) -> Result<(), String> {
    for p in procs.iter_mut() {
        if let Some(status) = p.child.try_wait().expect("child status") {
            return Err(format!("exited with {status}; {}", p.log_tail()));
        }
    }
    Ok(())
}

fn log_of(p: &Proc) -> String {
    std::fs::read_to_string(&p.log).unwrap_or_default()
}

async fn wait_for_log(p: &Proc, needle: &str) -> bool {
    wait_for(PATIENCE, || async { (log_of(p).contains(needle), ()) })
        .await
        .0
}

async fn workers(base: &str) -> Option<u64> {
    let (status, body) = get_text(&client(), &format!("{base}/health")).await;
    let workers = serde_json::from_str::<Value>(&body).ok()?["workers"].as_u64();
    (status == 200).then_some(workers?)
}

async fn chat_tokens(base: &str) -> Value {
    let body = json!({"model": "smollm2", "messages": [{"role": "user", "content": "Hello there"}],
                      "max_tokens": 8, "ignore_eos": true, "temperature": 0});
    let (status, body) = post_json(&client(), &format!("{base}/v1/chat/completions"), &body).await;
    assert_eq!(status, 200, "{body}");
    body["usage"]["completion_tokens"].clone()
}

/// Sends `payload` to a request-plane `address` with a reply inbox and returns what came back
/// after the acceptance: the worker answers bad input rather than going quiet.
async fn ask(nats: &async_nats::Client, address: &str, payload: Vec<u8>) -> Vec<u8> {
    let inbox = nats.new_inbox();
    let mut replies = nats.subscribe(inbox.clone()).await.expect("subscribe");
    nats.publish_with_reply(address.to_string(), inbox, payload.into())
        .await
        .expect("publish");
    let mut seen = Vec::new();
    while let Ok(Some(m)) = tokio::time::timeout(PATIENCE, replies.next()).await {
        // A bare tag 3 is the acceptance; the next message is the answer.
        if m.payload.as_ref() == [3] {
            continue;
        }
        seen = m.payload.to_vec();
        break;
    }
    assert!(!seen.is_empty(), "`{address}` did not answer");
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_the_planes_and_in_etcd_is_logged_and_dropped() {
    let nats_server = NatsServer::start().expect("nats-server (scripts/infra install)");
    let etcd_server = EtcdServer::start().expect("etcd (scripts/infra install)");
    let (n, e) = (nats_server.url.clone(), etcd_server.url.clone());
    let mut etcd = etcd_client::Client::connect([e.as_str()], None)
        .await
        .expect("etcd client");
    let prefix = format!("baton/{NS}/instances/decode-worker/generate/");
    let endpoint = json!({"namespace": NS, "component": "decode-worker", "endpoint": "generate"});
    // Present before anyone watches: read by the first get, not a watch event.
    etcd.put(format!("{prefix}not-hex"), "{}", None)
        .await
        .unwrap();
    etcd.put(format!("{prefix}1a2b"), "\u{0}garbage", None)
        .await
        .unwrap();

    let mut decode = Proc::spawn("bad-decode", &flags("decode-worker"), &n, &e);
    let mut prefill = Proc::spawn("bad-prefill", &flags("prefill-worker"), &n, &e);
    let mut front = Proc::spawn("bad-frontend", &flags("frontend"), &n, &e);
    let base = front.listening();
    let (ok, _) = wait_for(PATIENCE, || async { (workers(&base).await == Some(1), ()) }).await;
    assert!(ok, "the worker registered; {}", front.log_tail());
    assert_eq!(chat_tokens(&base).await, 8, "before the garbage");

    let worker = etcd
        .get(prefix.as_str(), Some(GetOptions::new().with_prefix()))
        .await
        .unwrap()
        .kvs()
        .iter()
        .find_map(|kv| {
            serde_json::from_slice::<Value>(kv.value()).ok()?["address"]
                .as_str()
                .map(str::to_string)
        })
        .expect("the worker's instance in etcd");

    // --- etcd, while everyone watches ---
    let lease = etcd.lease_grant(60, None).await.unwrap().id();
    let instance = |id: u64, address: &str| {
        json!({"endpoint": endpoint, "instance_id": id, "address": address, "model": "smollm2",
               "metadata": {}})
        .to_string()
    };
    let wrong_type = json!({"endpoint": endpoint, "instance_id": "c0ffee", "address": "x"});
    etcd.put(format!("{prefix}c0ffee"), wrong_type.to_string(), None)
        .await
        .unwrap();
    // Well formed, but no lease holds it: it would never leave routing.
    etcd.put(
        format!("{prefix}beef"),
        instance(0xbeef, "nowhere.beef"),
        None,
    )
    .await
    .unwrap();
    // Under a real lease, but its value names another instance.
    etcd.put(
        format!("{prefix}{lease:x}"),
        instance(0xdead, "nowhere.dead"),
        Some(PutOptions::new().with_lease(lease)),
    )
    .await
    .unwrap();
    etcd.put(format!("baton/{NS}/settings/disagg"), "{\"max-local", None)
        .await
        .unwrap();
    for setting in ["[1, 2]", "{\"max-local-prefill-length\": \"many\"}"] {
        etcd.put(format!("baton/{NS}/settings/disagg"), setting, None)
            .await
            .unwrap();
    }

    // --- NATS: every subject the graph subscribes to ---
    let nats = async_nats::connect(n.as_str()).await.expect("nats client");
    let js = async_nats::jetstream::new(nats.clone());
    let subjects = [
        format!("{NS}.load"),
        format!("{NS}.kv_events"),
        format!("{NS}.router_load"),
    ];
    let addresses = [
        worker.clone(),
        format!("{worker}.kv"),
        format!("{worker}.prefill"),
    ];
    for (what, payload) in garbage() {
        for subject in subjects.iter().chain(&addresses) {
            nats.publish(subject.clone(), payload.clone().into())
                .await
                .unwrap_or_else(|err| panic!("{what} on {subject}: {err}"));
        }
        js.publish(format!("{NS}.prefill.smollm2"), payload.clone().into())
            .await
            .expect("publish a prefill job")
            .await
            .unwrap_or_else(|err| panic!("{what} on the prefill queue: {err}"));
        for address in &addresses {
            let answer = ask(&nats, address, payload.clone()).await;
            assert!(
                !answer.is_empty() && answer[0] <= 2,
                "{what} to {address}: a frame comes back, got {answer:?}"
            );
        }
    }
    // Well-formed generate requests with values no frontend sends: refused (a `rejected` data
    // frame or an error frame), or — the overlap is only a hint — served.
    for (what, request) in [
        (
            "a token outside the vocabulary",
            json!({"request_id": "v", "token_ids": [u32::MAX], "sampling": {"max_tokens": 2}}),
        ),
        (
            "an empty prompt",
            json!({"request_id": "e", "token_ids": [], "sampling": {}}),
        ),
        (
            "2^64 - 1 tokens",
            json!({"request_id": "m", "token_ids": [1, 2], "sampling": {"max_tokens": u64::MAX}}),
        ),
        (
            "bad sampling",
            json!({"request_id": "s", "token_ids": [1, 2], "sampling": {"temperature": -1.0, "top_p": 5.0}}),
        ),
        (
            "a huge overlap",
            json!({"request_id": "o", "token_ids": [1, 2], "sampling": {"max_tokens": 2}, "router_overlap_blocks": u64::MAX}),
        ),
    ] {
        let answer = ask(&nats, &worker, request.to_string().into_bytes()).await;
        let body = String::from_utf8_lossy(answer.get(9..).unwrap_or_default());
        let served = answer[0] == 0 && body.contains("\"tokens\"");
        let refused = answer[0] == 1 || (answer[0] == 0 && body.contains("rejected"));
        assert!(served || refused, "{what}: {answer:?} / {body}");
        assert_eq!(served, what == "a huge overlap", "{what}: {body}");
    }
    // Shapes that parse but mean nothing: a job for a request nobody waits for, sent to the
    // worker's real notice address; a load report for an unknown worker; a KV event from one.
    let job = json!({"request_id": "nobody", "decode_instance": 1, "notice_address": addresses[2],
                     "token_ids": [1, 2, 3], "cached_block_count": 0, "dst_block_ids": [0],
                     "sampling": {}});
    js.publish(format!("{NS}.prefill.smollm2"), job.to_string().into())
        .await
        .unwrap()
        .await
        .unwrap();
    // A flood: the warnings are rate-limited.
    for _ in 0..2_000 {
        nats.publish(subjects[0].clone(), b"{\"flood\": true}".to_vec().into())
            .await
            .unwrap();
    }
    nats.flush().await.unwrap();

    // --- each drop is named by the process that dropped it ---
    for (p, needle) in [
        (&front, "dropping a malformed load report"),
        (&front, "dropping a malformed KV event"),
        (&front, "dropping a malformed router load report"),
        (
            &front,
            "ignoring etcd key `baton/badmsg/instances/decode-worker/generate/not-hex`",
        ),
        (&front, "generate/1a2b`: its value is not an instance"),
        (
            &front,
            "generate/c0ffee`: its value is not an instance: `instance_id`",
        ),
        (&front, "generate/beef`: it is held by lease 0"),
        (&front, "its value describes instance dead"),
        (&decode, "dropping a malformed generate request"),
        (&decode, "dropping a malformed KV state query"),
        (&decode, "dropping a malformed prefill notice"),
        (&decode, "dropping a request without a reply inbox"),
        (&decode, "ignoring `baton/badmsg/settings/disagg`"),
        (&prefill, "dropping a malformed prefill job"),
    ] {
        assert!(
            wait_for_log(p, needle).await,
            "`{needle}` in {}",
            p.log_tail()
        );
    }
    assert!(
        !log_of(&decode).contains("disaggregation thresholds updated"),
        "a garbage setting was applied: {}",
        decode.log_tail()
    );
    let load_warnings = log_of(&front)
        .matches("dropping a malformed load report")
        .count();
    assert!(
        load_warnings < 20,
        "2 000 bad load reports and more gave {load_warnings} warning lines"
    );

    // --- and nothing else changed ---
    alive(&mut [&mut front, &mut decode, &mut prefill]).unwrap();
    assert_eq!(
        workers(&base).await,
        Some(1),
        "the bogus instances are not workers"
    );
    for _ in 0..3 {
        assert_eq!(chat_tokens(&base).await, 8, "after the garbage");
    }
    // The four chats and the one served raw request were all prefilled by the prefill worker,
    // none locally after a fallback (the counts ride on the worker's load reports).
    let (remote, metrics) = wait_for(PATIENCE, || async {
        let (_, text) = get_text(&client(), &format!("{base}/metrics")).await;
        let remote = metric(&text, "baton_prefill_total{where=\"remote\"}");
        (remote == Some(5.0), text)
    })
    .await;
    assert!(remote, "five remote prefills:\n{metrics}");
    assert_eq!(
        metric(&metrics, "baton_prefill_total{where=\"local\"}").unwrap_or(0.0),
        0.0
    );
    let decisions: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("baton_router_requests_total{"))
        .collect();
    assert_eq!(
        decisions.len(),
        1,
        "every request went to the one worker: {decisions:?}"
    );
    alive(&mut [&mut front, &mut decode, &mut prefill]).unwrap();
}
