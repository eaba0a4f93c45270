//! The late prefill writer, end to end over real NATS and etcd (`baton run` processes): a
//! prefill worker is stopped (SIGSTOP) right after it claimed a long prompt A, A's claim
//! expires and A prefills on the decode worker, a local prompt B takes blocks A's reservation
//! freed, and only then the prefill worker resumes, finishes A and writes. Its write must be
//! refused by the decode worker's fence — over shared memory (the writer's own check in the
//! shared table) and over TCP (the decode worker's server) — and counted in `/metrics`, and
//! both A and B must produce their aggregated greedy text.

mod common;

use std::time::Duration;

use common::procs::Proc;
use common::{client, f32_reference, get_text, metric, post_json, wait_for};
use serde_json::{json, Value};
use test_support::{EtcdServer, NatsServer};

/// A prompt of `len` ordinary token ids, different for each `seed`.
fn prompt(len: usize, seed: u32) -> Vec<u32> {
    (0..len as u32)
        .map(|i| 1000 + (i * 7919 + seed * 104_729) % 20_000)
        .collect()
}

const MAX_TOKENS: u64 = 64;

async fn complete(base: &str, prompt: &[u32]) -> String {
    let body = json!({"model": "smollm2", "prompt": prompt, "max_tokens": MAX_TOKENS,
                      "temperature": 0, "ignore_eos": true});
    let (status, v) = post_json(&client(), &format!("{base}/v1/completions"), &body).await;
    assert_eq!(status, 200, "{v}");
    v["choices"][0]["text"].as_str().unwrap().to_string()
}

fn log_has(proc: &Proc, needle: &str) -> bool {
    std::fs::read_to_string(&proc.log).is_ok_and(|log| log.contains(needle))
}

/// Waits up to `within` for `needle` in `proc`'s log.
async fn wait_log(proc: &Proc, needle: &str, within: Duration) -> bool {
    wait_for(within, || async { (log_has(proc, needle), ()) })
        .await
        .0
}

async fn late_writer_is_refused(backend: &str, nats: &str, etcd: &str, want: &[String; 2]) {
    let ns = format!("late-{backend}");
    let flags = [
        "--namespace",
        &ns,
        "--remote-prefill",
        "true",
        "--conditional-disagg",
        "true",
        // A (800 tokens) goes remote, B (300) stays local.
        "--max-local-prefill-length",
        "500",
        "--max-prefill-queue-size",
        "100",
        "--kv-transfer",
        backend,
        "--dtype",
        "f32",
        "--block-size",
        "16",
        "--remote-prefill-timeout",
        "3",
        // A takes 54 blocks and B 23 of these 96 once A prefills locally: at least 31 of the
        // 50 blocks A's reservation held are in use again when the late write comes.
        "--num-kv-blocks",
        "96",
    ];
    let with = |component: &'static str| {
        let mut v = vec!["run", component];
        v.extend(flags.iter().copied());
        v
    };
    let decode = Proc::spawn(&format!("{ns}-decode"), &with("decode-worker"), nats, etcd);
    let prefill = Proc::spawn(
        &format!("{ns}-prefill"),
        &with("prefill-worker"),
        nats,
        etcd,
    );
    let mut front = with("frontend");
    front.extend(["--port", "0"]);
    let mut frontend = Proc::spawn(&format!("{ns}-frontend"), &front, nats, etcd);
    let base = frontend.listening();
    let ready = wait_for(Duration::from_secs(90), || async {
        let (status, body) = get_text(&client(), &format!("{base}/health")).await;
        let workers = serde_json::from_str::<Value>(&body)
            .ok()
            .and_then(|v| v["workers"].as_u64());
        (status == 200 && workers == Some(1), ())
    })
    .await
    .0;
    assert!(ready, "{}", decode.log_tail());

    let a = prompt(800, 1);
    let b = prompt(300, 2);
    let run_a = tokio::spawn({
        let base = base.clone();
        async move { complete(&base, &a).await }
    });
    assert!(
        wait_log(&prefill, "claimed a prefill job", Duration::from_secs(60)).await,
        "{backend}: the prefill worker never claimed A\n{}",
        prefill.log_tail()
    );
    prefill.signal(libc::SIGSTOP);
    // The claim ages past --remote-prefill-timeout: A prefills on the decode worker.
    assert!(
        wait_log(
            &decode,
            "no remote prefill in time",
            Duration::from_secs(30)
        )
        .await,
        "{backend}: A never fell back to local prefill\n{}",
        decode.log_tail()
    );
    let run_b = tokio::spawn({
        let base = base.clone();
        async move { complete(&base, &b).await }
    });
    // A and B are in the batch, on blocks A's reservation held, when the writer wakes up.
    tokio::time::sleep(Duration::from_millis(300)).await;
    prefill.signal(libc::SIGCONT);
    let (got_a, got_b) = (run_a.await.unwrap(), run_b.await.unwrap());
    assert_eq!(
        [got_a, got_b],
        *want,
        "{backend}: the late write changed what A or B generated\n{}",
        prefill.log_tail()
    );
    assert!(
        wait_log(
            &prefill,
            "not granted to this write",
            Duration::from_secs(30)
        )
        .await,
        "{backend}: the prefill worker's write was not refused\n{}",
        prefill.log_tail()
    );
    let (ok, m) = wait_for(Duration::from_secs(10), || async {
        let m = get_text(&client(), &format!("{base}/metrics")).await.1;
        let refused = metric(&m, "baton_kv_transfer_refused_total").unwrap_or(0.0);
        let used = metric(&m, "baton_kv_blocks_used");
        (refused >= 1.0 && used == Some(0.0), m)
    })
    .await;
    assert!(
        ok,
        "{backend}: the refused write is counted and no block is left in use\n{m}"
    );
    let timeouts = metric(&m, "baton_prefill_fallbacks_total{reason=\"timeout\"}");
    assert_eq!(timeouts, Some(1.0), "{backend}: A fell back once\n{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_prefill_writer_cannot_write_into_blocks_reused_after_its_claim_expired() {
    let nats = NatsServer::start().expect("nats-server (scripts/infra install)");
    let etcd = EtcdServer::start().expect("etcd (scripts/infra install)");
    let reference = f32_reference();
    let want = [
        complete(&reference.base, &prompt(800, 1)).await,
        complete(&reference.base, &prompt(300, 2)).await,
    ];
    for backend in ["shm", "tcp"] {
        late_writer_is_refused(backend, &nats.url, &etcd.url, &want).await;
    }
}
