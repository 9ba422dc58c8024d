//! `recorder`: counts the events it sees and records the last one, so tests
//! can count effects and read what reached a topic (a dead-letter topic,
//! say).
//!
//! The key is the payload's `key` field if it has one, else the event id.
//! Each event increments `count:{key}` (read-modify-write through the host's
//! state, so a double effect shows as 2) and stores `event:{key}` with the
//! event's id, topic, attempt and extensions as JSON.
//!
//! A payload field `spin_ms` makes it busy for that long first, so a test can
//! kill a host while the handler is running. A payload field `forward_to`
//! (a topic) makes it publish `{"key": "fwd-{key}"}` there too, so a test
//! can count follow-up publishes the same way.

wit_bindgen::generate!({ world: "handler", path: "../../wit" });

use serde_json::{Map, Value, json};
use wasmsub::handler::{publisher, state};

struct Recorder;

impl Guest for Recorder {
    fn handle(event: Event) -> Disposition {
        let payload = serde_json::from_slice::<Value>(&event.data).unwrap_or(Value::Null);
        let key = payload.get("key").and_then(Value::as_str).map(str::to_owned).unwrap_or_else(|| event.id.clone());
        if let Some(spin_ms) = payload.get("spin_ms").and_then(Value::as_u64) {
            let until = std::time::Instant::now() + std::time::Duration::from_millis(spin_ms);
            while std::time::Instant::now() < until {
                std::hint::spin_loop();
            }
        }
        let count_key = format!("count:{key}");
        let count = match state::get(&count_key) {
            Ok(Some(bytes)) => String::from_utf8_lossy(&bytes).parse::<u64>().unwrap_or(0),
            Ok(None) => 0,
            Err(why) => return Disposition::Retry(format!("state get {count_key}: {why}")),
        };
        let extensions: Map<String, Value> = event.extensions.into_iter().map(|(k, v)| (k, Value::String(v))).collect();
        let record = json!({"id": event.id, "topic": event.topic, "attempt": event.attempt, "extensions": extensions});
        let writes = [
            (count_key, (count + 1).to_string().into_bytes()),
            (format!("event:{key}"), record.to_string().into_bytes()),
        ];
        for (key, value) in writes {
            if let Err(why) = state::set(&key, &value) {
                return Disposition::Retry(format!("state set {key}: {why}"));
            }
        }
        if let Some(topic) = payload.get("forward_to").and_then(Value::as_str) {
            let follow_up = json!({"key": format!("fwd-{key}")}).to_string();
            if let Err(why) = publisher::publish(topic, follow_up.as_bytes(), "application/json") {
                return Disposition::Retry(format!("publish {topic}: {why}"));
            }
        }
        Disposition::Success
    }
}

export!(Recorder);
