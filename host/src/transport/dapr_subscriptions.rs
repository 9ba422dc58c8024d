//! `GET /dapr/subscribe`: the programmatic subscriptions Dapr reads once at
//! start-up, built from the manifest.
//!
//! No `deadLetterTopic` is set: the host dead-letters the events it gives up
//! on itself, with a reason. Dapr 1.18 would also dead-letter a DROP answer
//! (a second copy, without a reason) and an event whose retries ran out
//! while another copy was still being handled (a false dead letter).

use serde::Serialize;
use serde_json::{Map, Value};

use crate::control::registry::{Registry, fan_out_route};

/// One entry of Dapr's subscription list (field names are Dapr's).
#[derive(Debug, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Subscription {
    /// The pub/sub component.
    pub pubsubname: String,
    /// The topic.
    pub topic: String,
    /// Where Dapr delivers.
    pub routes: Routes,
    #[serde(skip_serializing_if = "Map::is_empty")]
    /// Subscription metadata (`rawPayload`).
    pub metadata: Map<String, Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    /// Bulk delivery settings, if asked for.
    pub bulk_subscribe: Option<BulkSubscribe>,
}

/// Dapr's routing: the first rule whose CEL `match` holds, else `default`.
#[derive(Debug, Serialize, PartialEq)]
pub struct Routes {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    /// Routing rules, first match wins.
    pub rules: Vec<Rule>,
    #[serde(skip_serializing_if = "Option::is_none")]
    /// The route for events no rule matches.
    pub default: Option<String>,
}

#[derive(Debug, Serialize, PartialEq)]
/// A routing rule: a CEL condition and the route it sends to.
pub struct Rule {
    #[serde(rename = "match")]
    /// The CEL condition.
    pub matches: String,
    /// The route.
    pub path: String,
}

#[derive(Debug, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
/// Dapr's bulk subscribe settings.
pub struct BulkSubscribe {
    /// Always true when present.
    pub enabled: bool,
    /// Most events per request.
    pub max_messages_count: u32,
    /// Longest wait to fill a request, in ms.
    pub max_await_duration_ms: u32,
}

/// One subscription per (pubsub, topic): Dapr delivers a topic to an app
/// once. Handlers with a `match_type` become routing rules; the others share
/// the default route (their own, or the host's fan-out route for several).
/// The manifest check guarantees they agree on raw payload and bulk.
pub fn subscriptions(registry: &Registry) -> Vec<Subscription> {
    let mut subscriptions: Vec<_> = registry
        .topics()
        .into_iter()
        .map(|((pubsub, topic), group)| {
            let first = &group[0].config;
            let mut metadata = Map::new();
            if first.raw_payload {
                metadata.insert("rawPayload".into(), "true".into());
            }
            let rules = group
                .iter()
                .filter_map(|h| h.config.match_type.as_ref().map(|ty| Rule { matches: cel_type_equals(ty), path: h.route.clone() }))
                .collect();
            let defaults: Vec<_> = group.iter().filter(|h| h.config.match_type.is_none()).collect();
            let default = match defaults.as_slice() {
                [] => None,
                [only] => Some(only.route.clone()),
                _ => Some(fan_out_route(&pubsub, &topic)),
            };
            Subscription {
                pubsubname: pubsub.clone(),
                topic: topic.clone(),
                routes: Routes { rules, default },
                metadata,
                bulk_subscribe: first.bulk.as_ref().map(|bulk| BulkSubscribe {
                    enabled: true,
                    max_messages_count: bulk.max_messages,
                    max_await_duration_ms: bulk.max_await_ms,
                }),
            }
        })
        .collect();
    subscriptions.sort_by(|a, b| (&a.pubsubname, &a.topic).cmp(&(&b.pubsubname, &b.topic)));
    subscriptions
}

/// A CEL expression comparing the event type with a string literal.
fn cel_type_equals(ty: &str) -> String {
    format!("event.type == {}", serde_json::to_string(ty).expect("a string serialises"))
}
