//! How the process's allocator treats the large buffers a CPU forward step frees. A prefill
//! step allocates and frees tens of MiB of activations per layer (libtorch's tensors and the
//! kernels' scratch). glibc serves each of those above its mmap threshold with a fresh mapping
//! and unmaps it on free, or trims the heap top back to the kernel, so every step faults the
//! same pages in again (the test below: four 8 MiB buffers freed and reallocated ten times
//! fault 81 632 pages in with glibc's defaults, none with these settings). Raising the thresholds keeps freed memory in the process for the
//! next step, and one arena keeps a buffer freed on one thread reusable by another (libtorch's
//! OpenMP workers and the engine thread share them).

/// Largest buffer served from the heap (bigger ones are still mapped on their own).
const MMAP_THRESHOLD: i32 = 32 << 20;
/// Free memory at the heap top kept before any is returned to the kernel.
const TRIM_THRESHOLD: i32 = 1 << 30;

/// Tunes glibc's allocator for a serving process, once, before threads start: called first in
/// `baton`'s main and the engine bench. A user who sets `MALLOC_*` or `GLIBC_TUNABLES` has
/// chosen otherwise, so nothing changes then. Returns whether the settings were applied.
pub fn keep_freed_memory() -> bool {
    let chosen = std::env::vars_os().any(|(k, _)| {
        let k = k.to_string_lossy();
        k.starts_with("MALLOC_") || k == "GLIBC_TUNABLES"
    });
    if chosen {
        return false;
    }
    apply()
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn apply() -> bool {
    // SAFETY: mallopt only changes allocator parameters; it is safe to call at any time.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
            && libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
            && libc::mallopt(libc::M_ARENA_MAX, 1) == 1
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn apply() -> bool {
    false
}

#[cfg(all(test, target_os = "linux", target_env = "gnu"))]
mod tests {
    /// Set in the child this test starts: which measurement it runs.
    const CHILD: &str = "BATON_HOST_MEMORY_CHILD";

    fn minor_faults() -> i64 {
        // SAFETY: getrusage writes into the zeroed struct it is given.
        unsafe {
            let mut usage: libc::rusage = std::mem::zeroed();
            libc::getrusage(libc::RUSAGE_SELF, &mut usage);
            usage.ru_minflt
        }
    }

    /// Allocates, touches and frees step-sized buffers (four of 8 MiB alive at once, as a
    /// prefill layer's activations) ten times after a warm-up round; the page faults of those
    /// ten rounds.
    fn faults_of_reused_buffers() -> i64 {
        const SIZES: [usize; 4] = [8 << 20; 4];
        let round = || {
            let bufs: Vec<Vec<u8>> = SIZES.iter().map(|&n| vec![1u8; n]).collect();
            std::hint::black_box(&bufs);
        };
        round();
        let before = minor_faults();
        for _ in 0..10 {
            round();
        }
        minor_faults() - before
    }

    /// The measurement runs in a child process of its own: page faults are counted per
    /// process, and the other tests of this binary allocate beside it.
    fn faults_in_child(tuned: bool) -> i64 {
        let mode = if tuned { "tuned" } else { "default" };
        crate::test_child::measure_in_child(
            "host_memory::tests::child_measures",
            (CHILD, mode),
            "faults",
        )
    }

    #[test]
    fn child_measures() {
        // Outside the parent test this does nothing.
        let Ok(mode) = std::env::var(CHILD) else {
            return;
        };
        if mode == "tuned" {
            assert!(super::keep_freed_memory(), "mallopt refused");
        }
        println!("faults={}", faults_of_reused_buffers());
    }

    #[test]
    fn freed_step_buffers_are_reused_without_new_page_faults() {
        let default = faults_in_child(false);
        let tuned = faults_in_child(true);
        // The ten rounds touch 320 MiB, 81 920 pages; glibc's defaults trim the freed heap top
        // back to the kernel each round, so most fault anew, while kept memory needs none of
        // them again (a few for the test harness's own allocations).
        assert!(tuned < 256, "{tuned} page faults on reused buffers");
        assert!(
            default > 10 * tuned + 1_000,
            "glibc's defaults no longer fault freed buffers in again ({default} against {tuned}): \
             the setting may have become pointless"
        );
    }
}
