//! The NATS request and event planes against a real nats-server (started here from the binary
//! `scripts/infra` installs), caller and worker on separate connections as in `baton run`:
//! a 1 000-frame stream arrives complete and in order; dropping the caller's stream cancels the
//! worker; a silent worker fails the caller with `Silent`; worker errors arrive as `Remote`, a
//! dropped sender as `Truncated`; an unserved address is `NoSuchAddress` at once; the same planes
//! serve again after a NATS restart; events fan out over NATS and in memory; an unreachable
//! server is named promptly.

mod contract;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use runtime::event_plane::{EventPlane, MemoryEventPlane, NatsEventPlane};
use runtime::request_plane::{IncomingRequest, NatsRequestPlane, RequestPlane, RequestPlaneError};
use test_support::NatsServer;
use tokio::sync::mpsc;

const ADDRESS: &str = "baton.decode-worker.generate.1f";

/// The request-plane contract over NATS, caller and worker on separate connections (the
/// silence timeout is long: every failure must arrive by message).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_request_plane_contract_holds_over_nats() {
    let nats = NatsServer::start().expect("nats-server");
    let worker = plane(&nats, Duration::from_secs(10)).await;
    let caller = plane(&nats, Duration::from_secs(10)).await;
    contract::frames_arrive_complete_and_in_order(&worker, &caller, ADDRESS).await;
    let quick = plane(&nats, Duration::from_secs(1)).await;
    contract::heartbeats_keep_a_quiet_stream_alive(
        &worker,
        &quick,
        &format!("{ADDRESS}hb"),
        Duration::from_secs(1),
    )
    .await;
    contract::dropping_the_stream_cancels_the_worker(&worker, &caller, &format!("{ADDRESS}0"))
        .await;
    contract::worker_errors_are_remote_and_a_dropped_sender_truncated(
        &worker,
        &caller,
        &format!("{ADDRESS}1"),
    )
    .await;
}

async fn plane(nats: &NatsServer, silence: Duration) -> NatsRequestPlane {
    NatsRequestPlane::connect(&nats.url, silence)
        .await
        .expect("request plane connects")
}

async fn next_request(incoming: &mut mpsc::Receiver<IncomingRequest>) -> IncomingRequest {
    tokio::time::timeout(Duration::from_secs(5), incoming.recv())
        .await
        .expect("a request arrives within 5 s")
        .expect("still serving")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_stream_mid_response_cancels_the_worker() {
    let nats = NatsServer::start().expect("nats-server");
    let worker = plane(&nats, Duration::from_secs(5)).await;
    let caller = plane(&nats, Duration::from_secs(5)).await;
    let mut incoming = worker.serve(ADDRESS).await.expect("serve");
    let (stopped_tx, stopped_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let mut req = next_request(&mut incoming).await;
        let mut sent = 0u32;
        // Streams until told to stop, as an engine would.
        let outcome = loop {
            if let Err(e) = req.response.data(sent.to_le_bytes().to_vec()).await {
                break e;
            }
            sent += 1;
            tokio::time::sleep(Duration::from_millis(2)).await;
        };
        let _ = stopped_tx.send((outcome, req.response.is_cancelled(), sent));
    });
    let mut stream = caller.request(ADDRESS, vec![]).await.expect("request");
    for _ in 0..5 {
        stream.next().await.expect("frame").expect("data");
    }
    drop(stream);
    let (outcome, cancelled, sent) = tokio::time::timeout(Duration::from_secs(2), stopped_rx)
        .await
        .expect("the worker stops within 2 s of the caller leaving")
        .expect("worker task");
    assert_eq!(outcome, RequestPlaneError::Cancelled);
    assert!(cancelled);
    assert!(sent >= 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_goes_quiet_fails_the_caller_with_silent_and_is_cancelled() {
    let silence = Duration::from_secs(1);
    let nats = NatsServer::start().expect("nats-server");
    let worker = plane(&nats, silence).await;
    let caller = plane(&nats, silence).await;
    let mut incoming = worker.serve(ADDRESS).await.expect("serve");
    let mut stream = caller.request(ADDRESS, vec![]).await.expect("request");
    let mut req = next_request(&mut incoming).await;
    req.response.data(b"first".to_vec()).await.expect("data");
    assert_eq!(stream.next().await, Some(Ok(b"first".to_vec())));
    // The worker holds its sender but sends nothing more, like a hung engine.
    let started = Instant::now();
    assert_eq!(
        stream.next().await,
        Some(Err(RequestPlaneError::Silent(silence)))
    );
    let waited = started.elapsed();
    assert!(
        // Only the lower bound is the contract; the upper one catches a silence timer that
        // never fires, with room for a loaded 2-core machine.
        waited >= silence && waited < silence * 10,
        "failed after {waited:?}"
    );
    assert_eq!(stream.next().await, None);
    tokio::time::timeout(Duration::from_secs(2), req.response.cancelled())
        .await
        .expect("the timed-out caller cancels the worker");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unserved_address_is_no_such_address_at_once() {
    let nats = NatsServer::start().expect("nats-server");
    let caller = plane(&nats, Duration::from_secs(10)).await;
    contract::an_unserved_address_is_no_such_address(&caller, "baton.decode-worker.generate.dead")
        .await;

    // A worker that stops serving leaves its address unserved too. (A request crossing the
    // unsubscription on the wire can still be lost and end `Silent`: keep that wait short.)
    let caller = plane(&nats, Duration::from_secs(1)).await;
    let worker = plane(&nats, Duration::from_secs(1)).await;
    let incoming = worker.serve(ADDRESS).await.expect("serve");
    drop(incoming);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        // The serving task unsubscribes asynchronously once the receiver is gone.
        match caller.request(ADDRESS, vec![]).await {
            Err(RequestPlaneError::NoSuchAddress(_)) => break,
            other => assert!(Instant::now() < deadline, "still served: {:?}", other.err()),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_planes_serve_again_after_a_nats_restart() {
    let silence = Duration::from_secs(1);
    let mut nats = NatsServer::start().expect("nats-server");
    let worker = plane(&nats, silence).await;
    let caller = plane(&nats, silence).await;
    let mut incoming = worker.serve(ADDRESS).await.expect("serve");
    tokio::spawn(async move {
        while let Some(mut req) = incoming.recv().await {
            let _ = req.response.data(req.payload.clone()).await;
            let _ = req.response.end().await;
        }
    });
    let echo = |payload: &'static [u8]| {
        let caller = caller.clone();
        async move {
            let mut stream = caller.request(ADDRESS, payload.to_vec()).await?;
            let first = stream
                .next()
                .await
                .unwrap_or(Err(RequestPlaneError::Truncated))?;
            assert_eq!(stream.next().await, None);
            Ok::<_, RequestPlaneError>(first)
        }
    };
    assert_eq!(
        echo(b"before").await.expect("before the restart"),
        b"before"
    );

    nats.restart().expect("nats restart");
    let restarted = Instant::now();
    let deadline = restarted + Duration::from_secs(10);
    let mut last_error = None;
    loop {
        match echo(b"after").await {
            Ok(bytes) => {
                assert_eq!(bytes, b"after");
                break;
            }
            Err(e) => last_error = Some(e),
        }
        assert!(
            Instant::now() < deadline,
            "no answer 10 s after the restart; last error: {last_error:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Both connections really went through a reconnect (the test is moot otherwise).
    for (side, plane) in [("worker", &worker), ("caller", &caller)] {
        let connects = plane.client().statistics().connects.load(Ordering::Relaxed);
        assert!(connects >= 2, "the {side} connected {connects} time(s)");
    }
    eprintln!(
        "served again {:?} after the restart (last error before: {last_error:?})",
        restarted.elapsed()
    );
}

/// Two subscribers (`a` and `b` may be other connections than `publisher`) both get a message;
/// dropping one does not break publishing to the other.
async fn events_fan_out(publisher: &dyn EventPlane, a: &dyn EventPlane, b: &dyn EventPlane) {
    let subject = "dynamo.kv_events";
    let mut first = a.subscribe(subject).await.expect("subscribe");
    let mut second = b.subscribe(subject).await.expect("subscribe");
    let mut elsewhere = a.subscribe("dynamo.load").await.expect("subscribe");
    let within = Duration::from_secs(2);
    publisher
        .publish(subject, b"stored".to_vec())
        .await
        .expect("publish");
    for rx in [&mut first, &mut second] {
        let got = tokio::time::timeout(within, rx.recv())
            .await
            .expect("delivered");
        assert_eq!(got.as_deref(), Some(&b"stored"[..]));
    }
    drop(first);
    publisher
        .publish(subject, b"removed".to_vec())
        .await
        .expect("publish after a drop");
    let got = tokio::time::timeout(within, second.recv())
        .await
        .expect("delivered");
    assert_eq!(got.as_deref(), Some(&b"removed"[..]));
    assert!(
        tokio::time::timeout(Duration::from_millis(200), elsewhere.recv())
            .await
            .is_err(),
        "another subject's subscriber got a kv event"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_fan_out_over_nats_and_in_memory() {
    let memory = MemoryEventPlane::new();
    events_fan_out(&memory, &memory, &memory).await;

    let nats = NatsServer::start().expect("nats-server");
    let publisher = NatsEventPlane::connect(&nats.url).await.expect("connect");
    let other = NatsEventPlane::connect(&nats.url).await.expect("connect");
    // One connection shared by the request and event planes.
    let requests = plane(&nats, Duration::from_secs(1)).await;
    let shared = NatsEventPlane::from_client(requests.client().clone());
    events_fan_out(&publisher, &other, &shared).await;
}

#[tokio::test]
async fn an_unreachable_nats_is_reported_promptly_by_name() {
    let url = format!("nats://127.0.0.1:{}", test_support::free_port());
    let started = Instant::now();
    let requests = NatsRequestPlane::connect(&url, Duration::from_secs(1)).await;
    let events = NatsEventPlane::connect(&url).await;
    let took = started.elapsed();
    let requests = requests
        .err()
        .expect("connecting to nothing fails")
        .to_string();
    let events = events
        .err()
        .expect("connecting to nothing fails")
        .to_string();
    for err in [requests, events] {
        assert!(err.contains(&url), "error names the server: {err}");
    }
    assert!(took < Duration::from_secs(6), "took {took:?}");
}
