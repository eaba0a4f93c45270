//! The decode worker's side of a remote prefill: the table of requests waiting for one, the
//! notices prefill workers send about them (claim, done, failed), and the wait of each request
//! with its fallbacks. Nothing here may hang a request, leak a block or let a stray write land:
//! - a claim is granted the request's blocks in the KV sink's fence table under a fresh
//!   generation, with a random token; the claimant's writes present the generation, its
//!   `Done`/`Failed` the token, and nothing else is accepted (a forged or stale notice is
//!   refused, a `Done` whose token is outside the vocabulary sends the request to local
//!   prefill instead of poisoning the batch);
//! - a redelivered job may claim again (its earlier claimant stalled or died): the new grant
//!   ends the old one, unless the old claimant is in mid-copy, in which case the claim is
//!   refused and the request falls back on its timeout;
//! - a job nobody claims within the timeout, or a claim not completed within it, is prefilled
//!   locally; a failure report sends the request to local prefill at once; a cancelled
//!   request is dropped from the table at once. In every case the engine thread closes the
//!   grant before it frees or reuses the blocks (`engine_host.rs`), so a late writer is
//!   refused before it writes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use engine::SampledToken;
use kv_transfer::KvFences;
use runtime::protocol::{ClaimGrant, NoticeReply, PrefillCounters, PrefillNotice};
use subtle::ConstantTimeEq;
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

/// The live claim of a job.
struct Claim {
    delivery: u64,
    at: Instant,
    token: String,
}

struct Entry {
    /// The blocks a claimant writes: the prompt's blocks past those cached here.
    blocks: Vec<u32>,
    claim: Option<Claim>,
    outcome: oneshot::Sender<Outcome>,
}

/// What a request's deadline found.
#[derive(Debug, PartialEq, Eq)]
pub enum Expiry {
    /// Given up: removed from the table; the engine closes the grant before freeing.
    Expired,
    /// Claimed recently: wait until then.
    WaitUntil(Instant),
    /// Already settled; the outcome is on its way.
    Settled,
}

pub struct RemotePrefills {
    entries: Mutex<HashMap<String, Entry>>,
    fences: KvFences,
    vocab_size: usize,
}

fn new_token() -> String {
    let bytes: [u8; 16] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl RemotePrefills {
    /// A table granting blocks in `fences`; a `Done` must name a token below `vocab_size`.
    pub fn new(fences: KvFences, vocab_size: usize) -> Arc<Self> {
        Arc::new(Self {
            entries: Mutex::default(),
            fences,
            vocab_size,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        // Every update below is a single insert, remove or field write: a panic elsewhere
        // cannot leave an entry half-made, so a poisoned lock is still consistent.
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts waiting for `request_id`'s prefill into `blocks`.
    pub fn open(&self, request_id: &str, blocks: Vec<u32>) -> oneshot::Receiver<Outcome> {
        let (outcome, rx) = oneshot::channel();
        self.lock().insert(
            request_id.to_string(),
            Entry {
                blocks,
                claim: None,
                outcome,
            },
        );
        rx
    }

    /// Forgets `request_id`: its job could not be queued, or its client went away. Any claim
    /// ends with it (the engine closes the grant before freeing the blocks).
    pub fn remove(&self, request_id: &str) {
        self.lock().remove(request_id);
    }

    /// Whether a request is still waiting (for tests and metrics).
    pub fn waiting(&self) -> usize {
        self.lock().len()
    }

    /// Answers a prefill worker.
    pub fn notice(&self, notice: PrefillNotice) -> NoticeReply {
        let mut entries = self.lock();
        let id = notice.request_id().to_string();
        let Some(entry) = entries.get_mut(&id) else {
            return NoticeReply::refused(
                "not waiting for a prefill (cancelled, timed out, or served)",
            );
        };
        let is_claimant = |token: &str| {
            entry
                .claim
                .as_ref()
                .is_some_and(|c| bool::from(c.token.as_bytes().ct_eq(token.as_bytes())))
        };
        match notice {
            PrefillNotice::Claim { delivery, .. } => {
                if let Some(claim) = &entry.claim {
                    // A redelivery means the earlier claimant's job was given up on by the
                    // queue (it died or stalled past ack_wait): the new one may write.
                    if claim.delivery >= delivery {
                        return NoticeReply::refused("claimed by another delivery");
                    }
                }
                let generation = match self.fences.grant(&entry.blocks) {
                    Ok(g) => g,
                    Err(e) => return NoticeReply::refused(format!("cannot grant the blocks: {e}")),
                };
                let token = new_token();
                entry.claim = Some(Claim {
                    delivery,
                    at: Instant::now(),
                    token: token.clone(),
                });
                NoticeReply {
                    grant: Some(ClaimGrant { generation, token }),
                    ..NoticeReply::accepted()
                }
            }
            PrefillNotice::Done {
                token,
                first_token,
                logprob,
                top_logprobs,
                backend,
                bytes,
                seconds,
                ..
            } => {
                if !is_claimant(&token) {
                    return NoticeReply::refused("not from the claimant of this job");
                }
                let entry = entries.remove(&id).expect("present");
                let vocab = self.vocab_size;
                let outside = std::iter::once(first_token)
                    .chain(top_logprobs.iter().map(|&(t, _)| t))
                    .find(|&t| t as usize >= vocab);
                if let Some(token) = outside {
                    let reason =
                        format!("token {token} is outside the vocabulary of {vocab} tokens");
                    let _ = entry.outcome.send(Outcome::Failed(reason.clone()));
                    return NoticeReply::refused(reason);
                }
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
                NoticeReply::accepted()
            }
            PrefillNotice::Failed { token, reason, .. } => {
                if !is_claimant(&token) {
                    return NoticeReply::refused("not from the claimant of this job");
                }
                let entry = entries.remove(&id).expect("present");
                let _ = entry.outcome.send(Outcome::Failed(reason));
                NoticeReply::accepted()
            }
        }
    }

    /// The request's deadline passed: give up unless a claim is younger than `timeout`.
    pub fn expire(&self, request_id: &str, timeout: Duration) -> Expiry {
        let mut entries = self.lock();
        let Some(entry) = entries.get(request_id) else {
            return Expiry::Settled;
        };
        if let Some(claim) = &entry.claim {
            if claim.at.elapsed() < timeout {
                return Expiry::WaitUntil(claim.at + timeout);
            }
        }
        entries.remove(request_id);
        Expiry::Expired
    }
}

/// Records a finished transfer in the worker's counters.
pub fn record(counters: &Mutex<PrefillCounters>, f: impl FnOnce(&mut PrefillCounters)) {
    f(&mut counters.lock().unwrap_or_else(|e| e.into_inner()));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> Arc<RemotePrefills> {
        RemotePrefills::new(KvFences::in_process(8).unwrap(), 100)
    }

    fn claim(id: &str, delivery: u64) -> PrefillNotice {
        PrefillNotice::Claim {
            request_id: id.into(),
            delivery,
        }
    }

    fn done_with(id: &str, token: &str, first_token: u32) -> PrefillNotice {
        PrefillNotice::Done {
            request_id: id.into(),
            token: token.into(),
            first_token,
            logprob: -1.0,
            top_logprobs: vec![],
            backend: "memory".into(),
            bytes: 1,
            seconds: 0.0,
        }
    }

    fn granted(reply: NoticeReply) -> ClaimGrant {
        assert!(reply.accepted, "{reply:?}");
        reply.grant.expect("an accepted claim carries a grant")
    }

    #[test]
    fn one_claim_one_completion_and_nothing_after() {
        let t = table();
        let mut rx = t.open("r", vec![1, 2]);
        assert!(
            !t.notice(done_with("r", "", 9)).accepted,
            "a completion needs a claim"
        );
        let first = granted(t.notice(claim("r", 1)));
        assert!(t.fences.is_granted(1, first.generation));
        assert!(!t.notice(claim("r", 1)).accepted, "same delivery twice");
        let second = granted(t.notice(claim("r", 2)));
        assert!(second.generation > first.generation);
        assert!(
            !t.fences.is_granted(2, first.generation),
            "a redelivery's grant ends the earlier one"
        );
        assert!(
            !t.notice(done_with("r", &first.token, 9)).accepted,
            "the earlier claimant cannot settle"
        );
        assert!(t.notice(done_with("r", &second.token, 9)).accepted);
        assert!(
            !t.notice(done_with("r", &second.token, 9)).accepted,
            "duplicate"
        );
        assert!(!t.notice(claim("r", 3)).accepted, "served");
        assert!(matches!(rx.try_recv(), Ok(Outcome::Done { .. })));
        assert_eq!(t.waiting(), 0);
    }

    #[test]
    fn a_forged_notice_is_refused_and_the_claimant_still_settles() {
        let t = table();
        let mut rx = t.open("r", vec![3]);
        let grant = granted(t.notice(claim("r", 1)));
        for forged in ["", "0000", &grant.token[1..]] {
            assert!(!t.notice(done_with("r", forged, 9)).accepted, "{forged:?}");
            let failed = PrefillNotice::Failed {
                request_id: "r".into(),
                token: forged.into(),
                reason: "forged".into(),
            };
            assert!(!t.notice(failed).accepted, "{forged:?}");
        }
        assert!(rx.try_recv().is_err(), "nothing settled");
        assert!(t.notice(done_with("r", &grant.token, 9)).accepted);
        assert!(matches!(rx.try_recv(), Ok(Outcome::Done { first, .. }) if first.token == 9));
    }

    #[test]
    fn a_first_token_outside_the_vocabulary_sends_the_request_to_local_prefill() {
        let t = table();
        let mut rx = t.open("r", vec![3]);
        let grant = granted(t.notice(claim("r", 1)));
        let reply = t.notice(done_with("r", &grant.token, 100));
        assert!(!reply.accepted);
        assert!(reply.reason.unwrap().contains("vocabulary of 100"));
        assert!(matches!(rx.try_recv(), Ok(Outcome::Failed(r)) if r.contains("token 100")));
        assert_eq!(t.waiting(), 0);
    }

    #[test]
    fn an_unclaimed_job_expires_a_claimed_one_waits_for_its_claim_to_age() {
        let t = table();
        let _rx = t.open("a", vec![0]);
        assert_eq!(t.expire("a", Duration::from_secs(5)), Expiry::Expired);
        assert!(
            !t.notice(claim("a", 1)).accepted,
            "a claim after the expiry is refused"
        );

        let _rx = t.open("b", vec![1]);
        granted(t.notice(claim("b", 1)));
        assert!(matches!(
            t.expire("b", Duration::from_secs(5)),
            Expiry::WaitUntil(_)
        ));
        assert_eq!(t.expire("b", Duration::ZERO), Expiry::Expired);
        assert_eq!(t.expire("b", Duration::ZERO), Expiry::Settled);
    }

    #[test]
    fn a_removed_request_takes_no_claim_and_no_completion() {
        let t = table();
        let _a = t.open("a", vec![0]);
        let grant = granted(t.notice(claim("a", 1)));
        t.remove("a");
        assert!(!t.notice(claim("a", 2)).accepted, "dropped when pulled");
        assert!(!t.notice(done_with("a", &grant.token, 1)).accepted);
    }

    #[test]
    fn a_takeover_is_refused_while_the_earlier_claimant_copies() {
        let t = table();
        let _rx = t.open("r", vec![5]);
        let first = granted(t.notice(claim("r", 1)));
        let hold = t.fences.acquire(5, first.generation).unwrap();
        let reply = t.notice(claim("r", 2));
        assert!(!reply.accepted && reply.reason.unwrap().contains("grant"));
        drop(hold);
        granted(t.notice(claim("r", 3)));
    }

    #[test]
    fn a_failure_report_settles_at_once() {
        let t = table();
        let mut rx = t.open("r", vec![]);
        let grant = granted(t.notice(claim("r", 1)));
        let failed = PrefillNotice::Failed {
            request_id: "r".into(),
            token: grant.token,
            reason: "layout".into(),
        };
        assert!(t.notice(failed).accepted);
        assert!(matches!(rx.try_recv(), Ok(Outcome::Failed(r)) if r == "layout"));
    }
}
