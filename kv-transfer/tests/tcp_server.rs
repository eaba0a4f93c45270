//! The KV server against peers that misbehave: garbage, bad headers, writes cancelled midway.
//! None of them may crash it, write a byte into the cache, or spoil the next honest write.

mod common;

use std::time::Duration;

use common::{pattern_block, small_layout, snapshot, LOOPBACK};
use kv_transfer::{connect, BackendChoice, KvLayout, KvSink, TransferBackend};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn tcp_sink(layout: KvLayout) -> (KvSink, String) {
    let sink = KvSink::new(layout, &[TransferBackend::Tcp], LOOPBACK)
        .await
        .unwrap();
    let addr = sink.descriptor().endpoints[0].address.clone();
    (sink, addr)
}

/// Sends `frame` on a fresh connection; returns the server's error message, and checks that the
/// server hung up after it.
async fn refused(addr: &str, frame: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(frame).await.unwrap();
    assert_eq!(stream.read_u8().await.unwrap(), 1, "status: error");
    let len = stream.read_u32_le().await.unwrap();
    let mut message = vec![0u8; len as usize];
    stream.read_exact(&mut message).await.unwrap();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut rest)).await;
    assert!(
        matches!(closed, Ok(Ok(0))),
        "the server keeps talking after an error: {closed:?}"
    );
    String::from_utf8(message).unwrap()
}

fn header(n_blocks: u32, block_bytes: u64, ids: &[u32]) -> Vec<u8> {
    let mut frame = b"BKV1".to_vec();
    frame.extend_from_slice(&n_blocks.to_le_bytes());
    frame.extend_from_slice(&block_bytes.to_le_bytes());
    for id in ids {
        frame.extend_from_slice(&id.to_le_bytes());
    }
    frame
}

async fn honest_write_works(sink: &KvSink, layout: &KvLayout) {
    let writer = connect(
        &sink.descriptor(),
        layout,
        BackendChoice::Only(TransferBackend::Tcp),
    )
    .await
    .unwrap();
    let block = pattern_block(layout, 1);
    writer
        .write_blocks(&[4], std::slice::from_ref(&block))
        .await
        .unwrap();
    let cache = snapshot(sink);
    let start = layout.offset(0, 4);
    assert_eq!(
        &cache[start..start + layout.layer_block_bytes()],
        &block[..layout.layer_block_bytes()]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_survives_a_garbage_frame() {
    let layout = small_layout();
    let (sink, addr) = tcp_sink(layout.clone()).await;
    let message = refused(&addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(message.contains("magic"), "{message}");
    honest_write_works(&sink, &layout).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_headers_are_refused_before_any_payload_lands() {
    let layout = small_layout();
    let (sink, addr) = tcp_sink(layout.clone()).await;
    let bb = layout.block_bytes() as u64;
    let payload = vec![0xAB; layout.block_bytes()];

    let mut out_of_range = header(2, bb, &[1, 10]);
    out_of_range.extend_from_slice(&payload);
    out_of_range.extend_from_slice(&payload);
    let message = refused(&addr, &out_of_range).await;
    assert!(message.contains("block id 10"), "{message}");

    let mut wrong_size = header(1, bb - 4, &[1]);
    wrong_size.extend_from_slice(&payload[4..]);
    let message = refused(&addr, &wrong_size).await;
    assert!(
        message.contains("block_bytes") && message.contains(&(bb - 4).to_string()),
        "{message}"
    );

    let message = refused(&addr, &header(u32::MAX, bb, &[])).await;
    assert!(message.contains("n_blocks"), "{message}");

    assert!(
        snapshot(&sink).iter().all(|&b| b == 0),
        "a refused frame wrote into the cache"
    );
    assert_eq!(sink.bytes_received(), 0);
    honest_write_works(&sink, &layout).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_write_does_not_spoil_the_next_one() {
    // Big enough (8 x 1.5 MB) that a 1 ms timeout usually cuts the write mid-payload.
    let layout = KvLayout {
        num_layers: 4,
        block_size: 128,
        num_kv_heads: 4,
        head_dim: 96,
        num_blocks: 8,
        ..small_layout()
    };
    let (sink, _) = tcp_sink(layout.clone()).await;
    let writer = connect(
        &sink.descriptor(),
        &layout,
        BackendChoice::Only(TransferBackend::Tcp),
    )
    .await
    .unwrap();
    let ids: Vec<u32> = (0..8).collect();
    let junk: Vec<Vec<u8>> = (0..8).map(|_| vec![0xEE; layout.block_bytes()]).collect();
    let _ = tokio::time::timeout(Duration::from_millis(1), writer.write_blocks(&ids, &junk)).await;

    let blocks: Vec<Vec<u8>> = (0..8).map(|seed| pattern_block(&layout, seed)).collect();
    writer.write_blocks(&ids, &blocks).await.unwrap();
    // Several requests on one connection, too.
    writer.write_blocks(&ids, &blocks).await.unwrap();
    let cache = snapshot(&sink);
    let chunk = layout.layer_block_bytes();
    for (seed, &block) in ids.iter().enumerate() {
        for layer in 0..layout.num_layers {
            let start = layout.offset(layer, block as usize);
            assert!(
                cache[start..start + chunk] == blocks[seed][layer * chunk..(layer + 1) * chunk],
                "layer {layer} of block {block}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_stops_with_its_sink() {
    let (sink, addr) = tcp_sink(small_layout()).await;
    drop(sink);
    // The abort lands on the runtime's next turn of the accept task.
    for _ in 0..50 {
        if TcpStream::connect(&addr).await.is_err() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{addr} still accepts after the sink dropped");
}
