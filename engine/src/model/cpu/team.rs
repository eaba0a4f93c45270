//! The threads a step's kernels share: libtorch's own OpenMP team where libgomp is loaded
//! (found at run time), else a rayon pool. Sharing libtorch's team matters: the engine thread
//! alternates kernels with libtorch ops (prefill attention, sampling), and a second set of
//! threads would fight libgomp's spinning workers for the cores — measured, a prefill step
//! on a rayon pool beside the OpenMP team spent ~19 % of its cycles in libgomp's spin and ran
//! at half the speed.

use std::ffi::{c_int, c_uint, c_void};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

use rayon::prelude::*;

type GompParallel = unsafe extern "C" fn(extern "C" fn(*mut c_void), *mut c_void, c_uint, c_uint);
type OmpThreadNum = unsafe extern "C" fn() -> c_int;

/// libgomp's entry points, looked up in the process (libtorch loads libgomp).
struct Gomp {
    parallel: GompParallel,
    thread_num: OmpThreadNum,
}

fn gomp() -> Option<&'static Gomp> {
    static GOMP: OnceLock<Option<Gomp>> = OnceLock::new();
    GOMP.get_or_init(|| {
        // SAFETY: dlsym on the global scope with NUL-terminated names; the symbols, when
        // present, have the GNU OpenMP ABI's signatures.
        unsafe {
            let p = libc::dlsym(libc::RTLD_DEFAULT, c"GOMP_parallel".as_ptr());
            let t = libc::dlsym(libc::RTLD_DEFAULT, c"omp_get_thread_num".as_ptr());
            (!p.is_null() && !t.is_null()).then(|| Gomp {
                parallel: std::mem::transmute::<*mut c_void, GompParallel>(p),
                thread_num: std::mem::transmute::<*mut c_void, OmpThreadNum>(t),
            })
        }
    })
    .as_ref()
}

/// What `GOMP_parallel` hands each thread: the body and where a panic goes.
struct Region<'a> {
    body: &'a (dyn Fn(usize) + Sync),
    panic: Mutex<Option<Box<dyn std::any::Any + Send>>>,
}

extern "C" fn region_entry(data: *mut c_void) {
    // SAFETY: `data` is the `Region` `parallel` passed, alive until GOMP_parallel returns.
    let region = unsafe { &*(data as *const Region<'_>) };
    let g = gomp().expect("only called through libgomp");
    // SAFETY: inside a parallel region.
    let t = unsafe { (g.thread_num)() } as usize;
    // A panic must not unwind into C: keep it and rethrow on the calling thread.
    if let Err(p) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (region.body)(t))) {
        *region.panic.lock().unwrap_or_else(|e| e.into_inner()) = Some(p);
    }
}

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

enum Threads {
    /// The calling thread alone.
    Inline,
    /// The calling thread's OpenMP team (the one libtorch's ops on it use).
    OpenMp,
    Rayon(rayon::ThreadPool),
}

pub struct Team {
    threads: usize,
    backing: Threads,
}

impl Team {
    /// `threads` of 1 runs everything on the calling thread. Build it on the thread that will
    /// use it: with OpenMP, that thread's team does the work.
    pub fn new(threads: usize) -> Team {
        Self::with(threads, gomp().is_some())
    }

    /// As [`Team::new`], choosing rayon even where libgomp is loaded (`openmp` false).
    pub fn with(threads: usize, openmp: bool) -> Team {
        let threads = threads.max(1);
        let backing = if threads == 1 {
            Threads::Inline
        } else if openmp && gomp().is_some() {
            Threads::OpenMp
        } else {
            match rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .thread_name(|i| format!("baton-kernel-{i}"))
                .build()
            {
                Ok(pool) => Threads::Rayon(pool),
                Err(_) => Threads::Inline,
            }
        };
        let threads = if matches!(backing, Threads::Inline) {
            1
        } else {
            threads
        };
        Team { threads, backing }
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Which threads these are, for the log.
    pub fn backing(&self) -> &'static str {
        match self.backing {
            Threads::Inline => "one thread",
            Threads::OpenMp => "libtorch's OpenMP team",
            Threads::Rayon(_) => "a rayon pool",
        }
    }

    /// Runs `f` where the team's loops are cheapest to start: inside the rayon pool, or
    /// right here for OpenMP (the caller leads its team).
    pub fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        match &self.backing {
            Threads::Rayon(pool) => pool.install(f),
            Threads::Inline | Threads::OpenMp => f(),
        }
    }

    /// `body(t)` on each of `threads` OpenMP threads, the caller being thread 0.
    fn parallel(&self, body: &(dyn Fn(usize) + Sync)) {
        let g = gomp().expect("OpenMp backing implies libgomp");
        let region = Region {
            body,
            panic: Mutex::new(None),
        };
        // SAFETY: `region` outlives the call, which returns when every thread is done.
        unsafe {
            (g.parallel)(
                region_entry,
                &region as *const Region<'_> as *mut c_void,
                self.threads as c_uint,
                0,
            )
        };
        if let Some(p) = region.panic.into_inner().unwrap_or_else(|e| e.into_inner()) {
            std::panic::resume_unwind(p);
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
        let range = |p: usize| (p * n / parts, (p + 1) * n / parts);
        match &self.backing {
            Threads::OpenMp => self.parallel(&|t| {
                if t < parts {
                    let (a, b) = range(t);
                    f(a, b);
                }
            }),
            _ => (0..parts).into_par_iter().with_max_len(1).for_each(|p| {
                let (a, b) = range(p);
                f(a, b)
            }),
        }
    }

    /// `f(i)` for every `i` in `0..n`, handed out one at a time (tasks of uneven size).
    pub fn each(&self, n: usize, f: impl Fn(usize) + Sync) {
        if self.threads <= 1 || n <= 1 {
            (0..n).for_each(f);
            return;
        }
        match &self.backing {
            Threads::OpenMp => {
                let next = AtomicUsize::new(0);
                self.parallel(&|_| loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        break;
                    }
                    f(i);
                });
            }
            _ => (0..n).into_par_iter().with_max_len(1).for_each(&f),
        }
    }
}
