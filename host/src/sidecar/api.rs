//! One HTTP request per call: what a batch (or a lone call) finally sends.

use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use super::{CONNECT_TIMEOUT, REQUEST_TIMEOUT, SidecarError, path_segment};
use crate::cloudevent::CLOUDEVENTS_JSON;
use crate::telemetry::TraceContext;

/// A key's value as read (JSON, undecoded) and its ETag; `None`: absent.
pub(super) type Read = Option<(Box<RawValue>, Option<String>)>;

#[derive(Clone)]
pub(super) struct Api {
    http: reqwest::Client,
    base: String,
}

impl Api {
    pub(super) fn new(base: &str) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .connect_timeout(CONNECT_TIMEOUT)
            .pool_max_idle_per_host(64)
            .build()?;
        Ok(Self { http, base: base.trim_end_matches('/').to_owned() })
    }

    pub(super) fn base(&self) -> &str {
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

    pub(super) async fn healthy(&self) -> bool {
        let url = format!("{}/v1.0/healthz/outbound", self.base);
        self.send(url.clone(), self.http.get(&url)).await.is_ok()
    }

    fn publish_url(&self, pubsub: &str, topic: &str, bulk: bool) -> String {
        let api = if bulk { "v1.0-alpha1/publish/bulk" } else { "v1.0/publish" };
        format!("{}/{api}/{}/{}", self.base, path_segment(pubsub), path_segment(topic))
    }

    /// Publishes one structured CloudEvent.
    pub(super) async fn publish(&self, pubsub: &str, topic: &str, event: &Map<String, Value>) -> Result<(), SidecarError> {
        let url = self.publish_url(pubsub, topic, false);
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

    /// Publishes several events to one topic in one request (Dapr's bulk
    /// publish API). Returns the indices of the events Dapr reports as not
    /// published; an error means it did not say (treat all as unknown).
    pub(super) async fn publish_bulk(&self, pubsub: &str, topic: &str, events: &[&Map<String, Value>]) -> Result<Vec<usize>, SidecarError> {
        #[derive(serde::Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Answer {
            #[serde(default)]
            failed_entries: Vec<Failed>,
        }
        #[derive(serde::Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Failed {
            entry_id: String,
        }
        #[derive(serde::Serialize)]
        #[serde(rename_all = "camelCase")]
        struct Entry<'a> {
            entry_id: String,
            event: WithTraceId<'a>,
            content_type: &'static str,
        }
        let entries: Vec<Entry> = events
            .iter()
            .enumerate()
            .map(|(index, event)| Entry { entry_id: index.to_string(), event: WithTraceId(event), content_type: CLOUDEVENTS_JSON })
            .collect();
        let url = self.publish_url(pubsub, topic, true);
        let request = self.http.post(&url).json(&entries);
        match self.send(url, request).await {
            Ok(_) => Ok(Vec::new()),
            Err(SidecarError::Status { url, status, body }) => match serde_json::from_str::<Answer>(&body) {
                Ok(answer) if !answer.failed_entries.is_empty() => {
                    Ok(answer.failed_entries.iter().filter_map(|f| f.entry_id.parse().ok()).filter(|i| *i < events.len()).collect())
                }
                _ => Err(SidecarError::Status { url, status, body }),
            },
            Err(error) => Err(error),
        }
    }

    /// One key with a plain GET (cheaper for daprd than a bulk read of one).
    pub(super) async fn get_one(&self, store: &str, key: &str) -> Result<Read, SidecarError> {
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
        // Everything the host stores is JSON; anything else is kept as text,
        // as Dapr's bulk read would give it.
        let value = serde_json::from_slice::<Box<RawValue>>(&body).unwrap_or_else(|_| super::to_raw(&String::from_utf8_lossy(&body)));
        Ok(Some((value, etag)))
    }

    /// Several keys in one request, answered in the order asked.
    pub(super) async fn get_bulk(&self, store: &str, keys: &[String]) -> Result<Vec<Read>, SidecarError> {
        #[derive(serde::Deserialize)]
        struct Item {
            key: String,
            /// JSON `null` (an absent key) reads as `None`.
            #[serde(default)]
            data: Option<Box<RawValue>>,
            #[serde(default)]
            etag: Option<String>,
            #[serde(default)]
            error: Option<String>,
        }
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let url = format!("{}/v1.0/state/{}/bulk", self.base, path_segment(store));
        #[derive(Serialize)]
        struct Body<'a> {
            keys: &'a [String],
            parallelism: u32,
        }
        let request = self.http.post(&url).json(&Body { keys, parallelism: 16 });
        let response = self.send(url.clone(), request).await?;
        let items: Vec<Item> = response.json().await.map_err(|source| SidecarError::Unreachable { url: url.clone(), source })?;
        let mut by_key = std::collections::HashMap::with_capacity(items.len());
        for item in items {
            if let Some(error) = item.error {
                return Err(SidecarError::Status { url, status: reqwest::StatusCode::INTERNAL_SERVER_ERROR, body: format!("key {}: {error}", item.key) });
            }
            by_key.insert(item.key, item.data.map(|data| (data, item.etag)));
        }
        // A key asked for twice gets its answer twice.
        Ok(keys.iter().map(|key| by_key.get(key).cloned().flatten()).collect())
    }

    /// Saves `items` (`StateItem`s, owned or borrowed).
    pub(super) async fn save<T: Serialize>(&self, store: &str, items: &[T]) -> Result<(), SidecarError> {
        let url = format!("{}/v1.0/state/{}", self.base, path_segment(store));
        let request = self.http.post(&url).json(items);
        self.send(url, request).await.map(drop)
    }

    /// Runs `operations` (`Operation`s, owned or borrowed) as one transaction.
    pub(super) async fn transaction<T: Serialize>(&self, store: &str, operations: &[T]) -> Result<(), SidecarError> {
        #[derive(Serialize)]
        struct Body<'a, T> {
            operations: &'a [T],
        }
        let url = format!("{}/v1.0/state/{}/transaction", self.base, path_segment(store));
        let request = self.http.post(&url).json(&Body { operations });
        self.send(url, request).await.map(drop)
    }
}

/// An event as a bulk publish entry carries it: Dapr keeps an entry's trace
/// context only if it has a `traceid` too (without one it stamps the bulk
/// request's), so one equal to its `traceparent` is added when missing,
/// while the event is written, without copying it.
struct WithTraceId<'a>(&'a Map<String, Value>);

impl serde::Serialize for WithTraceId<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let event = self.0;
        let traceid = event.get("traceparent").filter(|_| !event.contains_key("traceid"));
        let mut map = serializer.serialize_map(Some(event.len() + usize::from(traceid.is_some())))?;
        for (name, value) in event {
            map.serialize_entry(name, value)?;
        }
        if let Some(parent) = traceid {
            map.serialize_entry("traceid", parent)?;
        }
        map.end()
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::WithTraceId;

    #[test]
    fn a_bulk_entry_gets_its_traceparent_as_traceid_unless_it_has_one() {
        let event = json!({"id": "e1", "traceparent": "00-aa-bb-01"});
        let written = serde_json::to_value(WithTraceId(event.as_object().unwrap())).unwrap();
        assert_eq!(written, json!({"id": "e1", "traceparent": "00-aa-bb-01", "traceid": "00-aa-bb-01"}));
        let own = json!({"id": "e2", "traceparent": "00-aa-bb-01", "traceid": "00-cc-dd-01"});
        assert_eq!(serde_json::to_value(WithTraceId(own.as_object().unwrap())).unwrap(), own);
        let untraced = json!({"id": "e3"});
        assert_eq!(serde_json::to_value(WithTraceId(untraced.as_object().unwrap())).unwrap(), untraced);
    }
}
