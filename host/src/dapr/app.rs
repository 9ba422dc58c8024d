//! The host as a Dapr application (HTTP app protocol): the subscription list
//! and the event routes, single and bulk.
//!
//! Every event route answers HTTP 200 with `{"status": ...}`. A route Dapr
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

use super::subscriptions::{Subscription, subscriptions};
use crate::outcome::DaprStatus;
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
    let Some(handler) = state.registry.by_route(uri.path()).cloned() else {
        tracing::warn!(route = uri.path(), "delivery to a route no handler serves; asking Dapr to retry");
        return status_reply(DaprStatus::Retry);
    };
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok());
    if handler.config.bulk.is_some()
        && let Ok(bulk) = serde_json::from_slice::<BulkRequest>(&body)
    {
        let deliveries = bulk.entries.into_iter().map(|entry| {
            let (pipeline, handler) = (state.pipeline.clone(), handler.clone());
            async move {
                let bytes = match &entry.event {
                    Value::String(text) => text.clone().into_bytes(),
                    other => other.to_string().into_bytes(),
                };
                let outcome = pipeline.deliver(&handler, &bytes, entry.content_type.as_deref()).await;
                json!({"entryId": entry.entry_id, "status": outcome.dapr_status()})
            }
        });
        let statuses: Vec<Value> = futures_join(deliveries).await;
        return Json(json!({ "statuses": statuses })).into_response();
    }
    let outcome = state.pipeline.deliver(&handler, &body, content_type).await;
    status_reply(outcome.dapr_status())
}

fn status_reply(status: DaprStatus) -> Response {
    Json(json!({ "status": status })).into_response()
}

/// Runs the bulk entries concurrently (each is bounded by its tenant's
/// concurrency gate) and keeps their order.
async fn futures_join<F: std::future::Future<Output = Value> + Send + 'static>(futures: impl Iterator<Item = F>) -> Vec<Value> {
    let handles: Vec<_> = futures.map(tokio::spawn).collect();
    let mut results = Vec::with_capacity(handles.len());
    for handle in handles {
        // A panicked entry is left out: Dapr counts a missing entry as RETRY.
        if let Ok(value) = handle.await {
            results.push(value);
        }
    }
    results
}
