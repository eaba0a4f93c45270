//! One contract, run against every host backend: blocks land exactly at
//! `offset(layer, dst_block)`, nothing else changes, a bad write moves no byte, and a write
//! under a grant that ended (or was never made) is refused and counted without touching the
//! cache.

mod common;

use common::{layer_chunk, pattern_block, pattern_byte, small_layout, snapshot, LOOPBACK};
use kv_transfer::{connect, BackendChoice, KvLayout, KvSink, TransferBackend, TransferError};

const DST: [u32; 3] = [7, 2, 9];

async fn contract(backend: TransferBackend) {
    let layout = small_layout();
    let sink = KvSink::new(layout.clone(), &[backend], LOOPBACK)
        .await
        .unwrap();
    assert!(
        snapshot(&sink).iter().all(|&b| b == 0),
        "a new cache is zeroed"
    );
    let writer = connect(&sink.descriptor(), &layout, BackendChoice::Only(backend))
        .await
        .unwrap();
    assert_eq!(writer.backend(), backend);

    let blocks: Vec<Vec<u8>> = (0..DST.len())
        .map(|seed| pattern_block(&layout, seed))
        .collect();
    let generation = sink.fences().grant(&DST).unwrap();
    let written = writer
        .write_blocks(generation, &DST, &blocks)
        .await
        .unwrap();
    assert_eq!(written, (DST.len() * layout.block_bytes()) as u64);

    let cache = snapshot(&sink);
    for block in 0..layout.num_blocks {
        for layer in 0..layout.num_layers {
            let got = layer_chunk(&cache, &layout, layer, block);
            match DST.iter().position(|&d| d as usize == block) {
                Some(seed) => {
                    let want: Vec<u8> = (0..got.len())
                        .map(|i| pattern_byte(seed, layer, i))
                        .collect();
                    assert!(
                        got == want.as_slice(),
                        "{backend}: layer {layer} of block {block} misplaced"
                    );
                }
                None => assert!(
                    got.iter().all(|&b| b == 0),
                    "{backend}: block {block} layer {layer} was touched"
                ),
            }
        }
    }
    if backend == TransferBackend::Tcp {
        assert_eq!(sink.bytes_received(), written);
    }

    refuses_bad_writes(&*writer, &layout, &sink, &cache, generation).await;
    refuses_ungranted_writes(&*writer, &layout, &sink, generation).await;
}

/// Writes outside the writer's grant: never granted, granted to another generation, closed.
async fn refuses_ungranted_writes(
    writer: &dyn kv_transfer::KvTransfer,
    layout: &KvLayout,
    sink: &KvSink,
    generation: u64,
) {
    let backend = writer.backend();
    let fences = sink.fences();
    let before = snapshot(sink);
    let block = pattern_block(layout, 8);
    let refused_before = fences.refused();
    let fenced = |r: Result<u64, TransferError>, want: u32| match r {
        Err(TransferError::Fenced { block, .. }) => assert_eq!(block, want, "{backend}"),
        other => panic!("{backend}: a write outside its grant gave {other:?}"),
    };
    // Block 0 was never granted.
    fenced(
        writer
            .write_blocks(generation, &[0], std::slice::from_ref(&block))
            .await,
        0,
    );
    // Block 2 is closed (its request freed it), then granted to somebody else.
    fences.close(&DST, std::time::Duration::ZERO).unwrap();
    fenced(
        writer
            .write_blocks(generation, &[2], std::slice::from_ref(&block))
            .await,
        2,
    );
    let other = fences.grant(&[2]).unwrap();
    fenced(
        writer
            .write_blocks(generation, &[2], std::slice::from_ref(&block))
            .await,
        2,
    );
    assert!(snapshot(sink) == before, "{backend}: a fenced write landed");
    assert_eq!(
        fences.refused(),
        refused_before + 3,
        "{backend}: refusals counted"
    );
    // The new grant's writer gets through.
    writer
        .write_blocks(other, &[2], std::slice::from_ref(&block))
        .await
        .unwrap();
    let chunk = layout.layer_block_bytes();
    let start = layout.offset(1, 2);
    assert!(snapshot(sink)[start..start + chunk] == block[chunk..2 * chunk]);
}

/// Out-of-range ids, wrong sizes and mismatched counts are refused and leave `before` intact.
async fn refuses_bad_writes(
    writer: &dyn kv_transfer::KvTransfer,
    layout: &KvLayout,
    sink: &KvSink,
    before: &[u8],
    generation: u64,
) {
    let good = pattern_block(layout, 5);
    let out_of_range = writer
        .write_blocks(generation, &[3, 10], &[good.clone(), good.clone()])
        .await;
    assert!(
        matches!(
            out_of_range,
            Err(TransferError::NoSuchBlock {
                block: 10,
                num_blocks: 10
            })
        ),
        "{out_of_range:?}"
    );
    let short = writer
        .write_blocks(generation, &[3], &[good[1..].to_vec()])
        .await;
    assert!(
        matches!(short, Err(TransferError::BlockSize { block: 3, .. })),
        "{short:?}"
    );
    let counts = writer
        .write_blocks(generation, &[3, 4], std::slice::from_ref(&good))
        .await;
    assert!(
        matches!(counts, Err(TransferError::BlockCount { ids: 2, blocks: 1 })),
        "{counts:?}"
    );
    assert!(
        snapshot(sink) == before,
        "a refused write changed the cache"
    );
    // The writer still works after refusals (TCP: its connection was never poisoned).
    assert_eq!(writer.write_blocks(generation, &[], &[]).await.unwrap(), 0);
}

/// A prefill worker whose layout differs refuses at connect, naming the field.
async fn refuses_mismatched_layouts(backend: TransferBackend) {
    let layout = small_layout();
    let sink = KvSink::new(layout.clone(), &[backend], LOOPBACK)
        .await
        .unwrap();
    let desc = sink.descriptor();
    let bf16 = KvLayout {
        dtype: "bf16".into(),
        elem_bytes: 2,
        ..layout.clone()
    };
    let wide = KvLayout {
        head_dim: 16,
        ..layout.clone()
    };
    for (ours, field) in [(bf16, "dtype"), (wide, "head_dim")] {
        let err = match connect(&desc, &ours, BackendChoice::Only(backend)).await {
            Ok(_) => panic!("{backend}: connected with a different `{field}`"),
            Err(e) => e,
        };
        assert!(
            matches!(&err, TransferError::LayoutMismatch { field: f, .. } if *f == field),
            "{backend}: {err}"
        );
        assert!(err.to_string().contains(field), "{err}");
    }
    assert!(snapshot(&sink).iter().all(|&b| b == 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_backend_meets_the_contract() {
    contract(TransferBackend::Memory).await;
    refuses_mismatched_layouts(TransferBackend::Memory).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shm_backend_meets_the_contract() {
    contract(TransferBackend::Shm).await;
    refuses_mismatched_layouts(TransferBackend::Shm).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_backend_meets_the_contract() {
    contract(TransferBackend::Tcp).await;
    refuses_mismatched_layouts(TransferBackend::Tcp).await;
}
