//! The threads a decode step's kernels share. One step runs inside the pool (`Team::run`), so
//! each kernel's parallel loop is a fork/join among threads that are already awake, not a
//! wake-up of sleeping ones from the engine thread.

use rayon::prelude::*;

/// A pointer handed to the tasks of one parallel loop, each of which touches its own part.
#[derive(Clone, Copy, Debug)]
pub struct SyncPtr<T>(pub *mut T);

// SAFETY: used only to give disjoint ranges of one buffer to the tasks of one loop, which
// ends before the buffer's borrow does.
unsafe impl<T> Send for SyncPtr<T> {}
unsafe impl<T> Sync for SyncPtr<T> {}

impl<T> SyncPtr<T> {
    /// Through a method, so closures capture the whole (Sync) wrapper, not its field.
    pub fn get(self) -> *mut T {
        self.0
    }
}

pub struct Team {
    pool: Option<rayon::ThreadPool>,
    threads: usize,
}

impl Team {
    /// `threads` of 1 runs everything on the calling thread.
    pub fn new(threads: usize) -> Team {
        let threads = threads.max(1);
        let pool = (threads > 1)
            .then(|| {
                rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .thread_name(|i| format!("baton-kernel-{i}"))
                    .build()
                    .ok()
            })
            .flatten();
        let threads = if pool.is_some() { threads } else { 1 };
        Team { pool, threads }
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Runs `f` on one of the team's threads (the caller waits).
    pub fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        match &self.pool {
            Some(pool) => pool.install(f),
            None => f(),
        }
    }

    /// `f(start, end)` over `0..n` cut into one contiguous range per thread.
    pub fn split(&self, n: usize, f: impl Fn(usize, usize) + Sync) {
        let parts = self.threads.min(n);
        if parts <= 1 {
            if n > 0 {
                f(0, n);
            }
            return;
        }
        (0..parts)
            .into_par_iter()
            .with_max_len(1)
            .for_each(|p| f(p * n / parts, (p + 1) * n / parts));
    }

    /// `f(i)` for every `i` in `0..n`, handed out one at a time (tasks of uneven size).
    pub fn each(&self, n: usize, f: impl Fn(usize) + Sync) {
        if self.threads <= 1 || n <= 1 {
            (0..n).for_each(f);
            return;
        }
        (0..n).into_par_iter().with_max_len(1).for_each(&f);
    }
}
