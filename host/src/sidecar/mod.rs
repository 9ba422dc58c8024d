//! The Dapr sidecar's HTTP API, as the host uses it: publish, state reads,
//! saves with concurrency options, and state transactions. One pooled
//! `reqwest` client with timeouts; errors say which call failed and how.
//!
//! - this file: the types and [`Sidecar`], whose calls go through
//!   [`batches`]: concurrent calls of a kind share one request;
//! - [`api`]: one HTTP request per call, what a batch finally sends;
//! - [`coalesce`]: the queue that forms batches without making a lone call wait.

mod api;
mod batches;
mod coalesce;

use std::sync::Arc;

use std::time::Duration;

use async_trait::async_trait;
use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::outbox::Publisher;
use crate::store::OutboundMessage;

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
    /// The call was in a batch whose worker stopped (the host is shutting
    /// down): it may or may not have reached the sidecar.
    #[error("the call to the Dapr sidecar ({what}) was interrupted: the host is stopping")]
    Interrupted {
        /// The kind of call.
        what: &'static str,
    },
    /// A request that carried several calls got no answer (the error it
    /// met is inside); every call in it gets this.
    #[error("{0}")]
    Shared(Arc<SidecarError>),
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
    /// The value (absent for a delete), already encoded: an item is
    /// serialised once, into the request, however often it is merged.
    pub value: Option<Box<RawValue>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    /// The ETag a write is checked against.
    pub etag: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    /// Concurrency and consistency options.
    pub options: Option<ItemOptions>,
    #[serde(skip_serializing_if = "ItemMetadata::is_empty")]
    /// Per-item metadata (TTL).
    pub metadata: ItemMetadata,
}

/// Dapr's per-item `options`.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct ItemOptions {
    /// `first-write` or `last-write`.
    pub concurrency: &'static str,
    /// `strong` or `eventual`.
    pub consistency: &'static str,
}

/// Dapr's per-item `metadata`, as far as the host sets it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ItemMetadata {
    /// Seconds until the store expires the item.
    #[serde(rename = "ttlInSeconds", skip_serializing_if = "Option::is_none")]
    pub ttl_in_seconds: Option<String>,
}

impl ItemMetadata {
    fn is_empty(&self) -> bool {
        self.ttl_in_seconds.is_none()
    }
}

impl StateItem {
    /// An item for `key`.
    pub fn new(key: String, value: Option<Box<RawValue>>) -> Self {
        Self { key, value, etag: None, options: None, metadata: ItemMetadata::default() }
    }

    /// An item writing `value` (encoded as JSON) under `key`.
    pub fn json(key: String, value: &impl Serialize) -> Self {
        Self::new(key, Some(to_raw(value)))
    }

    /// Insert-if-absent (no ETag) or compare-and-set (with one).
    pub fn first_write(mut self, etag: Option<String>) -> Self {
        self.etag = etag;
        self.options = Some(ItemOptions { concurrency: "first-write", consistency: "strong" });
        self
    }

    /// Expires the item after `ttl`.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.metadata.ttl_in_seconds = Some(ttl.as_secs().max(1).to_string());
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

/// The sidecar's HTTP API, with one pooled client. Clones share the client
/// and the batches.
#[derive(Clone)]
pub struct Sidecar {
    api: api::Api,
    batches: Arc<batches::Batches>,
}

impl Sidecar {
    /// `base` is the sidecar's HTTP address, e.g. `http://127.0.0.1:3500`.
    pub fn new(base: &str) -> anyhow::Result<Self> {
        let api = api::Api::new(base)?;
        Ok(Self { batches: Arc::new(batches::Batches::new(api.clone())), api })
    }

    /// The sidecar's base URL.
    pub fn base(&self) -> &str {
        self.api.base()
    }

    /// Whether the sidecar is up with its components loaded.
    pub async fn healthy(&self) -> bool {
        self.api.healthy().await
    }

    /// Publishes `event` (a structured CloudEvent) to `topic` of `pubsub`.
    pub async fn publish_event(&self, pubsub: &str, topic: &str, event: Arc<Map<String, Value>>) -> Result<(), SidecarError> {
        self.batches.publish(pubsub, topic, event).await
    }

    /// A key's value (JSON, as stored) and ETag, or `None` if it is absent.
    pub async fn get_state(&self, store: &str, key: &str) -> Result<Option<(Box<RawValue>, Option<String>)>, SidecarError> {
        let mut values = self.batches.get(store, vec![key.to_owned()]).await?;
        Ok(values.pop().flatten())
    }

    /// Saves `items` (applied item by item: on failure, some may be saved).
    pub async fn save_state(&self, store: &str, items: Vec<StateItem>) -> Result<(), SidecarError> {
        self.batches.save(store, items).await
    }

    /// Several keys' values (JSON, as stored) and ETags (`None`: absent).
    /// A key Dapr could not read is an error.
    pub async fn get_bulk(&self, store: &str, keys: &[String]) -> Result<Vec<Option<(Box<RawValue>, Option<String>)>>, SidecarError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        self.batches.get(store, keys.to_vec()).await
    }

    /// Applies `operations` as one state transaction (atomic only where the
    /// store makes it so: Redis applies the operations whose ETag checks
    /// pass even when another's fails).
    pub async fn transaction(&self, store: &str, operations: Vec<Operation>) -> Result<(), SidecarError> {
        self.batches.transaction(store, operations).await
    }
}

/// `value` encoded as JSON, once.
pub fn to_raw(value: &impl Serialize) -> Box<RawValue> {
    serde_json::value::to_raw_value(value).expect("the host's records and JSON values always serialise")
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
        Ok(self.publish_event(&message.pubsub, &message.topic, message.event.clone()).await?)
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
        let item = StateItem::json("k".into(), &1).first_write(Some("3".into())).ttl(Duration::from_secs(90));
        let json = serde_json::to_value(&item).unwrap();
        assert_eq!(json["etag"], "3");
        assert_eq!(json["options"]["concurrency"], "first-write");
        assert_eq!(json["metadata"]["ttlInSeconds"], "90");
        assert_eq!(json["value"], 1);
        let delete = serde_json::to_value(Operation::delete("k".into())).unwrap();
        assert_eq!(delete, serde_json::json!({"operation": "delete", "request": {"key": "k"}}));
    }
}
