//! The host as a Dapr application (HTTP app protocol): the subscription list
//! Dapr reads at start-up, and the event routes it delivers to, one event
//! per request or many (bulk). Each request becomes [`Delivery`]s for the
//! [`Door`]; the door's answer goes back as `{"status": ...}` (or one
//! status per bulk entry).
//!
//! A route Dapr was told about never answers 404 (Dapr would drop the
//! event): the door answers RETRY for a route nobody serves.

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::get;
use serde::Deserialize;
use serde_json::json;
use serde_json::value::RawValue;

use super::bulk_sizing::BulkSizing;
use super::dapr_subscriptions::{Subscription, subscriptions};
use crate::control::registry::{Registry, RouteTarget};
use crate::delivery::{Delivery, Destination, Door};
use crate::manifest::BulkConfig;
use crate::pipeline::outcome::DaprStatus;
use crate::pipeline::receive::Payload;

/// What the routes need: the registry for the subscription list and to
/// tell bulk routes apart, the door for deliveries.
#[derive(Clone)]
struct AppRoutes {
    registry: Arc<Registry>,
    door: Arc<Door>,
    /// Notices bulk requests Dapr holds back (`bulk_sizing`).
    bulk_sizing: Arc<BulkSizing>,
}

/// `GET /dapr/subscribe` and every event route.
pub fn routes(registry: Arc<Registry>, door: Arc<Door>) -> Router {
    Router::new().route("/dapr/subscribe", get(subscribe)).fallback(deliver).with_state(AppRoutes { registry, door, bulk_sizing: Arc::default() })
}

async fn subscribe(State(app): State<AppRoutes>) -> Json<Vec<Subscription>> {
    Json(subscriptions(&app.registry))
}

/// Dapr's bulk delivery: many events in one request.
#[derive(Debug, Deserialize)]
struct BulkRequest<'a> {
    #[serde(borrow)]
    entries: Vec<BulkEntry<'a>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct BulkEntry<'a> {
    entry_id: String,
    /// The event as it is in the request: parsed once, by the door.
    #[serde(borrow)]
    event: &'a RawValue,
    content_type: Option<String>,
}

async fn deliver(State(app): State<AppRoutes>, method: Method, uri: Uri, headers: HeaderMap, body: Bytes) -> Response {
    if method != Method::POST {
        return StatusCode::NOT_FOUND.into_response();
    }
    let route = uri.path().to_owned();
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).map(str::to_owned);
    if let Some(bulk) = bulk_config(&app.registry, &route)
        && let Some(entries) = parse_bulk(&body)
    {
        app.bulk_sizing.arrived(&route, entries.len(), &bulk);
        let (ids, deliveries): (Vec<_>, Vec<_>) = entries
            .into_iter()
            .map(|(id, body, content_type)| {
                (id, Delivery { destination: Destination::Route(route.clone()), payload: Payload::Bytes(body), content_type })
            })
            .unzip();
        let statuses = app.door.deliver_all(deliveries).await;
        app.bulk_sizing.answered(&route);
        let statuses: Vec<_> = ids.into_iter().zip(statuses).map(|(id, status)| json!({"entryId": id, "status": status})).collect();
        return Json(json!({ "statuses": statuses })).into_response();
    }
    let delivery = Delivery { destination: Destination::Route(route), payload: Payload::Bytes(body), content_type };
    status_reply(app.door.deliver(delivery).await)
}

/// A bulk request's entries: (entry id, event bytes, content type); `None`
/// when the body is not a bulk request (then it is delivered as one event).
pub(crate) fn parse_bulk(body: &[u8]) -> Option<Vec<(String, Bytes, Option<String>)>> {
    let bulk = serde_json::from_slice::<BulkRequest<'_>>(body).ok()?;
    Some(bulk.entries.into_iter().map(|entry| (entry.entry_id, entry_bytes(entry.event), entry.content_type)).collect())
}

/// The route's bulk setting, if it asked for bulk deliveries. Handlers
/// sharing a route share one subscription, so one bulk setting.
fn bulk_config(registry: &Registry, route: &str) -> Option<BulkConfig> {
    match registry.by_route(route)? {
        RouteTarget::Handler(handler) => handler.config.bulk.clone(),
        RouteTarget::FanOut(handlers) => handlers.first()?.config.bulk.clone(),
    }
}

/// A bulk entry's event: a JSON string is a raw payload (its text), anything
/// else is the event's JSON as it was sent.
fn entry_bytes(event: &RawValue) -> Bytes {
    match serde_json::from_str::<String>(event.get()) {
        Ok(text) => Bytes::from(text),
        Err(_) => Bytes::copy_from_slice(event.get().as_bytes()),
    }
}

fn status_reply(status: DaprStatus) -> Response {
    Json(json!({ "status": status })).into_response()
}
