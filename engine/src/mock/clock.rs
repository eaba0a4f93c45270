//! Time as the mock engine spends it: a real clock sleeps each step's modelled time (divided by
//! a speed-up); a virtual clock only advances a counter, so a trace of thousands of requests
//! replays in seconds and everything timed against the same clock reads simulated time.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

pub trait Clock: Send + Sync {
    /// Time since the clock started.
    fn now(&self) -> Duration;
    /// Lets `d` of simulated time pass.
    fn advance(&self, d: Duration);
}

/// Sleeps; `speedup` divides every sleep (infinite: no sleep at all, for measuring overhead).
pub struct RealClock {
    start: Instant,
    speedup: f64,
}

impl RealClock {
    pub fn new(speedup: f64) -> Self {
        Self {
            start: Instant::now(),
            speedup,
        }
    }
}

impl Clock for RealClock {
    fn now(&self) -> Duration {
        self.start.elapsed()
    }

    fn advance(&self, d: Duration) {
        if self.speedup.is_finite() && self.speedup > 0.0 {
            std::thread::sleep(d.div_f64(self.speedup));
        }
    }
}

/// Simulated time only: `advance` adds to it.
#[derive(Default)]
pub struct VirtualClock {
    nanos: AtomicU64,
}

impl Clock for VirtualClock {
    fn now(&self) -> Duration {
        Duration::from_nanos(self.nanos.load(Ordering::Relaxed))
    }

    fn advance(&self, d: Duration) {
        self.nanos.fetch_add(d.as_nanos() as u64, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn virtual_time_moves_only_when_advanced_and_infinite_speedup_never_sleeps() {
        let v = VirtualClock::default();
        v.advance(Duration::from_secs(3600));
        assert_eq!(v.now(), Duration::from_secs(3600));
        let r = RealClock::new(f64::INFINITY);
        let before = Instant::now();
        r.advance(Duration::from_secs(3600));
        assert!(before.elapsed() < Duration::from_secs(1));
    }
}
