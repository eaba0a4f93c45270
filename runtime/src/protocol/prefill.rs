//! Disaggregation's wire types (DESIGN.md §4): the job a decode worker puts on the prefill
//! queue, and the notices a prefill worker sends back to the decode worker's notice address.
//!
//! A prefill worker claims a job before it computes it, so a job whose request was cancelled,
//! timed out or already served is dropped when pulled; the decode worker grants one claim per
//! request (a redelivery after the claimant died may claim again, which ends the earlier
//! claim) and accepts exactly one completion, from the claimant of the live grant, which is
//! what makes late, duplicate and forged completions harmless. The grant's generation fences
//! the claimant's KV writes: once its claim ends, its writes are refused before they land.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::protocol::SamplingParams;

/// Where a decode worker's discovery metadata carries its KV descriptor (kv-transfer's
/// `KvDescriptor`, as JSON).
pub const KV_TRANSFER_KEY: &str = "kv_transfer";

/// The two disaggregation thresholds that change at run time (the graph's `disagg` setting,
/// which the frontend's admin endpoint writes and decode workers watch).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct DisaggThresholds {
    /// Uncached prompt tokens up to which a decode worker prefills itself.
    pub max_local_prefill_length: usize,
    /// Queue length from which prefills stay local (the queue is busy enough).
    pub max_prefill_queue_size: usize,
}

/// One queued prefill.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RemotePrefillRequest {
    pub request_id: String,
    /// The decode worker's instance id: where its KV descriptor is found in discovery.
    pub decode_instance: u64,
    /// Its request-plane address for [`PrefillNotice`]s.
    pub notice_address: String,
    pub token_ids: Vec<u32>,
    /// The decode worker's blocks for the whole prompt, in sequence order.
    pub dst_block_ids: Vec<u32>,
    /// Leading blocks the decode worker already holds: they are not written.
    pub cached_block_count: usize,
    pub sampling: SamplingParams,
}

/// A prefill worker's word to the decode worker about one job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum PrefillNotice {
    /// "I am about to compute this; may I write into your blocks?" `delivery` is the queue's
    /// delivery count of the job.
    Claim { request_id: String, delivery: u64 },
    /// The blocks are written; `first_token` was sampled with the request's parameters.
    /// `token` is the claim's [`ClaimGrant::token`]: only the live claimant can settle a job.
    Done {
        request_id: String,
        #[serde(default)]
        token: String,
        first_token: u32,
        logprob: f32,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        top_logprobs: Vec<(u32, f32)>,
        /// How the KV moved: backend name, bytes and seconds, for the decode worker's metrics.
        backend: String,
        bytes: u64,
        seconds: f64,
    },
    /// The prefill could not be done (refused, layout mismatch, transfer error): prefill
    /// locally now.
    Failed {
        request_id: String,
        #[serde(default)]
        token: String,
        reason: String,
    },
}

impl PrefillNotice {
    pub fn request_id(&self) -> &str {
        match self {
            PrefillNotice::Claim { request_id, .. }
            | PrefillNotice::Done { request_id, .. }
            | PrefillNotice::Failed { request_id, .. } => request_id,
        }
    }
}

/// The decode worker's answer to a notice.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NoticeReply {
    pub accepted: bool,
    /// Why not, when refused (cancelled, timed out, already served, not the claimant).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// What an accepted claim is granted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grant: Option<ClaimGrant>,
}

impl NoticeReply {
    pub fn refused(reason: impl Into<String>) -> NoticeReply {
        NoticeReply {
            accepted: false,
            reason: Some(reason.into()),
            grant: None,
        }
    }

    pub fn accepted() -> NoticeReply {
        NoticeReply {
            accepted: true,
            reason: None,
            grant: None,
        }
    }
}

/// What the claimant of a job is granted: the generation its KV writes must present (the
/// decode worker's fence refuses any other), and the token its `Done`/`Failed` must carry.
/// Both end with the claim; the token is random, so a NATS publisher that is not the claimant
/// cannot settle the request.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClaimGrant {
    pub generation: u64,
    pub token: String,
}

impl std::fmt::Debug for ClaimGrant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClaimGrant")
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

/// Upper bounds (seconds) of the KV-transfer time histogram.
pub const TRANSFER_SECONDS_BUCKETS: [f64; 10] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];

/// A decode worker's disaggregation counters since start, carried in its load report.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PrefillCounters {
    pub local: u64,
    pub remote: u64,
    /// Remote prefills given up on, by reason: `timeout`, `failed`, `queue_full`.
    pub fallbacks: BTreeMap<String, u64>,
    /// The prefill queue's length as this worker last saw it.
    pub queue_length: u64,
    /// KV bytes written into this worker's cache, by backend.
    pub transfer_bytes: BTreeMap<String, u64>,
    /// Transfer-time histogram: counts per [`TRANSFER_SECONDS_BUCKETS`] bound (not cumulative,
    /// the last entry for longer ones), their sum and count.
    pub transfer_buckets: Vec<u64>,
    pub transfer_seconds_sum: f64,
    pub transfers: u64,
    /// KV writes refused by this worker's fence: their claim had ended (expired, cancelled,
    /// taken over) or was never granted. Each is a late writer kept out of another request's
    /// blocks.
    #[serde(default)]
    pub refused_writes: u64,
}

impl PrefillCounters {
    pub fn record_transfer(&mut self, backend: &str, bytes: u64, seconds: f64) {
        *self.transfer_bytes.entry(backend.to_string()).or_default() += bytes;
        if self.transfer_buckets.len() != TRANSFER_SECONDS_BUCKETS.len() + 1 {
            self.transfer_buckets = vec![0; TRANSFER_SECONDS_BUCKETS.len() + 1];
        }
        let slot = TRANSFER_SECONDS_BUCKETS
            .iter()
            .position(|&b| seconds <= b)
            .unwrap_or(TRANSFER_SECONDS_BUCKETS.len());
        self.transfer_buckets[slot] += 1;
        self.transfer_seconds_sum += seconds;
        self.transfers += 1;
    }

    pub fn fallback(&mut self, reason: &str) {
        *self.fallbacks.entry(reason.to_string()).or_default() += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notices_round_trip_and_transfers_land_in_their_bucket() {
        let n = PrefillNotice::Done {
            request_id: "r".into(),
            token: "t".into(),
            first_token: 5,
            logprob: -0.25,
            top_logprobs: vec![],
            backend: "shm".into(),
            bytes: 10,
            seconds: 0.003,
        };
        let back: PrefillNotice = serde_json::from_slice(&serde_json::to_vec(&n).unwrap()).unwrap();
        assert_eq!(back, n);
        let mut c = PrefillCounters::default();
        c.record_transfer("shm", 10, 0.003);
        c.record_transfer("shm", 5, 7.0);
        assert_eq!(c.transfer_bytes["shm"], 15);
        assert_eq!(c.transfer_buckets[3], 1, "0.003 ≤ 0.005");
        assert_eq!(
            *c.transfer_buckets.last().unwrap(),
            1,
            "beyond the last bound"
        );
        assert_eq!(c.transfers, 2);
    }
}
