//! flowgen-server: the engine behind an HTTP API that queues, batches, journals and streams jobs.

pub mod api;
pub mod batcher;
pub mod config;
pub mod connections;
pub mod engine;
pub mod error;
pub mod job;
pub mod jobs;
pub mod local;
pub mod metrics;
pub mod openapi;
pub mod queue;
pub mod redis_backend;
pub mod routes;
pub mod startup;
pub mod state;
pub mod store;
#[cfg(any(test, feature = "testing"))]
pub mod testing;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

pub use config::{Overrides, Role, ServerConfig};
pub use engine::{Engine, Models};
pub use error::{ApiError, Result, ServerError};
pub use routes::app;
pub use startup::start;
pub use state::AppState;

/// Serve `state` on `listener` until `shutdown` resolves, then drain: readiness 503, no new jobs,
/// the running batch gets `server.shutdown_grace_s` to finish while status and probes still answer,
/// queued jobs stay journaled, and every connection is closed within the grace period (at least
/// one second after the batch is done).
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let grace = Duration::from_secs(state.config.server.shutdown_grace_s);
    let draining = state.clone();
    // Lazy: it starts only once `shutdown` has resolved.
    let drain = async move {
        tracing::info!(queued = draining.queue.queued(), "shutdown requested: draining");
        draining.begin_drain();
        if draining.wait_for_batcher(grace).await {
            tracing::info!("running batch finished; queued jobs stay in the journal");
        } else {
            tracing::warn!(
                grace_s = grace.as_secs(),
                "running batch did not finish in the grace period; it reruns at the next start"
            );
        }
    };
    let router =
        if state.config.server.role.runs_api() { app(state.clone()) } else { routes::worker_app(state.clone()) };
    connections::serve(listener, state.clone(), router, routes::probes(state), shutdown, drain).await;
    Ok(())
}
