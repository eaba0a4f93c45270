//! Binding and serving: `TCP_NODELAY` on every accepted socket (a streamed token must not wait
//! for the client's delayed ACK), graceful shutdown that drains in-flight streams and, after
//! the drain timeout, ends the rest with an error event.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::serve::ListenerExt;
use tokio::net::TcpListener;

use crate::routes;
use crate::state::AppState;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("the HTTP server failed: {0}")]
    Serve(#[source] std::io::Error),
}

/// Binds the configured address (port 0 picks a free one).
pub async fn bind(state: &AppState) -> Result<TcpListener, ServeError> {
    let addr = state.config.addr;
    TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Bind { addr, source })
}

/// Serves until `shutdown` resolves, then stops accepting and waits for open responses.
pub async fn serve(
    state: Arc<AppState>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::warn!("cannot set TCP_NODELAY: {e}");
        }
    });
    let drain = state.config.drain_timeout;
    let abort = state.abort_streams.clone();
    let app = routes::app(state);
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            shutdown.await;
            tracing::info!("shutting down: draining in-flight requests (up to {drain:?})");
            tokio::spawn(async move {
                tokio::time::sleep(drain).await;
                abort.cancel();
            });
        })
        .await
        .map_err(ServeError::Serve)
}
