//! The HTTP server: routes, and serving them until shutdown.
//!
//! - [`publish_api`]: Dapr's publish API shape, served by the embedded broker;
//! - [`admin`]: health, handlers and recent dead letters.

pub mod admin;
pub mod publish_api;

use std::future::Future;
use std::sync::Arc;

use anyhow::Context;
use axum::Router;
use tokio::net::TcpListener;

use crate::broker::embedded::EmbeddedBroker;
use crate::pipeline::Pipeline;
use crate::registry::Registry;

/// The largest request body the server reads; bigger events are refused by
/// the tenant's own (smaller or equal) limit before they are parsed.
pub const MAX_REQUEST_BYTES: usize = 16 * 1024 * 1024;

/// What the handlers of every route share.
#[derive(Clone)]
pub struct AppState {
    pub registry: Arc<Registry>,
    pub pipeline: Arc<Pipeline>,
    pub broker: EmbeddedBroker,
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .merge(publish_api::routes())
        .merge(admin::routes())
        .layer(axum::extract::DefaultBodyLimit::max(MAX_REQUEST_BYTES))
        .with_state(state)
}

/// Serves `router` on `listener` until `shutdown` resolves, then lets
/// requests in progress finish.
pub async fn serve(listener: TcpListener, router: Router, shutdown: impl Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
    let address = listener.local_addr().context("reading the listener's address")?;
    tracing::info!(%address, "serving HTTP");
    axum::serve(listener, router).with_graceful_shutdown(shutdown).await.context("HTTP server failed")
}
