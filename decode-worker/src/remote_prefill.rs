//! The decode worker's side of a remote prefill: the table of requests waiting for one, the
//! notices prefill workers send about them (claim, done, failed), and the wait of each request
//! with its fallbacks. Nothing here may hang a request or leak a block:
//! - a job nobody claims within the timeout, or a claim not completed within it, is prefilled
//!   locally (the reservation is freed first, so a late writer is refused before it writes);
//! - a completion is accepted once, from the claimant; late and duplicate ones are refused;
//! - a prefill worker's failure report sends the request to local prefill at once;
//! - a cancelled request frees its blocks at once when unclaimed, and otherwise as soon as the
//!   claimant finishes (or its claim expires), since it may be writing into them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use engine::SampledToken;
use runtime::protocol::{NoticeReply, PrefillCounters, PrefillNotice};
use tokio::sync::oneshot;

/// How a remote prefill ended, as the waiting request learns it.
#[derive(Debug)]
pub enum Outcome {
    Done {
        first: SampledToken,
        backend: String,
        bytes: u64,
        seconds: f64,
    },
    Failed(String),
}

struct Entry {
    /// The delivery that claimed it, and when.
    claimed: Option<(u64, Instant)>,
    cancelled: bool,
    outcome: oneshot::Sender<Outcome>,
}

/// What a request's deadline found.
#[derive(Debug, PartialEq, Eq)]
pub enum Expiry {
    /// Given up: removed from the table, no writer may touch its blocks any more.
    Expired,
    /// Claimed recently: wait until then.
    WaitUntil(Instant),
    /// Already settled; the outcome is on its way.
    Settled,
}

#[derive(Default)]
pub struct RemotePrefills {
    entries: Mutex<HashMap<String, Entry>>,
}

impl RemotePrefills {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts waiting for `request_id`'s prefill.
    pub fn open(&self, request_id: &str) -> oneshot::Receiver<Outcome> {
        let (outcome, rx) = oneshot::channel();
        self.lock().insert(
            request_id.to_string(),
            Entry {
                claimed: None,
                cancelled: false,
                outcome,
            },
        );
        rx
    }

    /// Forgets `request_id` (its job could not be queued).
    pub fn remove(&self, request_id: &str) {
        self.lock().remove(request_id);
    }

    /// Whether a request is still waiting (for tests and metrics).
    pub fn waiting(&self) -> usize {
        self.lock().len()
    }

    /// Answers a prefill worker.
    pub fn notice(&self, notice: PrefillNotice) -> NoticeReply {
        let refuse = |reason: &str| NoticeReply {
            accepted: false,
            reason: Some(reason.to_string()),
        };
        let accept = NoticeReply {
            accepted: true,
            reason: None,
        };
        let mut entries = self.lock();
        let id = notice.request_id().to_string();
        let Some(entry) = entries.get_mut(&id) else {
            return refuse("not waiting for a prefill (cancelled, timed out, or served)");
        };
        match notice {
            PrefillNotice::Claim { delivery, .. } => {
                if entry.cancelled {
                    return refuse("cancelled");
                }
                match entry.claimed {
                    // A redelivery means the earlier claimant's job was given up on by the
                    // queue (it died or stalled past ack_wait): the new one may write.
                    Some((by, _)) if by >= delivery => refuse("claimed by another delivery"),
                    _ => {
                        entry.claimed = Some((delivery, Instant::now()));
                        accept
                    }
                }
            }
            PrefillNotice::Done {
                first_token,
                logprob,
                top_logprobs,
                backend,
                bytes,
                seconds,
                ..
            } => {
                if entry.claimed.is_none() {
                    return refuse("not claimed");
                }
                let entry = entries.remove(&id).expect("present");
                let _ = entry.outcome.send(Outcome::Done {
                    first: SampledToken {
                        token: first_token,
                        logprob,
                        top_logprobs,
                    },
                    backend,
                    bytes,
                    seconds,
                });
                accept
            }
            PrefillNotice::Failed { reason, .. } => {
                let entry = entries.remove(&id).expect("present");
                let _ = entry.outcome.send(Outcome::Failed(reason));
                accept
            }
        }
    }

    /// The request's deadline passed: give up unless a claim is younger than `timeout`.
    pub fn expire(&self, request_id: &str, timeout: Duration) -> Expiry {
        let mut entries = self.lock();
        let Some(entry) = entries.get(request_id) else {
            return Expiry::Settled;
        };
        if let Some((_, at)) = entry.claimed {
            if at.elapsed() < timeout {
                return Expiry::WaitUntil(at + timeout);
            }
        }
        entries.remove(request_id);
        Expiry::Expired
    }

    /// The client went away. True when nobody claimed the job: it is forgotten and its
    /// blocks may be freed now. False when a prefill worker holds it: the request waits for
    /// that worker's outcome (or the claim's expiry) before freeing what it may be writing.
    pub fn cancel(&self, request_id: &str) -> bool {
        let mut entries = self.lock();
        match entries.get_mut(request_id) {
            Some(entry) if entry.claimed.is_some() => {
                entry.cancelled = true;
                false
            }
            Some(_) => {
                entries.remove(request_id);
                true
            }
            None => false,
        }
    }
}

/// Records a finished transfer in the worker's counters.
pub fn record(counters: &Mutex<PrefillCounters>, f: impl FnOnce(&mut PrefillCounters)) {
    f(&mut counters.lock().unwrap_or_else(|e| e.into_inner()));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(id: &str, delivery: u64) -> PrefillNotice {
        PrefillNotice::Claim {
            request_id: id.into(),
            delivery,
        }
    }

    fn done(id: &str) -> PrefillNotice {
        PrefillNotice::Done {
            request_id: id.into(),
            first_token: 9,
            logprob: -1.0,
            top_logprobs: vec![],
            backend: "memory".into(),
            bytes: 1,
            seconds: 0.0,
        }
    }

    #[test]
    fn one_claim_one_completion_and_nothing_after() {
        let t = RemotePrefills::new();
        let mut rx = t.open("r");
        assert!(!t.notice(done("r")).accepted, "a completion needs a claim");
        assert!(t.notice(claim("r", 1)).accepted);
        assert!(!t.notice(claim("r", 1)).accepted, "same delivery twice");
        assert!(
            t.notice(claim("r", 2)).accepted,
            "a redelivery may take over"
        );
        assert!(t.notice(done("r")).accepted);
        assert!(!t.notice(done("r")).accepted, "duplicate");
        assert!(!t.notice(claim("r", 3)).accepted, "served");
        assert!(matches!(rx.try_recv(), Ok(Outcome::Done { .. })));
        assert_eq!(t.waiting(), 0);
    }

    #[test]
    fn an_unclaimed_job_expires_a_claimed_one_waits_for_its_claim_to_age() {
        let t = RemotePrefills::new();
        let _rx = t.open("a");
        assert_eq!(t.expire("a", Duration::from_secs(5)), Expiry::Expired);
        assert!(
            !t.notice(claim("a", 1)).accepted,
            "a claim after the expiry is refused"
        );

        let _rx = t.open("b");
        assert!(t.notice(claim("b", 1)).accepted);
        assert!(matches!(
            t.expire("b", Duration::from_secs(5)),
            Expiry::WaitUntil(_)
        ));
        assert_eq!(t.expire("b", Duration::ZERO), Expiry::Expired);
        assert_eq!(t.expire("b", Duration::ZERO), Expiry::Settled);
    }

    #[test]
    fn cancel_frees_at_once_only_when_unclaimed() {
        let t = RemotePrefills::new();
        let _a = t.open("a");
        assert!(t.cancel("a"));
        assert!(!t.notice(claim("a", 1)).accepted, "dropped when pulled");
        let mut b = t.open("b");
        assert!(t.notice(claim("b", 1)).accepted);
        assert!(!t.cancel("b"), "its claimant may be writing");
        assert!(
            !t.notice(claim("b", 2)).accepted,
            "no new claim after a cancel"
        );
        assert!(
            t.notice(done("b")).accepted,
            "the claimant's completion is taken"
        );
        assert!(matches!(b.try_recv(), Ok(Outcome::Done { .. })));
    }

    #[test]
    fn a_failure_report_settles_at_once() {
        let t = RemotePrefills::new();
        let mut rx = t.open("r");
        let failed = PrefillNotice::Failed {
            request_id: "r".into(),
            reason: "layout".into(),
        };
        assert!(t.notice(failed).accepted);
        assert!(matches!(rx.try_recv(), Ok(Outcome::Failed(r)) if r == "layout"));
    }
}
