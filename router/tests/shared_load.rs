//! Two routers (two frontends) over one real NATS and etcd share their load books: a request
//! sequence split across them balances the workers as one router alone would, because each
//! sees the other's requests at once instead of at the workers' next load report.

mod common;

use std::time::Duration;

use common::{endpoint, holding_worker, request};
use router::{policy_from_name, KvCostConfig, Router, RouterOptions};
use runtime::{PlaneSettings, Planes};
use test_support::{EtcdServer, NatsServer};

async fn connect(nats: &NatsServer, etcd: &EtcdServer) -> Planes {
    Planes::connect(
        PlaneSettings {
            stream_timeout: Duration::from_secs(10),
            ..PlaneSettings::new("shared", "m")
        },
        &nats.url,
        std::slice::from_ref(&etcd.url),
    )
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_routers_over_nats_agree_on_load() {
    let nats = NatsServer::start().expect("nats-server");
    let etcd = EtcdServer::start().expect("etcd");
    let worker_planes = connect(&nats, &etcd).await;
    let a = holding_worker(&worker_planes, "shared", "shared.w.a").await;
    let b = holding_worker(&worker_planes, "shared", "shared.w.b").await;
    let ids = [a.instance.instance_id, b.instance.instance_id];
    let mut routers = Vec::new();
    for _ in 0..2 {
        let planes = connect(&nats, &etcd).await;
        let router = Router::new(
            &planes,
            endpoint("shared"),
            policy_from_name("least-loaded", KvCostConfig::default()).unwrap(),
            RouterOptions::default(),
        )
        .await
        .unwrap();
        routers.push((planes, router));
    }
    for _ in 0..200 {
        if routers.iter().all(|(_, r)| r.instances().len() == 2) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Rounds of three requests: two through the first router, one through the second. The
    // second router must send its request to the worker the first left lighter.
    let mut streams = Vec::new();
    for round in 0..6 {
        for (k, which) in [0usize, 0, 1].into_iter().enumerate() {
            let router = &routers[which].1;
            let mut s = router
                .generate(request(&format!("r{round}-{k}"), 50))
                .await
                .unwrap();
            s.next().await.unwrap().unwrap();
            streams.push((which, s.instance_id().unwrap(), s));
            let truth: Vec<usize> = ids
                .iter()
                .map(|w| streams.iter().filter(|(_, i, _)| i == w).count())
                .collect();
            // Each router learns the other's request within a NATS round trip, long before
            // the workers' own reports (up to a second) would tell it.
            let mut agreed = false;
            for _ in 0..300 {
                agreed = routers.iter().all(|(_, r)| {
                    ids.iter()
                        .map(|&w| r.active_requests(w))
                        .collect::<Vec<_>>()
                        == truth
                });
                if agreed {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            assert!(
                agreed,
                "round {round}: both routers count both routers' requests {truth:?}"
            );
        }
        let per_worker: Vec<usize> = ids
            .iter()
            .map(|w| streams.iter().filter(|(_, i, _)| i == w).count())
            .collect();
        assert!(
            per_worker[0].abs_diff(per_worker[1]) <= 1,
            "round {round}: {per_worker:?}"
        );
    }
}
