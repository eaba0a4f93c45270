//! Admission: at most `max_inflight` requests are served at once, and the rest wait in one
//! bounded queue, served first in, first out, for at most `queue_timeout`.
//!
//! Why a queue and not an immediate 503: under overload a freed slot goes to whoever asks
//! first after it frees. Clients that honour `Retry-After` then lose every slot to clients
//! that re-ask at once, and starve. Waiting in arrival order gives each request its turn; the
//! bound (`max_queued`) and the timeout keep the wait, and the memory, finite.
//!
//! A slot passes from the request that frees it straight to the first waiter (never through a
//! free count a newcomer could take first), so the order is strict. A waiter whose client goes
//! away (its future is dropped) leaves the queue without taking a slot; one granted a slot in
//! the same instant gives it on to the next waiter.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

/// A request's priority class in the queue. Today every request is [`Class::Default`]; a
/// later change adds classes as variants here (listed in [`Class::ORDER`], highest first):
/// a freed slot then goes to the oldest waiter of the highest class that has one, so the
/// queue stays first in, first out within a class.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Class {
    #[default]
    Default,
}

/// How many classes there are: one FIFO per class.
const CLASSES: usize = 1;

impl Class {
    /// Served highest first.
    const ORDER: [Class; CLASSES] = [Class::Default];

    fn index(self) -> usize {
        match self {
            Class::Default => 0,
        }
    }
}

/// The limits admission enforces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Requests served at once.
    pub max_inflight: usize,
    /// Requests waiting for a slot; past it, refused at once. 0: no queue.
    pub max_queued: usize,
    /// Longest wait for a slot before the request is refused.
    pub queue_timeout: Duration,
}

/// Why a request was not admitted. Both tell the client when to retry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error(
        "the server is at its limit of {max_inflight} requests in flight and {max_queued} \
         queued; retry in {retry_after_secs} s"
    )]
    QueueFull {
        max_inflight: usize,
        max_queued: usize,
        retry_after_secs: u64,
    },
    #[error(
        "no slot among the {max_inflight} requests in flight freed within the queue timeout \
         of {timeout:?}; retry in {retry_after_secs} s"
    )]
    TimedOut {
        max_inflight: usize,
        timeout: Duration,
        retry_after_secs: u64,
    },
}

impl Refused {
    /// Seconds the client should wait before retrying (`Retry-After`).
    pub fn retry_after_secs(&self) -> u64 {
        match self {
            Refused::QueueFull {
                retry_after_secs, ..
            }
            | Refused::TimedOut {
                retry_after_secs, ..
            } => *retry_after_secs,
        }
    }
}

/// `Retry-After` bounds: at least a second (the header counts whole seconds), at most a
/// minute (past that the estimate says little and clients would give up).
pub const RETRY_AFTER_MIN_SECS: u64 = 1;
pub const RETRY_AFTER_MAX_SECS: u64 = 60;

/// The time constant of the drain-rate estimate: long enough to span many requests, short
/// enough to follow a change of load within seconds.
const DRAIN_WINDOW: Duration = Duration::from_secs(10);

/// Slots freed per second, exponentially weighted over about [`DRAIN_WINDOW`]: each release
/// adds 1 to a sum that decays by `e` per window.
#[derive(Debug)]
struct DrainRate {
    /// When measuring began: before a full window has passed, the sum covers less of it.
    since: Instant,
    /// The decayed count of releases, as of `last`.
    sum: f64,
    last: Instant,
    /// Whether any slot was ever freed (before that no rate is known).
    seen: bool,
}

impl DrainRate {
    fn new(now: Instant) -> Self {
        Self {
            since: now,
            sum: 0.0,
            last: now,
            seen: false,
        }
    }

    fn decayed(&self, now: Instant) -> f64 {
        let age = now.saturating_duration_since(self.last).as_secs_f64();
        self.sum * (-age / DRAIN_WINDOW.as_secs_f64()).exp()
    }

    fn record(&mut self, now: Instant) {
        self.sum = self.decayed(now) + 1.0;
        self.last = now;
        self.seen = true;
    }

    /// Releases per second, or `None` before the first.
    fn per_second(&self, now: Instant) -> Option<f64> {
        if !self.seen {
            return None;
        }
        let tau = DRAIN_WINDOW.as_secs_f64();
        // A steady rate r fills the sum to r·tau·(1 − e^(−elapsed/tau)): dividing by the
        // covered part keeps the first seconds from reading as a slow drain.
        let elapsed = now.saturating_duration_since(self.since).as_secs_f64();
        let covered = (1.0 - (-elapsed / tau).exp()).max(f64::MIN_POSITIVE);
        Some(self.decayed(now) / (tau * covered))
    }

    /// Seconds until `queued + 1` more slots free at the measured rate, within the bounds;
    /// the lower bound when no rate is known yet.
    fn retry_after_secs(&self, queued: usize, now: Instant) -> u64 {
        let Some(rate) = self.per_second(now) else {
            return RETRY_AFTER_MIN_SECS;
        };
        let secs = ((queued + 1) as f64 / rate).ceil();
        if secs.is_nan() {
            return RETRY_AFTER_MAX_SECS;
        }
        // A float clamp first: the division may be infinite (nothing freed for long).
        secs.clamp(RETRY_AFTER_MIN_SECS as f64, RETRY_AFTER_MAX_SECS as f64) as u64
    }
}

struct Waiter {
    id: u64,
    grant: oneshot::Sender<Permit>,
}

struct State {
    /// Slots nobody holds. Only ever above 0 while every queue is empty: a freed slot goes
    /// to a waiter when there is one.
    free: usize,
    queues: [VecDeque<Waiter>; CLASSES],
    next_id: u64,
    drain: DrainRate,
}

impl State {
    fn queued(&self) -> usize {
        self.queues.iter().map(VecDeque::len).sum()
    }

    /// The next waiter: the oldest of the highest class that has one.
    fn pop_next(&mut self) -> Option<Waiter> {
        Class::ORDER
            .iter()
            .find_map(|class| self.queues[class.index()].pop_front())
    }

    /// Takes waiter `id` out of its queue; false when it is no longer there (granted).
    fn remove(&mut self, class: Class, id: u64) -> bool {
        let queue = &mut self.queues[class.index()];
        match queue.iter().position(|w| w.id == id) {
            Some(i) => {
                queue.remove(i);
                true
            }
            None => false,
        }
    }
}

struct Inner {
    limits: Limits,
    state: Mutex<State>,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent across a panic elsewhere: every change is one statement.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The admission queue; cheap to clone, every clone the same queue.
#[derive(Clone)]
pub struct Admission {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Admission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admission")
            .field("limits", &self.inner.limits)
            .field("queued", &self.queued())
            .finish()
    }
}

/// A request's slot, given back when it drops (to the next waiter, if any).
#[must_use = "the slot is held only while the permit lives"]
pub struct Permit {
    /// `None` once the slot has been accounted for elsewhere (disarmed).
    inner: Option<Arc<Inner>>,
}

impl std::fmt::Debug for Permit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Permit")
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(inner) = self.inner.take() {
            release(inner);
        }
    }
}

/// Gives a freed slot to the first waiter still there, or back to the free count.
fn release(inner: Arc<Inner>) {
    let mut permit = Permit {
        inner: Some(inner.clone()),
    };
    let mut first = true;
    loop {
        let waiter = {
            let mut state = inner.lock();
            if first {
                state.drain.record(Instant::now());
                first = false;
            }
            match state.pop_next() {
                Some(w) => w,
                None => {
                    state.free += 1;
                    // Counted as free: the permit must not release again when it drops.
                    permit.inner = None;
                    return;
                }
            }
        };
        // Sent without the lock held: whatever the channel drops runs `Permit::drop`, which
        // takes the lock. `Err` means the waiter's client went away; the next one gets it.
        match waiter.grant.send(permit) {
            Ok(()) => return,
            Err(back) => permit = back,
        }
    }
}

/// Keeps a waiter's place in the queue; dropping it (the client went away, or the wait timed
/// out) takes the place out.
struct Place<'a> {
    inner: &'a Inner,
    class: Class,
    id: u64,
}

impl Drop for Place<'_> {
    fn drop(&mut self) {
        self.inner.lock().remove(self.class, self.id);
    }
}

/// A granted slot and how long the request waited for it.
#[derive(Debug)]
pub struct Admitted {
    pub permit: Permit,
    pub waited: Duration,
}

impl Admission {
    pub fn new(limits: Limits) -> Self {
        Self {
            inner: Arc::new(Inner {
                limits,
                state: Mutex::new(State {
                    free: limits.max_inflight,
                    queues: std::array::from_fn(|_| VecDeque::new()),
                    next_id: 0,
                    drain: DrainRate::new(Instant::now()),
                }),
            }),
        }
    }

    pub fn limits(&self) -> Limits {
        self.inner.limits
    }

    /// Requests waiting now.
    pub fn queued(&self) -> usize {
        self.inner.lock().queued()
    }

    /// Slots freed per second over the last ~10 s; `None` before any was freed.
    pub fn drain_rate(&self) -> Option<f64> {
        self.inner.lock().drain.per_second(Instant::now())
    }

    /// A slot for one request of `class` (today always [`Class::Default`]): at once when one
    /// is free and nobody waits, else after the requests queued before it, within
    /// `queue_timeout`. Refused at once when the queue is full. Dropping the future while it
    /// waits leaves the queue.
    pub async fn admit(&self, class: Class) -> Result<Admitted, Refused> {
        let limits = self.inner.limits;
        let started = Instant::now();
        let (id, mut granted) = {
            let mut state = self.inner.lock();
            if state.free > 0 {
                state.free -= 1;
                return Ok(Admitted {
                    permit: Permit {
                        inner: Some(self.inner.clone()),
                    },
                    waited: Duration::ZERO,
                });
            }
            let queued = state.queued();
            if queued >= limits.max_queued {
                return Err(Refused::QueueFull {
                    max_inflight: limits.max_inflight,
                    max_queued: limits.max_queued,
                    retry_after_secs: state.drain.retry_after_secs(queued, started),
                });
            }
            let (tx, rx) = oneshot::channel();
            let id = state.next_id;
            state.next_id += 1;
            state.queues[class.index()].push_back(Waiter { id, grant: tx });
            (id, rx)
        };
        let place = Place {
            inner: &self.inner,
            class,
            id,
        };
        let permit = match tokio::time::timeout(limits.queue_timeout, &mut granted).await {
            Ok(Ok(permit)) => Some(permit),
            // Only a panic between popping a waiter and granting it drops the sender.
            Ok(Err(_)) => None,
            Err(_elapsed) => {
                if self.inner.lock().remove(class, id) {
                    None
                } else {
                    // Out of the queue but not refused: a release popped this waiter just as
                    // the time ran out and is sending the slot now; take it rather than lose it.
                    granted.await.ok()
                }
            }
        };
        // Out of the queue by now, one way or another; the place has nothing left to remove.
        drop(place);
        match permit {
            Some(permit) => Ok(Admitted {
                permit,
                waited: started.elapsed(),
            }),
            None => {
                let state = self.inner.lock();
                Err(Refused::TimedOut {
                    max_inflight: limits.max_inflight,
                    timeout: limits.queue_timeout,
                    retry_after_secs: state.drain.retry_after_secs(state.queued(), Instant::now()),
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admission(max_inflight: usize, max_queued: usize, timeout_ms: u64) -> Admission {
        Admission::new(Limits {
            max_inflight,
            max_queued,
            queue_timeout: Duration::from_millis(timeout_ms),
        })
    }

    /// (a) 40 closed-loop clients over 8 slots and a queue of 48: every request is served,
    /// and none waits much longer than the typical one (no starvation).
    #[tokio::test]
    async fn closed_loop_clients_are_all_served_fairly() {
        const CLIENTS: u64 = 40;
        const ROUNDS: u64 = 5;
        let admission = admission(8, 48, 30_000);
        let mut tasks = Vec::new();
        for client in 0..CLIENTS {
            let admission = admission.clone();
            tasks.push(tokio::spawn(async move {
                let mut waits = Vec::new();
                for round in 0..ROUNDS {
                    let admitted = admission
                        .admit(Class::Default)
                        .await
                        .unwrap_or_else(|e| panic!("client {client} round {round}: {e}"));
                    waits.push(admitted.waited);
                    // Holds of 20–40 ms, varying by client and round; long against timer
                    // jitter, so a slow machine stretches every wait alike.
                    let hold = 20 + (client * 7 + round * 13) % 21;
                    tokio::time::sleep(Duration::from_millis(hold)).await;
                    drop(admitted.permit);
                    // Re-asks at once: the closed loop that starved others without a queue.
                }
                waits
            }));
        }
        let mut waits = Vec::new();
        for t in tasks {
            waits.extend(t.await.unwrap());
        }
        assert_eq!(waits.len() as u64, CLIENTS * ROUNDS);
        waits.sort();
        let median = waits[waits.len() / 2];
        let longest = *waits.last().unwrap();
        assert!(
            median > Duration::ZERO,
            "40 clients over 8 slots must queue"
        );
        assert!(
            longest <= median * 3,
            "longest wait {longest:?} is over 3 × the median {median:?}"
        );
        assert_eq!(admission.queued(), 0);
        assert!(admission.drain_rate().is_some_and(|r| r > 0.0));
    }

    #[tokio::test]
    async fn waiters_are_served_in_arrival_order() {
        let admission = admission(1, 10, 30_000);
        let held = admission.admit(Class::Default).await.unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut tasks = Vec::new();
        for i in 0..5 {
            let queue = admission.clone();
            let tx = tx.clone();
            tasks.push(tokio::spawn(async move {
                let a = queue.admit(Class::Default).await.unwrap();
                tx.send(i).unwrap();
                tokio::time::sleep(Duration::from_millis(2)).await;
                drop(a);
            }));
            // Each waiter is queued before the next one asks.
            while admission.queued() < i + 1 {
                tokio::task::yield_now().await;
            }
        }
        drop(held);
        for t in tasks {
            t.await.unwrap();
        }
        let order: Vec<usize> = std::iter::from_fn(|| rx.try_recv().ok()).collect();
        assert_eq!(order, [0, 1, 2, 3, 4]);
    }

    /// (b) A full queue refuses at once, with a Retry-After of at least a second.
    #[tokio::test]
    async fn full_queue_refuses_at_once() {
        let admission = admission(1, 1, 30_000);
        let _held = admission.admit(Class::Default).await.unwrap();
        let waiting = tokio::spawn({
            let admission = admission.clone();
            async move { admission.admit(Class::Default).await.map(|_| ()) }
        });
        while admission.queued() < 1 {
            tokio::task::yield_now().await;
        }
        let started = Instant::now();
        let refused = admission.admit(Class::Default).await.unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(1));
        assert!(matches!(refused, Refused::QueueFull { .. }), "{refused}");
        // No slot freed yet: no rate is known, so the lower bound.
        assert_eq!(refused.retry_after_secs(), 1);
        waiting.abort();

        // No queue at all: the old behaviour, refused at once while every slot is taken.
        let no_queue = self::admission(1, 0, 30_000);
        let _held = no_queue.admit(Class::Default).await.unwrap();
        assert!(matches!(
            no_queue.admit(Class::Default).await,
            Err(Refused::QueueFull { max_queued: 0, .. })
        ));
    }

    /// (c) A wait past the queue timeout is refused, and its place freed.
    #[tokio::test]
    async fn wait_past_the_timeout_is_refused() {
        let admission = admission(1, 4, 200);
        let _held = admission.admit(Class::Default).await.unwrap();
        let started = Instant::now();
        let refused = admission.admit(Class::Default).await.unwrap_err();
        let waited = started.elapsed();
        assert!(matches!(refused, Refused::TimedOut { .. }), "{refused}");
        assert!(waited >= Duration::from_millis(200), "{waited:?}");
        assert!(refused.retry_after_secs() >= 1);
        assert_eq!(admission.queued(), 0);
    }

    /// (d) A waiter whose future is dropped (its client went away) leaves the queue and takes
    /// no slot: the next waiter gets the freed one.
    #[tokio::test]
    async fn dropped_waiter_frees_its_place() {
        let admission = admission(1, 1, 30_000);
        let held = admission.admit(Class::Default).await.unwrap();
        let gone = tokio::spawn({
            let admission = admission.clone();
            async move { admission.admit(Class::Default).await.map(|_| ()) }
        });
        while admission.queued() < 1 {
            tokio::task::yield_now().await;
        }
        assert!(matches!(
            admission.admit(Class::Default).await,
            Err(Refused::QueueFull { .. })
        ));
        gone.abort();
        assert!(gone.await.unwrap_err().is_cancelled());
        assert_eq!(admission.queued(), 0);

        // Its place is free again, and the slot goes to the waiter after it.
        let next = tokio::spawn({
            let admission = admission.clone();
            async move { admission.admit(Class::Default).await }
        });
        while admission.queued() < 1 {
            tokio::task::yield_now().await;
        }
        drop(held);
        let admitted = tokio::time::timeout(Duration::from_secs(10), next)
            .await
            .expect("the freed slot reaches the next waiter")
            .unwrap()
            .unwrap();
        assert!(admitted.waited > Duration::ZERO);
        // One slot in all: it is held again, so another request queues.
        assert_eq!(admission.inner.lock().free, 0);
        drop(admitted);
        assert_eq!(admission.inner.lock().free, 1);
    }

    /// A waiter granted a slot in the instant its client goes away passes it on.
    #[tokio::test]
    async fn slot_granted_to_a_dropped_waiter_is_passed_on() {
        let admission = admission(1, 4, 30_000);
        let held = admission.admit(Class::Default).await.unwrap();
        // Queued, then abandoned without running again: its receiver drops unpolled.
        let mut abandoned = Box::pin(admission.admit(Class::Default));
        assert!(futures::poll!(abandoned.as_mut()).is_pending());
        let next = tokio::spawn({
            let admission = admission.clone();
            async move { admission.admit(Class::Default).await }
        });
        while admission.queued() < 2 {
            tokio::task::yield_now().await;
        }
        // The slot goes to the abandoned waiter first; dropping it sends it on.
        drop(held);
        drop(abandoned);
        let admitted = tokio::time::timeout(Duration::from_secs(10), next)
            .await
            .expect("the slot passed on")
            .unwrap()
            .unwrap();
        drop(admitted);
        assert_eq!(admission.inner.lock().free, 1);
        assert_eq!(admission.queued(), 0);
    }

    #[test]
    fn retry_after_follows_the_drain_rate() {
        let start = Instant::now();
        let mut d = DrainRate::new(start);
        assert_eq!(d.retry_after_secs(100, start), 1, "no rate known yet");
        // 10 releases a second for 30 s.
        for i in 1..=300 {
            d.record(start + Duration::from_millis(100 * i));
        }
        let now = start + Duration::from_secs(30);
        let rate = d.per_second(now).unwrap();
        assert!((rate - 10.0).abs() < 1.0, "{rate}");
        assert_eq!(d.retry_after_secs(0, now), 1);
        assert_eq!(d.retry_after_secs(49, now), 5);
        assert_eq!(d.retry_after_secs(10_000, now), 60, "clamped");
        // Nothing freed for ten minutes: the rate decays and the advice reaches its bound.
        assert_eq!(d.retry_after_secs(0, now + Duration::from_secs(600)), 60);
    }
}
