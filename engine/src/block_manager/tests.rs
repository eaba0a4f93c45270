//! Unit tests of the block manager: prefix hits, the compute cap, LRU eviction, atomic failure,
//! reset, concurrent duplicates, errors, and running without prefix caching.

use std::sync::mpsc::{channel, Receiver};

use runtime::block_hash::block_hashes;

use super::*;

fn manager(num_blocks: usize, block_size: usize) -> (BlockManager, Receiver<KvEvent>) {
    let (tx, rx) = channel();
    let config = BlockManagerConfig {
        num_blocks,
        block_size,
        enable_prefix_caching: true,
    };
    (BlockManager::new(config, Some(tx)), rx)
}

fn drain(rx: &Receiver<KvEvent>) -> Vec<KvEventData> {
    rx.try_iter().map(|e| e.data).collect()
}

/// (free, cached, used) counts.
fn counts(bm: &BlockManager) -> (usize, usize, usize) {
    let c = (
        bm.num_free_blocks(),
        bm.num_cached_blocks(),
        bm.num_used_blocks(),
    );
    assert_eq!(c.0 + c.1 + c.2, bm.total_blocks());
    c
}

#[test]
fn prefix_hit_after_free() {
    let (mut bm, rx) = manager(16, 4);
    let prompt: Vec<u32> = (1..=10).collect();
    assert_eq!(bm.blocks_needed(&prompt), 3);
    assert_eq!(bm.allocate(1, &prompt), Ok(0));
    assert_eq!(counts(&bm), (13, 0, 3));
    bm.commit(1, &prompt).unwrap();
    assert_eq!(
        drain(&rx),
        vec![KvEventData::Stored {
            parent_hash: None,
            blocks: block_hashes(&prompt, 4),
        }]
    );
    let first = bm.block_table(1).unwrap().to_vec();
    assert!(bm.free(1));
    // The partial last block goes to the free list, the two registered ones to the LRU.
    assert_eq!(counts(&bm), (14, 2, 0));

    assert_eq!(bm.cached_prefix_len(&prompt), 8);
    // One fresh block plus the two hits leaving the LRU.
    assert_eq!(bm.blocks_needed(&prompt), 3);
    assert_eq!(bm.allocate(2, &prompt), Ok(8));
    assert_eq!(bm.block_table(2).unwrap()[..2], first[..2]);
    // Only one block came from the free list.
    assert_eq!(counts(&bm), (13, 0, 3));
    assert_eq!(bm.prefix_cache_hits(), (8, 20));
    assert!(drain(&rx).is_empty());

    // A third sequence with the same prefix shares the blocks while they are referenced.
    assert_eq!(bm.blocks_needed(&prompt), 1);
    assert_eq!(bm.allocate(3, &prompt), Ok(8));
    assert_eq!(bm.block_table(3).unwrap()[..2], first[..2]);
    assert_eq!(bm.blocks[first[0] as usize].ref_count, 2);
    assert_eq!(counts(&bm), (12, 0, 4));
}

#[test]
fn cap_leaves_a_token_to_compute() {
    let (mut bm, _rx) = manager(16, 4);
    let prompt: Vec<u32> = (1..=8).collect();
    bm.allocate(1, &prompt).unwrap();
    bm.commit(1, &prompt).unwrap();
    bm.free(1);
    assert_eq!(bm.cached_block_hashes().len(), 2);
    assert_eq!(bm.cached_prefix_len(&prompt), 4);
    assert_eq!(bm.cached_prefix_len(&prompt[..5]), 4);
    assert_eq!(bm.cached_prefix_len(&prompt[..4]), 0);
    assert_eq!(bm.cached_prefix_len(&[]), 0);
    assert_eq!(bm.allocate(2, &prompt), Ok(4));
    assert_eq!(bm.block_table(2).unwrap().len(), 2);
}

#[test]
fn eviction_is_lru_and_emits_removed() {
    let (mut bm, rx) = manager(4, 2);
    let a = [1, 2, 3, 4];
    let b = [5, 6, 7, 8];
    let ha = block_hashes(&a, 2);
    let hb = block_hashes(&b, 2);
    for (seq, tokens) in [(1, &a), (2, &b)] {
        bm.allocate(seq, tokens).unwrap();
        bm.commit(seq, tokens).unwrap();
        bm.free(seq);
    }
    // LRU, oldest first: a1, a0, b1, b0 (tails before heads).
    assert_eq!(counts(&bm), (0, 4, 0));
    drain(&rx);

    // A hit revives a0 and a1 out of the LRU; the fresh third block evicts the oldest left, b1.
    assert_eq!(bm.blocks_needed(&[1, 2, 3, 4, 9]), 3);
    assert_eq!(bm.allocate(3, &[1, 2, 3, 4, 9]), Ok(4));
    assert_eq!(
        drain(&rx),
        vec![KvEventData::Removed {
            block_hashes: vec![hb[1].block_hash],
        }]
    );
    // Freeing puts the hits back at the LRU tail (a1 before a0): b0, a1, a0.
    bm.free(3);
    assert_eq!(counts(&bm), (1, 3, 0));

    // Three fresh blocks: the free one, then the two oldest cached ones (b0, a1).
    bm.allocate(4, &[20, 21, 22, 23, 24, 25]).unwrap();
    assert_eq!(
        drain(&rx),
        vec![KvEventData::Removed {
            block_hashes: vec![hb[0].block_hash, ha[1].block_hash],
        }]
    );
    assert_eq!(bm.cached_block_hashes(), HashSet::from([ha[0].block_hash]));
    assert_eq!(bm.cached_prefix_len(&[1, 2, 3]), 2);
    assert_eq!(bm.cached_prefix_len(&[5, 6, 7]), 0);
}

#[test]
fn atomic_failure_changes_nothing() {
    let (mut bm, rx) = manager(4, 2);
    bm.allocate(1, &[1, 2, 3, 4]).unwrap();
    bm.commit(1, &[1, 2, 3, 4]).unwrap();
    bm.free(1);
    bm.allocate(2, &[9, 9]).unwrap();
    drain(&rx);
    let before = counts(&bm);
    assert_eq!(before, (1, 2, 1));

    // Needs 4 blocks (one hit revived from the LRU + three fresh) of 3 available.
    let prompt = [1, 2, 5, 6, 7, 8, 9];
    assert_eq!(bm.blocks_needed(&prompt), 4);
    assert_eq!(
        bm.allocate(3, &prompt),
        Err(BlockError::OutOfBlocks(OutOfBlocks {
            needed: 4,
            available: 3
        }))
    );
    assert!(!bm.contains(3));
    assert_eq!(counts(&bm), before);
    assert_eq!(bm.cached_block_hashes().len(), 2);
    assert_eq!(bm.prefix_cache_hits(), (0, 6));

    let table = bm.block_table(2).unwrap().to_vec();
    assert_eq!(
        bm.append_slots(2, 10),
        Err(BlockError::OutOfBlocks(OutOfBlocks {
            needed: 4,
            available: 3
        }))
    );
    assert_eq!(bm.block_table(2).unwrap(), table);
    assert_eq!(counts(&bm), before);
    assert!(drain(&rx).is_empty());

    // Exactly what is available succeeds, evicting both cached blocks in one event.
    bm.append_slots(2, 8).unwrap();
    assert_eq!(counts(&bm), (0, 0, 4));
    assert!(
        matches!(&drain(&rx)[..], [KvEventData::Removed { block_hashes }] if block_hashes.len() == 2)
    );
}

#[test]
fn reset_emits_removed_then_cleared() {
    let (mut bm, rx) = manager(8, 2);
    let a = [1, 2, 3, 4, 5];
    let b = [7, 8, 9];
    for (seq, tokens) in [(1, &a[..]), (2, &b[..])] {
        bm.allocate(seq, tokens).unwrap();
        bm.commit(seq, tokens).unwrap();
    }
    bm.free(1);
    drain(&rx);
    assert_eq!(counts(&bm), (4, 2, 2));

    // Tail block first, as in the LRU.
    assert_eq!(bm.reset_prefix_cache(), 2);
    let ha = block_hashes(&a, 2);
    assert_eq!(
        drain(&rx),
        vec![
            KvEventData::Removed {
                block_hashes: vec![ha[1].block_hash, ha[0].block_hash],
            },
            KvEventData::Cleared,
        ]
    );
    assert!(bm.cached_block_hashes().is_empty());
    assert_eq!(counts(&bm), (6, 0, 2));
    assert_eq!(bm.cached_prefix_len(&a), 0);
    // The still-referenced block was unregistered: freeing it sends it to the free list.
    bm.free(2);
    assert_eq!(counts(&bm), (8, 0, 0));
    // An empty reset still announces itself.
    assert_eq!(bm.reset_prefix_cache(), 0);
    assert_eq!(drain(&rx), vec![KvEventData::Cleared]);
}

#[test]
fn concurrent_duplicate_is_not_registered_twice() {
    let (mut bm, rx) = manager(16, 2);
    let prompt = [1, 2, 3, 4, 5];
    bm.allocate(1, &prompt).unwrap();
    bm.allocate(2, &prompt).unwrap();
    let hashes = block_hashes(&prompt, 2);
    bm.commit(1, &prompt).unwrap();
    assert_eq!(
        drain(&rx),
        vec![KvEventData::Stored {
            parent_hash: None,
            blocks: hashes.clone(),
        }]
    );
    bm.commit(2, &prompt).unwrap();
    assert!(drain(&rx).is_empty());
    let table2 = bm.block_table(2).unwrap().to_vec();
    assert!(table2.iter().all(|&b| bm.blocks[b as usize].hash.is_none()));

    // The chain continues through the duplicate's hash.
    let grown = [1, 2, 3, 4, 5, 6, 7];
    bm.append_slots(2, grown.len()).unwrap();
    bm.commit(2, &grown).unwrap();
    let grown_hashes = block_hashes(&grown, 2);
    assert_eq!(
        drain(&rx),
        vec![KvEventData::Stored {
            parent_hash: Some(hashes[1].block_hash),
            blocks: grown_hashes[2..].to_vec(),
        }]
    );
    assert_eq!(
        bm.blocks[table2[2] as usize].hash,
        Some(grown_hashes[2].block_hash)
    );

    // Sequence 2's first two blocks go to the free list, its registered third one to the LRU.
    let before = bm.num_free_blocks();
    bm.free(2);
    assert_eq!(bm.num_free_blocks(), before + 3);
    assert_eq!(bm.num_cached_blocks(), 1);
    bm.free(1);
    assert_eq!(bm.num_cached_blocks(), 3);
    assert_eq!(bm.cached_prefix_len(&[1, 2, 3, 4, 5, 6, 7, 8]), 6);
}

#[test]
fn commit_in_chunks_emits_one_event_per_call() {
    let (mut bm, rx) = manager(16, 2);
    let tokens: Vec<u32> = (0..9).collect();
    let hashes = block_hashes(&tokens, 2);
    bm.allocate(1, &tokens).unwrap();
    bm.commit(1, &tokens[..3]).unwrap();
    bm.commit(1, &tokens[..3]).unwrap();
    bm.commit(1, &tokens[..8]).unwrap();
    bm.commit(1, &tokens).unwrap();
    let events: Vec<KvEvent> = rx.try_iter().collect();
    assert_eq!(
        events.iter().map(|e| e.event_id).collect::<Vec<_>>(),
        [0, 1]
    );
    assert_eq!(
        events[0].data,
        KvEventData::Stored {
            parent_hash: None,
            blocks: hashes[..1].to_vec(),
        }
    );
    assert_eq!(
        events[1].data,
        KvEventData::Stored {
            parent_hash: Some(hashes[0].block_hash),
            blocks: hashes[1..].to_vec(),
        }
    );
}

#[test]
fn errors_name_the_sequence() {
    let (mut bm, _rx) = manager(4, 2);
    bm.allocate(7, &[1, 2, 3]).unwrap();
    assert_eq!(bm.allocate(7, &[1]), Err(BlockError::DuplicateSequence(7)));
    assert_eq!(bm.append_slots(8, 1), Err(BlockError::UnknownSequence(8)));
    assert_eq!(bm.commit(8, &[1]), Err(BlockError::UnknownSequence(8)));
    let err = bm.commit(7, &[1, 2, 3, 4, 5]).unwrap_err();
    assert_eq!(
        err,
        BlockError::CommitBeyondTable {
            seq: 7,
            tokens: 5,
            slots: 4
        }
    );
    assert_eq!(
        err.to_string(),
        "sequence `7` commits 5 tokens but its block table holds only 4 slots"
    );
    assert!(!bm.free(8));
    assert!(bm.free(7));
    assert!(!bm.contains(7));
    assert_eq!(bm.block_table(7), None);
    assert_eq!(counts(&bm), (4, 0, 0));
}

#[test]
fn without_prefix_caching_nothing_is_cached() {
    let (tx, rx) = channel();
    let config = BlockManagerConfig {
        num_blocks: 4,
        block_size: 2,
        enable_prefix_caching: false,
    };
    let mut bm = BlockManager::new(config, Some(tx));
    let prompt = [1, 2, 3, 4, 5];
    bm.allocate(1, &prompt).unwrap();
    bm.commit(1, &prompt).unwrap();
    bm.free(1);
    assert_eq!(counts(&bm), (4, 0, 0));
    assert_eq!(bm.cached_prefix_len(&prompt), 0);
    assert_eq!(bm.allocate(2, &prompt), Ok(0));
    assert_eq!(bm.reset_prefix_cache(), 0);
    assert!(bm.cached_block_hashes().is_empty());
    assert!(drain(&rx).is_empty());
}
