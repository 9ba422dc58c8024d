//! `POST /v1.0/publish/{pubsub}/{topic}`: Dapr's publish API, so the same
//! `curl` line publishes to the embedded broker and to a Dapr sidecar.
//! Answers as Dapr does: 204 when accepted, 400 for a malformed CloudEvent,
//! 404 for an unknown pub/sub, with `{"errorCode", "message"}` bodies.

use std::collections::HashMap;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::json;

use super::AppState;
use crate::broker::embedded::PublishError;

pub fn routes() -> Router<AppState> {
    Router::new().route("/v1.0/publish/{pubsub}/{topic}", post(publish))
}

async fn publish(
    State(state): State<AppState>,
    Path((pubsub, topic)): Path<(String, String)>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok());
    let raw = query.get("metadata.rawPayload").is_some_and(|v| v.eq_ignore_ascii_case("true"));
    let Some(broker) = &state.broker else {
        return (StatusCode::NOT_FOUND, axum::Json(json!({"errorCode": "ERR_NOT_EMBEDDED", "message": "publish through the Dapr sidecar"}))).into_response();
    };
    match broker.publish_api(&pubsub, &topic, body, content_type, raw).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(error) => {
            let (status, code) = match &error {
                PublishError::UnknownPubsub { .. } => (StatusCode::NOT_FOUND, "ERR_PUBSUB_NOT_FOUND"),
                PublishError::Rejected(_) => (StatusCode::BAD_REQUEST, "ERR_PUBSUB_CLOUD_EVENTS_SER"),
                PublishError::Closed => (StatusCode::SERVICE_UNAVAILABLE, "ERR_PUBSUB_PUBLISH_MESSAGE"),
            };
            tracing::info!(%pubsub, %topic, %error, "publish refused");
            (status, axum::Json(json!({"errorCode": code, "message": error.to_string()}))).into_response()
        }
    }
}
