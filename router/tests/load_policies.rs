//! Load-based routing over in-process planes with workers that hold their requests open:
//! least-loaded never picks a worker busier than another, power-of-two picks the lighter of
//! its two, the load book gives every request's charge back however it ends, a vanished worker
//! (registered, its address unserved) is avoided on retry, and
//! `min-workers` holds requests until enough workers registered (or answers with a clear error).

mod common;

use std::time::Duration;

use common::{endpoint, holding_worker, request};
use router::{policy_from_name, KvCostConfig, RoutedStream, Router, RouterError, RouterOptions};
use runtime::{PlaneSettings, Planes};

fn planes() -> Planes {
    Planes::in_process(PlaneSettings {
        stream_timeout: Duration::from_secs(5),
        ..PlaneSettings::new("t", "m")
    })
}

async fn router(planes: &Planes, policy: &str, options: RouterOptions) -> Router {
    Router::new(
        planes,
        endpoint("t"),
        policy_from_name(policy, KvCostConfig::default()).unwrap(),
        options,
    )
    .await
    .unwrap()
}

/// Opens a stream and reads its first token (so the request is running on the worker).
async fn open(router: &Router, id: &str) -> RoutedStream {
    let mut s = router.generate(request(id, 300)).await.unwrap();
    s.next().await.unwrap().unwrap();
    s
}

#[tokio::test]
async fn least_loaded_never_picks_a_busier_worker_and_the_book_balances() {
    let planes = planes();
    let router = router(&planes, "least-loaded", RouterOptions::default()).await;
    let mut regs = Vec::new();
    for name in ["a", "b", "c"] {
        regs.push(holding_worker(&planes, "t", name).await);
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
    let ids: Vec<u64> = regs.iter().map(|r| r.instance.instance_id).collect();
    let mut open_streams: Vec<RoutedStream> = Vec::new();
    // A scripted mix of opens and closes (closing picks pseudo-random streams).
    let mut seed = 7u64;
    for step in 0..120 {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        if !open_streams.is_empty() && (seed >> 33).is_multiple_of(3) {
            let i = (seed >> 40) as usize % open_streams.len();
            drop(open_streams.swap_remove(i));
            continue;
        }
        let before: Vec<usize> = ids.iter().map(|&w| router.active_requests(w)).collect();
        let s = open(&router, &format!("r{step}")).await;
        let chosen = ids
            .iter()
            .position(|&w| Some(w) == s.instance_id())
            .unwrap();
        assert_eq!(
            before[chosen],
            *before.iter().min().unwrap(),
            "step {step}: picked a worker with {before:?} active"
        );
        open_streams.push(s);
    }
    let counts: Vec<usize> = ids.iter().map(|&w| router.active_requests(w)).collect();
    assert!(
        counts.iter().max().unwrap() - counts.iter().min().unwrap() <= 1,
        "{counts:?}"
    );
    drop(open_streams);
    for &w in &ids {
        assert_eq!(router.active_requests(w), 0, "every charge given back");
    }
}

#[tokio::test]
async fn power_of_two_picks_the_lighter_of_two() {
    let planes = planes();
    let router = router(&planes, "power-of-two", RouterOptions::default()).await;
    let a = holding_worker(&planes, "t", "a").await;
    let b = holding_worker(&planes, "t", "b").await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    // With two workers both are drawn each time: the lighter always wins, so they alternate
    // between equal and one apart.
    let mut streams = Vec::new();
    for i in 0..20 {
        streams.push(open(&router, &format!("r{i}")).await);
        let (na, nb) = (
            router.active_requests(a.instance.instance_id),
            router.active_requests(b.instance.instance_id),
        );
        assert!(na.abs_diff(nb) <= 1, "after {i}: {na} vs {nb}");
    }
}

#[tokio::test]
async fn min_workers_holds_requests_until_enough_workers_registered() {
    let planes = planes();
    let router = std::sync::Arc::new(
        router(
            &planes,
            "round-robin",
            RouterOptions {
                min_workers: 2,
                min_workers_wait: Duration::from_secs(5),
                ..RouterOptions::default()
            },
        )
        .await,
    );
    let _a = holding_worker(&planes, "t", "a").await;
    let waiting = {
        let router = router.clone();
        tokio::spawn(async move { open(&router, "early").await.instance_id() })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        !waiting.is_finished(),
        "one worker of two: the request waits"
    );
    let _b = holding_worker(&planes, "t", "b").await;
    let served = tokio::time::timeout(Duration::from_secs(2), waiting)
        .await
        .expect("served once the second worker registered")
        .unwrap();
    assert!(served.is_some());

    // Not enough within the bound: a clear error naming the counts.
    let planes = self::planes();
    let router = self::router(
        &planes,
        "round-robin",
        RouterOptions {
            min_workers: 3,
            min_workers_wait: Duration::from_millis(200),
            ..RouterOptions::default()
        },
    )
    .await;
    let _a = holding_worker(&planes, "t", "a").await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    match router.generate(request("x", 10)).await {
        Err(e @ RouterError::TooFewWorkers { .. }) => {
            let m = e.to_string();
            assert!(m.contains("only 1 of the 3 workers"), "{m}");
        }
        Err(other) => panic!("unexpected error {other}"),
        Ok(_) => panic!("routed with too few workers"),
    }
}

#[tokio::test]
async fn approximate_mode_learns_from_its_own_decisions_and_forgets_after_the_ttl() {
    let planes = planes();
    let router = router(
        &planes,
        "kv",
        RouterOptions {
            kv_mode: router::KvMode::Approximate {
                // Long enough that the five routings below finish inside it on a loaded machine.
                ttl: Duration::from_secs(3),
            },
            ..RouterOptions::default()
        },
    )
    .await;
    let _a = holding_worker(&planes, "t", "a").await;
    let _b = holding_worker(&planes, "t", "b").await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    // 300 tokens: two full 128-token blocks.
    let prompt = request("p", 300).token_ids;
    let first = open(&router, "first").await.instance_id().unwrap();
    assert_eq!(router.overlaps(&prompt).get(&first), Some(&2));
    for i in 0..5 {
        // Its load is gone with the dropped stream; the remembered prefix brings it back.
        let again = open(&router, &format!("again{i}")).await.instance_id();
        assert_eq!(
            again,
            Some(first),
            "the worker the router sent the prefix to"
        );
    }
    tokio::time::sleep(Duration::from_millis(3500)).await;
    assert!(
        router.overlaps(&prompt).is_empty(),
        "forgotten after the TTL"
    );
}

/// Routes `n` requests one after another (each ends before the next is routed), all sharing
/// a 384-token prefix; returns how many each of the two workers got.
async fn paced_shared_prefix(recent_load_weight: f64, n: usize) -> Vec<usize> {
    let planes = planes();
    let router = Router::new(
        &planes,
        endpoint("t"),
        policy_from_name(
            "kv",
            KvCostConfig {
                recent_load_weight,
                ..KvCostConfig::default()
            },
        )
        .unwrap(),
        RouterOptions {
            kv_mode: router::KvMode::Approximate {
                ttl: Duration::from_secs(60),
            },
            ..RouterOptions::default()
        },
    )
    .await
    .unwrap();
    let a = holding_worker(&planes, "t", "a").await;
    let b = holding_worker(&planes, "t", "b").await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let ids = [a.instance.instance_id, b.instance.instance_id];
    let mut got = vec![0; 2];
    for i in 0..n {
        let mut r = request(&format!("q{i}"), 384);
        r.token_ids.extend([1000 + i as u32; 136]);
        let mut s = router.generate(r).await.unwrap();
        s.next().await.unwrap().unwrap();
        got[ids
            .iter()
            .position(|&w| Some(w) == s.instance_id())
            .unwrap()] += 1;
    }
    got
}

#[tokio::test]
async fn paced_traffic_on_a_shared_prefix_spreads_only_with_the_recent_load_term() {
    // Dynamo's cost: nothing is in flight at any decision, so the worker holding the prefix
    // takes every request.
    let plain = paced_shared_prefix(0.0, 32).await;
    assert!(plain.contains(&32), "{plain:?}");
    // With the recent-load term the other worker takes some, learns the prefix, and they share.
    let spread = paced_shared_prefix(0.1, 32).await;
    eprintln!("paced shared prefix, 32 requests: weight 0 {plain:?}, weight 0.1 {spread:?}");
    assert!(spread.iter().all(|&n| n >= 8), "{spread:?}");
}

/// A registered worker whose address nobody serves (killed; its lease not yet ended) looks the
/// least loaded of all, so least-loaded picks it first every time: each request must still be
/// served by the live worker — the stream avoids the vanished one on its retry instead of
/// picking it again.
#[tokio::test]
async fn a_vanished_worker_is_avoided_on_retry_until_its_lease_ends() {
    let planes = planes();
    let router = router(&planes, "least-loaded", RouterOptions::default()).await;
    let live = holding_worker(&planes, "t", "live").await;
    let _ghost = planes
        .discovery
        .register(runtime::discovery::InstanceSpec {
            endpoint: endpoint("t"),
            address: "ghost".into(),
            model: None,
            metadata: serde_json::Value::Null,
        })
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let mut held = Vec::new();
    for i in 0..4 {
        let s = open(&router, &format!("r{i}")).await;
        assert_eq!(s.instance_id(), Some(live.instance.instance_id));
        held.push(s);
    }
}
