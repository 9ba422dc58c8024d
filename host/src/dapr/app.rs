//! The host as a Dapr application (HTTP app protocol): the subscription list
//! and the event routes, single and bulk.
//!
//! A handler's own route delivers to it; a topic's fan-out route delivers to
//! every handler without a `match_type` on that topic (several tenants on
//! one topic). Every event route answers HTTP 200 with `{"status": ...}`. A route Dapr
//! was told about never answers 404 (Dapr would drop the event): an unknown
//! route answers RETRY.

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::get;
use serde::Deserialize;
use serde_json::{Value, json};

use std::sync::Arc;

use super::subscriptions::{Subscription, subscriptions};
use crate::outcome::DaprStatus;
use crate::pipeline::Pipeline;
use crate::registry::{Handler, RouteTarget};
use crate::server::AppState;

pub fn routes() -> Router<AppState> {
    Router::new().route("/dapr/subscribe", get(subscribe)).fallback(deliver)
}

async fn subscribe(State(state): State<AppState>) -> Json<Vec<Subscription>> {
    Json(subscriptions(&state.registry))
}

/// Dapr's bulk delivery: many events in one request.
#[derive(Debug, Deserialize)]
struct BulkRequest {
    entries: Vec<BulkEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct BulkEntry {
    entry_id: String,
    event: Value,
    content_type: Option<String>,
}

async fn deliver(State(state): State<AppState>, method: Method, uri: Uri, headers: HeaderMap, body: Bytes) -> Response {
    if method != Method::POST {
        return StatusCode::NOT_FOUND.into_response();
    }
    let targets = match state.registry.by_route(uri.path()) {
        Some(RouteTarget::Handler(handler)) => vec![handler.clone()],
        Some(RouteTarget::FanOut(handlers)) => handlers.clone(),
        None => {
            tracing::warn!(route = uri.path(), "delivery to a route no handler serves; asking Dapr to retry");
            return status_reply(DaprStatus::Retry);
        }
    };
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).map(str::to_owned);
    // Handlers sharing a route share one subscription, so the same bulk setting.
    if targets[0].config.bulk.is_some()
        && let Ok(bulk) = serde_json::from_slice::<BulkRequest>(&body)
    {
        let entries = bulk.entries.into_iter().map(|entry| {
            let bytes = match &entry.event {
                Value::String(text) => text.clone().into_bytes(),
                other => other.to_string().into_bytes(),
            };
            let (pipeline, targets) = (state.pipeline.clone(), targets.clone());
            tokio::spawn(async move {
                let status = deliver_to_all(&pipeline, &targets, bytes.into(), entry.content_type).await;
                json!({"entryId": entry.entry_id, "status": status})
            })
        });
        let mut statuses = Vec::new();
        for entry in entries.collect::<Vec<_>>() {
            // A failed entry is left out: Dapr counts a missing entry as RETRY.
            if let Ok(status) = entry.await {
                statuses.push(status);
            }
        }
        return Json(json!({ "statuses": statuses })).into_response();
    }
    status_reply(deliver_to_all(&state.pipeline, &targets, body, content_type).await)
}

/// Delivers one event to every target handler (concurrently; each dedupes on
/// its own) and combines their answers: RETRY if any must see it again,
/// DROP if every one dead-lettered it, else SUCCESS.
pub(crate) async fn deliver_to_all(pipeline: &Arc<Pipeline>, targets: &[Arc<Handler>], body: Bytes, content_type: Option<String>) -> DaprStatus {
    let runs: Vec<_> = targets
        .iter()
        .map(|handler| {
            let (pipeline, handler, body, content_type) = (pipeline.clone(), handler.clone(), body.clone(), content_type.clone());
            tokio::spawn(async move { pipeline.deliver(&handler, &body, content_type.as_deref()).await.dapr_status() })
        })
        .collect();
    let mut statuses = Vec::with_capacity(runs.len());
    for run in runs {
        statuses.push(run.await.unwrap_or(DaprStatus::Retry));
    }
    if statuses.contains(&DaprStatus::Retry) {
        DaprStatus::Retry
    } else if statuses.iter().all(|s| *s == DaprStatus::Drop) {
        DaprStatus::Drop
    } else {
        DaprStatus::Success
    }
}

fn status_reply(status: DaprStatus) -> Response {
    Json(json!({ "status": status })).into_response()
}
