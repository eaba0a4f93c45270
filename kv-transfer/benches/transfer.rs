//! GB/s of writing 16 SmolLM2-sized blocks (30 layers, 3 KV heads, head_dim 64, 128 tokens,
//! f32: 5.9 MB a block, 94 MB a write) through each host backend, next to a plain memcpy of the
//! same bytes — the ceiling any same-host backend can reach on this machine.
//!
//! `cargo bench -p baton-kv-transfer --bench transfer -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use kv_transfer::{connect, BackendChoice, KvLayout, KvSink, TransferBackend};

const BLOCKS: usize = 16;

fn smollm2_layout() -> KvLayout {
    KvLayout {
        num_layers: 30,
        num_kv_heads: 3,
        head_dim: 64,
        block_size: 128,
        dtype: "f32".into(),
        elem_bytes: 4,
        num_blocks: BLOCKS,
    }
}

fn transfer(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let layout = smollm2_layout();
    let block_bytes = layout.block_bytes();
    let blocks: Vec<Vec<u8>> = (0..BLOCKS)
        .map(|i| vec![i as u8 + 1; block_bytes])
        .collect();
    // Reversed so the scatter really scatters.
    let ids: Vec<u32> = (0..BLOCKS as u32).rev().collect();

    let mut group = c.benchmark_group(format!("write_{BLOCKS}_blocks_of_{block_bytes}_bytes"));
    group.throughput(Throughput::BytesDecimal((BLOCKS * block_bytes) as u64));
    group.sample_size(20);

    let mut plain = vec![0u8; BLOCKS * block_bytes];
    group.bench_function("memcpy", |b| {
        b.iter(|| {
            for (dst, src) in plain.chunks_exact_mut(block_bytes).zip(&blocks) {
                dst.copy_from_slice(src);
            }
            black_box(&plain);
        })
    });

    // One sink serving all three, so every backend writes into the same memory.
    let backends = [
        TransferBackend::Memory,
        TransferBackend::Shm,
        TransferBackend::Tcp,
    ];
    let sink = runtime
        .block_on(KvSink::new(
            layout.clone(),
            &backends,
            IpAddr::V4(Ipv4Addr::LOCALHOST),
        ))
        .expect("sink");
    let desc = sink.descriptor();
    let generation = sink.fences().grant(&ids).expect("grant");
    for backend in backends {
        let writer = runtime
            .block_on(connect(&desc, &layout, BackendChoice::Only(backend)))
            .expect("connect");
        group.bench_function(backend.as_str(), |b| {
            b.iter(|| {
                runtime
                    .block_on(writer.write_blocks(generation, &ids, &blocks))
                    .expect("write")
            })
        });
    }
    group.finish();
}

criterion_group!(benches, transfer);
criterion_main!(benches);
