//! Which threads run libtorch's setup work (reading and casting weights, placing and packing
//! them, zeroing the KV cache). libgomp gives every thread that enters a parallel region a pool
//! of OpenMP workers that lives as long as that thread does, and once the process holds more of
//! those threads than it has cores, every team — the engine's too — stops spinning between
//! parallel regions (libgomp's throttled spin count) and its workers sleep on a futex, so each
//! of a step's hundreds of regions pays a wake-up. Building models and caches on the server's
//! main thread made served decode ~1.8× slower than the engine alone (72.6 against 39.8
//! ms/token, AMD EPYC); later, reading the GGUF on tokio's blocking thread left such a pool
//! alive for the 10 s that thread idles, and every request in those 10 s ran slow: served
//! 512-token prefill steps 190–217 ms against 137 ms once it had exited, decode steps 19.5
//! against 12.5 ms (Xeon with AMX, 2026-12-06). Setup off the engine thread therefore runs on a
//! thread of its own that ends, taking its pool with it, when the work does.

/// Runs `f` on a new thread and waits for it; the thread, and any OpenMP workers libtorch
/// started for it, are gone when this returns. A panic in `f` is resumed here.
pub fn on_passing_thread<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        std::thread::Builder::new()
            .name("baton-setup".into())
            .spawn_scoped(s, f)
            .expect("spawn a setup thread")
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use std::time::{Duration, Instant};

    use tch::{Device, Kind, Tensor};

    /// Set in the child this test starts: where the parallel op runs.
    const CHILD: &str = "BATON_HOST_THREADS_CHILD";

    fn threads() -> usize {
        std::fs::read_dir("/proc/self/task").map_or(0, |d| d.count())
    }

    /// A libtorch op big enough for a parallel region.
    fn parallel_op() -> f64 {
        let t = Tensor::ones([1 << 22], (Kind::Float, Device::Cpu));
        (t * 2.0).sum(Kind::Double).double_value(&[])
    }

    /// Threads the process holds after a parallel op ran on a thread that is still alive
    /// (`parked`) or through [`super::on_passing_thread`], less those before it.
    fn extra_threads(parked: bool) -> usize {
        let before = threads();
        if parked {
            let (tx, rx) = std::sync::mpsc::channel();
            let (_hold, wait) = std::sync::mpsc::channel::<()>();
            std::thread::spawn(move || {
                tx.send(parallel_op()).expect("report");
                let _ = wait.recv();
            });
            assert_eq!(rx.recv().expect("op ran"), 2.0 * (1 << 22) as f64);
            std::thread::sleep(Duration::from_millis(200));
            let extra = threads().saturating_sub(before);
            // `_hold` still alive here, so the thread (and its pool) are too.
            return extra;
        }
        assert_eq!(
            super::on_passing_thread(parallel_op),
            2.0 * (1 << 22) as f64
        );
        // Pool workers leave on their own once released; give them a moment.
        let deadline = Instant::now() + Duration::from_secs(2);
        while threads() > before && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        threads().saturating_sub(before)
    }

    fn extra_in_child(parked: bool) -> usize {
        let mode = if parked { "parked" } else { "short" };
        let test = "host_threads::tests::child_measures";
        crate::test_child::measure_in_child(test, (CHILD, mode), "extra") as usize
    }

    #[test]
    fn child_measures() {
        // Outside the parent test this does nothing.
        let Ok(mode) = std::env::var(CHILD) else {
            return;
        };
        // The main thread's own team first, as the engine's would be.
        parallel_op();
        println!("extra={}", extra_threads(mode == "parked"));
    }

    #[test]
    fn setup_on_a_short_lived_thread_leaves_no_openmp_pool_behind() {
        if tch::get_num_threads() < 2 {
            // One core: libtorch runs no parallel regions, so there is no pool to leave.
            return;
        }
        let parked = extra_in_child(true);
        let short = extra_in_child(false);
        // A live thread that ran a parallel op keeps itself and a pool worker per extra thread.
        assert!(
            parked >= 2,
            "a parked thread's pool did not show ({parked} extra threads): the check is blind"
        );
        assert_eq!(short, 0, "{short} threads outlived the setup thread");
    }
}
