//! Receive: turn a delivery's bytes into a [`CloudEvent`], or say why not.
//!
//! Structured CloudEvents (what Dapr delivers by default) are parsed strictly;
//! payloads without an envelope (Dapr's raw payload mode) are wrapped. A
//! delivery over its tenant's size limit is refused before it is parsed.

use crate::cloudevent::{CLOUDEVENTS_JSON, CloudEvent, MalformedEvent, is_json_media_type};

/// Why a delivery was refused. Neither gets better by retrying: the caller
/// dead-letters the payload and answers a client error.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Rejection {
    #[error("event body of {size} bytes is over the tenant's limit of {limit} bytes")]
    TooLarge { size: usize, limit: usize },
    #[error("malformed CloudEvent: {0}")]
    Malformed(#[from] MalformedEvent),
}

/// Parses a delivery. `content_type` is the HTTP content type it came with.
pub fn receive(
    body: &[u8],
    content_type: Option<&str>,
    pubsubname: &str,
    topic: &str,
    max_payload_bytes: usize,
) -> Result<CloudEvent, Rejection> {
    if body.len() > max_payload_bytes {
        return Err(Rejection::TooLarge { size: body.len(), limit: max_payload_bytes });
    }
    if is_structured(body, content_type) {
        Ok(CloudEvent::parse(body, pubsubname, topic)?)
    } else {
        Ok(CloudEvent::wrap_raw(body, content_type, pubsubname, topic))
    }
}

/// A body is a structured CloudEvent if it says so in its content type, or
/// if it is a JSON object that carries `specversion` (some clients send
/// CloudEvents as plain `application/json`).
fn is_structured(body: &[u8], content_type: Option<&str>) -> bool {
    let essence = content_type.map(|ct| ct.split(';').next().unwrap_or("").trim().to_ascii_lowercase());
    match essence.as_deref() {
        Some(CLOUDEVENTS_JSON) => true,
        Some(ct) if !is_json_media_type(ct) => false,
        // JSON or no content type: look for the envelope's mark.
        _ => serde_json::from_slice::<serde_json::Value>(body)
            .is_ok_and(|v| v.get("specversion").is_some()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EVENT: &str = r#"{"id":"1","source":"s","type":"t","specversion":"1.0","data":{"id":1}}"#;

    #[test]
    fn structured_events_are_parsed_and_raw_ones_wrapped() {
        let event = receive(EVENT.as_bytes(), Some("application/cloudevents+json"), "p", "t", 1024).unwrap();
        assert_eq!(event.id, "1");
        let as_json = receive(EVENT.as_bytes(), Some("application/json"), "p", "t", 1024).unwrap();
        assert_eq!(as_json.id, "1");
        let raw = receive(br#"{"id":1}"#, Some("application/json"), "p", "t", 1024).unwrap();
        assert!(raw.id.starts_with("raw-"));
        let text = receive(b"hello", Some("text/plain"), "p", "t", 1024).unwrap();
        assert_eq!(text.data, b"hello");
    }

    #[test]
    fn oversized_and_malformed_bodies_are_rejected() {
        assert_eq!(
            receive(EVENT.as_bytes(), None, "p", "t", 10).unwrap_err(),
            Rejection::TooLarge { size: EVENT.len(), limit: 10 }
        );
        let err = receive(b"{oops", Some("application/cloudevents+json"), "p", "t", 1024).unwrap_err();
        assert!(err.to_string().starts_with("malformed CloudEvent: not a JSON object"), "{err}");
    }
}
