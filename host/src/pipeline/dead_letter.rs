//! Dead letters: the message that carries a failed event to its handler's
//! dead-letter topic, and a bounded in-memory log of recent ones for
//! `wasmsub dead-letters`.
//!
//! The message is the original CloudEvent, unchanged, plus extension
//! attributes that say why it is there, so an operator can read the reason
//! and replay the event as it was.

use std::collections::VecDeque;
use std::sync::Mutex;

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::cloudevent::SPEC_VERSION;
use crate::store::OutboundMessage;
use crate::telemetry::TraceContext;

/// Recent dead letters kept for listing; the dead-letter topic is the record.
pub const DEAD_LETTER_LOG_CAPACITY: usize = 1000;

/// Why and where an event was dead-lettered.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// The tenant whose handler gave up.
    pub tenant: String,
    /// The handler.
    pub handler: String,
    /// The handler version (component sha256) that last handled it; empty if
    /// the event never reached the handler (malformed).
    pub handler_version: String,
    /// The id the event was deduplicated by.
    pub event_id: String,
    /// The topic it arrived on.
    pub topic: String,
    /// The topic it was sent to.
    pub dead_letter_topic: String,
    /// Why it was dead-lettered.
    pub reason: String,
    /// Attempts made (0: it never reached the handler).
    pub attempts: u32,
    /// RFC 3339 time it was dead-lettered.
    pub at: String,
}

impl DeadLetter {
    /// The original event with the diagnosis as extension attributes
    /// (CloudEvents extension names are lowercase alphanumerics), carrying
    /// `trace` on: whoever reads the dead-letter topic joins the trace.
    pub fn message_for(&self, pubsub: &str, original: &Map<String, Value>, trace: &TraceContext) -> OutboundMessage {
        let mut event = original.clone();
        // Dapr's delivery fields describe the old delivery, not this one.
        for field in ["topic", "pubsubname"] {
            event.remove(field);
        }
        trace.write_into(&mut event);
        event.insert("wasmsubreason".into(), self.reason.clone().into());
        event.insert("wasmsubattempts".into(), self.attempts.into());
        event.insert("wasmsubtenant".into(), self.tenant.clone().into());
        event.insert("wasmsubhandler".into(), self.handler.clone().into());
        event.insert("wasmsubversion".into(), self.handler_version.clone().into());
        event.insert("wasmsubtopic".into(), self.topic.clone().into());
        event.insert("wasmsubdeadletteredat".into(), self.at.clone().into());
        OutboundMessage { pubsub: pubsub.to_owned(), topic: self.dead_letter_topic.clone(), event: event.into(), origin: Some(self.tenant.clone()) }
    }
}

/// An envelope for a payload that could not be parsed as a CloudEvent, so
/// it can still travel to the dead-letter topic byte for byte.
pub fn envelope_for_malformed(body: &[u8], content_type: Option<&str>) -> (String, Map<String, Value>) {
    let id = format!("malformed-{}", hex::encode(Sha256::digest(body)));
    let mut event = Map::new();
    event.insert("id".into(), id.clone().into());
    event.insert("source".into(), "wasmsub/receive".into());
    event.insert("type".into(), "wasmsub.malformed".into());
    event.insert("specversion".into(), SPEC_VERSION.into());
    event.insert("datacontenttype".into(), content_type.unwrap_or("application/octet-stream").into());
    event.insert("data_base64".into(), base64::engine::general_purpose::STANDARD.encode(body).into());
    (id, event)
}

/// Recent dead letters, newest last, bounded.
#[derive(Default)]
pub struct DeadLetterLog {
    entries: Mutex<VecDeque<DeadLetter>>,
}

impl DeadLetterLog {
    /// Keeps `entry`, forgetting the oldest beyond the capacity.
    pub fn record(&self, entry: DeadLetter) {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if entries.len() == DEAD_LETTER_LOG_CAPACITY {
            entries.pop_front();
        }
        entries.push_back(entry);
    }

    /// The entries, oldest first.
    pub fn list(&self) -> Vec<DeadLetter> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner()).iter().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn entry() -> DeadLetter {
        DeadLetter {
            tenant: "todo".into(),
            handler: "poison".into(),
            handler_version: "abc".into(),
            event_id: "e1".into(),
            topic: "orders".into(),
            dead_letter_topic: "orders-dead-letter".into(),
            reason: "poison".into(),
            attempts: 3,
            at: "2026-11-26T00:00:00Z".into(),
        }
    }

    #[test]
    fn the_message_is_the_original_event_plus_the_diagnosis() {
        let original = json!({"id": "e1", "source": "s", "type": "t", "specversion": "1.0",
                              "data": {"x": 1}, "topic": "orders", "traceparent": "00-old", "traceid": "00-old"});
        let trace = TraceContext { traceparent: Some("00-delivery".into()), tracestate: None };
        let message = entry().message_for("pubsub", original.as_object().unwrap(), &trace);
        assert_eq!(message.topic, "orders-dead-letter");
        assert_eq!(message.event["id"], "e1");
        assert_eq!(message.event["data"], json!({"x": 1}));
        assert_eq!(message.event["wasmsubreason"], "poison");
        assert_eq!(message.event["wasmsubattempts"], 3);
        assert!(message.event.get("topic").is_none() && message.event.get("traceid").is_none());
        // The trace goes on through the dead letter.
        assert_eq!(message.event["traceparent"], "00-delivery");
    }

    #[test]
    fn malformed_payloads_travel_byte_for_byte() {
        let (id, event) = envelope_for_malformed(b"{oops", Some("application/cloudevents+json"));
        assert!(id.starts_with("malformed-"));
        assert_eq!(event["data_base64"], "e29vcHM=");
    }

    #[test]
    fn the_log_is_bounded() {
        let log = DeadLetterLog::default();
        for i in 0..DEAD_LETTER_LOG_CAPACITY + 5 {
            log.record(DeadLetter { event_id: i.to_string(), ..entry() });
        }
        let list = log.list();
        assert_eq!(list.len(), DEAD_LETTER_LOG_CAPACITY);
        assert_eq!(list[0].event_id, "5");
    }
}
