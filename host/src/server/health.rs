//! Liveness, readiness and the host's own view.
//!
//! - `GET /healthz` (and Dapr's `/v1.0/healthz`): 204 while the process
//!   serves. A full disk or a sidecar that is down is not fixed by a
//!   restart, so they do not make the host "dead".
//! - `GET /readyz`: 204 when the host can take events now; else 503 with
//!   the reasons (the store is reopening after an I/O error, the queue is
//!   full, the sidecar is down, the host is stopping). Point Dapr's app
//!   health check (`--app-health-check-path /readyz`) at it and Dapr holds
//!   deliveries back while the host cannot take them.
//! - `GET /wasmsub/host`: backend, queue depth and bounds, deliveries in
//!   flight, the memory budget, readiness.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::budget::MemoryBudget;
use crate::delivery::Door;
use crate::sidecar::Sidecar;
use crate::store::{DeliveryStore, MessageQueue, QueueLimits};

/// What readiness looks at.
#[derive(Clone)]
pub struct HealthState {
    /// The host's store.
    pub store: Arc<dyn DeliveryStore>,
    /// The embedded broker's queue, its bounds, and whether it is on disk.
    pub queue: Option<(Arc<dyn MessageQueue>, QueueLimits, bool)>,
    /// The sidecar, behind Dapr.
    pub sidecar: Option<Sidecar>,
    /// The door, for deliveries in flight.
    pub door: Arc<Door>,
    /// Cancelled once the host is stopping.
    pub stopping: CancellationToken,
    /// What the configuration lets the host use.
    pub budget: Arc<MemoryBudget>,
}

impl HealthState {
    /// Why the host cannot take events now (empty: it can).
    pub async fn not_ready_because(&self) -> Vec<String> {
        let mut reasons = Vec::new();
        if self.stopping.is_cancelled() {
            reasons.push("the host is stopping".to_owned());
        }
        if let Some(trouble) = self.store.trouble() {
            reasons.push(format!("store: {trouble}"));
        }
        if let Some((queue, limits, _)) = &self.queue {
            let (messages, bytes) = queue.index().depth();
            if messages >= limits.max_messages || bytes >= limits.max_bytes {
                reasons.push(format!("queue full: {messages} messages, {bytes} bytes queued"));
            }
        }
        if let Some(sidecar) = &self.sidecar
            && !sidecar.healthy().await
        {
            reasons.push(format!("the Dapr sidecar at {} is not healthy", sidecar.base()));
        }
        reasons
    }
}

/// The health routes.
pub fn routes(state: HealthState) -> Router {
    Router::new()
        .route("/healthz", get(alive))
        .route("/v1.0/healthz", get(alive))
        .route("/readyz", get(ready))
        .route("/wasmsub/host", get(host_view))
        .with_state(state)
}

async fn alive() -> StatusCode {
    StatusCode::NO_CONTENT
}

async fn ready(State(state): State<HealthState>) -> Response {
    let reasons = state.not_ready_because().await;
    if reasons.is_empty() {
        return StatusCode::NO_CONTENT.into_response();
    }
    (StatusCode::SERVICE_UNAVAILABLE, Json(json!({ "ready": false, "reasons": reasons }))).into_response()
}

async fn host_view(State(state): State<HealthState>) -> Json<serde_json::Value> {
    let queue = state.queue.as_ref().map(|(queue, limits, durable)| {
        let (messages, bytes) = queue.index().depth();
        json!({ "messages": messages, "bytes": bytes, "max_messages": limits.max_messages, "max_bytes": limits.max_bytes, "durable": durable })
    });
    let reasons = state.not_ready_because().await;
    Json(json!({
        "backend": if state.sidecar.is_some() { "dapr" } else { "embedded" },
        "ready": reasons.is_empty(),
        "not_ready_because": reasons,
        "queue": queue,
        "deliveries_in_flight": state.door.in_flight(),
        "memory_budget": &*state.budget,
    }))
}
