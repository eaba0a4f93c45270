//! What every handler shares: the served model, the router, limits, metrics, and the drain
//! signal.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use processor::ServedModel;
use router::Router;
use tokio_util::sync::CancellationToken;

use crate::admission::{self, Admission, Class, Permit, Refused};
use crate::error::ApiError;
use crate::metrics::Metrics;

#[derive(Debug, Clone)]
pub struct FrontendConfig {
    pub addr: SocketAddr,
    /// When set, every route but `/health` and `/live` needs `Authorization: Bearer <key>`.
    pub api_key: Option<String>,
    pub max_body_bytes: usize,
    /// Requests served at once; beyond it a request waits in the admission queue.
    pub max_inflight: usize,
    /// Requests waiting for a slot, first in, first out; past it a request gets 503 at once
    /// (nothing queues without bound; the engines keep their own waiting queues). 0: no queue.
    pub max_queued: usize,
    /// Longest wait in the admission queue before a 503.
    pub queue_timeout: Duration,
    /// Longest time to receive a request's headers, and then its body: a client that sends
    /// them slowly (slow loris) is cut off instead of holding a connection and a task.
    pub request_timeout: Duration,
    /// How long Ctrl-C waits for in-flight streams before ending them with an error.
    pub drain_timeout: Duration,
}

impl Default for FrontendConfig {
    fn default() -> Self {
        Self {
            addr: SocketAddr::from(([127, 0, 0, 1], 8000)),
            api_key: None,
            max_body_bytes: 8 << 20,
            max_inflight: 1024,
            max_queued: 1024,
            queue_timeout: Duration::from_secs(60),
            request_timeout: Duration::from_secs(30),
            drain_timeout: Duration::from_secs(30),
        }
    }
}

/// Where the admin endpoint writes graph settings (the decode workers watch them).
pub struct AdminSettings {
    pub discovery: Arc<dyn runtime::discovery::Discovery>,
    pub namespace: String,
}

pub struct AppState {
    pub admin: Option<AdminSettings>,
    pub model: Arc<ServedModel>,
    pub router: Arc<Router>,
    pub metrics: Metrics,
    pub config: FrontendConfig,
    admission: Admission,
    /// Fires when the drain timeout has passed: open streams end with an error.
    pub abort_streams: CancellationToken,
}

impl AppState {
    pub fn new(model: Arc<ServedModel>, router: Arc<Router>, config: FrontendConfig) -> Self {
        let metrics = Metrics::new(|registry| router.metrics().register(registry));
        Self {
            admin: None,
            model,
            router,
            metrics,
            admission: Admission::new(admission::Limits {
                max_inflight: config.max_inflight,
                max_queued: config.max_queued,
                queue_timeout: config.queue_timeout,
            }),
            config,
            abort_streams: CancellationToken::new(),
        }
    }

    /// Serves `/admin/*` over these settings.
    pub fn with_admin(mut self, admin: AdminSettings) -> Self {
        self.admin = Some(admin);
        self
    }

    /// The admission queue (for `/metrics`, and for tests that hold its slots).
    pub fn admission(&self) -> &Admission {
        &self.admission
    }

    /// A slot for one request, held until its response is complete: at once when one is
    /// free, else after the requests queued before it; 503 with a `Retry-After` from the
    /// measured drain rate when the queue is full or the wait passes `--queue-timeout`.
    pub async fn admit(&self) -> Result<Permit, ApiError> {
        match self.admission.admit(Class::Default).await {
            Ok(admitted) => {
                self.metrics.observe_admission_wait(admitted.waited);
                Ok(admitted.permit)
            }
            Err(refused) => {
                if let Refused::TimedOut { timeout, .. } = refused {
                    self.metrics.observe_admission_wait(timeout);
                }
                let retry = refused.retry_after_secs();
                Err(ApiError::unavailable_for(refused.to_string(), retry))
            }
        }
    }
}
