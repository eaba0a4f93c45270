//! In-process work queue: the prefill queue of `baton serve` in one process, with JetStream's
//! semantics (one consumer group, explicit ack, redelivery after `ack_wait`) so the
//! disaggregation code path is the same with or without NATS. Expired deliveries are reclaimed
//! lazily by every call rather than by timers: a waiting `next` sleeps until the earliest
//! deadline, so nothing is late and no task outlives the queue.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::{Acker, Job, WorkQueue, WorkQueueError};

struct Entry {
    id: u64,
    payload: Vec<u8>,
    /// How many times it has been handed out.
    deliveries: u64,
}

#[derive(Default)]
struct State {
    next_id: u64,
    ready: VecDeque<Entry>,
    /// Handed out and not yet settled, with the instant it comes back.
    in_flight: HashMap<u64, (Entry, Instant)>,
    closed: bool,
}

impl State {
    /// Moves deliveries whose `ack_wait` has passed back to the front of the queue, oldest
    /// first (JetStream also redelivers before handing out newer messages).
    fn reclaim(&mut self, now: Instant) {
        let mut expired: Vec<u64> = self
            .in_flight
            .iter()
            .filter(|(_, (_, deadline))| *deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        expired.sort_unstable_by(|a, b| b.cmp(a));
        for id in expired {
            if let Some((entry, _)) = self.in_flight.remove(&id) {
                self.ready.push_front(entry);
            }
        }
    }
}

struct Inner {
    state: Mutex<State>,
    /// Woken on enqueue, nak and close.
    changed: Notify,
    ack_wait: Duration,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Every critical section is a handful of collection moves that cannot panic halfway,
        // so a poisoned lock still guards consistent state.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The in-process queue; clones share it.
#[derive(Clone)]
pub struct MemoryWorkQueue {
    inner: Arc<Inner>,
}

impl MemoryWorkQueue {
    /// `ack_wait`: how long a delivery may stay unsettled before it is handed out again.
    pub fn new(ack_wait: Duration) -> Self {
        Self {
            inner: Arc::new(Inner {
                state: Mutex::new(State::default()),
                changed: Notify::new(),
                ack_wait,
            }),
        }
    }

    /// Stops the queue: waiting and later `next` calls return `None`, `enqueue` fails.
    pub fn close(&self) {
        self.inner.lock().closed = true;
        self.inner.changed.notify_waiters();
    }
}

#[async_trait]
impl WorkQueue for MemoryWorkQueue {
    async fn enqueue(&self, payload: Vec<u8>) -> Result<(), WorkQueueError> {
        {
            let mut state = self.inner.lock();
            if state.closed {
                return Err(WorkQueueError::Closed);
            }
            state.next_id += 1;
            let id = state.next_id;
            state.ready.push_back(Entry {
                id,
                payload,
                deliveries: 0,
            });
        }
        self.inner.changed.notify_waiters();
        Ok(())
    }

    async fn next(&self) -> Result<Option<Job>, WorkQueueError> {
        loop {
            // Registered before looking at the state, so a change between the look and the
            // wait still wakes us.
            let changed = self.inner.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let wake_at = {
                let mut state = self.inner.lock();
                if state.closed {
                    return Ok(None);
                }
                let now = Instant::now();
                state.reclaim(now);
                if let Some(mut entry) = state.ready.pop_front() {
                    entry.deliveries += 1;
                    let acker = MemoryAcker {
                        inner: self.inner.clone(),
                        id: entry.id,
                        delivery: entry.deliveries,
                    };
                    let job = Job::new(entry.payload.clone(), entry.deliveries, acker);
                    let deadline = now + self.inner.ack_wait;
                    state.in_flight.insert(entry.id, (entry, deadline));
                    return Ok(Some(job));
                }
                state.in_flight.values().map(|(_, d)| *d).min()
            };
            match wake_at {
                Some(at) => {
                    tokio::select! {
                        _ = changed => {}
                        _ = tokio::time::sleep_until(at) => {}
                    }
                }
                None => changed.await,
            }
        }
    }

    /// Also counts deliveries whose `ack_wait` passed (they wait for their redelivery here);
    /// JetStream keeps those under ack-pending instead, so the two differ only after a worker
    /// died holding a job.
    async fn pending(&self) -> Result<u64, WorkQueueError> {
        let mut state = self.inner.lock();
        state.reclaim(Instant::now());
        Ok(state.ready.len() as u64)
    }
}

struct MemoryAcker {
    inner: Arc<Inner>,
    id: u64,
    delivery: u64,
}

#[async_trait]
impl Acker for MemoryAcker {
    /// Removes the job wherever it is: even after `ack_wait` passed, the work is done, and
    /// dropping a pending redelivery saves doing it twice (JetStream accepts late acks too).
    async fn ack(self: Box<Self>) -> Result<(), WorkQueueError> {
        let mut state = self.inner.lock();
        if state.in_flight.remove(&self.id).is_none() {
            state.ready.retain(|e| e.id != self.id);
        }
        Ok(())
    }

    /// Requeues at the front, unless this delivery already expired and the job moved on.
    async fn nak(self: Box<Self>) -> Result<(), WorkQueueError> {
        {
            let mut state = self.inner.lock();
            let current = matches!(state.in_flight.get(&self.id),
                                   Some((e, _)) if e.deliveries == self.delivery);
            if !current {
                return Ok(());
            }
            if let Some((entry, _)) = state.in_flight.remove(&self.id) {
                state.ready.push_front(entry);
            }
        }
        self.inner.changed.notify_waiters();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WAIT: Duration = Duration::from_millis(200);

    async fn next_within(q: &MemoryWorkQueue, limit: Duration) -> Option<Job> {
        tokio::time::timeout(limit, q.next())
            .await
            .ok()
            .and_then(|r| r.expect("memory queue does not fail"))
    }

    #[tokio::test]
    async fn expired_jobs_count_as_pending_again() {
        let q = MemoryWorkQueue::new(WAIT);
        q.enqueue(b"job".to_vec()).await.unwrap();
        let _held = q.next().await.unwrap().unwrap();
        assert_eq!(q.pending().await.unwrap(), 0);
        tokio::time::sleep(WAIT + Duration::from_millis(50)).await;
        assert_eq!(q.pending().await.unwrap(), 1);
    }

    #[tokio::test]
    async fn nak_gives_the_job_back_at_once_ahead_of_newer_jobs() {
        let q = MemoryWorkQueue::new(Duration::from_secs(60));
        q.enqueue(b"first".to_vec()).await.unwrap();
        q.enqueue(b"second".to_vec()).await.unwrap();
        let first = q.next().await.unwrap().unwrap();
        first.nak().await.unwrap();
        let again = next_within(&q, Duration::from_millis(100))
            .await
            .expect("nak requeues without waiting for ack_wait");
        assert_eq!(
            (again.payload.as_slice(), again.delivery),
            (&b"first"[..], 2)
        );
    }

    #[tokio::test]
    async fn a_waiting_worker_wakes_on_enqueue_and_each_job_goes_to_one_worker() {
        let q = MemoryWorkQueue::new(Duration::from_secs(60));
        let workers: Vec<_> = (0..2)
            .map(|_| {
                let q = q.clone();
                tokio::spawn(async move { q.next().await.unwrap().unwrap().payload })
            })
            .collect();
        tokio::task::yield_now().await;
        q.enqueue(b"x".to_vec()).await.unwrap();
        q.enqueue(b"y".to_vec()).await.unwrap();
        let mut got = Vec::new();
        for w in workers {
            got.push(
                tokio::time::timeout(Duration::from_secs(1), w)
                    .await
                    .unwrap()
                    .unwrap(),
            );
        }
        got.sort();
        assert_eq!(got, vec![b"x".to_vec(), b"y".to_vec()]);
    }

    #[tokio::test]
    async fn close_ends_waiting_workers_and_refuses_new_jobs() {
        let q = MemoryWorkQueue::new(WAIT);
        let waiting = tokio::spawn({
            let q = q.clone();
            async move { q.next().await.unwrap().is_none() }
        });
        tokio::task::yield_now().await;
        q.close();
        assert!(tokio::time::timeout(Duration::from_secs(1), waiting)
            .await
            .unwrap()
            .unwrap());
        assert!(matches!(
            q.enqueue(b"late".to_vec()).await,
            Err(WorkQueueError::Closed)
        ));
    }
}
