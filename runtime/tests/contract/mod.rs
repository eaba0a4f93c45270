//! Contract tests, written once per trait as functions over `&dyn Trait` and run against each
//! implementation: `memory_planes.rs` for the in-process planes, `nats.rs`, `jetstream.rs` and
//! `etcd.rs` for the networked ones (against real servers). Each function takes the planes it
//! needs from the caller, so one NATS-backed test can pass a worker's and a caller's connection.
#![allow(dead_code)]

use std::time::{Duration, Instant};

use runtime::discovery::{Discovery, DiscoveryEvent, EndpointId, InstanceSpec};
use runtime::request_plane::{IncomingRequest, RequestPlane, RequestPlaneError};
use runtime::work_queue::{Job, WorkQueue};
use tokio::sync::mpsc;

/// How long any one message may take to cross a plane in these tests.
const WITHIN: Duration = Duration::from_secs(5);

async fn next_request(incoming: &mut mpsc::Receiver<IncomingRequest>) -> IncomingRequest {
    tokio::time::timeout(WITHIN, incoming.recv())
        .await
        .expect("a request arrives in time")
        .expect("still serving")
}

/// Request plane: 1 000 data frames arrive complete and in order, then the stream ends.
pub async fn frames_arrive_complete_and_in_order(
    worker: &dyn RequestPlane,
    caller: &dyn RequestPlane,
    address: &str,
) {
    let mut incoming = worker.serve(address).await.expect("serve");
    tokio::spawn(async move {
        let mut req = next_request(&mut incoming).await;
        let n: u32 = String::from_utf8(req.payload).unwrap().parse().unwrap();
        for i in 0..n {
            req.response.data(i.to_le_bytes().to_vec()).await.unwrap();
        }
        req.response.end().await.unwrap();
    });
    let mut stream = caller
        .request(address, b"1000".to_vec())
        .await
        .expect("request");
    let mut got = Vec::new();
    while let Some(frame) = stream.next().await {
        got.push(u32::from_le_bytes(
            frame.expect("data frame").try_into().unwrap(),
        ));
    }
    assert_eq!(got, (0..1000).collect::<Vec<_>>());
}

/// Request plane: a worker that has nothing to say for three silence timeouts but sends
/// heartbeats keeps its caller waiting — the heartbeats are not data, the stream is not
/// `Silent` — and the data that finally comes arrives. (The caller's plane times out after
/// `silence`.)
pub async fn heartbeats_keep_a_quiet_stream_alive(
    worker: &dyn RequestPlane,
    caller: &dyn RequestPlane,
    address: &str,
    silence: Duration,
) {
    let mut incoming = worker.serve(address).await.expect("serve");
    tokio::spawn(async move {
        let mut req = next_request(&mut incoming).await;
        let until = Instant::now() + silence * 3;
        while Instant::now() < until {
            req.response.heartbeat().await.unwrap();
            tokio::time::sleep(silence / 4).await;
        }
        req.response.data(b"late".to_vec()).await.unwrap();
        req.response.end().await.unwrap();
    });
    let mut stream = caller.request(address, Vec::new()).await.expect("request");
    assert_eq!(stream.next().await, Some(Ok(b"late".to_vec())));
    assert_eq!(stream.next().await, None);
}

/// Request plane: dropping the caller's stream before any frame cancels the worker's side.
pub async fn dropping_the_stream_cancels_the_worker(
    worker: &dyn RequestPlane,
    caller: &dyn RequestPlane,
    address: &str,
) {
    let mut incoming = worker.serve(address).await.expect("serve");
    let stream = caller.request(address, vec![]).await.expect("request");
    let req = next_request(&mut incoming).await;
    assert!(!req.response.is_cancelled());
    drop(stream);
    tokio::time::timeout(Duration::from_secs(2), req.response.cancelled())
        .await
        .expect("cancellation reaches the worker within 2 s");
}

/// Request plane: a worker's error arrives as `Remote` after its data, and a dropped sender
/// as `Truncated`, both by message (the caller's silence timeout must exceed 2 s).
pub async fn worker_errors_are_remote_and_a_dropped_sender_truncated(
    worker: &dyn RequestPlane,
    caller: &dyn RequestPlane,
    address: &str,
) {
    let mut incoming = worker.serve(address).await.expect("serve");
    let mut erroring = caller.request(address, vec![]).await.expect("request");
    let mut req = next_request(&mut incoming).await;
    req.response.data(b"partial".to_vec()).await.expect("data");
    req.response
        .error("engine failed: `max_tokens` exceeds the context".into())
        .await
        .expect("error frame");
    assert_eq!(erroring.next().await, Some(Ok(b"partial".to_vec())));
    assert_eq!(
        erroring.next().await,
        Some(Err(RequestPlaneError::Remote(
            "engine failed: `max_tokens` exceeds the context".into()
        )))
    );
    assert_eq!(erroring.next().await, None);

    let started = Instant::now();
    let mut truncated = caller.request(address, vec![]).await.expect("request");
    drop(next_request(&mut incoming).await);
    assert_eq!(
        truncated.next().await,
        Some(Err(RequestPlaneError::Truncated))
    );
    assert!(started.elapsed() < Duration::from_secs(2));
}

/// Request plane: an address nobody serves is `NoSuchAddress`, naming it, at once.
pub async fn an_unserved_address_is_no_such_address(caller: &dyn RequestPlane, address: &str) {
    let started = Instant::now();
    let result = caller.request(address, vec![]).await;
    assert!(
        matches!(&result, Err(RequestPlaneError::NoSuchAddress(a)) if a == address),
        "{:?}",
        result.err()
    );
    assert!(started.elapsed() < Duration::from_secs(2));
}

fn spec(endpoint: &EndpointId, address: &str) -> InstanceSpec {
    InstanceSpec {
        endpoint: endpoint.clone(),
        address: address.into(),
        model: Some("m".into()),
        metadata: serde_json::json!({"kv": address}),
    }
}

async fn next_event(events: &mut mpsc::UnboundedReceiver<DiscoveryEvent>) -> DiscoveryEvent {
    tokio::time::timeout(WITHIN, events.recv())
        .await
        .expect("a discovery event in time")
        .expect("watch open")
}

/// Discovery: a watcher sees the instances that exist, later puts with the full instance, and
/// a delete as soon as a registration is dropped; other endpoints' instances stay out.
pub async fn watchers_see_instances_puts_and_deletes(discovery: &dyn Discovery, namespace: &str) {
    let endpoint = EndpointId::new(namespace, "decode-worker", "generate");
    let elsewhere = EndpointId::new(namespace, "prefill-worker", "generate");
    let first = discovery
        .register(spec(&endpoint, "a"))
        .await
        .expect("register");
    let (current, mut events) = discovery.watch(&endpoint).await.expect("watch");
    assert_eq!(current, vec![first.instance.clone()]);
    assert_eq!(first.instance.endpoint, endpoint);
    assert_eq!(first.instance.metadata, serde_json::json!({"kv": "a"}));

    let _other = discovery
        .register(spec(&elsewhere, "x"))
        .await
        .expect("register");
    let second = discovery
        .register(spec(&endpoint, "b"))
        .await
        .expect("register");
    assert_ne!(first.instance.instance_id, second.instance.instance_id);
    assert_eq!(
        next_event(&mut events).await,
        DiscoveryEvent::Put(second.instance.clone()),
        "the other endpoint's instance is not reported"
    );
    let gone = first.instance.instance_id;
    drop(first);
    assert_eq!(
        next_event(&mut events).await,
        DiscoveryEvent::Delete { instance_id: gone }
    );
    let (current, _) = discovery.watch(&endpoint).await.expect("watch");
    assert_eq!(current, vec![second.instance.clone()]);
}

async fn next_job(q: &dyn WorkQueue, limit: Duration) -> Option<Job> {
    tokio::time::timeout(limit, q.next())
        .await
        .ok()
        .map(|r| r.expect("next").expect("queue open"))
}

/// Work queue: jobs come out in order, in-flight ones are not pending, an acked job never
/// comes back; an unacked one comes back after `ack_wait` with `delivery` 2; a nak gives it
/// back at once.
pub async fn jobs_are_acked_redelivered_and_nakked(q: &dyn WorkQueue, ack_wait: Duration) {
    q.enqueue(b"a".to_vec()).await.expect("enqueue");
    q.enqueue(b"b".to_vec()).await.expect("enqueue");
    assert_eq!(q.pending().await.expect("pending"), 2);
    let a = next_job(q, WITHIN).await.expect("a job");
    assert_eq!((a.payload.as_slice(), a.delivery), (&b"a"[..], 1));
    assert_eq!(
        q.pending().await.expect("pending"),
        1,
        "in flight is not pending"
    );
    a.ack().await.expect("ack");

    let b = next_job(q, WITHIN).await.expect("a job");
    assert_eq!(b.payload, b"b");
    let handed_out = Instant::now();
    drop(b); // its worker died holding it
    let again = next_job(q, ack_wait + WITHIN).await.expect("redelivered");
    assert!(
        handed_out.elapsed() >= ack_wait - Duration::from_millis(100),
        "not before ack_wait"
    );
    assert_eq!((again.payload.as_slice(), again.delivery), (&b"b"[..], 2));
    again.nak().await.expect("nak");
    let third = next_job(q, ack_wait / 2)
        .await
        .expect("a nak requeues at once");
    assert_eq!((third.payload.as_slice(), third.delivery), (&b"b"[..], 3));
    third.ack().await.expect("ack");
    assert!(
        next_job(q, ack_wait * 2).await.is_none(),
        "acked jobs stay gone"
    );
    assert_eq!(q.pending().await.expect("pending"), 0);
}

/// Graph settings: unset reads `None`; a put reaches a watcher that started before it, a
/// later watcher reads the latest value, and every later put reaches both.
pub async fn settings_are_read_and_followed(discovery: &dyn Discovery, namespace: &str) {
    let key = runtime::discovery::setting_key(namespace, "disagg");
    let mut early = discovery.watch_setting(&key).await.expect("watch");
    assert_eq!(*early.borrow(), None, "unset");
    assert_eq!(discovery.get_setting(&key).await.expect("get"), None);
    discovery
        .put_setting(&key, serde_json::json!({"n": 1}))
        .await
        .expect("put");
    tokio::time::timeout(Duration::from_secs(5), early.changed())
        .await
        .expect("the put reaches the watcher")
        .unwrap();
    assert_eq!(
        *early.borrow_and_update(),
        Some(serde_json::json!({"n": 1}))
    );
    assert_eq!(
        discovery.get_setting(&key).await.expect("get"),
        Some(serde_json::json!({"n": 1}))
    );
    let mut late = discovery.watch_setting(&key).await.expect("watch");
    assert_eq!(*late.borrow_and_update(), Some(serde_json::json!({"n": 1})));
    discovery
        .put_setting(&key, serde_json::json!({"n": 2}))
        .await
        .expect("put");
    for rx in [&mut early, &mut late] {
        tokio::time::timeout(Duration::from_secs(5), rx.changed())
            .await
            .expect("the second put arrives")
            .unwrap();
        assert_eq!(*rx.borrow(), Some(serde_json::json!({"n": 2})));
    }
}
