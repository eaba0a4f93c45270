//! Failures the graph must survive, over real NATS and etcd: a decode worker whose engine
//! thread dies (a panic injected through a test-only variable) leaves discovery at once, its
//! streams migrate to the other worker and complete, and its process exits non-zero; and
//! `baton serve -f configs/disagg.yaml` keeps serving when one of its prefill worker processes
//! is killed with SIGKILL while it holds a claimed job — every in-flight request completes with
//! the aggregated text — and restarts it, after which it takes jobs again.

mod common;

use std::time::{Duration, Instant};

use common::procs::Proc;
use common::{client, f32_reference, get_text, metric, post_json, wait_for};
use serde_json::{json, Value};
use test_support::{EtcdServer, NatsServer};

async fn completion(base: &str, prompt: &Value, max_tokens: u64) -> (u16, Value) {
    let body = json!({"model": "smollm2", "prompt": prompt, "max_tokens": max_tokens,
                      "temperature": 0, "ignore_eos": true});
    post_json(&client(), &format!("{base}/v1/completions"), &body).await
}

async fn workers(base: &str) -> Option<u64> {
    let (_, body) = get_text(&client(), &format!("{base}/health")).await;
    serde_json::from_str::<Value>(&body)
        .ok()
        .and_then(|v| v["workers"].as_u64())
}

/// The pids and command lines of `parent`'s child processes.
fn children(parent: u32) -> Vec<(u32, String)> {
    let list = std::fs::read_to_string(format!("/proc/{parent}/task/{parent}/children"))
        .unwrap_or_default();
    list.split_whitespace()
        .filter_map(|p| p.parse::<u32>().ok())
        .map(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            (pid, cmdline)
        })
        .collect()
}

fn prefill_workers(parent: u32) -> Vec<u32> {
    children(parent)
        .into_iter()
        .filter(|(_, cmd)| cmd.contains("run prefill-worker"))
        .map(|(pid, _)| pid)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decode_worker_whose_engine_dies_leaves_discovery_and_its_streams_migrate() {
    let nats = NatsServer::start().expect("nats-server (scripts/infra install)");
    let etcd = EtcdServer::start().expect("etcd (scripts/infra install)");
    let flags = |component: &'static str| {
        vec![
            "run",
            component,
            "--namespace",
            "engine-death",
            "--router",
            "round-robin",
            "--migration-limit",
            "1",
        ]
    };
    // This worker's engine thread panics after 20 steps: mid-stream for what it serves.
    let mut doomed = Proc::spawn_env(
        "engine-death-doomed",
        &flags("decode-worker"),
        &[("BATON_TEST_ENGINE_PANIC_AFTER_STEPS", "20")],
        &nats.url,
        &etcd.url,
    );
    let healthy = Proc::spawn(
        "engine-death-healthy",
        &flags("decode-worker"),
        &nats.url,
        &etcd.url,
    );
    let mut front = flags("frontend");
    front.extend(["--port", "0"]);
    let mut frontend = Proc::spawn("engine-death-frontend", &front, &nats.url, &etcd.url);
    let base = frontend.listening();
    let ready = wait_for(Duration::from_secs(90), || async {
        (workers(&base).await == Some(2), ())
    })
    .await
    .0;
    assert!(ready, "{}\n{}", doomed.log_tail(), healthy.log_tail());

    // Round-robin: half of these land on the doomed worker, which dies 20 steps in.
    let runs = (0..6).map(|i| {
        let base = base.clone();
        async move { completion(&base, &json!(format!("Story number {i}:")), 40).await }
    });
    let results = futures::future::join_all(runs).await;
    for (status, v) in &results {
        assert_eq!(*status, 200, "{v}\n{}", doomed.log_tail());
        assert_eq!(v["usage"]["completion_tokens"], 40, "{v}");
    }

    let exited = wait_for(Duration::from_secs(30), || {
        let status = doomed.child.try_wait().ok().flatten();
        async move { (status.is_some(), status) }
    })
    .await;
    let status = exited.1.expect("the worker whose engine died exits");
    assert!(
        !status.success(),
        "it exits non-zero: {status:?}\n{}",
        doomed.log_tail()
    );
    let seen = Instant::now();
    let (gone, n) = wait_for(Duration::from_secs(1), || async {
        let n = workers(&base).await;
        (n == Some(1), n)
    })
    .await;
    assert!(
        gone,
        "one worker left in routing {:?} after its exit, {n:?}\n{}",
        seen.elapsed(),
        doomed.log_tail()
    );
    let log = std::fs::read_to_string(&doomed.log).unwrap();
    assert!(log.contains("withdrawn from discovery"), "{log}");
    let m = get_text(&client(), &format!("{base}/metrics")).await.1;
    let migrations = metric(&m, "baton_migrations_total").unwrap_or(0.0);
    assert!(migrations >= 1.0, "its streams migrated\n{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_restarts_a_killed_prefill_worker_and_loses_no_request() {
    let nats = NatsServer::start().expect("nats-server (scripts/infra install)");
    let etcd = EtcdServer::start().expect("etcd (scripts/infra install)");
    let reference = f32_reference();
    let config = concat!(env!("CARGO_MANIFEST_DIR"), "/../configs/disagg.yaml");
    let args = [
        "serve",
        "-f",
        config,
        "--model",
        "smollm2",
        "--served-model-name",
        "smollm2",
        "--port",
        "0",
        "--namespace",
        "supervised",
        "--tensor-parallel-size",
        "1",
        "--dtype",
        "f32",
        "--block-size",
        "16",
        "--max-local-prefill-length",
        "64",
        "--max-prefill-queue-size",
        "100",
        "--prefill-workers",
        "1",
        "--remote-prefill-timeout",
        "5",
        "--num-kv-blocks",
        "400",
    ];
    let mut graph = Proc::spawn("supervised-serve", &args, &nats.url, &etcd.url);
    let base = graph.listening();
    let ready = wait_for(Duration::from_secs(90), || async {
        (workers(&base).await == Some(1), ())
    })
    .await
    .0;
    assert!(ready, "{}", graph.log_tail());
    let graph_pid = graph.child.id();
    let first = prefill_workers(graph_pid);
    assert_eq!(first.len(), 1, "{:?}", children(graph_pid));

    // Eight long prompts, every one remote (300 tokens > 64).
    let prompts: Vec<Vec<u32>> = (0..8u32)
        .map(|s| {
            (0..300)
                .map(|i| 1000 + (i * 7919 + s * 104_729) % 20_000)
                .collect()
        })
        .collect();
    let mut want = Vec::new();
    for p in &prompts {
        let (status, v) = completion(&reference.base, &json!(p), 16).await;
        assert_eq!(status, 200, "{v}");
        want.push(v["choices"][0]["text"].as_str().unwrap().to_string());
    }

    let runs = futures::future::join_all(prompts.iter().map(|p| {
        let base = base.clone();
        async move { completion(&base, &json!(p), 16).await }
    }));
    let kill = async {
        // The only prefill worker holds a job while it logged more claims than finished jobs.
        let claimed = wait_for(Duration::from_secs(60), || async {
            (graph.holds_a_prefill_job(), ())
        })
        .await
        .0;
        assert!(claimed, "no claim\n{}", graph.log_tail());
        // SAFETY: the pid is the graph's own child's.
        unsafe { libc::kill(first[0] as libc::pid_t, libc::SIGKILL) };
    };
    let (results, ()) = tokio::join!(runs, kill);
    let got: Vec<String> = results
        .iter()
        .map(|(status, v)| {
            assert_eq!(*status, 200, "{v}\n{}", graph.log_tail());
            v["choices"][0]["text"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(
        got, want,
        "all eight complete, each with its aggregated text"
    );
    assert!(
        graph.child.try_wait().unwrap().is_none(),
        "the graph keeps running\n{}",
        graph.log_tail()
    );

    // The killed job was redelivered or prefilled locally.
    let m = get_text(&client(), &format!("{base}/metrics")).await.1;
    let log = std::fs::read_to_string(&graph.log).unwrap();
    let fallbacks = metric(&m, "baton_prefill_fallbacks_total{reason=\"timeout\"}").unwrap_or(0.0)
        + metric(&m, "baton_prefill_fallbacks_total{reason=\"failed\"}").unwrap_or(0.0);
    assert!(
        fallbacks >= 1.0 || log.contains("delivery=2"),
        "the job the killed worker held was redelivered or prefilled locally\n{m}"
    );
    assert!(
        log.contains("signal 9"),
        "the death is logged with its status\n{log}"
    );

    // A new prefill worker process, which takes jobs.
    let (restarted, pids) = wait_for(Duration::from_secs(30), || async {
        let pids = prefill_workers(graph_pid);
        (pids.len() == 1 && pids[0] != first[0], pids)
    })
    .await;
    assert!(restarted, "restarted: {pids:?}\n{}", graph.log_tail());
    // Until one request goes remote and comes back without a fallback (the first ones may
    // time out while the new process loads the model).
    let counts = |m: &str| {
        let remote = metric(m, "baton_prefill_total{where=\"remote\"}").unwrap_or(0.0);
        let fallbacks = metric(m, "baton_prefill_fallbacks_total{reason=\"timeout\"}")
            .unwrap_or(0.0)
            + metric(m, "baton_prefill_fallbacks_total{reason=\"failed\"}").unwrap_or(0.0);
        (remote, fallbacks)
    };
    let p: Vec<u32> = (0..300).map(|i| 2000 + i).collect();
    let mut n = 0;
    let (taken, m) = wait_for(Duration::from_secs(120), || {
        n += 1;
        let (base, p) = (base.clone(), p.clone());
        async move {
            // A fresh prompt each time: a cached one would not go remote.
            let mut p = p;
            p[0] += n;
            let before = counts(&get_text(&client(), &format!("{base}/metrics")).await.1);
            let (status, v) = completion(&base, &json!(p), 4).await;
            assert_eq!(status, 200, "{v}");
            // Load reports reach the frontend within a heartbeat.
            tokio::time::sleep(Duration::from_millis(1500)).await;
            let m = get_text(&client(), &format!("{base}/metrics")).await.1;
            let after = counts(&m);
            (after.0 > before.0 && after.1 == before.1, m)
        }
    })
    .await;
    assert!(
        taken,
        "the restarted prefill worker takes jobs again\n{m}\n{}",
        graph.log_tail()
    );
    graph.signal(libc::SIGINT);
    let status = graph.child.wait().expect("the graph exits");
    assert!(status.success(), "{status:?}\n{}", graph.log_tail());
}
