//! Choosing and opening endpoints: what `Auto` picks, what a forced choice refuses, what a
//! descriptor carries, and what a sink cleans up.

mod common;

use std::path::Path;

use common::{small_layout, LOOPBACK};
use kv_transfer::{connect, BackendChoice, KvDescriptor, KvSink, TransferBackend, TransferError};

use TransferBackend::{Cuda, Memory, Shm, Tcp};

async fn sink(backends: &[TransferBackend]) -> KvSink {
    KvSink::new(small_layout(), backends, LOOPBACK)
        .await
        .unwrap()
}

async fn picks(
    desc: &KvDescriptor,
    choice: BackendChoice,
) -> Result<TransferBackend, TransferError> {
    connect(desc, &small_layout(), choice)
        .await
        .map(|t| t.backend())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_picks_the_nearest_endpoint() {
    let sink = sink(&[Tcp, Shm, Memory]).await;
    let desc = sink.descriptor();
    assert_eq!(picks(&desc, BackendChoice::Auto).await.unwrap(), Memory);
    // Another process on this host: the shm file.
    let other_process = KvDescriptor {
        pid: desc.pid.wrapping_add(1),
        ..desc.clone()
    };
    assert_eq!(
        picks(&other_process, BackendChoice::Auto).await.unwrap(),
        Shm
    );
    // Another host: the network.
    let other_host = KvDescriptor {
        host: format!("{}-elsewhere", desc.host),
        ..desc.clone()
    };
    assert_eq!(picks(&other_host, BackendChoice::Auto).await.unwrap(), Tcp);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forced_backend_uses_only_its_endpoint() {
    let sink = sink(&[Memory]).await;
    let err = picks(&sink.descriptor(), BackendChoice::Only(Tcp))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, TransferError::NoUsableEndpoint { offered } if offered == &["memory".to_string()]),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_registry_and_the_shm_file_go_with_the_sink() {
    let sink = sink(&[Memory, Shm]).await;
    let desc = sink.descriptor();
    let path = desc.endpoints[1].address.clone();
    assert!(path.starts_with("/dev/shm/baton-kv-"), "{path}");
    assert!(Path::new(&path).exists());
    assert_eq!(
        std::fs::metadata(&path).unwrap().len(),
        small_layout().total_bytes() as u64
    );
    drop(sink);
    assert!(!Path::new(&path).exists(), "{path} outlived its sink");
    let err = picks(&desc, BackendChoice::Only(Memory)).await.unwrap_err();
    assert!(matches!(err, TransferError::UnknownLocal(_)), "{err}");
    assert!(matches!(
        picks(&desc, BackendChoice::Auto).await.unwrap_err(),
        TransferError::NoEndpointOpened { .. } | TransferError::NoUsableEndpoint { .. }
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shm_segment_of_the_wrong_size_or_place_is_refused() {
    let sink = sink(&[Shm]).await;
    let desc = sink.descriptor();
    // A descriptor claiming more blocks than the file holds (block counts may differ between
    // the two sides, so only the file size catches it).
    let mut bigger = desc.clone();
    bigger.layout.num_blocks += 1;
    let err = picks(&bigger, BackendChoice::Only(Shm))
        .await
        .unwrap_err()
        .to_string();
    let (have, need) = (small_layout().total_bytes(), bigger.layout.total_bytes());
    assert!(
        err.contains(&have.to_string()) && err.contains(&need.to_string()),
        "{err}"
    );

    let mut elsewhere = desc.clone();
    elsewhere.endpoints[0].address = "/etc/passwd".into();
    let err = picks(&elsewhere, BackendChoice::Only(Shm))
        .await
        .unwrap_err();
    assert!(matches!(err, TransferError::Shm { .. }), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_descriptor_round_trips_through_json() {
    let sink = sink(&[Memory, Shm, Tcp]).await;
    let desc = sink.descriptor();
    assert_eq!(desc.pid, std::process::id());
    assert!(!desc.host.is_empty());
    assert_eq!(
        desc.endpoints.iter().map(|e| e.backend).collect::<Vec<_>>(),
        [Memory, Shm, Tcp],
        "the order asked for is the preference order"
    );
    let json = serde_json::to_string(&desc).unwrap();
    assert!(json.contains("\"shm\""), "{json}");
    let back: KvDescriptor = serde_json::from_str(&json).unwrap();
    assert_eq!(back, desc);
    // What travelled still connects.
    assert_eq!(picks(&back, BackendChoice::Only(Tcp)).await.unwrap(), Tcp);
}

#[test]
fn backend_choices_parse() {
    assert_eq!(
        "auto".parse::<BackendChoice>().unwrap(),
        BackendChoice::Auto
    );
    assert_eq!(
        "shm".parse::<BackendChoice>().unwrap(),
        BackendChoice::Only(Shm)
    );
    assert_eq!(
        "in-process".parse::<BackendChoice>().unwrap(),
        BackendChoice::Only(Memory)
    );
    let err = "rdma".parse::<BackendChoice>().unwrap_err().to_string();
    assert!(err.contains("`rdma`"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cuda_stands_alone_and_fails_cleanly_without_a_gpu() {
    let err = KvSink::new(small_layout(), &[Cuda, Memory], LOOPBACK)
        .await
        .err()
        .unwrap();
    assert!(matches!(err, TransferError::Backends { .. }), "{err}");
    let alone = KvSink::new(small_layout(), &[Cuda], LOOPBACK).await;
    if cfg!(feature = "cuda") {
        // With the feature it works on a GPU machine; elsewhere it must be an error, not a
        // panic (the unit test in backend/cuda.rs checks which, knowing whether libcuda is there).
        if let Err(err) = alone {
            assert!(matches!(err, TransferError::Cuda(_)), "{err}");
        }
    } else {
        let err = alone.err().unwrap().to_string();
        assert!(err.contains("built without the `cuda` feature"), "{err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_layout_is_refused() {
    let empty = kv_transfer::KvLayout {
        num_blocks: 0,
        ..small_layout()
    };
    let err = KvSink::new(empty, &[Memory], LOOPBACK).await.err().unwrap();
    assert!(matches!(err, TransferError::InvalidLayout { .. }), "{err}");
}

#[test]
fn sinks_and_writers_cross_threads() {
    fn send_sync<T: Send + Sync + ?Sized>() {}
    send_sync::<KvSink>();
    send_sync::<dyn kv_transfer::KvTransfer>();
    send_sync::<dyn kv_transfer::KvMemory>();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_simulated_link_takes_bytes_over_rate_and_checks_block_ids() {
    let layout = small_layout();
    // One block a quarter of a second.
    let rate = layout.block_bytes() as f64 * 4.0;
    let sink = KvSink::simulated(layout.clone(), rate).unwrap();
    let desc = sink.descriptor();
    assert_eq!(
        picks(&desc, BackendChoice::Auto).await.unwrap(),
        TransferBackend::Simulated
    );
    let link = connect(&desc, &layout, BackendChoice::Auto).await.unwrap();
    let started = std::time::Instant::now();
    let bytes = link
        .write_blocks(1, &[0, 1], &[Vec::new(), Vec::new()])
        .await
        .unwrap();
    let took = started.elapsed().as_secs_f64();
    assert_eq!(bytes, 2 * layout.block_bytes() as u64);
    assert!(
        (0.5..1.5).contains(&took),
        "{took} s for two blocks at four a second"
    );
    let outside = layout.num_blocks as u32;
    let err = link
        .write_blocks(1, &[outside], &[Vec::new()])
        .await
        .unwrap_err();
    assert!(matches!(err, TransferError::NoSuchBlock { .. }), "{err}");
    let err = link
        .write_blocks(1, &[0, 1], &[Vec::new()])
        .await
        .unwrap_err();
    assert!(matches!(err, TransferError::BlockCount { .. }), "{err}");
    // A bad rate, or a real sink asked for the simulated endpoint, is refused by name.
    assert!(KvSink::simulated(layout.clone(), 0.0)
        .err()
        .unwrap()
        .to_string()
        .contains("`0`"));
    let err = KvSink::new(layout, &[TransferBackend::Simulated], LOOPBACK)
        .await
        .err()
        .unwrap();
    assert!(err.to_string().contains("simulated"), "{err}");
}
