//! Block hashing for prefix caching and KV-aware routing: the one place the chained block-hash
//! formula lives (DESIGN §5), shared by the engine's block manager and the router's indexer.
//!
//! Each full block of `block_size` tokens is hashed on its own (`tokens_hash`: the tokens as
//! little-endian `u32` bytes through XXH3-64 with seed [`BLOCK_HASH_SEED`]) and chained to its
//! parent (`block_hash[i] = xxh3(block_hash[i−1] ‖ tokens_hash[i])`, `block_hash[0] =
//! tokens_hash[0]`), so a block hash identifies the whole prefix up to and including that block —
//! the scheme of vLLM's prefix cache and Dynamo's KV router. A partial last block is never hashed.

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_64_with_seed;

/// Seed of every XXH3-64 call in block hashing.
pub const BLOCK_HASH_SEED: u64 = 1337;

/// The hash of one block's tokens alone: little-endian `u32` bytes → XXH3-64, seed 1337.
pub fn tokens_hash(tokens: &[u32]) -> u64 {
    let mut bytes = Vec::with_capacity(tokens.len() * 4);
    for token in tokens {
        bytes.extend_from_slice(&token.to_le_bytes());
    }
    xxh3_64_with_seed(&bytes, BLOCK_HASH_SEED)
}

/// The chained hash of a block: its `tokens_hash` alone for the first block, otherwise XXH3-64
/// (seed 1337) of the parent's block hash and this block's tokens hash, both little-endian.
pub fn chain_hash(parent: Option<u64>, tokens_hash: u64) -> u64 {
    match parent {
        None => tokens_hash,
        Some(parent) => {
            let mut bytes = [0u8; 16];
            bytes[..8].copy_from_slice(&parent.to_le_bytes());
            bytes[8..].copy_from_slice(&tokens_hash.to_le_bytes());
            xxh3_64_with_seed(&bytes, BLOCK_HASH_SEED)
        }
    }
}

/// The two hashes of one full block, as carried by KV events.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct BlockHash {
    /// Chained hash: identifies the whole prefix ending with this block.
    pub block_hash: u64,
    /// Hash of this block's tokens alone.
    pub tokens_hash: u64,
}

/// Hashes of every full block of `tokens`; a partial last block is left out.
///
/// Panics if `block_size` is 0.
pub fn block_hashes(tokens: &[u32], block_size: usize) -> Vec<BlockHash> {
    let mut hashes = Vec::with_capacity(tokens.len() / block_size.max(1));
    extend_block_hashes(&mut hashes, tokens, block_size);
    hashes
}

/// Extends `existing` (the hashes of the first `existing.len()` full blocks of `tokens`, as an
/// earlier call or [`block_hashes`] returned them) with the full blocks of `tokens` not yet hashed,
/// so a growing sequence is hashed once per block. A partial last block is left out.
///
/// Panics if `block_size` is 0.
pub fn extend_block_hashes(existing: &mut Vec<BlockHash>, tokens: &[u32], block_size: usize) {
    assert!(block_size > 0, "`block_size` must be positive");
    let full_blocks = tokens.len() / block_size;
    let mut parent = existing.last().map(|h| h.block_hash);
    for block in existing.len()..full_blocks {
        let tokens_hash = tokens_hash(&tokens[block * block_size..(block + 1) * block_size]);
        let block_hash = chain_hash(parent, tokens_hash);
        existing.push(BlockHash {
            block_hash,
            tokens_hash,
        });
        parent = Some(block_hash);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_values() {
        // Computed independently with the Python `xxhash` 4.1.0 package:
        //   th = lambda t: xxhash.xxh3_64_intdigest(struct.pack('<%dI' % len(t), *t), seed=1337)
        //   a = th([1, 2, 3, 4]); b = th([5, 6, 7, 8])
        //   c = xxhash.xxh3_64_intdigest(struct.pack('<QQ', a, b), seed=1337)
        let a = 14643705804678351452;
        let b = 16777012769546811212;
        let c = 4945711292740353085;
        assert_eq!(tokens_hash(&[1, 2, 3, 4]), a);
        assert_eq!(tokens_hash(&[5, 6, 7, 8]), b);
        assert_eq!(chain_hash(None, a), a);
        assert_eq!(chain_hash(Some(a), b), c);
        assert_eq!(
            block_hashes(&[1, 2, 3, 4, 5, 6, 7, 8], 4),
            vec![
                BlockHash {
                    block_hash: a,
                    tokens_hash: a
                },
                BlockHash {
                    block_hash: c,
                    tokens_hash: b
                },
            ]
        );
    }

    #[test]
    fn chaining_distinguishes_prefixes() {
        let x = block_hashes(&[1, 2, 9, 9, 9, 9], 2);
        let y = block_hashes(&[3, 4, 9, 9, 9, 9], 2);
        assert_eq!(x.len(), 3);
        assert_ne!(x[0], y[0]);
        for i in 1..3 {
            assert_eq!(x[i].tokens_hash, y[i].tokens_hash);
            assert_ne!(x[i].block_hash, y[i].block_hash);
        }
        // Same content within one sequence: same tokens hash, different chained hash.
        assert_eq!(x[1].tokens_hash, x[2].tokens_hash);
        assert_ne!(x[1].block_hash, x[2].block_hash);
    }

    #[test]
    fn partial_block_ignored() {
        assert!(block_hashes(&[1, 2, 3], 4).is_empty());
        assert_eq!(
            block_hashes(&[1, 2, 3, 4, 5, 6, 7], 4),
            block_hashes(&[1, 2, 3, 4], 4)
        );
        assert_eq!(
            block_hashes(&[1, 2, 3, 4, 5, 6, 7], 4),
            block_hashes(&[1, 2, 3, 4, 5, 6, 8], 4)
        );
    }

    #[test]
    fn incremental_matches_batch() {
        let tokens: Vec<u32> = (0..103).map(|i| i * 7 % 31).collect();
        let batch = block_hashes(&tokens, 8);
        let mut incremental = Vec::new();
        for len in 0..=tokens.len() {
            extend_block_hashes(&mut incremental, &tokens[..len], 8);
            assert_eq!(incremental.len(), len / 8);
        }
        assert_eq!(incremental, batch);
        // Hashing again with nothing new is a no-op.
        extend_block_hashes(&mut incremental, &tokens, 8);
        assert_eq!(incremental, batch);
    }
}
