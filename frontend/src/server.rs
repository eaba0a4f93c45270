//! Binding and serving: `TCP_NODELAY` on every accepted socket (a streamed token must not wait
//! for the client's delayed ACK), a bound on reading each request's headers
//! (`--request-timeout`; the body's bound is in `routes`), and graceful shutdown that drains
//! in-flight streams and, after the drain timeout, ends the rest with an error event.
//!
//! The accept loop is ours rather than `axum::serve`'s because axum gives no access to hyper's
//! connection builder, and without a timer hyper never times out a request's headers: a client
//! that sends them a byte at a time (slow loris) would hold its connection for ever.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::watch;

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
    let drain = state.config.drain_timeout;
    let abort = state.abort_streams.clone();
    let mut http = hyper::server::conn::http1::Builder::new();
    // Also closes a keep-alive connection idle for that long: hyper times the wait for the
    // next request's headers the same way.
    http.timer(TokioTimer::new())
        .header_read_timeout(state.config.request_timeout);
    let app = routes::app(state);

    // `stop` tells every connection to finish its response and close; each holds a `done`
    // receiver, so `done_tx.closed()` resolves when the last one has.
    let (stop_tx, stop_rx) = watch::channel(());
    let (done_tx, done_rx) = watch::channel(());
    let mut shutdown = pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    accept_failed(e).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::warn!("cannot set TCP_NODELAY: {e}");
        }
        let conn = http.serve_connection(TokioIo::new(tcp), TowerToHyperService::new(app.clone()));
        let mut stop = stop_rx.clone();
        let done = done_rx.clone();
        tokio::spawn(async move {
            let mut conn = pin!(conn);
            let mut stopping = false;
            loop {
                tokio::select! {
                    result = conn.as_mut() => {
                        if let Err(e) = result {
                            // A client that went away or timed out reading its headers.
                            tracing::debug!("connection from {peer}: {e}");
                        }
                        break;
                    }
                    _ = stop.changed(), if !stopping => {
                        stopping = true;
                        conn.as_mut().graceful_shutdown();
                    }
                }
            }
            drop(done);
        });
    }

    tracing::info!("shutting down: draining in-flight requests (up to {drain:?})");
    drop(listener);
    tokio::spawn(async move {
        tokio::time::sleep(drain).await;
        abort.cancel();
    });
    // Dropping the sender is the signal: every `changed()` returns.
    drop(stop_tx);
    drop(stop_rx);
    drop(done_rx);
    done_tx.closed().await;
    Ok(())
}

/// Connection errors concern one client: go on at once. Others (out of file descriptors) last
/// a while: wait a second rather than spin, as hyper and axum do.
async fn accept_failed(e: std::io::Error) {
    use std::io::ErrorKind;
    if matches!(
        e.kind(),
        ErrorKind::ConnectionRefused | ErrorKind::ConnectionAborted | ErrorKind::ConnectionReset
    ) {
        return;
    }
    tracing::error!("accept failed: {e}");
    tokio::time::sleep(Duration::from_secs(1)).await;
}
