//! The Dapr sidecar's HTTP API, as the host uses it: publish, state reads,
//! saves with concurrency options, and state transactions. One pooled
//! `reqwest` client with timeouts; errors say which call failed and how.

use std::time::Duration;

use async_trait::async_trait;
use serde::Serialize;
use serde_json::{Map, Value};

use crate::outbox::Publisher;
use crate::cloudevent::CLOUDEVENTS_JSON;
use crate::store::OutboundMessage;
use crate::telemetry::TraceContext;

/// A sidecar call that takes longer than this is treated as the sidecar
/// being down: the event is deferred, not waited on indefinitely.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Connecting to a sidecar on localhost is immediate when it is up.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// How a sidecar call failed; callers branch on `Conflict`.
#[derive(Debug, thiserror::Error)]
pub enum SidecarError {
    #[error("Dapr sidecar at {url} is unreachable: {source}")]
    /// No answer (down, refused, timed out).
    Unreachable {
        /// The call.
        url: String,
        /// The transport error.
        source: reqwest::Error,
    },
    /// An ETag or first-write check failed (409 from the sidecar).
    #[error("Dapr refused {url} with a concurrency conflict: {body}")]
    Conflict {
        /// The call.
        url: String,
        /// Dapr's answer.
        body: String,
    },
    #[error("Dapr answered {status} to {url}: {body}")]
    /// Any other non-2xx answer.
    Status {
        /// The call.
        url: String,
        /// The status Dapr answered.
        status: reqwest::StatusCode,
        /// Dapr's answer.
        body: String,
    },
}

/// One item of a state save or transaction request.
#[derive(Debug, Clone, Serialize)]
pub struct StateItem {
    /// The state key.
    pub key: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    /// The value (absent for a delete).
    pub value: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    /// The ETag a write is checked against.
    pub etag: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    /// Concurrency and consistency options.
    pub options: Option<Value>,
    #[serde(skip_serializing_if = "Map::is_empty")]
    /// Per-item metadata (TTL).
    pub metadata: Map<String, Value>,
}

impl StateItem {
    /// An item for `key`.
    pub fn new(key: String, value: Option<Value>) -> Self {
        Self { key, value, etag: None, options: None, metadata: Map::new() }
    }

    /// Insert-if-absent (no ETag) or compare-and-set (with one).
    pub fn first_write(mut self, etag: Option<String>) -> Self {
        self.etag = etag;
        self.options = Some(serde_json::json!({"concurrency": "first-write", "consistency": "strong"}));
        self
    }

    /// Expires the item after `ttl`.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.metadata.insert("ttlInSeconds".into(), ttl.as_secs().max(1).to_string().into());
        self
    }
}

/// A transaction operation.
#[derive(Debug, Clone, Serialize)]
pub struct Operation {
    /// `upsert` or `delete`.
    pub operation: &'static str,
    /// The item.
    pub request: StateItem,
}

impl Operation {
    /// An upsert of `item`.
    pub fn upsert(item: StateItem) -> Self {
        Self { operation: "upsert", request: item }
    }
    /// A delete of `key`.
    pub fn delete(key: String) -> Self {
        Self { operation: "delete", request: StateItem::new(key, None) }
    }
    /// A delete of `key` if its ETag is still `etag`.
    pub fn delete_if(key: String, etag: String) -> Self {
        Self { operation: "delete", request: StateItem::new(key, None).first_write(Some(etag)) }
    }
}

#[derive(Clone)]
/// The sidecar's HTTP API, with one pooled client.
pub struct Sidecar {
    http: reqwest::Client,
    base: String,
}

impl Sidecar {
    /// `base` is the sidecar's HTTP address, e.g. `http://127.0.0.1:3500`.
    pub fn new(base: &str) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .connect_timeout(CONNECT_TIMEOUT)
            .pool_max_idle_per_host(64)
            .build()?;
        Ok(Self { http, base: base.trim_end_matches('/').to_owned() })
    }

    /// The sidecar's base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    async fn send(&self, url: String, request: reqwest::RequestBuilder) -> Result<reqwest::Response, SidecarError> {
        let response = request.send().await.map_err(|source| SidecarError::Unreachable { url: url.clone(), source })?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let body = response.text().await.unwrap_or_default();
        if status == reqwest::StatusCode::CONFLICT {
            return Err(SidecarError::Conflict { url, body });
        }
        Err(SidecarError::Status { url, status, body })
    }

    /// Whether the sidecar is up with its components loaded.
    pub async fn healthy(&self) -> bool {
        let url = format!("{}/v1.0/healthz/outbound", self.base);
        self.send(url.clone(), self.http.get(&url)).await.is_ok()
    }

    /// Publishes `event` (a structured CloudEvent) to `topic` of `pubsub`.
    pub async fn publish_event(&self, pubsub: &str, topic: &str, event: &Map<String, Value>) -> Result<(), SidecarError> {
        let url = format!("{}/v1.0/publish/{}/{}", self.base, path_segment(pubsub), path_segment(topic));
        let mut request = self.http.post(&url).header(reqwest::header::CONTENT_TYPE, CLOUDEVENTS_JSON).json(event);
        // Dapr takes the trace context of a publish from these headers (and
        // rewrites the event's own attributes from them).
        // A value no header may hold (a producer's stray newline) is left
        // out rather than failing the publish.
        let trace = TraceContext::of_event(event);
        for (name, value) in [("traceparent", &trace.traceparent), ("tracestate", &trace.tracestate)] {
            if let Some(value) = value.as_deref().and_then(|v| reqwest::header::HeaderValue::from_str(v).ok()) {
                request = request.header(name, value);
            }
        }
        self.send(url, request).await.map(drop)
    }

    /// A key's value and ETag, or `None` if it is absent.
    pub async fn get_state(&self, store: &str, key: &str) -> Result<Option<(Vec<u8>, Option<String>)>, SidecarError> {
        if key.contains('/') {
            // Dapr decodes `%2F` in the path and then finds no route (404
            // ERR_DIRECT_INVOKE): such a key is read through the bulk API,
            // which takes keys in the body.
            let mut values = self.get_bulk(store, &[key.to_owned()]).await?;
            return Ok(values.pop().flatten().map(|(value, etag)| (serde_json::to_vec(&value).expect("a JSON value encodes"), etag)));
        }
        let url = format!("{}/v1.0/state/{}/{}", self.base, path_segment(store), path_segment(key));
        let request = self.http.get(&url).query(&[("consistency", "strong")]);
        let response = self.send(url, request).await?;
        // Dapr answers 204 No Content for a missing key.
        if response.status() == reqwest::StatusCode::NO_CONTENT {
            return Ok(None);
        }
        let etag = response.headers().get("etag").and_then(|v| v.to_str().ok()).map(str::to_owned);
        let url = response.url().to_string();
        let body = response.bytes().await.map_err(|source| SidecarError::Unreachable { url, source })?;
        if body.is_empty() {
            return Ok(None);
        }
        Ok(Some((body.to_vec(), etag)))
    }

    /// Saves `items` (one request).
    pub async fn save_state(&self, store: &str, items: &[StateItem]) -> Result<(), SidecarError> {
        let url = format!("{}/v1.0/state/{}", self.base, path_segment(store));
        let request = self.http.post(&url).json(items);
        self.send(url, request).await.map(drop)
    }

    /// Several keys' values and ETags in one call (`None`: absent). Dapr
    /// answers each key on its own; a key it could not read is an error.
    pub async fn get_bulk(&self, store: &str, keys: &[String]) -> Result<Vec<Option<(Value, Option<String>)>>, SidecarError> {
        #[derive(serde::Deserialize)]
        struct Item {
            key: String,
            #[serde(default)]
            data: Option<Value>,
            #[serde(default)]
            etag: Option<String>,
            #[serde(default)]
            error: Option<String>,
        }
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let url = format!("{}/v1.0/state/{}/bulk", self.base, path_segment(store));
        let request = self.http.post(&url).json(&serde_json::json!({ "keys": keys, "parallelism": 16 }));
        let response = self.send(url.clone(), request).await?;
        let items: Vec<Item> = response.json().await.map_err(|source| SidecarError::Unreachable { url: url.clone(), source })?;
        let mut by_key = std::collections::HashMap::with_capacity(items.len());
        for item in items {
            if let Some(error) = item.error {
                return Err(SidecarError::Status { url, status: reqwest::StatusCode::INTERNAL_SERVER_ERROR, body: format!("key {}: {error}", item.key) });
            }
            by_key.insert(item.key, item.data.filter(|d| !d.is_null()).map(|data| (data, item.etag)));
        }
        Ok(keys.iter().map(|key| by_key.remove(key).flatten()).collect())
    }

    /// Applies `operations` as one state transaction (atomic only where the
    /// store makes it so: Redis applies the operations whose ETag checks
    /// pass even when another's fails).
    pub async fn transaction(&self, store: &str, operations: &[Operation]) -> Result<(), SidecarError> {
        let url = format!("{}/v1.0/state/{}/transaction", self.base, path_segment(store));
        let request = self.http.post(&url).json(&serde_json::json!({ "operations": operations }));
        self.send(url, request).await.map(drop)
    }
}

/// Names and keys travel in the URL path: escape everything but unreserved
/// characters so a `/`, `?` or `%` in a state key or a topic name cannot
/// change the request.
pub fn path_segment(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    for byte in key.bytes() {
        if byte.is_ascii_alphanumeric() || b"-_.~|:".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[async_trait]
impl Publisher for Sidecar {
    async fn publish(&self, message: &OutboundMessage) -> anyhow::Result<()> {
        Ok(self.publish_event(&message.pubsub, &message.topic, &message.event).await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_cannot_escape_their_path_segment() {
        assert_eq!(path_segment("wasmsub|state|4:acme|task:1"), "wasmsub|state|4:acme|task:1");
        assert_eq!(path_segment("../x?y=1 %"), "..%2Fx%3Fy%3D1%20%25");
    }

    #[test]
    fn items_serialise_as_dapr_expects() {
        let item = StateItem::new("k".into(), Some(Value::from(1))).first_write(Some("3".into())).ttl(Duration::from_secs(90));
        let json = serde_json::to_value(&item).unwrap();
        assert_eq!(json["etag"], "3");
        assert_eq!(json["options"]["concurrency"], "first-write");
        assert_eq!(json["metadata"]["ttlInSeconds"], "90");
        let delete = serde_json::to_value(Operation::delete("k".into())).unwrap();
        assert_eq!(delete, serde_json::json!({"operation": "delete", "request": {"key": "k"}}));
    }
}
