//! What every handler shares: the served model, the router, limits, metrics, and the drain
//! signal.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use processor::ServedModel;
use router::Router;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::error::ApiError;
use crate::metrics::Metrics;

#[derive(Debug, Clone)]
pub struct FrontendConfig {
    pub addr: SocketAddr,
    /// When set, every route but `/health` and `/live` needs `Authorization: Bearer <key>`.
    pub api_key: Option<String>,
    pub max_body_bytes: usize,
    /// Requests admitted at once; beyond it a request gets 503 at once instead of queueing
    /// without bound (the engines keep their own waiting queues).
    pub max_inflight: usize,
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
    admission: Arc<Semaphore>,
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
            admission: Arc::new(Semaphore::new(config.max_inflight)),
            config,
            abort_streams: CancellationToken::new(),
        }
    }

    /// Serves `/admin/*` over these settings.
    pub fn with_admin(mut self, admin: AdminSettings) -> Self {
        self.admin = Some(admin);
        self
    }

    /// A slot for one request, held until its response is complete.
    pub fn admit(&self) -> Result<OwnedSemaphorePermit, ApiError> {
        self.admission.clone().try_acquire_owned().map_err(|_| {
            ApiError::unavailable(format!(
                "the server is at its limit of {} requests in flight; retry later",
                self.config.max_inflight
            ))
        })
    }
}
