//! The accept loop: a bounded number of connections, each with a header-read timeout, a few
//! overflow connections that still answer the probes, and a shutdown that ends every connection
//! within the grace period whatever its client does.

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use hyper::server::conn::http1::Builder;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::state::AppState;

/// Connections past `server.max_connections` that are still served, one request each, so that
/// liveness and readiness probes answer during a connection flood (everything else gets 503).
pub const OVERFLOW_CONNECTIONS: usize = 64;

/// How long an overflow connection may take to send its request head.
const OVERFLOW_HEADER_TIMEOUT: Duration = Duration::from_secs(2);

/// After the running batch is done (or the grace period is over), open connections get at least
/// this long to finish the response they are writing before they are closed.
const MIN_CLOSE_WINDOW: Duration = Duration::from_secs(1);

/// The answer past every limit, written without reading the request.
fn refused() -> Vec<u8> {
    let body = serde_json::json!({"error": TOO_MANY_CONNECTIONS, "error_type": "unavailable"}).to_string();
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nconnection: close\r\nretry-after: 1\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// What a connection past the limits is told.
pub const TOO_MANY_CONNECTIONS: &str = "too many open connections (server.max_connections): try again shortly";

/// Which service a connection gets.
enum Admitted {
    Full(tokio::sync::OwnedSemaphorePermit),
    Overflow(tokio::sync::OwnedSemaphorePermit),
    Refused,
}

struct Listener {
    full: Arc<Semaphore>,
    overflow: Arc<Semaphore>,
    http: Builder,
    overflow_http: Builder,
    router: Router,
    probes: Router,
    graceful: GracefulShutdown,
    connections: JoinSet<()>,
}

impl Listener {
    fn new(state: &AppState, router: Router, probes: Router) -> Self {
        let cfg = &state.config.server;
        Listener {
            full: Arc::new(Semaphore::new(cfg.max_connections)),
            overflow: Arc::new(Semaphore::new(OVERFLOW_CONNECTIONS)),
            http: http_builder(Duration::from_secs(cfg.header_timeout_s), true),
            overflow_http: http_builder(OVERFLOW_HEADER_TIMEOUT, false),
            router,
            probes,
            graceful: GracefulShutdown::new(),
            connections: JoinSet::new(),
        }
    }

    fn admit(&self) -> Admitted {
        if let Ok(permit) = self.full.clone().try_acquire_owned() {
            Admitted::Full(permit)
        } else if let Ok(permit) = self.overflow.clone().try_acquire_owned() {
            Admitted::Overflow(permit)
        } else {
            Admitted::Refused
        }
    }

    fn spawn(&mut self, stream: TcpStream) {
        let (permit, http, router) = match self.admit() {
            Admitted::Full(permit) => (permit, &self.http, self.router.clone()),
            Admitted::Overflow(permit) => (permit, &self.overflow_http, self.probes.clone()),
            Admitted::Refused => {
                // Best effort and never blocking: a client that does not read this is just closed.
                let _ = stream.try_write(&refused());
                return;
            }
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(router);
        let connection = http.serve_connection(TokioIo::new(stream), service);
        let connection = self.graceful.watch(connection);
        self.connections.spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "connection ended with an error");
            }
            drop(permit);
        });
    }
}

fn http_builder(header_timeout: Duration, keep_alive: bool) -> Builder {
    // HTTP/1.1 only: its header-read timeout is what bounds a slow client; h2c is not offered.
    let mut builder = Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(header_timeout).keep_alive(keep_alive);
    builder
}

/// Accept until `shutdown` resolves; then `drain` runs (the batcher's grace period) while the
/// server still answers, and afterwards every connection is closed within `MIN_CLOSE_WINDOW` or
/// what is left of `grace`, whichever is longer.
pub async fn serve(
    listener: TcpListener,
    state: Arc<AppState>,
    router: Router,
    probes: Router,
    shutdown: impl Future<Output = ()>,
    drain: impl Future<Output = ()>,
) {
    let grace = Duration::from_secs(state.config.server.shutdown_grace_s);
    let mut accepting = Listener::new(&state, router, probes);
    accept_until(&listener, &mut accepting, shutdown).await;
    let started = Instant::now();
    // Keep answering status polls and probes while the running batch finishes.
    accept_until(&listener, &mut accepting, drain).await;
    drop(listener);
    let window = grace.saturating_sub(started.elapsed()).max(MIN_CLOSE_WINDOW);
    let Listener { graceful, mut connections, .. } = accepting;
    let open = connections.len();
    if tokio::time::timeout(window, graceful.shutdown()).await.is_err() {
        tracing::warn!(open, window_ms = window.as_millis() as u64, "closing connections that did not finish in time");
    }
    connections.abort_all();
    while connections.join_next().await.is_some() {}
}

/// Serve new connections, and reap finished ones, until `until` resolves.
async fn accept_until(listener: &TcpListener, accepting: &mut Listener, until: impl Future<Output = ()>) {
    tokio::pin!(until);
    loop {
        tokio::select! {
            () = &mut until => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => accepting.spawn(stream),
                Err(error) => accept_failed(error).await,
            },
            Some(_) = accepting.connections.join_next(), if !accepting.connections.is_empty() => {}
        }
    }
}

async fn accept_failed(error: io::Error) {
    if matches!(
        error.kind(),
        io::ErrorKind::ConnectionRefused | io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset
    ) {
        return;
    }
    // Out of file descriptors, most likely: wait for some connections to close.
    tracing::error!(%error, "accepting a connection failed");
    tokio::time::sleep(Duration::from_millis(200)).await;
}
