//! The graph as separate processes over real NATS and etcd (started here from the binaries
//! `scripts/infra` installs): a frontend and two decode workers serve chat completions; a
//! worker killed with SIGKILL mid-stream ends its stream with an error and the next request
//! succeeds; NATS and etcd restarts are survived without restarting Baton; and `baton serve`
//! with NATS/etcd starts and stops the processes itself. With `--migration-limit 1`, a stream
//! whose worker is killed mid-generation moves to the other worker and ends with the same
//! greedy text as an uninterrupted run.

mod common;

use std::time::Duration;

use common::procs::Proc;
use common::{
    client, collect_stream, decisions_by_worker, get_text, metric, post_json, wait_for, Sse,
};
use serde_json::{json, Value};
use test_support::EtcdServer;
use test_support::NatsServer;

async fn workers_healthy(base: &str, want: u64) -> bool {
    let (ok, _) = wait_for(Duration::from_secs(60), || async {
        let (status, body) = get_text(&client(), &format!("{base}/health")).await;
        let workers = serde_json::from_str::<Value>(&body)
            .ok()
            .and_then(|v| v["workers"].as_u64());
        (status == 200 && workers == Some(want), ())
    })
    .await;
    ok
}

fn chat(max_tokens: u32, stream: bool) -> Value {
    json!({"model": "smollm2", "messages": [{"role": "user", "content": "Tell me about the sea."}],
           "max_tokens": max_tokens, "temperature": 0, "ignore_eos": true, "stream": stream})
}

async fn chat_succeeds(base: &str) -> (bool, Value) {
    let (status, body) = post_json(
        &client(),
        &format!("{base}/v1/chat/completions"),
        &chat(4, false),
    )
    .await;
    (
        status == 200 && body["usage"]["completion_tokens"] == 4,
        body,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn separate_processes_serve_and_survive_worker_and_server_faults() {
    let mut nats = NatsServer::start().expect("nats-server");
    let mut etcd = EtcdServer::start().expect("etcd");
    let (n, e) = (nats.url.clone(), etcd.url.clone());
    let workers: Vec<Proc> = (0..2)
        .map(|i| Proc::spawn(&format!("worker{i}"), &["run", "decode-worker"], &n, &e))
        .collect();
    let mut front = Proc::spawn("frontend", &["run", "frontend", "--port", "0"], &n, &e);
    let base = front.listening();
    assert!(
        workers_healthy(&base, 2).await,
        "two workers registered; {}",
        front.log_tail()
    );

    // Both workers serve: the load each publishes reaches the frontend's metrics.
    let (ok, body) = chat_succeeds(&base).await;
    assert!(ok, "{body}");
    let (ok, text) = wait_for(Duration::from_secs(10), || async {
        let (_, text) = get_text(&client(), &format!("{base}/metrics")).await;
        (metric(&text, "baton_workers") == Some(2.0), text)
    })
    .await;
    assert!(ok, "load of both workers in /metrics:\n{text}");

    // SIGKILL one worker while two streams run (round-robin puts one on each).
    let c = client();
    let url = format!("{base}/v1/chat/completions");
    let mut streams = Vec::new();
    for _ in 0..2 {
        let resp = c.post(&url).json(&chat(400, true)).send().await.unwrap();
        let mut sse = Sse::new(resp);
        assert!(sse.next().await.is_some(), "stream started");
        streams.push(sse);
    }
    workers[0].signal(libc::SIGKILL);
    let mut outcomes = Vec::new();
    for mut sse in streams {
        let mut error = None;
        let mut done = false;
        let mut finish = None;
        while let Some(data) = tokio::time::timeout(Duration::from_secs(60), sse.next())
            .await
            .expect("a stream of a dead worker must not hang")
        {
            if data == "[DONE]" {
                done = true;
                continue;
            }
            let v: Value = serde_json::from_str(&data).unwrap();
            if v.get("error").is_some() {
                error = Some(v);
            } else if let Some(f) = v["choices"][0]["finish_reason"].as_str() {
                finish = Some(f.to_string());
            }
        }
        assert!(done, "every stream ends with [DONE]");
        outcomes.push((error, finish));
    }
    assert_eq!(
        outcomes.iter().filter(|(e, _)| e.is_some()).count(),
        1,
        "the killed worker's stream ends with an error event: {outcomes:?}"
    );
    assert!(
        outcomes
            .iter()
            .any(|(e, f)| e.is_none() && f.as_deref() == Some("length")),
        "the other stream completes: {outcomes:?}"
    );
    // The next request succeeds, even before the dead worker's lease has run out.
    let (ok, body) = chat_succeeds(&base).await;
    assert!(ok, "after kill -9: {body}");
    assert!(
        workers_healthy(&base, 1).await,
        "the dead worker left routing"
    );

    // NATS restart: the planes reconnect by themselves.
    nats.restart().expect("nats restart");
    let (ok, body) = wait_for(Duration::from_secs(30), || chat_succeeds(&base)).await;
    assert!(ok, "after a NATS restart: {body}; {}", front.log_tail());

    // etcd restart: the worker re-registers and is routed to again.
    etcd.restart().expect("etcd restart");
    assert!(
        workers_healthy(&base, 1).await,
        "re-registered after an etcd restart; {}",
        workers[1].log_tail()
    );
    let (ok, body) = wait_for(Duration::from_secs(30), || chat_succeeds(&base)).await;
    assert!(ok, "after an etcd restart: {body}");

    front.signal(libc::SIGTERM);
    let status = front.child.wait().unwrap();
    assert!(status.success(), "frontend exits 0 on SIGTERM: {status:?}");
}

/// The instance id a worker process logged when it registered.
fn instance_of(worker: &Proc) -> Option<u64> {
    let log = std::fs::read_to_string(&worker.log).ok()?;
    let line = log.lines().find(|l| l.contains("decode worker ready"))?;
    let id = line.split("instance=").nth(1)?;
    id.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
}

/// The worker (hex instance id) the router's request counter moved for since `before`.
fn routed_to(before: &str, after: &str) -> Option<String> {
    let old = decisions_by_worker(before);
    decisions_by_worker(after).into_iter().find_map(|(w, n)| {
        let was = old.get(&w).copied().unwrap_or(0.0);
        (n > was).then_some(w)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_workers_stream_migrates_with_the_same_greedy_text() {
    let nats = NatsServer::start().expect("nats-server");
    let etcd = EtcdServer::start().expect("etcd");
    let (n, e) = (nats.url.clone(), etcd.url.clone());
    // f32: a prefill of prompt + tokens so far gives the same argmax as decoding them did.
    let workers: Vec<Proc> = (0..2)
        .map(|i| {
            Proc::spawn(
                &format!("mworker{i}"),
                &["run", "decode-worker", "--dtype", "f32"],
                &n,
                &e,
            )
        })
        .collect();
    let mut front = Proc::spawn(
        "mfrontend",
        &["run", "frontend", "--port", "0", "--migration-limit", "1"],
        &n,
        &e,
    );
    let base = front.listening();
    assert!(workers_healthy(&base, 2).await, "{}", front.log_tail());
    let url = format!("{base}/v1/chat/completions");
    let (status, reference) = post_json(&client(), &url, &chat(48, false)).await;
    assert_eq!(status, 200, "{reference}");
    let reference = reference["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();

    let (_, before) = get_text(&client(), &format!("{base}/metrics")).await;
    let resp = client()
        .post(&url)
        .json(&chat(48, true))
        .send()
        .await
        .unwrap();
    let mut sse = Sse::new(resp);
    let mut text = String::new();
    let mut chunks = 0;
    let mut killed = false;
    let mut error = None;
    let mut done = false;
    while let Some(data) = tokio::time::timeout(Duration::from_secs(90), sse.next())
        .await
        .expect("a migrating stream must not hang")
    {
        if data == "[DONE]" {
            done = true;
            continue;
        }
        let v: Value = serde_json::from_str(&data).unwrap();
        if v.get("error").is_some() {
            error = Some(v);
            continue;
        }
        if let Some(c) = v["choices"][0]["delta"]["content"].as_str() {
            text.push_str(c);
            chunks += 1;
        }
        if chunks == 8 && !killed {
            let (_, after) = get_text(&client(), &format!("{base}/metrics")).await;
            let serving = routed_to(&before, &after).expect("the stream's worker in /metrics");
            let victim = workers
                .iter()
                .find(|w| instance_of(w).map(|id| format!("{id:x}")) == Some(serving.clone()))
                .expect("the serving worker's process");
            victim.signal(libc::SIGKILL);
            killed = true;
        }
    }
    assert!(killed && done, "killed mid-stream and ended with [DONE]");
    assert!(error.is_none(), "migrated, not failed: {error:?}");
    assert_eq!(text, reference, "the migrated stream's greedy text");
    let (_, metrics) = get_text(&client(), &format!("{base}/metrics")).await;
    assert_eq!(metric(&metrics, "baton_migrations_total"), Some(1.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_with_nats_and_etcd_runs_each_component_as_a_process() {
    let nats = NatsServer::start().expect("nats-server");
    let etcd = EtcdServer::start().expect("etcd");
    let mut graph = Proc::spawn(
        "graph",
        &["serve", "--port", "0", "--workers", "2"],
        &nats.url,
        &etcd.url,
    );
    let base = graph.listening();
    assert!(workers_healthy(&base, 2).await, "{}", graph.log_tail());
    let resp = client()
        .post(format!("{base}/v1/chat/completions"))
        .json(&chat(8, true))
        .send()
        .await
        .unwrap();
    let stream = collect_stream(resp).await;
    assert!(stream.done && stream.chunks.len() >= 2);
    let children = child_pids(graph.child.id());
    assert_eq!(
        children.len(),
        3,
        "a frontend and two workers: {children:?}"
    );
    graph.signal(libc::SIGINT);
    let status = graph.child.wait().unwrap();
    assert!(
        status.success(),
        "serve exits 0 on Ctrl-C: {status:?}; {}",
        graph.log_tail()
    );
    for pid in children {
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists()
                || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .is_ok_and(|s| s.contains(") Z ")),
            "component {pid} stopped with the graph"
        );
    }
}

/// Children of every thread of `parent` (tokio spawns them from its worker threads).
fn child_pids(parent: u32) -> Vec<u32> {
    let mut pids = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{parent}/task"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let text = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
        pids.extend(
            text.split_whitespace()
                .filter_map(|p| p.parse::<u32>().ok()),
        );
    }
    pids
}
