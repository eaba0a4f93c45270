//! The router over in-process planes with scripted workers: spreading, instances leaving,
//! failover before the first token (and none after it, or for an engine error), the policy's
//! hooks on every path, typed "no instance" / "no capacity", and the load view fed by the
//! workers' reports on the event plane.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use router::{
    NoCapacity, RoundRobin, RouteContext, RoutedStream, Router, RouterError, RouterOptions,
    RoutingPolicy, Selection,
};
use runtime::discovery::{EndpointId, InstanceSpec, Registration};
use runtime::protocol::{
    FinishReason, GenerateRequest, GenerateResponse, SamplingParams, TokenDelta, WorkerLoad,
};
use runtime::request_plane::IncomingRequest;
use runtime::{PlaneSettings, Planes};

fn planes() -> Planes {
    Planes::in_process(PlaneSettings {
        stream_timeout: Duration::from_secs(5),
        ..PlaneSettings::new("t", "m")
    })
}

fn endpoint() -> EndpointId {
    EndpointId::new("t", "decode-worker", "generate")
}

fn request(id: &str) -> GenerateRequest {
    GenerateRequest {
        request_id: id.into(),
        token_ids: vec![1, 2, 3, 4, 5],
        sampling: SamplingParams::greedy(3),
        router_overlap_blocks: 0,
    }
}

/// What a scripted worker does with each request.
#[derive(Clone, Copy)]
enum Script {
    /// Streams tokens 10, 11, 12 and ends.
    Serve,
    /// Drops the response before any frame, as a worker that dies.
    DieBeforeToken,
    /// Sends one token, then dies.
    DieAfterToken,
    /// Reports an engine failure.
    EngineError,
    /// Sends one token and waits for the caller to cancel.
    Hang,
}

struct Worker {
    registration: Registration,
    /// Request ids it received, and whether each was cancelled by the caller.
    seen: Arc<Mutex<Vec<(String, bool)>>>,
}

impl Worker {
    fn id(&self) -> u64 {
        self.registration.instance.instance_id
    }

    fn seen(&self) -> Vec<(String, bool)> {
        self.seen.lock().unwrap().clone()
    }
}

fn delta(token: u32, finish: Option<FinishReason>) -> Vec<u8> {
    serde_json::to_vec(&GenerateResponse::Tokens(TokenDelta {
        token_ids: vec![token],
        logprobs: vec![],
        finish_reason: finish,
        prompt_tokens: 5,
        cached_tokens: 0,
    }))
    .unwrap()
}

async fn worker(planes: &Planes, address: &str, script: Script) -> Worker {
    let mut incoming = planes.requests.serve(address).await.unwrap();
    let seen: Arc<Mutex<Vec<(String, bool)>>> = Arc::default();
    let log = seen.clone();
    tokio::spawn(async move {
        while let Some(IncomingRequest {
            payload,
            mut response,
        }) = incoming.recv().await
        {
            let r: GenerateRequest = serde_json::from_slice(&payload).unwrap();
            let index = {
                let mut log = log.lock().unwrap();
                log.push((r.request_id, false));
                log.len() - 1
            };
            match script {
                Script::Serve => {
                    // A caller that left makes sends fail: the worker just moves on.
                    for (i, t) in [10, 11, 12].into_iter().enumerate() {
                        let finish = (i == 2).then_some(FinishReason::Length);
                        let _ = response.data(delta(t, finish)).await;
                    }
                    let _ = response.end().await;
                }
                Script::DieBeforeToken => drop(response),
                Script::DieAfterToken => {
                    let _ = response.data(delta(10, None)).await;
                    drop(response);
                }
                Script::EngineError => {
                    let _ = response.error("simulated device failure".into()).await;
                }
                Script::Hang => {
                    let _ = response.data(delta(10, None)).await;
                    response.cancelled().await;
                    log.lock().unwrap()[index].1 = true;
                }
            }
        }
    });
    let registration = planes
        .discovery
        .register(InstanceSpec {
            endpoint: endpoint(),
            address: address.into(),
            model: None,
            metadata: serde_json::Value::Null,
        })
        .await
        .unwrap();
    Worker { registration, seen }
}

/// Chooses by a fixed preference of addresses and records every hook call.
struct Recorder {
    prefer: Vec<&'static str>,
    full: bool,
    log: Arc<Mutex<Vec<String>>>,
}

impl RoutingPolicy for Recorder {
    fn name(&self) -> &'static str {
        "recorder"
    }

    fn select(&self, ctx: &RouteContext<'_>) -> Result<Selection, NoCapacity> {
        if self.full {
            return Err(NoCapacity);
        }
        assert_eq!(ctx.block_hashes.len(), 2, "5 tokens in 2-token blocks");
        let chosen = self
            .prefer
            .iter()
            .find_map(|p| ctx.candidates.iter().find(|c| c.instance.address == *p))
            .unwrap_or(&ctx.candidates[0]);
        Ok(Selection::of(chosen))
    }

    fn on_dispatch(&self, request_id: &str, s: &Selection, _ctx: &RouteContext<'_>) {
        self.push(format!("dispatch {request_id} {:x}", s.instance_id));
    }

    fn on_first_token(&self, request_id: &str, instance_id: u64) {
        self.push(format!("first {request_id} {instance_id:x}"));
    }

    fn on_finish(&self, request_id: &str, instance_id: u64) {
        self.push(format!("finish {request_id} {instance_id:x}"));
    }
}

impl Recorder {
    fn push(&self, line: String) {
        self.log.lock().unwrap().push(line);
    }
}

struct Setup {
    planes: Planes,
    router: Router,
    hooks: Arc<Mutex<Vec<String>>>,
}

async fn setup(prefer: Vec<&'static str>, retries: u32, full: bool) -> Setup {
    let planes = planes();
    let hooks: Arc<Mutex<Vec<String>>> = Arc::default();
    let policy = Recorder {
        prefer,
        full,
        log: hooks.clone(),
    };
    let router = Router::new(
        &planes,
        endpoint(),
        Box::new(policy),
        RouterOptions {
            block_size: 2,
            retries,
            ..RouterOptions::default()
        },
    )
    .await
    .unwrap();
    Setup {
        planes,
        router,
        hooks,
    }
}

fn hooks(s: &Setup) -> Vec<String> {
    s.hooks.lock().unwrap().clone()
}

/// Every token until the end, or the first error.
async fn drain(stream: &mut RoutedStream) -> Result<Vec<u32>, RouterError> {
    let mut tokens = Vec::new();
    while let Some(item) = stream.next().await {
        match item? {
            GenerateResponse::Tokens(d) => tokens.extend(d.token_ids),
            other => panic!("unexpected {other:?}"),
        }
    }
    Ok(tokens)
}

async fn settle() {
    tokio::time::sleep(Duration::from_millis(20)).await;
}

#[tokio::test]
async fn round_robin_spreads_and_deleted_instances_leave_routing() {
    let planes = planes();
    let router = Router::new(
        &planes,
        endpoint(),
        Box::new(RoundRobin::default()),
        RouterOptions::default(),
    )
    .await
    .unwrap();
    assert!(matches!(
        router.generate(request("r")).await,
        Err(RouterError::NoInstances(_))
    ));
    let mut workers = vec![
        worker(&planes, "a", Script::Serve).await,
        worker(&planes, "b", Script::Serve).await,
    ];
    settle().await;
    let mut picked = Vec::new();
    for i in 0..4 {
        let s = router.generate(request(&format!("r{i}"))).await.unwrap();
        picked.push(s.instance_id().unwrap());
    }
    for w in &workers {
        assert_eq!(picked.iter().filter(|&&p| p == w.id()).count(), 2);
    }
    drop(workers.remove(0));
    settle().await;
    for i in 0..3 {
        let mut s = router.generate(request(&format!("s{i}"))).await.unwrap();
        assert_eq!(s.instance_id(), Some(workers[0].id()));
        assert_eq!(drain(&mut s).await.unwrap(), vec![10, 11, 12]);
    }
    assert_eq!(router.instances().len(), 1);
}

#[tokio::test]
async fn a_worker_dying_before_the_first_token_is_replaced_under_a_fresh_id() {
    let s = setup(vec!["bad", "good"], 1, false).await;
    let bad = worker(&s.planes, "bad", Script::DieBeforeToken).await;
    let good = worker(&s.planes, "good", Script::Serve).await;
    settle().await;
    let mut stream = s.router.generate(request("q")).await.unwrap();
    assert_eq!(drain(&mut stream).await.unwrap(), vec![10, 11, 12]);
    assert_eq!(stream.instance_id(), None, "finished: no dispatch left");
    assert_eq!(bad.seen(), vec![("q".to_string(), false)]);
    assert_eq!(good.seen(), vec![("q-r1".to_string(), false)]);
    let (b, g) = (bad.id(), good.id());
    assert_eq!(
        hooks(&s),
        vec![
            format!("dispatch q {b:x}"),
            format!("finish q {b:x}"),
            format!("dispatch q-r1 {g:x}"),
            format!("first q-r1 {g:x}"),
            format!("finish q-r1 {g:x}"),
        ]
    );
}

/// A worker "first" that the policy prefers, running `script`, beside a good one; one request
/// routed and drained.
async fn against(
    script: Script,
    retries: u32,
) -> (Setup, Worker, Worker, Result<Vec<u32>, RouterError>) {
    let s = setup(vec!["first", "good"], retries, false).await;
    let first = worker(&s.planes, "first", script).await;
    let good = worker(&s.planes, "good", Script::Serve).await;
    settle().await;
    let mut stream = s.router.generate(request("a")).await.unwrap();
    let result = drain(&mut stream).await;
    (s, first, good, result)
}

#[tokio::test]
async fn failures_that_cannot_be_retried_are_reported() {
    // After a token the client has seen output: no retry.
    let (s, late, good, result) = against(Script::DieAfterToken, 1).await;
    assert!(matches!(result, Err(RouterError::Lost(_))), "{result:?}");
    assert_eq!(late.seen().len(), 1);
    assert!(good.seen().is_empty(), "not moved after a token");
    assert_eq!(
        hooks(&s).last().unwrap(),
        &format!("finish a {:x}", late.id())
    );

    // An engine error would fail anywhere: no retry, and its message comes through.
    let (_s, broken, good, result) = against(Script::EngineError, 1).await;
    match result {
        Err(RouterError::Worker(m)) => assert!(m.contains("simulated device failure"), "{m}"),
        other => panic!("expected the worker's error, got {other:?}"),
    }
    assert_eq!(broken.seen().len(), 1);
    assert!(good.seen().is_empty());

    // With no retries left a lost worker is the caller's failure.
    let (_s, bad, good, result) = against(Script::DieBeforeToken, 0).await;
    assert!(matches!(result, Err(RouterError::Lost(_))), "{result:?}");
    assert_eq!(bad.seen().len(), 1);
    assert!(good.seen().is_empty());
}

#[tokio::test]
async fn dropping_a_stream_cancels_it_at_the_worker_and_ends_it_for_the_policy() {
    let s = setup(vec!["slow"], 1, false).await;
    let slow = worker(&s.planes, "slow", Script::Hang).await;
    settle().await;
    let mut stream = s.router.generate(request("d")).await.unwrap();
    assert!(matches!(
        stream.next().await,
        Some(Ok(GenerateResponse::Tokens(_)))
    ));
    drop(stream);
    settle().await;
    assert_eq!(slow.seen(), vec![("d".to_string(), true)], "cancelled");
    let id = slow.id();
    assert_eq!(
        hooks(&s),
        vec![
            format!("dispatch d {id:x}"),
            format!("first d {id:x}"),
            format!("finish d {id:x}"),
        ],
        "finish exactly once"
    );
}

#[tokio::test]
async fn no_instance_and_no_capacity_are_typed() {
    let s = setup(vec![], 1, true).await;
    assert!(matches!(
        s.router.generate(request("e")).await,
        Err(RouterError::NoInstances(_))
    ));
    let _w = worker(&s.planes, "w", Script::Serve).await;
    settle().await;
    assert!(matches!(
        s.router.generate(request("e")).await,
        Err(RouterError::NoCapacity(NoCapacity))
    ));
    assert!(hooks(&s).is_empty(), "nothing was dispatched");
}

#[tokio::test]
async fn the_load_view_follows_reports_of_live_workers_only() {
    let s = setup(vec![], 1, false).await;
    let w = worker(&s.planes, "w", Script::Serve).await;
    settle().await;
    let publish = |load: WorkerLoad| {
        let (events, subject) = (s.planes.events.clone(), s.planes.load_subject());
        async move {
            events
                .publish(&subject, serde_json::to_vec(&load).unwrap())
                .await
                .unwrap();
        }
    };
    publish(WorkerLoad {
        instance_id: w.id(),
        kv_blocks_used: 7,
        kv_blocks_total: 64,
        running: 2,
        ..WorkerLoad::default()
    })
    .await;
    publish(WorkerLoad {
        instance_id: 12345,
        running: 9,
        ..WorkerLoad::default()
    })
    .await;
    s.planes
        .events
        .publish(&s.planes.load_subject(), b"not json".to_vec())
        .await
        .unwrap();
    settle().await;
    let loads = s.router.loads();
    assert_eq!(
        loads.len(),
        1,
        "an unknown instance's report is ignored: {loads:?}"
    );
    assert_eq!((loads[0].instance_id, loads[0].kv_blocks_used), (w.id(), 7));
    drop(w);
    settle().await;
    assert!(
        s.router.loads().is_empty(),
        "a departed worker's load goes with it"
    );
}
