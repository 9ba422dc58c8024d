//! `GET /dapr/subscribe`: the programmatic subscriptions Dapr reads once at
//! start-up, built from the manifest.
//!
//! No `deadLetterTopic` is set: the host dead-letters the events it gives up
//! on itself, with a reason. Dapr 1.18 would also dead-letter a DROP answer
//! (a second copy, without a reason) and an event whose retries ran out
//! while another copy was still being handled (a false dead letter).

use serde::Serialize;
use serde_json::{Map, Value};

use crate::registry::Registry;

/// One entry of Dapr's subscription list (field names are Dapr's).
#[derive(Debug, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Subscription {
    pub pubsubname: String,
    pub topic: String,
    pub route: String,
    #[serde(skip_serializing_if = "Map::is_empty")]
    pub metadata: Map<String, Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bulk_subscribe: Option<BulkSubscribe>,
}

#[derive(Debug, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BulkSubscribe {
    pub enabled: bool,
    pub max_messages_count: u32,
    pub max_await_duration_ms: u32,
}

pub fn subscriptions(registry: &Registry) -> Vec<Subscription> {
    registry
        .handlers
        .iter()
        .map(|handler| {
            let config = &handler.config;
            let mut metadata = Map::new();
            if config.raw_payload {
                metadata.insert("rawPayload".into(), "true".into());
            }
            Subscription {
                pubsubname: config.pubsub.clone(),
                topic: config.topic.clone(),
                route: handler.route.clone(),
                metadata,
                bulk_subscribe: config.bulk.as_ref().map(|bulk| BulkSubscribe {
                    enabled: true,
                    max_messages_count: bulk.max_messages,
                    max_await_duration_ms: bulk.max_await_ms,
                }),
            }
        })
        .collect()
}
