//! Health and read-only views: `GET /healthz` (and Dapr's
//! `/v1.0/healthz`), `GET /wasmsub/handlers`, `GET /wasmsub/dead-letters`.

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{Value, json};

use super::AppState;
use crate::dead_letter::DeadLetter;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(health))
        .route("/v1.0/healthz", get(health))
        .route("/wasmsub/handlers", get(handlers))
        .route("/wasmsub/dead-letters", get(dead_letters))
}

async fn health() -> StatusCode {
    StatusCode::NO_CONTENT
}

async fn handlers(State(state): State<AppState>) -> Json<Value> {
    let handlers: Vec<_> = state
        .registry
        .handlers
        .iter()
        .map(|h| {
            json!({
                "tenant": &*h.tenant.name,
                "handler": &*h.name,
                "version": h.current().version,
                "pubsub": h.config.pubsub,
                "topic": h.config.topic,
                "route": h.route,
                "dead_letter_topic": h.dead_letter_topic,
                "counts": &h.counts,
            })
        })
        .collect();
    Json(json!({ "handlers": handlers }))
}

async fn dead_letters(State(state): State<AppState>) -> Json<Vec<DeadLetter>> {
    Json(state.pipeline.dead_letters.list())
}
