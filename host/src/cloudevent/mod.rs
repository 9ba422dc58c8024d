//! The CloudEvents 1.0 envelope as the host sees it: parsed from structured
//! JSON (what Dapr delivers by default) or wrapped around a raw payload.
//!
//! The envelope's JSON text is kept next to the parsed fields so that a
//! dead-letter entry can republish the event exactly as it arrived, with the
//! host's diagnosis added as extension attributes. Parsing reads the
//! attributes straight from that text ([`attributes`]): a JSON payload goes
//! to the guest as the text it was sent as, never parsed on the way.

mod attributes;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use attributes::{Attributes, is_null, string};

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
    /// The payload bytes: a JSON payload as the JSON text it was sent as.
    pub data: Vec<u8>,
    /// Extension attributes, as text, in the envelope's order.
    pub extensions: Vec<(String, String)>,
    /// The topic it arrived on.
    pub topic: String,
    /// The pub/sub component it arrived through.
    pub pubsubname: String,
    /// The envelope's JSON text as it arrived, for dead-lettering it
    /// unchanged (a raw payload's: the envelope it was wrapped in).
    pub original: Bytes,
}

impl CloudEvent {
    /// Parses a structured-mode CloudEvent. `topic` and `pubsubname` are the
    /// delivery's, used when the envelope does not carry them (Dapr adds them).
    pub fn parse(body: &Bytes, pubsubname: &str, topic: &str) -> Result<Self, MalformedEvent> {
        let attributes = Attributes::read(body).map_err(|e| MalformedEvent::NotJson(e.to_string()))?;
        Self::from_attributes(&attributes, body.clone(), pubsubname, topic)
    }

    /// A body sent as plain JSON (or with no content type) is a structured
    /// CloudEvent if it is an object that carries `specversion` (some
    /// clients send CloudEvents so): then it is parsed strictly. `None`:
    /// the body is a raw payload.
    pub fn parse_if_structured(body: &Bytes, pubsubname: &str, topic: &str) -> Option<Result<Self, MalformedEvent>> {
        let attributes = Attributes::read(body).ok()?;
        attributes.get("specversion")?;
        Some(Self::from_attributes(&attributes, body.clone(), pubsubname, topic))
    }

    /// Checks a JSON object as a structured CloudEvent (for events the host
    /// holds as JSON already: a file given to `wasmsub invoke`, tests).
    pub fn from_object(object: Map<String, Value>, pubsubname: &str, topic: &str) -> Result<Self, MalformedEvent> {
        let body = Bytes::from(serde_json::to_vec(&object).expect("a JSON object serialises"));
        Self::parse(&body, pubsubname, topic)
    }

    fn from_attributes(attributes: &Attributes<'_>, original: Bytes, pubsubname: &str, topic: &str) -> Result<Self, MalformedEvent> {
        let required = |name: &'static str| match attributes.get(name).and_then(string) {
            Some(text) if !text.is_empty() => Ok(text),
            _ => Err(MalformedEvent::MissingAttribute(name)),
        };
        let optional = |name: &'static str| match attributes.get(name) {
            None => Ok(None),
            Some(raw) if is_null(raw) => Ok(None),
            Some(raw) => string(raw).map(Some).ok_or(MalformedEvent::NotAString(name)),
        };
        let specversion = required("specversion")?;
        if specversion != SPEC_VERSION {
            return Err(MalformedEvent::UnsupportedSpecVersion(specversion));
        }
        let datacontenttype = optional("datacontenttype")?;
        let data = payload_of(attributes, datacontenttype.as_deref())?;
        Ok(Self {
            id: required("id")?,
            source: required("source")?,
            ty: required("type")?,
            specversion,
            subject: optional("subject")?,
            time: optional("time")?,
            datacontenttype,
            data,
            extensions: extensions_of(attributes),
            topic: optional("topic")?.unwrap_or_else(|| topic.to_owned()),
            pubsubname: optional("pubsubname")?.unwrap_or_else(|| pubsubname.to_owned()),
            original,
        })
    }

    /// The payload as JSON, when it is JSON (for content-derived ids: only
    /// handlers that ask for them pay for the parse).
    pub fn data_json(&self) -> Option<Value> {
        serde_json::from_slice(&self.data).ok()
    }

    /// The envelope as a JSON object, for a dead-letter entry to extend.
    pub fn original_object(&self) -> Map<String, Value> {
        match serde_json::from_slice(&self.original) {
            Ok(object) => object,
            // Nested deeper than serde_json builds a tree for (128 levels;
            // reading the attributes has no such limit): the envelope again
            // from its parsed fields, the payload base64-encoded and whole.
            Err(_) => self.rebuilt_envelope(),
        }
    }

    fn rebuilt_envelope(&self) -> Map<String, Value> {
        let mut object = Map::new();
        for (name, value) in &self.extensions {
            object.insert(name.clone(), value.clone().into());
        }
        let optional = [("subject", &self.subject), ("time", &self.time), ("datacontenttype", &self.datacontenttype)];
        for (name, value) in optional {
            if let Some(value) = value {
                object.insert(name.into(), value.clone().into());
            }
        }
        let fields = [("id", &self.id), ("source", &self.source), ("type", &self.ty), ("specversion", &self.specversion)];
        for (name, value) in fields.into_iter().chain([("topic", &self.topic), ("pubsubname", &self.pubsubname)]) {
            object.insert(name.into(), value.clone().into());
        }
        object.insert("data_base64".into(), BASE64.encode(&self.data).into());
        object
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
            extensions: Vec::new(),
            topic: topic.to_owned(),
            pubsubname: pubsubname.to_owned(),
            original: Bytes::from(serde_json::to_vec(&original).expect("a JSON object serialises")),
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

fn payload_of(attributes: &Attributes<'_>, content_type: Option<&str>) -> Result<Vec<u8>, MalformedEvent> {
    match (attributes.get("data"), attributes.get("data_base64")) {
        (Some(_), Some(_)) => Err(MalformedEvent::BothDataForms),
        (None, None) => Ok(Vec::new()),
        (Some(data), None) if is_null(data) => Ok(Vec::new()),
        (None, Some(encoded)) => {
            let encoded = string(encoded).ok_or(MalformedEvent::NotAString("data_base64"))?;
            BASE64.decode(encoded).map_err(|e| MalformedEvent::BadBase64(e.to_string()))
        }
        (Some(data), None) => match string(data) {
            // A string payload of a non-JSON media type is the text itself.
            Some(text) if !content_type.is_some_and(is_json_media_type) => Ok(text.into_bytes()),
            _ => Ok(data.get().as_bytes().to_vec()),
        },
    }
}

/// Attributes the host has no field for, as text, in the envelope's order
/// (a name sent twice keeps its last value).
fn extensions_of(attributes: &Attributes<'_>) -> Vec<(String, String)> {
    let mut extensions: Vec<(String, String)> = Vec::new();
    for (name, raw) in attributes.iter().filter(|(name, _)| !KNOWN_ATTRIBUTES.contains(name)) {
        let text = string(raw).unwrap_or_else(|| raw.get().to_owned());
        match extensions.iter_mut().find(|(known, _)| known == name) {
            Some(extension) => extension.1 = text,
            None => extensions.push((name.to_owned(), text)),
        }
    }
    extensions
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(value: Value) -> Result<CloudEvent, MalformedEvent> {
        CloudEvent::parse(&Bytes::from(value.to_string()), "pubsub", "orders")
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
    fn a_json_payload_reaches_the_guest_as_sent_and_the_envelope_is_kept() {
        let body = Bytes::from_static(
            br#"{"specversion":"1.0","id":"e\u0031","source":"s","type":"t","zz":1,"data":{"title":"a b","id":12345678901234567890},"aa":"x"}"#,
        );
        let event = CloudEvent::parse(&body, "p", "t").unwrap();
        assert_eq!(event.id, "e1");
        // Not re-serialised: key order and a number wider than 64 bits survive.
        assert_eq!(event.data, br#"{"title":"a b","id":12345678901234567890}"#);
        assert_eq!(event.extensions, [("zz".to_string(), "1".to_string()), ("aa".to_string(), "x".to_string())]);
        assert_eq!(event.original, body);
        assert_eq!(event.original_object()["zz"], json!(1));
    }

    #[test]
    fn a_payload_nested_too_deep_for_a_json_tree_still_dead_letters_whole() {
        let deep = format!("{}{}", "[".repeat(300), "]".repeat(300));
        let body = format!(r#"{{"specversion":"1.0","id":"deep","source":"s","type":"t","ext":"x","data":{deep}}}"#);
        let event = CloudEvent::parse(&Bytes::from(body), "p", "t").unwrap();
        assert_eq!(event.data, deep.as_bytes());
        let original = event.original_object();
        assert_eq!((original["id"].as_str(), original["ext"].as_str()), (Some("deep"), Some("x")));
        let again = CloudEvent::from_object(original, "p", "t").unwrap();
        assert_eq!(again.data, event.data);
    }

    #[test]
    fn plain_json_is_an_event_only_with_a_specversion() {
        let event = Bytes::from(minimal().to_string());
        assert_eq!(CloudEvent::parse_if_structured(&event, "p", "t").unwrap().unwrap().id, "e1");
        let mut bad = minimal();
        bad["specversion"] = "0.3".into();
        assert!(CloudEvent::parse_if_structured(&Bytes::from(bad.to_string()), "p", "t").unwrap().is_err());
        for raw in [&br#"{"id": 1}"#[..], b"[1]", b"not json"] {
            assert!(CloudEvent::parse_if_structured(&Bytes::copy_from_slice(raw), "p", "t").is_none());
        }
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
        assert!(matches!(CloudEvent::parse(&Bytes::from_static(b"{not json"), "p", "t"), Err(MalformedEvent::NotJson(_))));
        assert!(matches!(CloudEvent::parse(&Bytes::from_static(b"[1]"), "p", "t"), Err(MalformedEvent::NotJson(_))));
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
        assert_eq!(a.data_json(), Some(json!({"id": 1})));
        let reparsed = CloudEvent::parse(&a.original, "p", "t").unwrap();
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
