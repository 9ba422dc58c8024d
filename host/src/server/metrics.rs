//! `GET /metrics`: the host's Prometheus metrics (`crate::metrics`), with
//! the occupancy gauges read from the live values at each scrape.
//!
//! Not behind the admin token, as Prometheus scrapes expect; it names
//! tenants and handlers but carries no event data. Point a scrape (or the
//! `prometheus.io/*` annotations in `deploy/`) at the app port.

use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

use super::health::HealthState;
use crate::metrics::Metrics;
use crate::runtime::Runtime;

/// OpenMetrics text, which Prometheus reads (and asks for first).
const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// What a scrape reads.
#[derive(Clone)]
pub struct MetricsState {
    /// The counters and histograms.
    pub metrics: Arc<Metrics>,
    /// Deliveries in flight, the queue.
    pub health: HealthState,
    /// The instance pool.
    pub runtime: Runtime,
}

/// The `/metrics` route.
pub fn routes(state: MetricsState) -> Router {
    Router::new().route("/metrics", get(scrape)).with_state(state)
}

async fn scrape(State(state): State<MetricsState>) -> impl IntoResponse {
    let occupancy = &state.metrics.occupancy;
    let (in_use, slots) = state.runtime.instances_in_use();
    occupancy.instances_in_use.set(in_use as i64);
    occupancy.instance_slots.set(slots as i64);
    occupancy.instances_ready.set(state.runtime.instances_ready() as i64);
    occupancy.deliveries_in_flight.set(state.health.door.in_flight() as i64);
    let (messages, bytes) = state.health.queue.as_ref().map_or((0, 0), |(queue, _, _)| queue.index().depth());
    occupancy.queue_messages.set(messages as i64);
    occupancy.queue_bytes.set(bytes as i64);
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], state.metrics.encode())
}
