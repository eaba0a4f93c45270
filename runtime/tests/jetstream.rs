//! The JetStream prefill queue against a real nats-server (started here from the binary
//! `scripts/infra` installs): a job is handed out, acked and gone; an un-acked job comes back
//! after `ack_wait` with `delivery == 2`; a nak gives it back at once; workers in separate
//! connections share one queue with each job delivered once; `pending` counts waiting jobs
//! per model; a waiting worker survives a NATS restart; an unreachable server is named.

mod contract;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use runtime::work_queue::{JetStreamWorkQueue, Job, WorkQueue};
use test_support::NatsServer;

const ACK_WAIT: Duration = Duration::from_secs(1);
/// A model name with the characters JetStream names and subjects cannot hold.
const MODEL: &str = "neuralmagic/DeepSeek-R1-Distill-Llama-70B-FP8-dynamic";

async fn queue(nats: &NatsServer, model: &str, ack_wait: Duration) -> JetStreamWorkQueue {
    JetStreamWorkQueue::connect(&nats.url, "dynamo", model, ack_wait)
        .await
        .expect("queue opens")
}

/// The next job if one comes within `limit`.
async fn next_within(q: &JetStreamWorkQueue, limit: Duration) -> Option<Job> {
    tokio::time::timeout(limit, q.next())
        .await
        .ok()
        .map(|r| r.expect("next").expect("queue open"))
}

/// The consumer's pending count once it reaches `want`, or its value after 2 s: nats-server
/// updates `num_pending` a moment after a publish or delivery, so one read right after either
/// can see the old count.
async fn pending_settles(q: &JetStreamWorkQueue, want: u64) -> u64 {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    loop {
        let now = q.pending().await.expect("pending");
        if now == want || tokio::time::Instant::now() >= deadline {
            return now;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_work_queue_contract_holds_over_jetstream() {
    let nats = NatsServer::start().expect("nats-server");
    let q = queue(&nats, MODEL, ACK_WAIT).await;
    contract::jobs_are_acked_redelivered_and_nakked(&q, ACK_WAIT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_is_handed_out_acked_and_gone() {
    let nats = NatsServer::start().expect("nats-server");
    let q = queue(&nats, MODEL, ACK_WAIT).await;
    assert_eq!(
        q.subject(),
        "dynamo.prefill.neuralmagic_2fDeepSeek-R1-Distill-Llama-70B-FP8-dynamic"
    );
    q.enqueue(b"prefill 1".to_vec()).await.expect("enqueue");
    assert_eq!(pending_settles(&q, 1).await, 1);

    let job = next_within(&q, Duration::from_secs(5))
        .await
        .expect("a job");
    assert_eq!(
        (job.payload.as_slice(), job.delivery),
        (&b"prefill 1"[..], 1)
    );
    assert_eq!(pending_settles(&q, 0).await, 0, "in flight is not pending");
    job.ack().await.expect("ack");

    // Acked: not redelivered after ack_wait, and the work-queue stream dropped it.
    assert!(next_within(&q, ACK_WAIT * 2).await.is_none());
    let client = async_nats::connect(&nats.url).await.expect("connect");
    let mut stream = async_nats::jetstream::new(client)
        .get_stream("dynamo_prefill")
        .await
        .expect("stream exists");
    assert_eq!(stream.info().await.expect("stream info").state.messages, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_share_the_queue_and_each_job_goes_to_one() {
    let nats = NatsServer::start().expect("nats-server");
    let producer = queue(&nats, MODEL, ACK_WAIT).await;
    const JOBS: usize = 20;
    let mut workers = Vec::new();
    for _ in 0..2 {
        // Separate connections, as separate prefill-worker processes would have.
        let q = queue(&nats, MODEL, ACK_WAIT).await;
        workers.push(tokio::spawn(async move {
            let mut got = Vec::new();
            while let Some(job) = next_within(&q, Duration::from_secs(2)).await {
                assert_eq!(job.delivery, 1, "acked in time: never redelivered");
                // Slower than a pull, so one worker cannot drain the queue alone.
                tokio::time::sleep(Duration::from_millis(50)).await;
                got.push(String::from_utf8(job.payload.clone()).expect("utf-8"));
                job.ack().await.expect("ack");
            }
            got
        }));
    }
    for i in 0..JOBS {
        producer
            .enqueue(format!("job {i}").into_bytes())
            .await
            .expect("enqueue");
    }
    let mut seen = HashSet::new();
    for worker in workers {
        let got = worker.await.expect("worker");
        assert!(!got.is_empty(), "both workers took jobs");
        for job in got {
            assert!(seen.insert(job.clone()), "{job} delivered twice");
        }
    }
    assert_eq!(seen.len(), JOBS);
    assert_eq!(pending_settles(&producer, 0).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_counts_waiting_jobs_per_model() {
    let nats = NatsServer::start().expect("nats-server");
    let q = queue(&nats, MODEL, ACK_WAIT).await;
    let other = queue(&nats, "org/other.model", ACK_WAIT).await;
    for i in 0..3u8 {
        q.enqueue(vec![i]).await.expect("enqueue");
    }
    other.enqueue(b"x".to_vec()).await.expect("enqueue");
    assert_eq!(pending_settles(&q, 3).await, 3);
    assert_eq!(pending_settles(&other, 1).await, 1);

    let held = next_within(&q, Duration::from_secs(5))
        .await
        .expect("a job");
    assert_eq!(held.payload, vec![0]);
    assert_eq!(pending_settles(&q, 2).await, 2);
    held.ack().await.expect("ack");
    let job = next_within(&other, Duration::from_secs(5))
        .await
        .expect("a job");
    assert_eq!(job.payload, b"x");
    job.ack().await.expect("ack");
    assert_eq!(pending_settles(&other, 0).await, 0);
    assert_eq!(pending_settles(&q, 2).await, 2, "models do not share jobs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_worker_survives_a_nats_restart() {
    let mut nats = NatsServer::start().expect("nats-server");
    let producer = queue(&nats, MODEL, ACK_WAIT).await;
    let worker = queue(&nats, MODEL, ACK_WAIT).await;
    let waiting = tokio::spawn(async move { next_within(&worker, Duration::from_secs(30)).await });
    tokio::time::sleep(Duration::from_millis(300)).await;

    nats.restart().expect("nats restart");
    // The producer's connection reconnects too; retry while it does.
    let deadline = Instant::now() + Duration::from_secs(15);
    while let Err(e) = producer.enqueue(b"after restart".to_vec()).await {
        assert!(Instant::now() < deadline, "enqueue never recovered: {e}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let job = waiting
        .await
        .expect("worker")
        .expect("job after the restart");
    assert_eq!(job.payload, b"after restart");
    job.ack().await.expect("ack");
}

#[tokio::test]
async fn an_unreachable_nats_is_reported_promptly_by_name() {
    let url = format!("nats://127.0.0.1:{}", test_support::free_port());
    let started = Instant::now();
    let result = JetStreamWorkQueue::connect(&url, "dynamo", MODEL, ACK_WAIT).await;
    let took = started.elapsed();
    let err = result
        .err()
        .expect("connecting to nothing fails")
        .to_string();
    assert!(err.contains(&url), "error names the server: {err}");
    assert!(took < Duration::from_secs(5), "took {took:?}");
}
