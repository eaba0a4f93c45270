//! The routers against real decode workers (scripted engine, real scheduler, block manager
//! and KV events) over in-process planes: the KV router sends a shared prefix back to the
//! worker that caches it and the engine reports the reuse, round-robin does not; a router that
//! meets a worker late loads its cache from a dump, and an event-id gap is resolved by asking
//! the worker; a stream whose worker dies mid-generation migrates and ends with the tokens an
//! uninterrupted run gives.

mod common;

use std::time::Duration;

use common::{host_with_events, planes, request, tokens_of, BLOCK_SIZE};
use decode_worker::{worker_endpoint, DecodeWorker};
use router::{policy_from_name, KvCostConfig, RoutedStream, Router, RouterOptions};
use runtime::kv_event::{KvEvent, KvEventData, WorkerKvEvent};
use runtime::protocol::GenerateResponse;
use runtime::Planes;

async fn router_with(planes: &Planes, policy: &str, options: RouterOptions) -> Router {
    Router::new(
        planes,
        worker_endpoint("test"),
        policy_from_name(policy, KvCostConfig::default()).unwrap(),
        RouterOptions {
            block_size: BLOCK_SIZE,
            ..options
        },
    )
    .await
    .unwrap()
}

async fn start_workers(planes: &Planes, n: usize) -> Vec<DecodeWorker> {
    let mut all = Vec::new();
    for _ in 0..n {
        all.push(
            DecodeWorker::start(host_with_events(true), planes, "m")
                .await
                .unwrap(),
        );
    }
    tokio::time::sleep(Duration::from_millis(30)).await;
    all
}

/// Runs a request to its end: (the worker it ran on, its cached prompt tokens).
async fn run(router: &Router, id: &str, prompt: Vec<u32>) -> (u64, usize) {
    let mut stream = router.generate(request(id, prompt, 2)).await.unwrap();
    let worker = stream.instance_id().unwrap();
    let mut cached = None;
    while let Some(item) = stream.next().await {
        if let GenerateResponse::Tokens(d) = item.unwrap() {
            cached = Some(d.cached_tokens);
        }
    }
    (worker, cached.unwrap())
}

/// Waits until the router's index says some worker holds `blocks` leading blocks of `prompt`.
async fn indexed(router: &Router, prompt: &[u32], blocks: usize) -> u64 {
    for _ in 0..300 {
        if let Some((&w, _)) = router.overlaps(prompt).iter().find(|(_, &n)| n >= blocks) {
            return w;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!(
        "no worker indexed with {blocks} blocks: {:?}",
        router.overlaps(prompt)
    );
}

#[tokio::test]
async fn kv_routing_returns_a_shared_prefix_to_its_worker_and_round_robin_does_not() {
    for policy in ["kv", "round-robin"] {
        let planes = planes();
        let router = router_with(&planes, policy, RouterOptions::default()).await;
        let _workers = start_workers(&planes, 2).await;
        for pair in 0..3u32 {
            // Three full 4-token blocks shared, then each request its own tail.
            let prefix: Vec<u32> = (0..12).map(|i| 1 + (pair * 13 + i) % 60).collect();
            let first = [prefix.clone(), vec![61]].concat();
            let second = [prefix.clone(), vec![62, 63]].concat();
            let (w1, cached1) = run(&router, &format!("{policy}-{pair}a"), first).await;
            assert_eq!(cached1, 0, "{policy}: a new prefix is not cached");
            assert_eq!(indexed(&router, &prefix, 3).await, w1);
            let (w2, cached2) = run(&router, &format!("{policy}-{pair}b"), second).await;
            if policy == "kv" {
                assert_eq!(w2, w1, "kv: the prefix's worker");
                assert!(cached2 >= 12, "kv: cached_tokens {cached2}");
            } else {
                assert_ne!(w2, w1, "round-robin alternates");
                assert_eq!(
                    cached2, 0,
                    "round-robin: the other worker has nothing cached"
                );
            }
        }
    }
}

#[tokio::test]
async fn a_late_router_loads_a_dump_and_a_gap_is_filled_by_asking_the_worker() {
    let planes = planes();
    let early = router_with(&planes, "round-robin", RouterOptions::default()).await;
    let workers = start_workers(&planes, 1).await;
    let id = workers[0].instance_id();
    let prompt: Vec<u32> = (1..=9).collect();
    run(&early, "a", prompt.clone()).await;
    indexed(&early, &prompt, 2).await;

    // A router started now saw none of those events: it loads the worker's cache.
    let late = router_with(&planes, "kv", RouterOptions::default()).await;
    assert_eq!(indexed(&late, &prompt, 2).await, id);
    assert!(late.metrics().resyncs() >= 1, "the dump was asked for");

    // An event from the far future is a gap: the router asks the worker, whose ring and dump
    // cannot place it, so it is dropped — and the index keeps what the worker really holds.
    let before = late.metrics().resyncs();
    let bogus = WorkerKvEvent {
        worker_id: id,
        event: KvEvent {
            event_id: 1_000_000,
            data: KvEventData::Cleared,
        },
    };
    planes
        .events
        .publish(
            &planes.kv_events_subject(),
            serde_json::to_vec(&bogus).unwrap(),
        )
        .await
        .unwrap();
    for _ in 0..200 {
        if late.metrics().resyncs() > before {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        late.metrics().resyncs() > before,
        "the gap started a resync"
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(late.overlaps(&prompt).get(&id), Some(&2));
    // The worker's real events still apply after it.
    let other: Vec<u32> = (20..=28).collect();
    run(&late, "b", other.clone()).await;
    assert_eq!(indexed(&late, &other, 2).await, id);
    assert_eq!(indexed(&early, &other, 2).await, id);
}

/// Reads `n` tokens of `stream`.
async fn take(stream: &mut RoutedStream, n: usize) -> Vec<u32> {
    let mut tokens = Vec::new();
    while tokens.len() < n {
        match stream.next().await.unwrap().unwrap() {
            GenerateResponse::Tokens(d) => tokens.extend(d.token_ids),
            other => panic!("unexpected {other:?}"),
        }
    }
    tokens
}

/// Kills (silently, as kill -9 would) the worker serving `stream`.
fn abandon_serving(workers: &mut Vec<DecodeWorker>, stream: &RoutedStream) {
    let serving = stream.instance_id().unwrap();
    let i = workers
        .iter()
        .position(|w| w.instance_id() == serving)
        .unwrap();
    workers.remove(i).abandon();
}

#[tokio::test]
async fn a_stream_whose_worker_dies_migrates_and_ends_as_an_uninterrupted_one() {
    let planes = planes();
    let router = router_with(
        &planes,
        "least-loaded",
        RouterOptions {
            migration_limit: 1,
            ..RouterOptions::default()
        },
    )
    .await;
    let mut workers = start_workers(&planes, 2).await;
    let expected = {
        let mut s = router
            .generate(request("plain", vec![5], 30))
            .await
            .unwrap();
        tokens_of(&mut s).await
    };
    let mut stream = router
        .generate(request("moved", vec![5], 30))
        .await
        .unwrap();
    let mut got = take(&mut stream, 5).await;
    abandon_serving(&mut workers, &stream);
    got.extend(tokens_of(&mut stream).await);
    assert_eq!(got, expected, "the migrated stream continues where it was");
    assert_eq!(router.metrics().migrations(), 1);

    // Without migration the same death ends the stream with an error.
    let planes = common::planes();
    let router = router_with(&planes, "round-robin", RouterOptions::default()).await;
    let mut workers = start_workers(&planes, 2).await;
    let mut stream = router.generate(request("lost", vec![5], 30)).await.unwrap();
    take(&mut stream, 3).await;
    abandon_serving(&mut workers, &stream);
    let mut failed = false;
    while let Some(item) = stream.next().await {
        if item.is_err() {
            failed = true;
        }
    }
    assert!(failed, "no migration: the stream ends with an error");
}
