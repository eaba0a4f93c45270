//! etcd discovery against a real etcd (started here from the binary `scripts/infra` installs):
//! registrations reach watchers, a crashed worker's lease expires within its TTL, a dropped
//! registration leaves at once, a lost lease and an etcd restart are recovered from without
//! restarting anything, and an unreachable etcd is reported promptly by name.

mod contract;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use runtime::discovery::{
    Discovery, DiscoveryEvent, EndpointId, EtcdDiscovery, Instance, InstanceSpec,
};
use test_support::EtcdServer;
use tokio::sync::mpsc::UnboundedReceiver;

/// etcd's minimum lease TTL with default timings; keeps expiry tests short.
const TTL: Duration = Duration::from_secs(2);

fn endpoint() -> EndpointId {
    EndpointId::new("dynamo", "VllmWorker", "generate")
}

fn spec(address: &str) -> InstanceSpec {
    InstanceSpec {
        endpoint: endpoint(),
        address: address.into(),
        model: Some("smollm2".into()),
        metadata: serde_json::json!({"kv_transfer": {"port": 1234}}),
    }
}

async fn connect(etcd: &EtcdServer, ttl: Duration) -> EtcdDiscovery {
    EtcdDiscovery::connect(std::slice::from_ref(&etcd.url), ttl)
        .await
        .expect("etcd reachable")
}

/// A watcher's view: the initial instances with every event applied.
struct View {
    instances: HashMap<u64, Instance>,
    events: UnboundedReceiver<DiscoveryEvent>,
}

impl View {
    async fn open(discovery: &EtcdDiscovery) -> View {
        let (now, events) = discovery.watch(&endpoint()).await.expect("watch");
        let instances = now.into_iter().map(|i| (i.instance_id, i)).collect();
        View { instances, events }
    }

    /// Applies events until `done` holds; false if `limit` passes first.
    async fn until(&mut self, limit: Duration, done: impl Fn(&View) -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        while !done(self) {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(event)) => self.apply(event),
                Ok(None) => panic!("watch channel closed"),
                Err(_) => return false,
            }
        }
        true
    }

    /// The next event, if one comes within `limit`.
    async fn next(&mut self, limit: Duration) -> Option<DiscoveryEvent> {
        let event = tokio::time::timeout(limit, self.events.recv())
            .await
            .ok()??;
        self.apply(event.clone());
        Some(event)
    }

    fn apply(&mut self, event: DiscoveryEvent) {
        match event {
            DiscoveryEvent::Put(i) => {
                self.instances.insert(i.instance_id, i);
            }
            DiscoveryEvent::Delete { instance_id } => {
                self.instances.remove(&instance_id);
            }
        }
    }

    fn addresses(&self) -> Vec<String> {
        let mut a: Vec<String> = self.instances.values().map(|i| i.address.clone()).collect();
        a.sort();
        a
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_discovery_contract_holds_over_etcd() {
    let etcd = EtcdServer::start().expect("etcd");
    let discovery = connect(&etcd, Duration::from_secs(10)).await;
    contract::watchers_see_instances_puts_and_deletes(&discovery, "contract").await;
    contract::settings_are_read_and_followed(&discovery, "contract").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registrations_reach_watchers_with_their_instance() {
    let etcd = EtcdServer::start().expect("etcd");
    let (worker, router) = (connect(&etcd, TTL).await, connect(&etcd, TTL).await);
    let mut view = View::open(&router).await;
    assert!(view.instances.is_empty());

    let registration = worker.register(spec("worker-a")).await.expect("register");
    let event = view.next(Duration::from_secs(2)).await;
    assert_eq!(
        event,
        Some(DiscoveryEvent::Put(registration.instance.clone()))
    );
    assert_eq!(registration.instance.metadata["kv_transfer"]["port"], 1234);

    // A watcher opened later finds it in the initial list.
    let later = View::open(&router).await;
    assert_eq!(later.addresses(), vec!["worker-a"]);
    // Instances of another endpoint are not reported.
    let mut other = spec("prefill-a");
    other.endpoint = EndpointId::new("dynamo", "PrefillWorker", "generate");
    let _other = worker.register(other).await.expect("register");
    assert_eq!(view.next(Duration::from_millis(500)).await, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_worker_leaves_within_its_lease_ttl() {
    let etcd = EtcdServer::start().expect("etcd");
    let (worker, router) = (connect(&etcd, TTL).await, connect(&etcd, TTL).await);
    let mut view = View::open(&router).await;
    let registration = worker.register(spec("worker-a")).await.expect("register");
    let id = registration.instance.instance_id;
    assert!(
        view.until(Duration::from_secs(2), |v| v.instances.contains_key(&id))
            .await
    );

    // Keep-alives stop and nothing is revoked, as when the process is killed with SIGKILL.
    worker.shutdown();
    let crashed = Instant::now();
    let event = view.next(TTL + Duration::from_secs(1)).await;
    let took = crashed.elapsed();
    assert_eq!(event, Some(DiscoveryEvent::Delete { instance_id: id }));
    // Sooner than TTL minus one keep-alive period would mean the lease was revoked, not lost.
    assert!(took >= TTL / 2, "deleted after {took:?}: not by expiry");
    drop(registration);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_registration_withdraws_it_at_once() {
    let etcd = EtcdServer::start().expect("etcd");
    let ttl = Duration::from_secs(5);
    let (worker, router) = (connect(&etcd, ttl).await, connect(&etcd, ttl).await);
    let mut view = View::open(&router).await;
    let registration = worker.register(spec("worker-a")).await.expect("register");
    let id = registration.instance.instance_id;
    assert!(
        view.until(Duration::from_secs(2), |v| v.instances.contains_key(&id))
            .await
    );

    drop(registration);
    // Well inside the 5 s TTL: the lease was revoked, not left to expire.
    let event = view.next(Duration::from_secs(1)).await;
    assert_eq!(event, Some(DiscoveryEvent::Delete { instance_id: id }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_lease_is_granted_again_and_the_instance_put_back() {
    let etcd = EtcdServer::start().expect("etcd");
    let (worker, router) = (connect(&etcd, TTL).await, connect(&etcd, TTL).await);
    let mut view = View::open(&router).await;
    let registration = worker.register(spec("worker-a")).await.expect("register");
    let id = registration.instance.instance_id;
    assert!(
        view.until(Duration::from_secs(2), |v| v.instances.contains_key(&id))
            .await
    );

    // Revoked behind the worker's back, as when etcd lost it during a long outage.
    let mut admin = etcd_client::Client::connect([etcd.url.as_str()], None)
        .await
        .expect("admin client");
    admin.lease_revoke(id as i64).await.expect("revoke");
    assert_eq!(
        view.next(Duration::from_secs(1)).await,
        Some(DiscoveryEvent::Delete { instance_id: id })
    );
    // The keep-alive notices within a period and re-grants the same id.
    let back = view.next(TTL + Duration::from_secs(1)).await;
    match back {
        Some(DiscoveryEvent::Put(i)) => {
            assert_eq!((i.instance_id, i.address.as_str()), (id, "worker-a"))
        }
        other => panic!("expected the instance back, got {other:?}"),
    }
    // And it is kept alive again: still there after several TTLs.
    tokio::time::sleep(TTL * 2).await;
    assert_eq!(view.next(Duration::from_millis(100)).await, None);
    assert_eq!(View::open(&router).await.addresses(), vec!["worker-a"]);
    drop(registration);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_and_watchers_recover_from_an_etcd_restart() {
    let mut etcd = EtcdServer::start().expect("etcd");
    let (worker, router) = (connect(&etcd, TTL).await, connect(&etcd, TTL).await);
    let mut view = View::open(&router).await;
    let registration = worker.register(spec("worker-a")).await.expect("register");
    assert!(
        view.until(Duration::from_secs(2), |v| !v.instances.is_empty())
            .await
    );

    etcd.stop();
    // Down for longer than the lease TTL.
    tokio::time::sleep(TTL + Duration::from_secs(1)).await;
    etcd.restart().expect("etcd restart");

    // The instance is there again, exactly once, and stays (its keep-alive reconnected).
    let one = |v: &View| v.addresses() == vec!["worker-a".to_string()];
    assert!(
        view.until(Duration::from_secs(10), one).await,
        "view after restart: {:?}",
        view.addresses()
    );
    tokio::time::sleep(TTL * 2).await;
    while let Some(event) = view.next(Duration::from_millis(100)).await {
        let _ = event;
    }
    assert!(one(&view), "view later: {:?}", view.addresses());
    let fresh = View::open(&router).await;
    assert_eq!(fresh.instances, view.instances, "watcher view matches etcd");
    assert_eq!(fresh.addresses(), vec!["worker-a"]);

    // The watch itself is live again: a new registration reaches it.
    let second = worker
        .register(spec("worker-b"))
        .await
        .expect("register after restart");
    assert!(
        view.until(Duration::from_secs(2), |v| v.instances.len() == 2)
            .await,
        "view: {:?}",
        view.addresses()
    );
    drop((registration, second));
}

#[tokio::test]
async fn an_unreachable_etcd_is_reported_promptly_by_name() {
    let url = format!("http://127.0.0.1:{}", test_support::free_port());
    let started = Instant::now();
    let result = EtcdDiscovery::connect(std::slice::from_ref(&url), TTL).await;
    let took = started.elapsed();
    let err = result
        .err()
        .expect("connecting to nothing fails")
        .to_string();
    assert!(err.contains(&url), "error names the endpoint: {err}");
    assert!(took < Duration::from_secs(5), "took {took:?}");
}
