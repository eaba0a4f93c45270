//! The KV server against peers that misbehave: no or a wrong secret, garbage, bad headers,
//! writes under a grant that ended, writes cancelled midway. None of them may crash it, write
//! a byte into the cache, or spoil the next honest write.

mod common;

use std::time::Duration;

use common::{pattern_block, small_layout, snapshot, LOOPBACK};
use kv_transfer::{connect, BackendChoice, KvLayout, KvSink, TransferBackend, TransferError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn tcp_sink(layout: KvLayout) -> (KvSink, String) {
    let sink = KvSink::new(layout, &[TransferBackend::Tcp], LOOPBACK)
        .await
        .unwrap();
    let addr = sink.descriptor().endpoints[0].address.clone();
    (sink, addr)
}

/// The sink's secret, as its discovery record carries it.
fn secret(sink: &KvSink) -> String {
    let desc = serde_json::to_value(sink.descriptor()).unwrap();
    desc["secret"]
        .as_str()
        .expect("a TCP sink has a secret")
        .to_string()
}

/// The hello an honest writer sends first.
fn hello(secret: &str) -> Vec<u8> {
    let mut hello = b"BKVH".to_vec();
    hello.extend_from_slice(secret.as_bytes());
    hello
}

/// Sends `frame` on a fresh connection; returns the server's error message, and checks that the
/// server hung up after it.
async fn refused(addr: &str, frame: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    // The server may hang up before it has read all of a refused frame.
    let _ = stream.write_all(frame).await;
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

/// A hello with `secret`, then a request header for `generation`.
fn header(secret: &str, n_blocks: u32, block_bytes: u64, generation: u64, ids: &[u32]) -> Vec<u8> {
    let mut frame = hello(secret);
    frame.extend_from_slice(b"BKV2");
    frame.extend_from_slice(&n_blocks.to_le_bytes());
    frame.extend_from_slice(&block_bytes.to_le_bytes());
    frame.extend_from_slice(&generation.to_le_bytes());
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
    let generation = sink.fences().grant(&[4]).unwrap();
    writer
        .write_blocks(generation, &[4], std::slice::from_ref(&block))
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
    let mut frame = hello(&secret(&sink));
    frame.extend_from_slice(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    let message = refused(&addr, &frame).await;
    assert!(message.contains("magic"), "{message}");
    honest_write_works(&sink, &layout).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_without_the_secret_writes_nothing() {
    let layout = small_layout();
    let (sink, addr) = tcp_sink(layout.clone()).await;
    let secret = secret(&sink);
    // Every block granted, so only the secret stands between these peers and the cache.
    let all: Vec<u32> = (0..layout.num_blocks as u32).collect();
    let generation = sink.fences().grant(&all).unwrap();
    let payload = vec![0xAB; layout.block_bytes()];
    let request = |secret: &str| {
        let mut frame = header(secret, 1, layout.block_bytes() as u64, generation, &[3]);
        frame.extend_from_slice(&payload);
        frame
    };

    // No hello at all: a request straight away.
    let message = refused(&addr, &request(&secret)[4 + secret.len()..]).await;
    assert!(message.contains("not authenticated"), "{message}");
    // A wrong secret of the right length, and one that differs only in its last digit.
    let wrong = "0".repeat(secret.len());
    let message = refused(&addr, &request(&wrong)).await;
    assert!(message.contains("not authenticated"), "{message}");
    let mut near = secret.clone();
    let last = if near.ends_with('0') { "1" } else { "0" };
    near.replace_range(near.len() - 1.., last);
    let message = refused(&addr, &request(&near)).await;
    assert!(message.contains("not authenticated"), "{message}");
    // A short secret followed by the request.
    let message = refused(&addr, &request(&secret[..10])).await;
    assert!(message.contains("not authenticated"), "{message}");

    assert!(
        snapshot(&sink).iter().all(|&b| b == 0),
        "an unauthenticated peer wrote into the cache"
    );
    assert_eq!(sink.bytes_received(), 0);
    // The same bytes with the secret land.
    let mut stream = TcpStream::connect(&addr).await.unwrap();
    stream.write_all(&request(&secret)).await.unwrap();
    assert_eq!(stream.read_u8().await.unwrap(), 3, "status: go");
    assert_eq!(stream.read_u8().await.unwrap(), 0, "status: ok");
    assert_eq!(
        stream.read_u64_le().await.unwrap(),
        layout.block_bytes() as u64
    );
    let start = layout.offset(0, 3);
    assert!(snapshot(&sink)[start..start + 16]
        .iter()
        .all(|&b| b == 0xAB));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_under_an_ended_grant_is_refused_before_its_payload() {
    let layout = small_layout();
    let (sink, addr) = tcp_sink(layout.clone()).await;
    let fences = sink.fences();
    let old = fences.grant(&[2, 5]).unwrap();
    fences.close(&[2, 5], Duration::ZERO).unwrap();
    let new = fences.grant(&[5]).unwrap();
    for (generation, ids) in [
        (old, vec![2u32]),
        (old, vec![5]),
        (new, vec![5, 2]),
        (0, vec![7]),
    ] {
        let mut frame = header(
            &secret(&sink),
            ids.len() as u32,
            layout.block_bytes() as u64,
            generation,
            &ids,
        );
        frame.extend(std::iter::repeat_n(0xCD, ids.len() * layout.block_bytes()));
        let mut stream = TcpStream::connect(&addr).await.unwrap();
        let _ = stream.write_all(&frame).await;
        assert_eq!(stream.read_u8().await.unwrap(), 2, "status: fenced");
        let block = stream.read_u32_le().await.unwrap();
        assert!(ids.contains(&block), "{block} of {ids:?}");
        assert_eq!(stream.read_u64_le().await.unwrap(), generation);
    }
    assert!(
        snapshot(&sink).iter().all(|&b| b == 0),
        "a fenced write landed"
    );
    assert_eq!(fences.refused(), 4);
    // The writer of this crate reports it as `Fenced`.
    let writer = connect(
        &sink.descriptor(),
        &layout,
        BackendChoice::Only(TransferBackend::Tcp),
    )
    .await
    .unwrap();
    let err = writer
        .write_blocks(old, &[2], &[pattern_block(&layout, 0)])
        .await
        .unwrap_err();
    assert!(
        matches!(err, TransferError::Fenced { block: 2, presented, .. } if presented == old),
        "{err}"
    );
    honest_write_works(&sink, &layout).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_headers_are_refused_before_any_payload_lands() {
    let layout = small_layout();
    let (sink, addr) = tcp_sink(layout.clone()).await;
    let secret = secret(&sink);
    let bb = layout.block_bytes() as u64;
    let payload = vec![0xAB; layout.block_bytes()];
    let g = sink.fences().grant(&[1]).unwrap();

    let mut out_of_range = header(&secret, 2, bb, g, &[1, 10]);
    out_of_range.extend_from_slice(&payload);
    out_of_range.extend_from_slice(&payload);
    let message = refused(&addr, &out_of_range).await;
    assert!(message.contains("block id 10"), "{message}");

    let mut wrong_size = header(&secret, 1, bb - 4, g, &[1]);
    wrong_size.extend_from_slice(&payload[4..]);
    let message = refused(&addr, &wrong_size).await;
    assert!(
        message.contains("block_bytes") && message.contains(&(bb - 4).to_string()),
        "{message}"
    );

    let message = refused(&addr, &header(&secret, u32::MAX, bb, g, &[])).await;
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
    let g = sink.fences().grant(&ids).unwrap();
    let junk: Vec<Vec<u8>> = (0..8).map(|_| vec![0xEE; layout.block_bytes()]).collect();
    let _ = tokio::time::timeout(
        Duration::from_millis(1),
        writer.write_blocks(g, &ids, &junk),
    )
    .await;

    let blocks: Vec<Vec<u8>> = (0..8).map(|seed| pattern_block(&layout, seed)).collect();
    writer.write_blocks(g, &ids, &blocks).await.unwrap();
    // Several requests on one connection, too.
    writer.write_blocks(g, &ids, &blocks).await.unwrap();
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_that_ends_while_the_payload_travels_lands_nothing() {
    let layout = small_layout();
    let (sink, addr) = tcp_sink(layout.clone()).await;
    let fences = sink.fences();
    let generation = fences.grant(&[6]).unwrap();
    let mut stream = TcpStream::connect(&addr).await.unwrap();
    let frame = header(
        &secret(&sink),
        1,
        layout.block_bytes() as u64,
        generation,
        &[6],
    );
    stream.write_all(&frame).await.unwrap();
    assert_eq!(stream.read_u8().await.unwrap(), 3, "status: go");
    // The decode worker gives up on the request between the header and the payload.
    fences.close(&[6], Duration::ZERO).unwrap();
    stream
        .write_all(&vec![0xEF; layout.block_bytes()])
        .await
        .unwrap();
    assert_eq!(stream.read_u8().await.unwrap(), 2, "status: fenced");
    assert_eq!(stream.read_u32_le().await.unwrap(), 6);
    assert!(snapshot(&sink).iter().all(|&b| b == 0), "nothing landed");
    assert_eq!(fences.refused(), 1);
}
