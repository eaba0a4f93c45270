//! The contract tests (`contract/`) against the in-process planes `baton serve` runs on.

mod contract;

use std::time::Duration;

use runtime::discovery::MemoryDiscovery;
use runtime::request_plane::MemoryRequestPlane;
use runtime::work_queue::MemoryWorkQueue;

fn plane() -> MemoryRequestPlane {
    MemoryRequestPlane::new(Duration::from_secs(10))
}

#[tokio::test]
async fn the_request_plane_contract_holds_in_process() {
    let p = plane();
    contract::frames_arrive_complete_and_in_order(&p, &p, "w1").await;
    contract::dropping_the_stream_cancels_the_worker(&p, &p, "w2").await;
    contract::worker_errors_are_remote_and_a_dropped_sender_truncated(&p, &p, "w3").await;
    contract::an_unserved_address_is_no_such_address(&p, "nobody").await;
    let quick = MemoryRequestPlane::new(Duration::from_millis(500));
    contract::heartbeats_keep_a_quiet_stream_alive(
        &quick,
        &quick,
        "w4",
        Duration::from_millis(500),
    )
    .await;
}

#[tokio::test]
async fn discovery_watchers_see_instances_puts_and_deletes() {
    contract::watchers_see_instances_puts_and_deletes(&MemoryDiscovery::new(), "t").await;
    contract::settings_are_read_and_followed(&MemoryDiscovery::new(), "t").await;
}

#[tokio::test]
async fn work_queue_acks_redeliveries_and_naks() {
    let ack_wait = Duration::from_millis(300);
    contract::jobs_are_acked_redelivered_and_nakked(&MemoryWorkQueue::new(ack_wait), ack_wait)
        .await;
}
