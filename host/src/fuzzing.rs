//! Entry points for the fuzz targets (`fuzz/`, built with the `fuzzing`
//! feature): the host's parsers and the checks on what a guest hands back,
//! each asserting what must hold for any input. Not part of the service.

use bytes::Bytes;

use crate::cloudevent::CloudEvent;
use crate::pipeline::effects::{self, Effects, PendingPublish};
use crate::pipeline::receive::{self, Payload};
use crate::store::QueuedMessage;
use crate::store::embedded::codec;

/// A delivery's bytes: parsing never panics, and what parses re-parses from
/// its own envelope to the same event.
pub fn cloud_event(body: &[u8], content_type: Option<&str>) {
    let payload = Payload::Bytes(Bytes::copy_from_slice(body));
    if let Ok(event) = receive::parse(&payload, content_type, "pubsub", "topic") {
        let again = CloudEvent::parse(&event.original, "pubsub", "topic").expect("an accepted envelope parses again");
        assert_eq!(again.id, event.id);
        assert_eq!(again.data, event.data);
    }
}

/// A bulk request body: parsing never panics.
pub fn bulk_request(body: &[u8]) {
    if let Some(entries) = crate::transport::dapr_app::parse_bulk(body) {
        for (_, event, _) in entries {
            cloud_event(&event, None);
        }
    }
}

/// A manifest's text: parsing never panics; errors name what is wrong.
pub fn manifest(text: &str) {
    if let Err(error) = crate::Manifest::parse(text, std::path::Path::new("/")) {
        assert!(!format!("{error:#}").is_empty());
    }
}

/// What a guest hands back: keys, values, topics, content types, reasons.
/// Refusals are errors, never panics; every bound holds; a reason comes out
/// printable and bounded.
pub fn guest_values(key: &str, value: &[u8], topic: &str, content_type: &str, reason: &str) {
    let mut buffered = Effects::default();
    if buffered.set(key.to_owned(), value.to_vec()).is_ok() {
        effects::check_key(key).expect("a key the buffer took passes the key check");
        assert_eq!(buffered.buffered_read(key), Some(Some(value)));
    }
    if crate::manifest::check_topic_name(topic).is_ok() {
        assert!(crate::sidecar::path_segment(topic).bytes().all(|b| b != b'/' && b != b'?' && b != b'#'));
    }
    let publish = PendingPublish { topic: topic.to_owned(), data: value.to_vec(), content_type: content_type.to_owned() };
    let _ = buffered.publish(publish);
    let event = CloudEvent::new_outgoing("id".into(), "source", "type", value, content_type);
    let parsed = CloudEvent::from_object(event, "pubsub", "topic").expect("an outgoing event parses");
    if !crate::cloudevent::is_json_media_type(content_type) && std::str::from_utf8(value).is_err() {
        assert_eq!(parsed.data, value, "binary payloads round-trip");
    }
    let shown = crate::runtime::invoke::cut(reason.to_owned());
    assert!(!shown.chars().any(char::is_control), "a reason keeps a control character: {shown:?}");
    assert!(shown.len() <= crate::runtime::invoke::MAX_REASON_BYTES + 40);
}

/// A queue row read back from disk: decoding never panics, and a row that
/// decodes encodes to itself.
pub fn queue_row(row: &[u8]) {
    if let Ok(message) = codec::decode_message(row) {
        let again: QueuedMessage = codec::decode_message(&codec::encode_message(&message)).expect("an encoded row decodes");
        assert_eq!(again, message);
    }
}
