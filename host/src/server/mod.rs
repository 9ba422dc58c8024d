//! The HTTP server: the host's own routes and the transports' routes, served
//! until shutdown.
//!
//! - [`health`]: liveness, readiness and the host's own view;
//! - [`admin`]: handlers and recent dead letters; deploy, rollback and
//!   tenant state (token-protected);
//! - [`metrics`]: Prometheus metrics at `/metrics`;
//! - the transports bring their own routes: Dapr's app routes
//!   ([`crate::transport::dapr_app`]) and, on the embedded backend, Dapr's
//!   publish API ([`crate::transport::publish_api`]).

pub mod admin;
pub mod health;
pub mod metrics;

use std::future::Future;

use anyhow::Context;
use axum::Router;
use tokio::net::TcpListener;

/// The largest request body the server reads; bigger events are refused by
/// the tenant's own (smaller or equal) limit before they are parsed.
pub const MAX_REQUEST_BYTES: usize = 16 * 1024 * 1024;

/// The host's routes merged with the transports' `transports`.
pub fn router(admin: admin::AdminState, health: health::HealthState, metrics: metrics::MetricsState, transports: Router) -> Router {
    Router::new()
        .merge(health::routes(health))
        .merge(metrics::routes(metrics))
        .merge(admin::routes(admin))
        .merge(transports)
        .layer(axum::extract::DefaultBodyLimit::max(MAX_REQUEST_BYTES))
}

/// Serves `router` on `listener` until `shutdown` resolves, then lets
/// requests in progress finish.
pub async fn serve(listener: TcpListener, router: Router, shutdown: impl Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
    let address = listener.local_addr().context("reading the listener's address")?;
    tracing::info!(%address, "serving HTTP");
    axum::serve(listener, router).with_graceful_shutdown(shutdown).await.context("HTTP server failed")
}
