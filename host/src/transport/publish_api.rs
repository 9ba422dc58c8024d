//! `POST /v1.0/publish/{pubsub}/{topic}`: Dapr's publish API on the embedded
//! broker, so the same `curl` line publishes to the embedded host and to a
//! Dapr sidecar. Answers as Dapr does: 204 when accepted, 400 for a
//! malformed CloudEvent or topic, 404 for an unknown pub/sub, with
//! `{"errorCode", "message"}` bodies; and 429 with `Retry-After` while the
//! queue is full, so publishers slow down instead of the host growing.

use std::collections::HashMap;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};

use crate::telemetry::TraceContext;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::json;

use super::embedded::{EmbeddedBroker, PublishError};

/// Seconds a refused publisher is asked to wait: about the time a full
/// queue takes to make room for more.
const RETRY_AFTER_SECONDS: u64 = 1;

/// The route, on the broker.
pub fn routes(broker: EmbeddedBroker) -> Router {
    Router::new().route("/v1.0/publish/{pubsub}/{topic}", post(publish)).with_state(broker)
}

async fn publish(
    State(broker): State<EmbeddedBroker>,
    Path((pubsub, topic)): Path<(String, String)>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok());
    let raw = query.get("metadata.rawPayload").is_some_and(|v| v.eq_ignore_ascii_case("true"));
    // As Dapr does: the publisher's trace context, from its headers, goes
    // into the envelope the payload is wrapped in.
    let header_text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let trace = TraceContext { traceparent: header_text("traceparent"), tracestate: header_text("tracestate") };
    let Err(error) = broker.publish_api(&pubsub, &topic, body, content_type, raw, &trace).await else {
        return StatusCode::NO_CONTENT.into_response();
    };
    let (status, code) = match &error {
        PublishError::UnknownPubsub { .. } => (StatusCode::NOT_FOUND, "ERR_PUBSUB_NOT_FOUND"),
        PublishError::InvalidTopic(_) => (StatusCode::BAD_REQUEST, "ERR_TOPIC_NAME_INVALID"),
        PublishError::Malformed(_) => (StatusCode::BAD_REQUEST, "ERR_PUBSUB_CLOUD_EVENTS_SER"),
        PublishError::Full(_) => (StatusCode::TOO_MANY_REQUESTS, "ERR_PUBSUB_PUBLISH_OUTBOX"),
        PublishError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "ERR_PUBSUB_PUBLISH_MESSAGE"),
    };
    tracing::debug!(%pubsub, %topic, %error, "publish refused");
    let mut response = (status, axum::Json(json!({"errorCode": code, "message": error.to_string()}))).into_response();
    if matches!(error, PublishError::Full(_) | PublishError::Unavailable(_)) {
        response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECONDS));
    }
    response
}
