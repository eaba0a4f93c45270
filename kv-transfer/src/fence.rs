//! Fenced writes: a writer may put bytes into a destination block only while the decode worker
//! grants it that block, under the generation the grant named. The table lives beside the
//! cache: in the sink's own memory for in-process and TCP writers, in a `/dev/shm` segment
//! for writers in other processes on the host (shared memory, CUDA IPC).
//!
//! # The word of a block
//! One `u64` per block, in memory every writer maps: the generation of the grant that may
//! write it (upper 40 bits; 0 = nobody) and the process id of the writer copying into it right
//! now (lower 24 bits; 0 = nobody; Linux's `pid_max` is at most 2^22).
//!
//! - **Grant** (the decode worker, when it accepts a claim): `(0 | g_old, 0) → (g, 0)` for each
//!   block, `g` fresh from a counter only the sink advances, so no two grants share a
//!   generation and a freed block's old generation never comes back.
//! - **Acquire** (a writer, before it copies into a block): `(g, 0) → (g, pid)` by
//!   compare-and-swap, only if the word carries the writer's own `g`; otherwise the write is
//!   refused and counted. **Release** after the copy: `(g, pid) → (g, 0)`.
//! - **Close** (the decode worker, before it frees or re-grants a reserved block):
//!   `(g, 0) → (0, 0)`. While a writer holds the block it waits; a holder whose process is
//!   gone (SIGKILL mid-copy) is cleared; a live holder that does not let go within the
//!   patience given (stopped mid-copy) makes the close fail, and the caller must keep the
//!   block out of use and try again later.
//!
//! # Why it is sound
//! A copy into a block happens only between a successful acquire and its release, and an
//! acquire succeeds only on a word carrying the writer's generation with no holder. A close
//! succeeds only by swapping out a word with no holder, after which the word carries
//! generation 0, which no writer holds. So once `close` returns `Ok`, no copy into the block
//! is in progress and none can start: the engine may free and reuse it. The acquire's
//! `Acquire` and the release's `Release` ordering make the copied bytes visible to whoever
//! closes the word after it (one `lock cmpxchg` on a `MAP_SHARED` page is atomic across
//! processes on every CPU Linux runs us on). Because the check and the copy sit inside one
//! acquire/release pair, a free cannot slip between them — the race a check-then-copy would
//! leave open.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::TransferError;
use crate::memory::HostMemory;

const MAGIC: u64 = u64::from_le_bytes(*b"BKVFENC1");
/// Header words: magic, block count, refused writes, reserved.
const HEADER_WORDS: usize = 4;
const HOLDER_BITS: u32 = 24;
const HOLDER_MASK: u64 = (1 << HOLDER_BITS) - 1;
/// Generations are 40 bits: 2^40 grants last 35 years at a thousand a second, but the counter
/// refuses to wrap rather than ever hand out a generation twice (a restarted worker begins a
/// new table).
const MAX_GENERATION: u64 = (1 << (64 - HOLDER_BITS)) - 1;

/// The generation a grant carries; a writer presents it with every write.
pub type Generation = u64;

fn generation_of(word: u64) -> u64 {
    word >> HOLDER_BITS
}

fn holder_of(word: u64) -> u32 {
    (word & HOLDER_MASK) as u32
}

fn word(generation: u64, holder: u32) -> u64 {
    (generation << HOLDER_BITS) | u64::from(holder)
}

/// This process's id as a holder (never 0: pid 0 is the kernel's).
fn own_holder() -> u32 {
    std::process::id() & HOLDER_MASK as u32
}

/// Whether process `pid` is gone (not merely unsignalable).
fn process_gone(pid: u32) -> bool {
    // SAFETY: signal 0 only asks whether the process exists.
    let rc = unsafe { libc::kill(pid as libc::pid_t, 0) };
    rc != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH)
}

/// A close that could not finish: a live writer still holds the block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockHeld {
    pub block: u32,
    pub holder_pid: u32,
}

/// The fence table of one sink's cache: the owner's view (grant, close) and every writer's
/// (acquire, release). Cloned handles share the table.
#[derive(Clone)]
pub struct KvFences {
    memory: Arc<HostMemory>,
    num_blocks: usize,
    next: Arc<AtomicU64>,
}

impl std::fmt::Debug for KvFences {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvFences")
            .field("num_blocks", &self.num_blocks)
            .finish_non_exhaustive()
    }
}

/// Bytes of a table for `num_blocks` blocks.
pub(crate) fn table_bytes(num_blocks: usize) -> usize {
    (HEADER_WORDS + num_blocks) * 8
}

impl KvFences {
    /// A new table over fresh zeroed memory (every block ungranted), writing its header.
    pub(crate) fn create(memory: HostMemory, num_blocks: usize) -> Result<KvFences, TransferError> {
        let fences = KvFences::over(memory, num_blocks)?;
        fences.header(0).store(MAGIC, Ordering::Relaxed);
        fences.header(1).store(num_blocks as u64, Ordering::Release);
        Ok(fences)
    }

    /// A table in this process's anonymous memory (a sink without writers in other
    /// processes, and tests).
    pub fn in_process(num_blocks: usize) -> Result<KvFences, TransferError> {
        let bytes = table_bytes(num_blocks);
        let memory = HostMemory::anonymous(bytes).map_err(|e| TransferError::Alloc {
            bytes,
            reason: e.to_string(),
        })?;
        KvFences::create(memory, num_blocks)
    }

    /// A writer's view of a table another process created, after checking its header.
    pub(crate) fn attach(memory: HostMemory, num_blocks: usize) -> Result<KvFences, TransferError> {
        let fences = KvFences::over(memory, num_blocks)?;
        let magic = fences.header(0).load(Ordering::Acquire);
        let blocks = fences.header(1).load(Ordering::Acquire);
        if magic != MAGIC || blocks != num_blocks as u64 {
            return Err(TransferError::Fence(format!(
                "the fence table is not one for {num_blocks} blocks (magic {magic:#x}, \
                 {blocks} blocks)"
            )));
        }
        Ok(fences)
    }

    fn over(memory: HostMemory, num_blocks: usize) -> Result<KvFences, TransferError> {
        let needed = table_bytes(num_blocks);
        if crate::memory::KvMemory::len(&memory) < needed {
            return Err(TransferError::MemoryTooSmall {
                needed,
                len: crate::memory::KvMemory::len(&memory),
            });
        }
        Ok(KvFences {
            memory: Arc::new(memory),
            num_blocks,
            next: Arc::new(AtomicU64::new(1)),
        })
    }

    fn words(&self) -> &[AtomicU64] {
        let ptr = crate::memory::KvMemory::as_mut_ptr(&*self.memory) as *const AtomicU64;
        // SAFETY: the mapping is page-aligned (so 8-aligned), at least `table_bytes` long
        // (checked in `over`), and lives as long as `self.memory`; every access to it, from
        // any process, is atomic.
        unsafe { std::slice::from_raw_parts(ptr, HEADER_WORDS + self.num_blocks) }
    }

    fn header(&self, i: usize) -> &AtomicU64 {
        &self.words()[i]
    }

    fn block(&self, block: u32) -> Result<&AtomicU64, TransferError> {
        self.words()
            .get(HEADER_WORDS + block as usize)
            .filter(|_| (block as usize) < self.num_blocks)
            .ok_or(TransferError::NoSuchBlock {
                block,
                num_blocks: self.num_blocks,
            })
    }

    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    /// Writes refused because their generation was not (or no longer) the block's, by any
    /// writer of this table, since it was created.
    pub fn refused(&self) -> u64 {
        self.header(2).load(Ordering::Relaxed)
    }

    /// Grants `blocks` to one writer under a fresh generation. Fails (granting nothing) when
    /// a block is being copied into by an earlier grant's writer: the caller refuses the
    /// claim. An earlier grant on the blocks ends with this one.
    pub fn grant(&self, blocks: &[u32]) -> Result<Generation, TransferError> {
        let generation = self.next.fetch_add(1, Ordering::Relaxed);
        if generation > MAX_GENERATION {
            return Err(TransferError::Fence(
                "this cache's grant generations are used up; restart the worker".into(),
            ));
        }
        for (i, &block) in blocks.iter().enumerate() {
            let cell = self.block(block)?;
            let mut current = cell.load(Ordering::Acquire);
            loop {
                if holder_of(current) != 0 {
                    // Undo what this grant set: nobody learns `generation`.
                    for &done in &blocks[..i] {
                        if let Ok(c) = self.block(done) {
                            let _ = c.compare_exchange(
                                word(generation, 0),
                                0,
                                Ordering::AcqRel,
                                Ordering::Relaxed,
                            );
                        }
                    }
                    return Err(TransferError::Fence(format!(
                        "block {block} is being written by process {} under an earlier grant",
                        holder_of(current)
                    )));
                }
                match cell.compare_exchange_weak(
                    current,
                    word(generation, 0),
                    Ordering::AcqRel,
                    Ordering::Acquire,
                ) {
                    Ok(_) => break,
                    Err(now) => current = now,
                }
            }
        }
        Ok(generation)
    }

    /// Ends every grant on `blocks`, waiting up to `patience` for a writer in mid-copy. `Ok`:
    /// no write into them is in progress and none can start. A holder whose process is gone
    /// is cleared; a live one that keeps the block past `patience` is reported, and the
    /// caller must not reuse the block yet.
    pub fn close(&self, blocks: &[u32], patience: Duration) -> Result<(), BlockHeld> {
        let deadline = Instant::now() + patience;
        for &block in blocks {
            let Ok(cell) = self.block(block) else {
                continue; // outside the table: nothing could ever be granted there
            };
            let mut spins = 0u32;
            loop {
                let current = cell.load(Ordering::Acquire);
                if current == 0 {
                    break;
                }
                let holder = holder_of(current);
                let clear = holder == 0 || (holder != own_holder() && process_gone(holder));
                if clear {
                    if cell
                        .compare_exchange(current, 0, Ordering::AcqRel, Ordering::Acquire)
                        .is_ok()
                    {
                        break;
                    }
                    continue;
                }
                if Instant::now() >= deadline {
                    return Err(BlockHeld {
                        block,
                        holder_pid: holder,
                    });
                }
                // A copy of one block takes microseconds to milliseconds: spin a little,
                // then yield the core to the writer.
                spins += 1;
                if spins < 64 {
                    std::hint::spin_loop();
                } else {
                    std::thread::sleep(Duration::from_micros(200));
                }
            }
        }
        Ok(())
    }

    /// Whether `block` currently carries `generation` (a cheap early check; only
    /// [`KvFences::acquire`] makes a write safe).
    pub fn is_granted(&self, block: u32, generation: Generation) -> bool {
        self.block(block)
            .map(|c| generation_of(c.load(Ordering::Acquire)) == generation && generation != 0)
            .unwrap_or(false)
    }

    /// Takes `block` for a copy under `generation`; the copy must happen while the returned
    /// hold lives. Refused (and counted) when the block is not granted to `generation`.
    pub fn acquire(
        &self,
        block: u32,
        generation: Generation,
    ) -> Result<BlockHold<'_>, TransferError> {
        let cell = self.block(block)?;
        let me = own_holder();
        let want = word(generation, 0);
        let refused = |found: u64| {
            self.header(2).fetch_add(1, Ordering::Relaxed);
            TransferError::Fenced {
                block,
                presented: generation,
                current: generation_of(found),
            }
        };
        if generation == 0 {
            return Err(refused(cell.load(Ordering::Relaxed)));
        }
        match cell.compare_exchange(
            want,
            word(generation, me),
            Ordering::AcqRel,
            Ordering::Acquire,
        ) {
            Ok(_) => Ok(BlockHold {
                cell,
                held: word(generation, me),
                released: word(generation, 0),
            }),
            Err(found) => Err(refused(found)),
        }
    }

    /// Counts a write refused before it reached [`KvFences::acquire`] (an early check).
    pub(crate) fn count_refused(&self) {
        self.header(2).fetch_add(1, Ordering::Relaxed);
    }
}

/// A block taken for one copy; released when dropped.
pub struct BlockHold<'a> {
    cell: &'a AtomicU64,
    held: u64,
    released: u64,
}

impl Drop for BlockHold<'_> {
    fn drop(&mut self) {
        // Fails only if the owner cleared the word believing this process dead, which it
        // cannot be while running this.
        let _ = self.cell.compare_exchange(
            self.held,
            self.released,
            Ordering::Release,
            Ordering::Relaxed,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_grant_admits_its_generation_only_until_it_is_closed() {
        let f = KvFences::in_process(4).unwrap();
        let g = f.grant(&[1, 2]).unwrap();
        assert!(f.is_granted(1, g) && !f.is_granted(0, g));
        drop(f.acquire(1, g).unwrap());
        assert!(f.acquire(0, g).is_err(), "never granted");
        assert!(f.acquire(1, g + 1).is_err(), "another generation");
        f.close(&[1, 2], Duration::ZERO).unwrap();
        assert!(f.acquire(1, g).is_err(), "closed");
        assert_eq!(f.refused(), 3);
        let g2 = f.grant(&[1]).unwrap();
        assert!(g2 > g, "generations never repeat");
        assert!(f.acquire(1, g).is_err(), "an old grant stays refused");
    }

    #[test]
    fn a_close_waits_for_a_copy_in_progress_and_a_grant_refuses_to_take_it_over() {
        let f = KvFences::in_process(2).unwrap();
        let g = f.grant(&[0]).unwrap();
        let hold = f.acquire(0, g).unwrap();
        assert!(f.grant(&[1, 0]).is_err(), "mid-copy: no takeover");
        assert!(!f.is_granted(1, g + 1), "the refused grant set nothing");
        assert_eq!(
            f.close(&[0], Duration::from_millis(5)),
            Err(BlockHeld {
                block: 0,
                holder_pid: own_holder()
            })
        );
        let closer = {
            let f = f.clone();
            std::thread::spawn(move || f.close(&[0], Duration::from_secs(10)))
        };
        std::thread::sleep(Duration::from_millis(20));
        drop(hold);
        closer.join().unwrap().unwrap();
        assert!(f.acquire(0, g).is_err());
    }

    #[test]
    fn a_holder_whose_process_is_gone_is_cleared() {
        let f = KvFences::in_process(1).unwrap();
        let g = f.grant(&[0]).unwrap();
        // Above Linux's pid_max: no such process.
        let ghost = (1u32 << 22) + 1;
        f.block(0).unwrap().store(word(g, ghost), Ordering::Release);
        f.close(&[0], Duration::ZERO).unwrap();
        assert_eq!(f.block(0).unwrap().load(Ordering::Acquire), 0);
    }
}
