//! Paged-KV block accounting with prefix caching: hands out the KV block ids each sequence's
//! block table points at, shares full blocks between sequences with the same prefix, and reports
//! what it caches as KV events for the router (DESIGN §3, §5). No tensors live here: the paged KV
//! cache is indexed by the ids this hands out. The design is vLLM v1's `KVCacheManager`.
//!
//! Every block is in exactly one of three states:
//! - **free**: holds nothing; kept in a FIFO free list;
//! - **cached**: reference count 0 but registered in the prefix cache under its chained block
//!   hash ([`runtime::block_hash`]); kept in an LRU ordered by the tick at which it was freed and
//!   evicted (unregistered, one `Removed` event per call) when a fresh block is needed and the free
//!   list is empty;
//! - **used**: referenced by the block tables of one or more sequences. Only full, registered
//!   blocks are shared; a partial last block is never shared or registered.
//!
//! A sequence's life: [`BlockManager::allocate`] reuses the longest cached prefix (always leaving
//! at least one token to compute) and takes fresh blocks for the rest; [`BlockManager::append_slots`]
//! grows the table as tokens are generated; [`BlockManager::commit`] registers the blocks whose KV
//! has been computed and emits `Stored`; [`BlockManager::free`] drops the references, sending
//! registered blocks to the LRU (tail blocks first, so a sequence's head outlives its tail) and
//! the rest to the free list. Every operation costs O(blocks touched), plus hashing the tokens it
//! is given.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::mpsc::Sender;

use runtime::block_hash::{chain_hash, extend_block_hashes, tokens_hash, BlockHash};
use runtime::kv_event::{KvEvent, KvEventData};

#[cfg(test)]
mod proptests;
#[cfg(test)]
mod tests;

/// Identifies a sequence (a request) to the block manager.
pub type SeqId = u64;

/// Size and behaviour of the paged KV cache.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockManagerConfig {
    /// Number of KV blocks in the cache.
    pub num_blocks: usize,
    /// Tokens per block.
    pub block_size: usize,
    /// Register computed full blocks and reuse them across sequences (emitting KV events).
    pub enable_prefix_caching: bool,
}

/// An allocation needs more blocks than the free list and the evictable cached blocks hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("out of KV blocks: need {needed}, {available} available")]
pub struct OutOfBlocks {
    pub needed: usize,
    pub available: usize,
}

/// Why a block-manager operation was refused; a refused operation changes nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BlockError {
    #[error(transparent)]
    OutOfBlocks(#[from] OutOfBlocks),
    #[error("sequence `{0}` already has a block table")]
    DuplicateSequence(SeqId),
    #[error("sequence `{0}` has no block table")]
    UnknownSequence(SeqId),
    #[error(
        "sequence `{seq}` commits {tokens} tokens but its block table holds only {slots} slots"
    )]
    CommitBeyondTable {
        seq: SeqId,
        tokens: usize,
        slots: usize,
    },
}

/// Per-block bookkeeping.
#[derive(Clone, Debug, Default)]
struct Block {
    /// Number of block tables holding this block.
    ref_count: u32,
    /// Block hash under which this block is registered in the prefix cache.
    hash: Option<u64>,
    /// Key of this block in the LRU while it is cached (registered and unreferenced).
    lru_tick: Option<u64>,
}

/// Per-sequence bookkeeping.
#[derive(Clone, Debug)]
struct Sequence {
    /// Block ids covering the sequence's token slots, in order.
    table: Vec<u32>,
    /// Chained hashes of the sequence's leading full blocks known so far (prefix caching only).
    hashes: Vec<BlockHash>,
    /// Leading blocks already considered for registration: prefix hits and committed full blocks.
    committed_blocks: usize,
}

/// Paged-KV block accounting with a prefix cache; see the module documentation.
#[derive(Debug)]
pub struct BlockManager {
    config: BlockManagerConfig,
    blocks: Vec<Block>,
    /// Blocks holding nothing; taken from the front.
    free: VecDeque<u32>,
    /// Cached blocks (registered, unreferenced) by the tick at which they were freed; the first
    /// entry is evicted first.
    lru: BTreeMap<u64, u32>,
    next_tick: u64,
    /// Registered blocks by block hash.
    cache: HashMap<u64, u32>,
    seqs: HashMap<SeqId, Sequence>,
    events: Option<Sender<KvEvent>>,
    next_event_id: u64,
    hit_tokens: u64,
    queried_tokens: u64,
}

impl BlockManager {
    /// A manager over `config.num_blocks` free blocks. KV events go to `events` when given (a
    /// closed receiver is ignored); event ids count from 0.
    ///
    /// Panics if `block_size` is 0 or `num_blocks` does not fit a `u32` block id.
    pub fn new(config: BlockManagerConfig, events: Option<Sender<KvEvent>>) -> Self {
        assert!(config.block_size > 0, "`block_size` must be positive");
        assert!(
            u32::try_from(config.num_blocks).is_ok(),
            "`num_blocks` {} exceeds u32 block ids",
            config.num_blocks
        );
        Self {
            blocks: vec![Block::default(); config.num_blocks],
            free: (0..config.num_blocks as u32).collect(),
            lru: BTreeMap::new(),
            next_tick: 0,
            cache: HashMap::new(),
            seqs: HashMap::new(),
            events,
            next_event_id: 0,
            hit_tokens: 0,
            queried_tokens: 0,
            config,
        }
    }

    pub fn block_size(&self) -> usize {
        self.config.block_size
    }

    pub fn total_blocks(&self) -> usize {
        self.config.num_blocks
    }

    /// Blocks holding nothing.
    pub fn num_free_blocks(&self) -> usize {
        self.free.len()
    }

    /// Unreferenced blocks still registered in the prefix cache (evictable, LRU).
    pub fn num_cached_blocks(&self) -> usize {
        self.lru.len()
    }

    /// Blocks referenced by at least one sequence.
    pub fn num_used_blocks(&self) -> usize {
        self.config.num_blocks - self.free.len() - self.lru.len()
    }

    /// Blocks an allocation can take: free plus cached.
    pub fn num_available_blocks(&self) -> usize {
        self.free.len() + self.lru.len()
    }

    /// Longest cached prefix of `tokens` in full blocks, capped so at least one token is left to
    /// compute (at most `(tokens.len() - 1) / block_size` blocks); returns the number of tokens it
    /// covers. No side effects.
    pub fn cached_prefix_len(&self, tokens: &[u32]) -> usize {
        self.match_prefix(tokens).1.len() * self.config.block_size
    }

    /// By how many blocks an `allocate(tokens)` would shrink [`Self::num_available_blocks`]: the
    /// fresh blocks beyond the prefix hits, plus the hits taken out of the LRU. The allocation
    /// succeeds iff this is at most `num_available_blocks()`.
    pub fn blocks_needed(&self, tokens: &[u32]) -> usize {
        let (_, hits) = self.match_prefix(tokens);
        self.needed_for(tokens.len(), &hits)
    }

    /// Gives a new sequence a block table covering all of `tokens`: cached prefix blocks are
    /// reused (reference count +1; an unreferenced one leaves the LRU), fresh blocks taken for the
    /// rest (evicting cached blocks when the free list is empty). Returns the number of cached
    /// tokens, a multiple of the block size below `tokens.len()` (0 for an empty prompt).
    /// On error nothing changed.
    pub fn allocate(&mut self, seq: SeqId, tokens: &[u32]) -> Result<usize, BlockError> {
        if self.seqs.contains_key(&seq) {
            return Err(BlockError::DuplicateSequence(seq));
        }
        let (hashes, hits) = self.match_prefix(tokens);
        let needed = self.needed_for(tokens.len(), &hits);
        let available = self.num_available_blocks();
        if needed > available {
            return Err(OutOfBlocks { needed, available }.into());
        }
        let total = tokens.len().div_ceil(self.config.block_size);
        let mut table = Vec::with_capacity(total);
        for &block in &hits {
            let meta = &mut self.blocks[block as usize];
            if meta.ref_count == 0 {
                let tick = meta
                    .lru_tick
                    .take()
                    .expect("an unreferenced hit is in the LRU");
                self.lru.remove(&tick);
            }
            meta.ref_count += 1;
            table.push(block);
        }
        let mut removed = Vec::new();
        while table.len() < total {
            table.push(self.take_fresh(&mut removed));
        }
        self.emit_removed(removed);
        let cached_tokens = hits.len() * self.config.block_size;
        self.hit_tokens += cached_tokens as u64;
        self.queried_tokens += tokens.len() as u64;
        self.seqs.insert(
            seq,
            Sequence {
                table,
                hashes,
                committed_blocks: hits.len(),
            },
        );
        Ok(cached_tokens)
    }

    /// Grows the sequence's block table with fresh blocks so it covers `num_tokens` token slots
    /// (a no-op when it already does). On error nothing changed.
    pub fn append_slots(&mut self, seq: SeqId, num_tokens: usize) -> Result<(), BlockError> {
        let state = self
            .seqs
            .get(&seq)
            .ok_or(BlockError::UnknownSequence(seq))?;
        let needed = num_tokens
            .div_ceil(self.config.block_size)
            .saturating_sub(state.table.len());
        if needed == 0 {
            return Ok(());
        }
        let available = self.num_available_blocks();
        if needed > available {
            return Err(OutOfBlocks { needed, available }.into());
        }
        let mut removed = Vec::new();
        let fresh: Vec<u32> = (0..needed).map(|_| self.take_fresh(&mut removed)).collect();
        self.emit_removed(removed);
        self.seqs
            .get_mut(&seq)
            .expect("checked above")
            .table
            .extend(fresh);
        Ok(())
    }

    /// Records that the KV of `tokens` (a prefix of the sequence, growing call to call, starting
    /// with the tokens given to `allocate`) is computed. Every block that became full is hashed
    /// and registered in the prefix cache, and one `Stored` event covers them (one per
    /// contiguous run in the rare case a block in the middle is skipped). A block whose hash is
    /// already registered (another sequence computed the same block concurrently) stays
    /// unregistered and is freed normally later; the chain continues through its hash.
    /// On error nothing changed.
    pub fn commit(&mut self, seq: SeqId, tokens: &[u32]) -> Result<(), BlockError> {
        let bs = self.config.block_size;
        let state = self
            .seqs
            .get_mut(&seq)
            .ok_or(BlockError::UnknownSequence(seq))?;
        let slots = state.table.len() * bs;
        if tokens.len() > slots {
            return Err(BlockError::CommitBeyondTable {
                seq,
                tokens: tokens.len(),
                slots,
            });
        }
        let full = tokens.len() / bs;
        if full <= state.committed_blocks {
            return Ok(());
        }
        let first = state.committed_blocks;
        state.committed_blocks = full;
        if !self.config.enable_prefix_caching {
            return Ok(());
        }
        extend_block_hashes(&mut state.hashes, tokens, bs);
        // Contiguous runs of newly registered blocks: (index of the first, hashes).
        let mut runs: Vec<(usize, Vec<BlockHash>)> = Vec::new();
        for i in first..full {
            let hash = state.hashes[i];
            if self.cache.contains_key(&hash.block_hash) {
                continue;
            }
            let block = state.table[i];
            self.cache.insert(hash.block_hash, block);
            self.blocks[block as usize].hash = Some(hash.block_hash);
            match runs.last_mut() {
                Some((start, run)) if *start + run.len() == i => run.push(hash),
                _ => runs.push((i, vec![hash])),
            }
        }
        let parents: Vec<Option<u64>> = runs
            .iter()
            .map(|&(start, _)| start.checked_sub(1).map(|p| state.hashes[p].block_hash))
            .collect();
        for ((_, blocks), parent_hash) in runs.into_iter().zip(parents) {
            self.emit(KvEventData::Stored {
                parent_hash,
                blocks,
            });
        }
        Ok(())
    }

    /// The sequence's block ids, in token order.
    pub fn block_table(&self, seq: SeqId) -> Option<&[u32]> {
        self.seqs.get(&seq).map(|s| s.table.as_slice())
    }

    pub fn contains(&self, seq: SeqId) -> bool {
        self.seqs.contains_key(&seq)
    }

    /// Frees the sequence (finish, cancel, preempt): reference count −1 per block; registered
    /// blocks reaching 0 go to the LRU tail (in reverse table order, so the sequence's tail blocks
    /// are evicted before its head), the others to the free list. Returns false, changing
    /// nothing, for an unknown sequence.
    pub fn free(&mut self, seq: SeqId) -> bool {
        let Some(state) = self.seqs.remove(&seq) else {
            return false;
        };
        for &block in state.table.iter().rev() {
            let meta = &mut self.blocks[block as usize];
            meta.ref_count -= 1;
            if meta.ref_count > 0 {
                continue;
            }
            if meta.hash.is_some() {
                meta.lru_tick = Some(self.next_tick);
                self.lru.insert(self.next_tick, block);
                self.next_tick += 1;
            } else {
                self.free.push_back(block);
            }
        }
        true
    }

    /// Drops every unreferenced cached block to the free list (one `Removed` event), then
    /// unregisters the blocks still referenced (they stay in their tables and are freed normally
    /// later) and emits `Cleared`, so the prefix cache ends empty. Returns how many cached blocks
    /// were dropped. Does nothing without prefix caching.
    pub fn reset_prefix_cache(&mut self) -> usize {
        if !self.config.enable_prefix_caching {
            return 0;
        }
        let mut removed = Vec::with_capacity(self.lru.len());
        for (_, block) in std::mem::take(&mut self.lru) {
            let meta = &mut self.blocks[block as usize];
            meta.lru_tick = None;
            removed.push(meta.hash.take().expect("a cached block is registered"));
            self.free.push_back(block);
        }
        for (_, block) in self.cache.drain() {
            self.blocks[block as usize].hash = None;
        }
        let dropped = removed.len();
        self.emit_removed(removed);
        self.emit(KvEventData::Cleared);
        dropped
    }

    /// Hashes of all blocks registered in the prefix cache, referenced or not.
    pub fn cached_block_hashes(&self) -> HashSet<u64> {
        self.cache.keys().copied().collect()
    }

    /// (prefix-hit tokens, prompt tokens) over every successful `allocate`, for a hit-rate gauge.
    pub fn prefix_cache_hits(&self) -> (u64, u64) {
        (self.hit_tokens, self.queried_tokens)
    }

    /// Hashes and block ids of the longest cached prefix of `tokens`, capped to leave at least one
    /// token to compute; hashing stops at the first miss.
    fn match_prefix(&self, tokens: &[u32]) -> (Vec<BlockHash>, Vec<u32>) {
        let mut hashes = Vec::new();
        let mut hits = Vec::new();
        if !self.config.enable_prefix_caching || tokens.is_empty() {
            return (hashes, hits);
        }
        let bs = self.config.block_size;
        let mut parent = None;
        for chunk in tokens[..tokens.len() - 1].chunks_exact(bs) {
            let tokens_hash = tokens_hash(chunk);
            let block_hash = chain_hash(parent, tokens_hash);
            let Some(&block) = self.cache.get(&block_hash) else {
                break;
            };
            hashes.push(BlockHash {
                block_hash,
                tokens_hash,
            });
            hits.push(block);
            parent = Some(block_hash);
        }
        (hashes, hits)
    }

    /// Blocks taken from the available pool by a table of `num_tokens` slots over `hits`.
    fn needed_for(&self, num_tokens: usize, hits: &[u32]) -> usize {
        let fresh = num_tokens.div_ceil(self.config.block_size) - hits.len();
        let revived = hits
            .iter()
            .filter(|&&b| self.blocks[b as usize].ref_count == 0)
            .count();
        fresh + revived
    }

    /// A block for one table slot (reference count 1): from the free list, or by evicting the
    /// least recently freed cached block (its hash is pushed to `removed`). The caller checked
    /// that one is available.
    fn take_fresh(&mut self, removed: &mut Vec<u64>) -> u32 {
        let block = match self.free.pop_front() {
            Some(block) => block,
            None => {
                let (_, block) = self.lru.pop_first().expect("caller checked availability");
                let meta = &mut self.blocks[block as usize];
                meta.lru_tick = None;
                let hash = meta.hash.take().expect("a cached block is registered");
                self.cache.remove(&hash);
                removed.push(hash);
                block
            }
        };
        self.blocks[block as usize].ref_count = 1;
        block
    }

    fn emit_removed(&mut self, block_hashes: Vec<u64>) {
        if !block_hashes.is_empty() {
            self.emit(KvEventData::Removed { block_hashes });
        }
    }

    fn emit(&mut self, data: KvEventData) {
        let event_id = self.next_event_id;
        self.next_event_id += 1;
        if let Some(events) = &self.events {
            // A dropped receiver only means nobody listens any more.
            let _ = events.send(KvEvent { event_id, data });
        }
    }
}
