//! Conditional disaggregation: the seed's rule for where a prompt is prefilled, with the two
//! thresholds that change at run time (the frontend's admin endpoint writes them to the graph's
//! `disagg` setting in discovery; every decode worker watches it).
//!
//! `remote = remote_prefill && (!conditional || (prompt_len − prefix_hit_len >
//! max_local_prefill_length && queue_len < max_prefill_queue_size))`

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use runtime::discovery::{setting_key, Discovery};

/// The name of the graph setting that carries [`DisaggThresholds`].
pub const DISAGG_SETTING: &str = "disagg";

/// Where the setting of `namespace` lives in discovery.
pub fn disagg_setting_key(namespace: &str) -> String {
    setting_key(namespace, DISAGG_SETTING)
}

pub use runtime::protocol::DisaggThresholds;

#[derive(Clone, Debug)]
pub struct DisaggConfig {
    pub remote_prefill: bool,
    pub conditional: bool,
    pub thresholds: DisaggThresholds,
    /// How long a queued job may wait for a prefill worker's claim, and a claimed one for its
    /// completion, before the decode worker prefills it itself.
    pub remote_prefill_timeout: Duration,
}

impl Default for DisaggConfig {
    fn default() -> Self {
        Self {
            remote_prefill: false,
            conditional: true,
            thresholds: DisaggThresholds {
                max_local_prefill_length: 1000,
                max_prefill_queue_size: 2,
            },
            remote_prefill_timeout: Duration::from_secs(30),
        }
    }
}

/// Where a prompt is prefilled, and why when it is not remote although it could be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    Local,
    Remote,
    /// Long enough to go remote, but the queue is full.
    LocalQueueFull,
}

impl DisaggConfig {
    pub fn place(&self, prompt_len: usize, prefix_hit_len: usize, queue_len: u64) -> Placement {
        if !self.remote_prefill {
            return Placement::Local;
        }
        if !self.conditional {
            return Placement::Remote;
        }
        let uncached = prompt_len.saturating_sub(prefix_hit_len);
        if uncached <= self.thresholds.max_local_prefill_length {
            Placement::Local
        } else if queue_len < self.thresholds.max_prefill_queue_size as u64 {
            Placement::Remote
        } else {
            Placement::LocalQueueFull
        }
    }
}

/// The live rule a decode worker consults for each request: its config, the thresholds as
/// last set, and the prefill queue's length as last seen (plus what this worker enqueued since).
pub struct DisaggState {
    config: RwLock<DisaggConfig>,
    queue_len: AtomicU64,
}

impl DisaggState {
    pub fn new(config: DisaggConfig) -> Arc<Self> {
        Arc::new(Self {
            config: RwLock::new(config),
            queue_len: AtomicU64::new(0),
        })
    }

    pub fn config(&self) -> DisaggConfig {
        self.config
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn set_thresholds(&self, t: DisaggThresholds) {
        self.config
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .thresholds = t;
    }

    pub fn queue_len(&self) -> u64 {
        self.queue_len.load(Ordering::Relaxed)
    }

    pub fn set_queue_len(&self, n: u64) {
        self.queue_len.store(n, Ordering::Relaxed);
    }

    /// Decides for one prompt; a remote placement counts as queued at once, so a burst of
    /// requests between two queue polls does not overfill the queue.
    pub fn place(&self, prompt_len: usize, prefix_hit_len: usize) -> Placement {
        let placement = self
            .config()
            .place(prompt_len, prefix_hit_len, self.queue_len());
        if placement == Placement::Remote {
            self.queue_len.fetch_add(1, Ordering::Relaxed);
        }
        placement
    }
}

/// Follows the graph's `disagg` setting: each valid put replaces the thresholds.
pub async fn follow_thresholds(
    state: Arc<DisaggState>,
    discovery: Arc<dyn Discovery>,
    namespace: String,
) {
    let key = disagg_setting_key(&namespace);
    let mut rx = match discovery.watch_setting(&key).await {
        Ok(rx) => rx,
        Err(e) => {
            tracing::warn!("cannot watch `{key}`; the disaggregation thresholds stay fixed: {e}");
            return;
        }
    };
    loop {
        match rx.borrow_and_update().clone() {
            None => {}
            // serde would also read `[1, 2]` as the two thresholds in order.
            Some(value) if !value.is_object() => {
                tracing::warn!("ignoring `{key}`: {value} is not an object of thresholds")
            }
            Some(value) => match serde_json::from_value::<DisaggThresholds>(value) {
                Ok(t) => {
                    tracing::info!(?t, "disaggregation thresholds updated");
                    state.set_thresholds(t);
                }
                Err(e) => tracing::warn!("ignoring `{key}`: {e}"),
            },
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(remote: bool, conditional: bool) -> DisaggConfig {
        DisaggConfig {
            remote_prefill: remote,
            conditional,
            thresholds: DisaggThresholds {
                max_local_prefill_length: 10,
                max_prefill_queue_size: 2,
            },
            ..DisaggConfig::default()
        }
    }

    #[test]
    fn the_seeds_rule() {
        use Placement::*;
        assert_eq!(config(false, true).place(5000, 0, 0), Local);
        assert_eq!(config(true, false).place(3, 0, 99), Remote, "unconditional");
        let c = config(true, true);
        assert_eq!(c.place(10, 0, 0), Local, "at the threshold");
        assert_eq!(c.place(11, 0, 0), Remote);
        assert_eq!(
            c.place(138, 128, 0),
            Local,
            "the cached part does not count"
        );
        assert_eq!(c.place(11, 0, 1), Remote);
        assert_eq!(c.place(11, 0, 2), LocalQueueFull);
    }

    #[test]
    fn a_remote_placement_counts_as_queued_until_the_next_poll() {
        let s = DisaggState::new(config(true, true));
        assert_eq!(s.place(100, 0), Placement::Remote);
        assert_eq!(s.place(100, 0), Placement::Remote);
        assert_eq!(s.place(100, 0), Placement::LocalQueueFull);
        s.set_queue_len(0);
        assert_eq!(s.place(100, 0), Placement::Remote);
    }

    #[tokio::test]
    async fn thresholds_follow_the_setting() {
        let discovery: Arc<dyn Discovery> = Arc::new(runtime::discovery::MemoryDiscovery::new());
        let s = DisaggState::new(config(true, true));
        tokio::spawn(follow_thresholds(s.clone(), discovery.clone(), "ns".into()));
        let t = DisaggThresholds {
            max_local_prefill_length: 500,
            max_prefill_queue_size: 7,
        };
        discovery
            .put_setting(&disagg_setting_key("ns"), serde_json::to_value(t).unwrap())
            .await
            .unwrap();
        for _ in 0..100 {
            if s.config().thresholds == t {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("thresholds not applied: {:?}", s.config().thresholds);
    }
}
