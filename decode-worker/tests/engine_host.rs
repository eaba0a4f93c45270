//! The engine host and the worker service with a scripted executor (no model): the next token
//! is always the chunk's last token + 1, so outputs are known exactly, and each step sleeps a
//! little so a cancellation lands mid-generation.

mod common;

use std::time::Duration;

use common::{
    host, host_with_events, planes, request, tokens_of, wait_for_free_blocks, BLOCKS, BLOCK_SIZE,
};
use decode_worker::{worker_endpoint, DecodeWorker, EngineEvent};
use router::{RoundRobin, Router, RouterOptions};
use runtime::kv_event::{KvEventData, WorkerKvEvent};
use runtime::protocol::{FinishReason, WorkerLoad};
use runtime::Planes;
use tokio::sync::mpsc;

#[tokio::test]
async fn a_request_streams_its_tokens_then_frees_its_blocks() {
    let host = host();
    let (tx, mut rx) = mpsc::unbounded_channel();
    host.add(request("a", vec![5, 6, 7], 6), tx).unwrap();
    let mut tokens = Vec::new();
    let mut finish = None;
    while let Some(event) = rx.recv().await {
        match event {
            EngineEvent::Tokens(d) => {
                assert_eq!(d.prompt_tokens, 3);
                tokens.extend(d.token_ids);
                finish = d.finish_reason;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(tokens, vec![8, 9, 10, 11, 12, 13]);
    assert_eq!(finish, Some(FinishReason::Length));
    wait_for_free_blocks(&host).await;
}

#[tokio::test]
async fn a_caller_that_goes_away_or_aborts_frees_the_blocks() {
    let host = host();
    let (tx, mut rx) = mpsc::unbounded_channel();
    host.add(request("gone", vec![1, 2, 3, 4, 5], 40), tx)
        .unwrap();
    let (tx2, mut rx2) = mpsc::unbounded_channel();
    host.add(request("aborted", vec![9, 9, 9, 9, 9], 40), tx2)
        .unwrap();
    assert!(matches!(rx.recv().await, Some(EngineEvent::Tokens(_))));
    assert!(matches!(rx2.recv().await, Some(EngineEvent::Tokens(_))));
    assert!(host.load().kv_blocks_used > 0);
    drop(rx);
    host.abort("aborted");
    wait_for_free_blocks(&host).await;
}

#[tokio::test]
async fn requests_the_engine_refuses_are_rejected_naming_the_field() {
    let host = host();
    let (tx, mut rx) = mpsc::unbounded_channel();
    host.add(request("long", vec![1; 40], 20), tx).unwrap();
    match rx.recv().await {
        Some(EngineEvent::Rejected { param, message }) => {
            assert_eq!(param.as_deref(), Some("max_tokens"), "{message}");
        }
        other => panic!("expected a rejection, got {other:?}"),
    }
    let (tx, mut rx) = mpsc::unbounded_channel();
    host.add(request("vocab", vec![1, 999], 2), tx).unwrap();
    assert!(matches!(
        rx.recv().await,
        Some(EngineEvent::Rejected { param: Some(p), .. }) if p == "prompt"
    ));
}

async fn router(planes: &Planes) -> Router {
    Router::new(
        planes,
        worker_endpoint("test"),
        Box::new(RoundRobin::default()),
        RouterOptions {
            block_size: BLOCK_SIZE,
            ..RouterOptions::default()
        },
    )
    .await
    .unwrap()
}

#[tokio::test]
async fn through_router_and_request_plane_and_cancelled_by_dropping_the_stream() {
    let planes = planes();
    let router = router(&planes).await;
    let worker = DecodeWorker::start(host(), &planes, "m").await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;

    let mut stream = router.generate(request("r1", vec![3], 4)).await.unwrap();
    assert_eq!(stream.instance_id(), Some(worker.instance_id()));
    assert_eq!(
        tokens_of(&mut stream).await,
        vec![4, 5, 6, 7],
        "stream ends with End after the finish"
    );

    let mut stream = router
        .generate(request("r2", vec![3; 6], 40))
        .await
        .unwrap();
    assert!(stream.next().await.unwrap().is_ok());
    assert!(worker.host().load().kv_blocks_used > 0);
    drop(stream);
    wait_for_free_blocks(worker.host()).await;
    worker.stop();
}

/// In-process planes (as `baton serve` wires them): the worker itself publishes its load and
/// its block manager's KV events on the event plane, and the router's load view follows.
#[tokio::test]
async fn load_reports_and_kv_events_cross_the_event_plane() {
    let planes = planes();
    let mut loads = planes
        .events
        .subscribe(&planes.load_subject())
        .await
        .unwrap();
    let mut kv = planes
        .events
        .subscribe(&planes.kv_events_subject())
        .await
        .unwrap();
    let router = router(&planes).await;
    let worker = DecodeWorker::start(host_with_events(true), &planes, "m")
        .await
        .unwrap();
    let id = worker.instance_id();

    let first: WorkerLoad = serde_json::from_slice(&loads.recv().await.unwrap()).unwrap();
    assert_eq!(first.instance_id, id);
    assert_eq!(first.kv_blocks_total, BLOCKS);
    assert_eq!(first.kv_blocks_used, 0);

    // Nine prompt tokens fill two 4-token blocks: one Stored event for them, from this worker.
    let prompt: Vec<u32> = (1..=9).collect();
    // 30 steps of 3 ms: long enough for a load report to catch the request running.
    let mut stream = router
        .generate(request("r", prompt.clone(), 30))
        .await
        .unwrap();
    assert_eq!(tokens_of(&mut stream).await, (10..40).collect::<Vec<u32>>());
    let event: WorkerKvEvent = tokio::time::timeout(Duration::from_secs(5), kv.recv())
        .await
        .expect("a KV event within 5 s")
        .map(|b| serde_json::from_slice(&b).unwrap())
        .unwrap();
    assert_eq!(event.worker_id, id);
    assert_eq!(event.event.event_id, 0, "the worker's first event");
    let hashes = runtime::block_hash::block_hashes(&prompt, BLOCK_SIZE);
    match &event.event.data {
        KvEventData::Stored {
            parent_hash: None,
            blocks,
        } => assert_eq!(
            blocks[..],
            hashes[..blocks.len()],
            "chained prompt block hashes"
        ),
        other => panic!("expected the prompt's blocks stored, got {other:?}"),
    }

    // A report with the request in it went out, and the router saw the worker's load.
    let (mut saw_busy, mut saw_idle_after) = (false, false);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while let Ok(Some(bytes)) = tokio::time::timeout_at(deadline, loads.recv()).await {
        let load: WorkerLoad = serde_json::from_slice(&bytes).unwrap();
        if load.running > 0 && load.kv_blocks_used > 0 {
            saw_busy = true;
        } else if saw_busy && load.running == 0 && load.kv_blocks_used == 0 {
            saw_idle_after = true;
            break;
        }
    }
    assert!(saw_busy, "a load report showed the request running");
    assert!(saw_idle_after, "a later report showed its blocks freed");
    let seen = router.loads();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].instance_id, id);
    assert_eq!(seen[0].kv_blocks_total, BLOCKS);
    worker.stop();
}

/// SIGTERM's drain: the draining worker's request in flight finishes in full, a request routed
/// to it meanwhile goes to the other worker, and it reports no KV block left in use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_worker_finishes_what_it_has_and_takes_nothing_new() {
    let planes = planes();
    let router = router(&planes).await;
    let draining = DecodeWorker::start(host(), &planes, "m").await.unwrap();
    let other = DecodeWorker::start(host(), &planes, "m").await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    // Round-robin: find the request that lands on the worker about to drain.
    let mut in_flight = None;
    for i in 0..2 {
        let stream = router
            .generate(request(&format!("long{i}"), vec![3], 40))
            .await
            .unwrap();
        if stream.instance_id() == Some(draining.instance_id()) {
            in_flight = Some(stream);
        }
    }
    let mut in_flight = in_flight.expect("one of two round-robin requests lands on it");
    let started = match in_flight.next().await.unwrap().unwrap() {
        runtime::protocol::GenerateResponse::Tokens(d) => d.token_ids.len(),
        other => panic!("unexpected {other:?}"),
    };
    let draining_id = draining.instance_id();
    let drain = tokio::spawn(draining.drain(Duration::from_secs(60)));
    tokio::time::sleep(Duration::from_millis(50)).await;
    for i in 0..2 {
        let mut fresh = router
            .generate(request(&format!("new{i}"), vec![7], 3))
            .await
            .unwrap();
        assert_eq!(tokens_of(&mut fresh).await, vec![8, 9, 10]);
        assert_ne!(
            fresh.instance_id(),
            Some(draining_id),
            "a draining worker takes nothing new"
        );
    }
    let rest = tokens_of(&mut in_flight).await;
    assert_eq!(
        started + rest.len(),
        40,
        "the request in flight finished in full"
    );
    assert_eq!(drain.await.unwrap(), 0, "no KV block left in use");
    other.stop();
}
