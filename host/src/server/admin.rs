//! Read-only views: `GET /wasmsub/handlers`, `GET /wasmsub/dead-letters`;
//! and the token-protected admin API: `PUT
//! /admin/tenants/{tenant}/handlers/{handler}/component` (deploy the body as
//! the new version), `POST .../rollback`, and `GET
//! /admin/tenants/{tenant}/state/{key}` (a tenant's committed state value).

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use subtle::ConstantTimeEq;
use serde_json::{Value, json};

use std::sync::Arc;

use crate::control::{DeployError, Deployer, NewHandler};
use crate::control::registry::Registry;
use crate::pipeline::Pipeline;
use crate::pipeline::dead_letter::DeadLetter;
use crate::store::DeliveryStore;

/// What the admin routes read and change.
#[derive(Clone)]
pub struct AdminState {
    /// Handlers and their versions.
    pub registry: Arc<Registry>,
    /// For recent dead letters.
    pub pipeline: Arc<Pipeline>,
    /// Deploys and rollbacks.
    pub deployer: Deployer,
    /// The bearer token of the admin API; `None` disables it.
    pub admin_token: Option<Arc<str>>,
    /// For tenant state.
    pub store: Arc<dyn DeliveryStore>,
}

/// Largest upload the admin API reads; each tenant's own limit
/// (`max_component_bytes`) is checked after.
const MAX_UPLOAD_BYTES: usize = 256 * 1024 * 1024;

/// Health, views, and the token-protected writes.
pub fn routes(state: AdminState) -> Router {
    Router::new()
        .route("/wasmsub/handlers", get(handlers))
        .route("/wasmsub/dead-letters", get(dead_letters))
        .merge(write_routes())
        .with_state(state)
}

async fn handlers(State(state): State<AdminState>) -> Json<Value> {
    let handlers: Vec<_> = state
        .registry
        .handlers()
        .iter()
        .map(|h| {
            json!({
                "tenant": &*h.tenant.name,
                "handler": &*h.name,
                "version": h.current().version,
                "previous_versions": h.previous_versions(),
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

async fn dead_letters(State(state): State<AdminState>) -> Json<Vec<DeadLetter>> {
    Json(state.pipeline.dead_letters().await)
}

fn write_routes() -> Router<AdminState> {
    Router::new()
        .route("/admin/tenants/{tenant}/handlers/{handler}/component", put(deploy))
        .route("/admin/tenants/{tenant}/handlers/{handler}/rollback", post(rollback))
        .route("/admin/tenants/{tenant}/state/{key}", get(state_value))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_UPLOAD_BYTES))
}

/// Checks `Authorization: Bearer <token>` in constant time.
fn authorize(state: &AdminState, headers: &HeaderMap) -> Result<(), (StatusCode, &'static str)> {
    let Some(expected) = &state.admin_token else {
        return Err((StatusCode::FORBIDDEN, "the admin API is disabled: start the host with --admin-token (or WASMSUB_ADMIN_TOKEN)"));
    };
    let given = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(token) if bool::from(token.as_bytes().ct_eq(expected.as_bytes())) => Ok(()),
        _ => Err((StatusCode::UNAUTHORIZED, "missing or wrong bearer token")),
    }
}

fn error(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({ "error": message }))).into_response()
}

fn deploy_error(failure: DeployError) -> Response {
    let status = match failure {
        DeployError::UnknownTenant(_) | DeployError::UnknownHandler { .. } => StatusCode::NOT_FOUND,
        DeployError::NothingToRollBack { .. } => StatusCode::CONFLICT,
        DeployError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
        DeployError::Invalid(_) | DeployError::NewHandler(_) => StatusCode::UNPROCESSABLE_ENTITY,
        DeployError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        DeployError::NotRecorded(_) => StatusCode::SERVICE_UNAVAILABLE,
    };
    error(status, &failure.to_string())
}

/// `?topic=T[&pubsub=P]` creates the handler if the manifest has none by
/// that name, for topic T (subscribed to at runtime if need be).
#[derive(serde::Deserialize)]
struct Placement {
    topic: Option<String>,
    pubsub: Option<String>,
}

async fn deploy(
    State(state): State<AdminState>,
    Path((tenant, handler)): Path<(String, String)>,
    Query(placement): Query<Placement>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Err((status, why)) = authorize(&state, &headers) {
        return error(status, why);
    }
    let origin = std::path::PathBuf::from(format!("upload for {tenant}/{handler}"));
    let deployed = match placement.topic {
        Some(topic) => {
            let pubsub = placement.pubsub.unwrap_or_else(|| crate::manifest::DEFAULT_PUBSUB.to_owned());
            let new = NewHandler { pubsub, topic };
            state.deployer.deploy_new(&tenant, &handler, new, &origin, body.to_vec()).await
        }
        None => state.deployer.deploy(&tenant, &handler, &origin, body.to_vec()).await,
    };
    match deployed {
        Ok(change) => Json(change).into_response(),
        Err(failure) => deploy_error(failure),
    }
}

async fn rollback(State(state): State<AdminState>, Path((tenant, handler)): Path<(String, String)>, headers: HeaderMap) -> Response {
    if let Err((status, why)) = authorize(&state, &headers) {
        return error(status, why);
    }
    match state.deployer.rollback(&tenant, &handler).await {
        Ok(change) => Json(change).into_response(),
        Err(failure) => deploy_error(failure),
    }
}

/// A tenant's committed value of `key`, as the bytes its handler wrote.
async fn state_value(State(state): State<AdminState>, Path((tenant, key)): Path<(String, String)>, headers: HeaderMap) -> Response {
    if let Err((status, why)) = authorize(&state, &headers) {
        return error(status, why);
    }
    let Some(owner) = state.registry.tenant(&tenant) else {
        return error(StatusCode::NOT_FOUND, &format!("no tenant `{tenant}` (tenants come from the manifest)"));
    };
    match state.store.get_state(&owner.namespace, &key).await {
        Ok(Some(value)) => ([(header::CONTENT_TYPE, "application/octet-stream")], value).into_response(),
        Ok(None) => error(StatusCode::NOT_FOUND, &format!("tenant `{tenant}` has no state under that key")),
        Err(failure) => error(StatusCode::SERVICE_UNAVAILABLE, &failure.to_string()),
    }
}
