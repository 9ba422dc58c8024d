//! Receive: a delivery's payload becomes a [`CloudEvent`], or the reason it
//! cannot. Run once per delivery by [`crate::delivery`], whatever the
//! transport and however many handlers share the event.
//!
//! Structured CloudEvents (what Dapr delivers by default) are parsed strictly;
//! payloads without an envelope (Dapr's raw payload mode) are wrapped. A
//! payload over a tenant's size limit is refused for that tenant's handlers
//! (and not parsed at all when it is over every recipient's limit).

use bytes::Bytes;

use crate::cloudevent::{CLOUDEVENTS_JSON, CloudEvent, MalformedEvent, is_json_media_type};

/// A delivery's payload as the transport holds it.
#[derive(Debug, Clone)]
pub enum Payload {
    /// Bytes as they arrived (an HTTP body, a bulk entry, a queued message).
    Bytes(Bytes),
    /// An envelope a transport built itself from an event that came in
    /// fields (a streaming subscription's), with the size of its payload:
    /// the limits apply to what the producer sent, not to the wrapping.
    Envelope {
        /// The structured CloudEvent's JSON text.
        json: Bytes,
        /// Bytes of the event's data, for size limits.
        size: usize,
    },
}

impl Payload {
    /// The size that tenants' payload limits apply to.
    pub fn len(&self) -> usize {
        match self {
            Payload::Bytes(bytes) => bytes.len(),
            Payload::Envelope { size, .. } => *size,
        }
    }

    /// Whether the payload is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The payload as bytes, for dead-lettering it as it came.
    pub fn to_bytes(&self) -> Bytes {
        match self {
            Payload::Bytes(bytes) => bytes.clone(),
            Payload::Envelope { json, .. } => json.clone(),
        }
    }
}

/// Why a delivery was refused. Neither gets better by retrying: the caller
/// dead-letters the payload.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Rejection {
    /// The payload is over the receiving tenant's `max_payload_bytes`.
    #[error("event body of {size} bytes is over the tenant's limit of {limit} bytes")]
    TooLarge {
        /// The payload's size.
        size: usize,
        /// The tenant's limit.
        limit: usize,
    },
    /// The payload is not a valid CloudEvent.
    #[error("malformed CloudEvent: {0}")]
    Malformed(#[from] MalformedEvent),
}

/// Checks a payload's size against one tenant's limit.
pub fn check_size(payload: &Payload, limit: usize) -> Result<(), Rejection> {
    let size = payload.len();
    if size > limit {
        return Err(Rejection::TooLarge { size, limit });
    }
    Ok(())
}

/// Parses a payload. `content_type` is the one it was delivered with.
pub fn parse(payload: &Payload, content_type: Option<&str>, pubsubname: &str, topic: &str) -> Result<CloudEvent, MalformedEvent> {
    let body = match payload {
        Payload::Envelope { json, .. } => return CloudEvent::parse(json, pubsubname, topic),
        Payload::Bytes(body) => body,
    };
    let essence = content_type.map(|ct| ct.split(';').next().unwrap_or("").trim().to_ascii_lowercase());
    match essence.as_deref() {
        Some(CLOUDEVENTS_JSON) => CloudEvent::parse(body, pubsubname, topic),
        Some(ct) if !is_json_media_type(ct) => Ok(CloudEvent::wrap_raw(body, content_type, pubsubname, topic)),
        // JSON or no content type: an object carrying `specversion` is a
        // CloudEvent (some clients send them as plain `application/json`).
        _ => CloudEvent::parse_if_structured(body, pubsubname, topic)
            .unwrap_or_else(|| Ok(CloudEvent::wrap_raw(body, content_type, pubsubname, topic))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EVENT: &str = r#"{"id":"1","source":"s","type":"t","specversion":"1.0","data":{"id":1}}"#;

    fn bytes(text: &str) -> Payload {
        Payload::Bytes(Bytes::from(text.to_owned()))
    }

    #[test]
    fn structured_events_are_parsed_and_raw_ones_wrapped() {
        let event = parse(&bytes(EVENT), Some("application/cloudevents+json"), "p", "t").unwrap();
        assert_eq!(event.id, "1");
        let as_json = parse(&bytes(EVENT), Some("application/json"), "p", "t").unwrap();
        assert_eq!(as_json.id, "1");
        let raw = parse(&bytes(r#"{"id":1}"#), Some("application/json"), "p", "t").unwrap();
        assert!(raw.id.starts_with("raw-"));
        let text = parse(&bytes("hello"), Some("text/plain"), "p", "t").unwrap();
        assert_eq!(text.data, b"hello");
        let from_envelope = parse(&Payload::Envelope { json: Bytes::from_static(EVENT.as_bytes()), size: 8 }, None, "p", "t").unwrap();
        assert_eq!(from_envelope, event);
    }

    #[test]
    fn oversized_and_malformed_payloads_are_rejected() {
        assert_eq!(check_size(&bytes(EVENT), 10).unwrap_err(), Rejection::TooLarge { size: EVENT.len(), limit: 10 });
        check_size(&bytes(EVENT), EVENT.len()).unwrap();
        let err = Rejection::from(parse(&bytes("{oops"), Some("application/cloudevents+json"), "p", "t").unwrap_err());
        assert!(err.to_string().starts_with("malformed CloudEvent: not a JSON object"), "{err}");
    }
}
