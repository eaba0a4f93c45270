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
async fn request_plane_frames_arrive_complete_and_in_order() {
    let p = plane();
    contract::frames_arrive_complete_and_in_order(&p, &p, "w1").await;
}

#[tokio::test]
async fn request_plane_dropping_the_stream_cancels_the_worker() {
    let p = plane();
    contract::dropping_the_stream_cancels_the_worker(&p, &p, "w1").await;
}

#[tokio::test]
async fn request_plane_errors_are_remote_and_truncated() {
    let p = plane();
    contract::worker_errors_are_remote_and_a_dropped_sender_truncated(&p, &p, "w1").await;
}

#[tokio::test]
async fn request_plane_unserved_address() {
    contract::an_unserved_address_is_no_such_address(&plane(), "nobody").await;
}

#[tokio::test]
async fn discovery_watchers_see_instances_puts_and_deletes() {
    contract::watchers_see_instances_puts_and_deletes(&MemoryDiscovery::new(), "t").await;
}

#[tokio::test]
async fn work_queue_acks_redeliveries_and_naks() {
    let ack_wait = Duration::from_millis(300);
    contract::jobs_are_acked_redelivered_and_nakked(&MemoryWorkQueue::new(ack_wait), ack_wait)
        .await;
}
