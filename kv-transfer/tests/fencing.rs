//! Fenced writes against a model of the decode worker's reservations: requests reserve blocks,
//! prefill writers claim them (a later claim takes over from an earlier one), requests expire,
//! are cancelled or complete and free their blocks, freed blocks are reserved again — and
//! writers whose claims ended keep writing. In every order proptest finds, a write lands
//! exactly when the model says its claim is the live grant of its blocks, and the cache holds
//! exactly the bytes of the writes the model admitted: no write ever lands in a block it was
//! not granted.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{small_layout, snapshot, LOOPBACK};
use kv_transfer::{connect, BackendChoice, KvSink, KvTransfer, TransferBackend, TransferError};
use proptest::prelude::*;

#[derive(Clone, Debug)]
enum Op {
    /// A new request reserves `n` blocks (if that many are free).
    Reserve { n: usize },
    /// A prefill writer claims request `r` (the `r`-th live one, modulo): a fresh grant.
    Claim { r: usize },
    /// Request `r` ends — expired, cancelled, completed or failed alike: the decode worker
    /// closes its blocks and frees them.
    End { r: usize },
    /// Claim `c` (of every claim ever made, modulo) writes its request's blocks through
    /// writer `w` (memory or shm).
    Write { c: usize, w: usize },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (1usize..4).prop_map(|n| Op::Reserve { n }),
        (0usize..8).prop_map(|r| Op::Claim { r }),
        (0usize..8).prop_map(|r| Op::End { r }),
        (0usize..16, 0usize..2).prop_map(|(c, w)| Op::Write { c, w }),
    ]
}

struct Claim {
    request: u64,
    generation: u64,
    blocks: Vec<u32>,
}

/// The model: which request holds which blocks, and its live claim.
#[derive(Default)]
struct Model {
    free: Vec<u32>,
    requests: BTreeMap<u64, (Vec<u32>, Option<usize>)>,
    next_request: u64,
    /// What each block must hold: the byte of the last admitted write (0: never written).
    expected: Vec<u8>,
}

fn block_of(layout: &kv_transfer::KvLayout, cache: &[u8], block: u32) -> Vec<u8> {
    (0..layout.num_layers)
        .flat_map(|layer| {
            let start = layout.offset(layer, block as usize);
            cache[start..start + layout.layer_block_bytes()].to_vec()
        })
        .collect()
}

async fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let layout = small_layout();
    let sink = KvSink::new(
        layout.clone(),
        &[TransferBackend::Memory, TransferBackend::Shm],
        LOOPBACK,
    )
    .await
    .unwrap();
    let fences = sink.fences();
    let desc = sink.descriptor();
    let mut writers: Vec<Box<dyn KvTransfer>> = Vec::new();
    for backend in [TransferBackend::Memory, TransferBackend::Shm] {
        writers.push(
            connect(&desc, &layout, BackendChoice::Only(backend))
                .await
                .unwrap(),
        );
    }
    let mut model = Model {
        free: (0..layout.num_blocks as u32).collect(),
        expected: vec![0; layout.num_blocks],
        ..Model::default()
    };
    let mut claims: Vec<Claim> = Vec::new();
    let mut refused = 0u64;
    for (step, op) in ops.into_iter().enumerate() {
        match op {
            Op::Reserve { n } => {
                if model.free.len() >= n {
                    let blocks = model.free.split_off(model.free.len() - n);
                    model.requests.insert(model.next_request, (blocks, None));
                    model.next_request += 1;
                }
            }
            Op::Claim { r } => {
                let Some((&id, _)) = model.requests.iter().nth(r % model.requests.len().max(1))
                else {
                    continue;
                };
                let (blocks, live) = model.requests.get_mut(&id).unwrap();
                let generation = fences.grant(blocks).unwrap();
                claims.push(Claim {
                    request: id,
                    generation,
                    blocks: blocks.clone(),
                });
                *live = Some(claims.len() - 1);
            }
            Op::End { r } => {
                let Some((&id, _)) = model.requests.iter().nth(r % model.requests.len().max(1))
                else {
                    continue;
                };
                let (blocks, _) = model.requests.remove(&id).unwrap();
                fences.close(&blocks, Duration::ZERO).unwrap();
                model.free.extend(blocks);
            }
            Op::Write { c, w } => {
                if claims.is_empty() {
                    continue;
                }
                let c = c % claims.len();
                let claim = &claims[c];
                let admitted = model
                    .requests
                    .get(&claim.request)
                    .is_some_and(|(_, live)| *live == Some(c));
                // Every write carries its own byte, so a stray one shows wherever it lands.
                let byte = (step % 250 + 1) as u8;
                let data: Vec<Vec<u8>> = claim
                    .blocks
                    .iter()
                    .map(|_| vec![byte; layout.block_bytes()])
                    .collect();
                let got = writers[w]
                    .write_blocks(claim.generation, &claim.blocks, &data)
                    .await;
                match (admitted, got) {
                    (true, Ok(_)) => {
                        for &b in &claim.blocks {
                            model.expected[b as usize] = byte;
                        }
                    }
                    (false, Err(TransferError::Fenced { .. })) => refused += 1,
                    (admitted, got) => {
                        return Err(TestCaseError::fail(format!(
                            "step {step}: claim {c} (admitted: {admitted}) got {got:?}"
                        )))
                    }
                }
            }
        }
        let cache = snapshot(&sink);
        for block in 0..layout.num_blocks as u32 {
            let want = model.expected[block as usize];
            let got = block_of(&layout, &cache, block);
            prop_assert!(
                got.iter().all(|&b| b == want),
                "step {step}: block {block} holds bytes of a write the model refused"
            );
        }
    }
    prop_assert_eq!(fences.refused(), refused);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]
    #[test]
    fn no_write_lands_in_a_block_it_was_not_granted(ops in proptest::collection::vec(op(), 1..60)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(run(ops))?;
    }
}

/// A writer stopped in mid-copy (here: holding the block) keeps the block out of reuse: a
/// close waits, then reports it; once the writer lets go the close goes through.
#[test]
fn a_close_never_frees_a_block_under_a_copy() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let sink = rt
        .block_on(KvSink::new(
            small_layout(),
            &[TransferBackend::Memory],
            LOOPBACK,
        ))
        .unwrap();
    let fences = sink.fences();
    let g = fences.grant(&[4]).unwrap();
    let hold = fences.acquire(4, g).unwrap();
    let held = fences.close(&[4], Duration::from_millis(20)).unwrap_err();
    assert_eq!(held.block, 4);
    assert_eq!(held.holder_pid, std::process::id());
    drop(hold);
    fences.close(&[4], Duration::ZERO).unwrap();
    assert!(fences.acquire(4, g).is_err());
}
