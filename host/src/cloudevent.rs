//! The CloudEvents 1.0 envelope as the host sees it: parsed from structured
//! JSON (what Dapr delivers by default) or wrapped around a raw payload.
//!
//! The original JSON object is kept next to the parsed fields so that a
//! dead-letter entry can republish the event exactly as it arrived, with the
//! host's diagnosis added as extension attributes.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

/// The only CloudEvents version the host accepts.
pub const SPEC_VERSION: &str = "1.0";
/// Media type of a structured-mode CloudEvent.
pub const CLOUDEVENTS_JSON: &str = "application/cloudevents+json";

/// Attributes the host maps to fields of its own; everything else not in
/// this list is passed to the guest as an extension.
const KNOWN_ATTRIBUTES: &[&str] = &[
    "id", "source", "type", "specversion", "subject", "time", "datacontenttype", "data",
    "data_base64", "topic", "pubsubname",
];

/// Why an event could not be parsed. Callers answer a client error and
/// dead-letter the payload; they never retry it (it cannot get better).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MalformedEvent {
    #[error("not a JSON object: {0}")]
    /// The body is not a JSON object.
    NotJson(String),
    #[error("required attribute `{0}` is missing or not a non-empty string")]
    /// A required attribute is absent or empty.
    MissingAttribute(&'static str),
    #[error("unsupported specversion `{0}` (only 1.0 is accepted)")]
    /// Another CloudEvents version.
    UnsupportedSpecVersion(String),
    #[error("attribute `{0}` must be a string")]
    /// An attribute that must be a string is not.
    NotAString(&'static str),
    #[error("`data_base64` is not valid base64: {0}")]
    /// `data_base64` does not decode.
    BadBase64(String),
    #[error("both `data` and `data_base64` are present")]
    /// The payload is given twice.
    BothDataForms,
}

/// One event, parsed. Field names follow the CloudEvents attributes.
#[derive(Debug, Clone, PartialEq)]
pub struct CloudEvent {
    /// `id`: with `source`, the event's identity.
    pub id: String,
    /// `source`: who produced it.
    pub source: String,
    /// `type`: what kind of event it is.
    pub ty: String,
    /// `specversion`: always 1.0.
    pub specversion: String,
    /// `subject`, if given.
    pub subject: Option<String>,
    /// `time`, if given (RFC 3339 text, as sent).
    pub time: Option<String>,
    /// `datacontenttype`, if given.
    pub datacontenttype: Option<String>,
    /// The payload bytes: JSON payloads as their JSON text.
    pub data: Vec<u8>,
    /// The payload as JSON, when it is JSON (used for content-derived ids).
    pub data_json: Option<Value>,
    /// Extension attributes, as text, in the envelope's order.
    pub extensions: Vec<(String, String)>,
    /// The topic it arrived on.
    pub topic: String,
    /// The pub/sub component it arrived through.
    pub pubsubname: String,
    /// The event as it arrived, for dead-lettering it unchanged.
    pub original: Map<String, Value>,
}

impl CloudEvent {
    /// Parses a structured-mode CloudEvent. `topic` and `pubsubname` are the
    /// delivery's, used when the envelope does not carry them (Dapr adds them).
    pub fn parse(body: &[u8], pubsubname: &str, topic: &str) -> Result<Self, MalformedEvent> {
        let value: Value = serde_json::from_slice(body).map_err(|e| MalformedEvent::NotJson(e.to_string()))?;
        let Value::Object(object) = value else {
            return Err(MalformedEvent::NotJson("the body is JSON but not an object".into()));
        };
        Self::from_object(object, pubsubname, topic)
    }

    /// Checks an already-parsed JSON object as a structured CloudEvent.
    pub fn from_object(object: Map<String, Value>, pubsubname: &str, topic: &str) -> Result<Self, MalformedEvent> {
        let required = |name: &'static str| match object.get(name) {
            Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
            _ => Err(MalformedEvent::MissingAttribute(name)),
        };
        let optional = |name: &'static str| match object.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(MalformedEvent::NotAString(name)),
        };
        let specversion = required("specversion")?;
        if specversion != SPEC_VERSION {
            return Err(MalformedEvent::UnsupportedSpecVersion(specversion));
        }
        let datacontenttype = optional("datacontenttype")?;
        let (data, data_json) = payload_of(&object, datacontenttype.as_deref())?;
        let extensions = object
            .iter()
            .filter(|(name, _)| !KNOWN_ATTRIBUTES.contains(&name.as_str()))
            .map(|(name, value)| (name.clone(), attribute_text(value)))
            .collect();
        Ok(Self {
            id: required("id")?,
            source: required("source")?,
            ty: required("type")?,
            specversion,
            subject: optional("subject")?,
            time: optional("time")?,
            datacontenttype,
            data,
            data_json,
            extensions,
            topic: optional("topic")?.unwrap_or_else(|| topic.to_owned()),
            pubsubname: optional("pubsubname")?.unwrap_or_else(|| pubsubname.to_owned()),
            original: object,
        })
    }

    /// Wraps a payload that arrived without an envelope (Dapr's raw payload
    /// mode). With no producer id, the id is the payload's sha256, so a
    /// redelivered raw payload is recognised as the same event.
    pub fn wrap_raw(body: &[u8], content_type: Option<&str>, pubsubname: &str, topic: &str) -> Self {
        let id = format!("raw-{}", hex::encode(Sha256::digest(body)));
        let content_type = content_type.unwrap_or("application/octet-stream").to_owned();
        let data_json: Option<Value> = is_json_media_type(&content_type).then(|| serde_json::from_slice(body).ok()).flatten();
        let mut original = Map::new();
        original.insert("id".into(), id.clone().into());
        original.insert("source".into(), "wasmsub/raw".into());
        original.insert("type".into(), "wasmsub.raw".into());
        original.insert("specversion".into(), SPEC_VERSION.into());
        original.insert("datacontenttype".into(), content_type.clone().into());
        match &data_json {
            Some(json) => original.insert("data".into(), json.clone()),
            None => original.insert("data_base64".into(), BASE64.encode(body).into()),
        };
        Self {
            id,
            source: "wasmsub/raw".into(),
            ty: "wasmsub.raw".into(),
            specversion: SPEC_VERSION.into(),
            subject: None,
            time: None,
            datacontenttype: Some(content_type),
            data: body.to_vec(),
            data_json,
            extensions: Vec::new(),
            topic: topic.to_owned(),
            pubsubname: pubsubname.to_owned(),
            original,
        }
    }

    /// A new event to publish, with a caller-chosen (stable) id. The payload
    /// goes in as Dapr's publish API puts it: JSON as JSON, other UTF-8 text
    /// as a string, anything else base64-encoded.
    pub fn new_outgoing(id: String, source: &str, ty: &str, data: &[u8], content_type: &str) -> Map<String, Value> {
        let mut event = Map::new();
        event.insert("id".into(), id.into());
        event.insert("source".into(), source.into());
        event.insert("type".into(), ty.into());
        event.insert("specversion".into(), SPEC_VERSION.into());
        event.insert("datacontenttype".into(), content_type.into());
        let json = is_json_media_type(content_type)
            .then(|| serde_json::from_slice::<Value>(data).ok())
            .flatten();
        match (json, std::str::from_utf8(data)) {
            (Some(json), _) => event.insert("data".into(), json),
            (None, Ok(text)) => event.insert("data".into(), text.into()),
            (None, Err(_)) => event.insert("data_base64".into(), BASE64.encode(data).into()),
        };
        event
    }
}

/// Whether a media type carries JSON (`application/json`, `...+json`).
pub fn is_json_media_type(media_type: &str) -> bool {
    let essence = media_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    essence == "application/json" || essence == "text/json" || essence.ends_with("+json")
}

fn payload_of(object: &Map<String, Value>, content_type: Option<&str>) -> Result<(Vec<u8>, Option<Value>), MalformedEvent> {
    match (object.get("data"), object.get("data_base64")) {
        (Some(_), Some(_)) => Err(MalformedEvent::BothDataForms),
        (None | Some(Value::Null), None) => Ok((Vec::new(), None)),
        (None, Some(Value::String(encoded))) => {
            let bytes = BASE64.decode(encoded).map_err(|e| MalformedEvent::BadBase64(e.to_string()))?;
            let json = content_type.filter(|ct| is_json_media_type(ct)).and_then(|_| serde_json::from_slice(&bytes).ok());
            Ok((bytes, json))
        }
        (None, Some(_)) => Err(MalformedEvent::NotAString("data_base64")),
        // A string payload of a non-JSON media type is the text itself.
        (Some(Value::String(text)), None) if !content_type.is_some_and(is_json_media_type) => {
            Ok((text.clone().into_bytes(), serde_json::from_str(text).ok()))
        }
        (Some(value), None) => Ok((value.to_string().into_bytes(), Some(value.clone()))),
    }
}

fn attribute_text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(value: Value) -> Result<CloudEvent, MalformedEvent> {
        CloudEvent::parse(value.to_string().as_bytes(), "pubsub", "orders")
    }

    fn minimal() -> Value {
        json!({"id": "e1", "source": "/todo", "type": "task-created", "specversion": "1.0"})
    }

    #[test]
    fn parses_a_dapr_structured_event() {
        let event = parse(json!({
            "id": "e1", "source": "todo-api", "type": "com.example.task-created", "specversion": "1.0",
            "time": "2026-11-26T10:00:00Z", "datacontenttype": "application/json",
            "data": {"id": 7, "title": "write tests"},
            "topic": "task-created", "pubsubname": "todo-pubsub", "traceparent": "00-abc-def-01"
        }))
        .unwrap();
        assert_eq!(event.ty, "com.example.task-created");
        assert_eq!(event.topic, "task-created");
        assert_eq!(event.pubsubname, "todo-pubsub");
        assert_eq!(event.time.as_deref(), Some("2026-11-26T10:00:00Z"));
        assert_eq!(serde_json::from_slice::<Value>(&event.data).unwrap(), json!({"id": 7, "title": "write tests"}));
        assert_eq!(event.extensions, vec![("traceparent".to_string(), "00-abc-def-01".to_string())]);
    }

    #[test]
    fn topic_defaults_to_the_deliverys() {
        let event = parse(minimal()).unwrap();
        assert_eq!((event.topic.as_str(), event.pubsubname.as_str()), ("orders", "pubsub"));
        assert!(event.data.is_empty());
    }

    #[test]
    fn text_and_base64_payloads_are_bytes() {
        let mut text = minimal();
        text["datacontenttype"] = "text/plain".into();
        text["data"] = "hello".into();
        assert_eq!(parse(text).unwrap().data, b"hello");

        let mut binary = minimal();
        binary["data_base64"] = BASE64.encode([0u8, 159, 146, 150]).into();
        assert_eq!(parse(binary).unwrap().data, vec![0u8, 159, 146, 150]);
    }

    #[test]
    fn malformed_events_say_what_is_wrong() {
        assert!(matches!(CloudEvent::parse(b"{not json", "p", "t"), Err(MalformedEvent::NotJson(_))));
        assert!(matches!(CloudEvent::parse(b"[1]", "p", "t"), Err(MalformedEvent::NotJson(_))));
        let mut no_id = minimal();
        no_id.as_object_mut().unwrap().remove("id");
        assert_eq!(parse(no_id).unwrap_err().to_string(), "required attribute `id` is missing or not a non-empty string");
        let mut v02 = minimal();
        v02["specversion"] = "0.2".into();
        assert_eq!(parse(v02).unwrap_err(), MalformedEvent::UnsupportedSpecVersion("0.2".into()));
        let mut both = minimal();
        both["data"] = json!(1);
        both["data_base64"] = "AA==".into();
        assert_eq!(parse(both).unwrap_err(), MalformedEvent::BothDataForms);
        let mut bad_subject = minimal();
        bad_subject["subject"] = json!(5);
        assert_eq!(parse(bad_subject).unwrap_err(), MalformedEvent::NotAString("subject"));
    }

    #[test]
    fn raw_payloads_get_a_content_derived_id() {
        let a = CloudEvent::wrap_raw(br#"{"id":1}"#, Some("application/json"), "p", "t");
        let b = CloudEvent::wrap_raw(br#"{"id":1}"#, Some("application/json"), "p", "t");
        let c = CloudEvent::wrap_raw(br#"{"id":2}"#, Some("application/json"), "p", "t");
        assert_eq!(a.id, b.id);
        assert_ne!(a.id, c.id);
        assert_eq!(a.data_json, Some(json!({"id": 1})));
        let reparsed = CloudEvent::from_object(a.original.clone(), "p", "t").unwrap();
        assert_eq!(reparsed.data, a.data);
    }

    #[test]
    fn outgoing_events_embed_json_and_encode_binary() {
        let json_event = CloudEvent::new_outgoing("x".into(), "s", "t", br#"{"a":1}"#, "application/json");
        assert_eq!(json_event["data"], json!({"a": 1}));
        let binary = CloudEvent::new_outgoing("x".into(), "s", "t", &[0xff, 0x00], "application/octet-stream");
        assert_eq!(binary["data_base64"], json!("/wA="));
    }
}
