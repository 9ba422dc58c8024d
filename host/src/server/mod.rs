//! The HTTP server: routes, and serving them until shutdown.
//!
//! - [`publish_api`]: Dapr's publish API shape, served by the embedded broker;
//! - [`admin`]: health, handlers and recent dead letters; deploy and
//!   rollback (token-protected);
//! - [`crate::dapr::app`]: the Dapr app routes (subscriptions, events).

pub mod admin;
pub mod publish_api;

use std::future::Future;
use std::sync::Arc;

use anyhow::Context;
use axum::Router;
use tokio::net::TcpListener;

use crate::broker::embedded::EmbeddedBroker;
use crate::deploy::Deployer;
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
    /// The in-process broker, when there is no sidecar.
    pub broker: Option<EmbeddedBroker>,
    pub deployer: Deployer,
    /// The bearer token of the admin API; `None` disables its writes.
    pub admin_token: Option<Arc<str>>,
}

pub fn router(state: AppState) -> Router {
    let router = Router::new().merge(admin::routes()).merge(admin::write_routes());
    // Dapr's publish API is served only by the embedded backend (with a
    // sidecar, publish to the sidecar); the app routes serve both, so the
    // embedded host also answers deliveries in Dapr's shape.
    let router = if state.broker.is_some() { router.merge(publish_api::routes()) } else { router };
    router
        .merge(crate::dapr::app::routes())
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
