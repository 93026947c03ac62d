//! `rvq-kv serve`: an OpenAI-compatible HTTP server. One scheduler thread steps every admitted
//! sequence together (continuous batching: the weights are read once per step for all of them),
//! each attending through its own cache; requests are admitted while their caches' exact bytes at
//! full length fit a budget, so a compressed cache admits proportionally more of them.
//!
//! - [`engine`]: the scheduler, admission by bytes, cancellation.
//! - [`api`]: request fields and their checks, response objects.
//! - [`http`]: routes and server-sent events.
//! - [`metrics`]: what `GET /metrics` reports.
//! - [`load`]: the load generator behind `rvq-kv bench serve`.

pub mod api;
pub mod engine;
pub mod http;
pub mod load;
pub mod metrics;
pub mod stop;

pub use engine::{Engine, EngineConfig};
pub use http::{router, AppState};

use std::future::Future;
use std::sync::Arc;
use tokio::net::TcpListener;

/// Serves `state` on `listener` until `shutdown` resolves, then stops accepting requests, lets
/// the ones in flight finish and stops the scheduler.
pub async fn serve(
    listener: TcpListener,
    state: Arc<AppState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(state.clone()))
        .with_graceful_shutdown(shutdown)
        .await?;
    tokio::task::spawn_blocking(move || state.engine.shutdown())
        .await
        .map_err(std::io::Error::other)
}
