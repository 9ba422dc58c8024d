//! Dedupe: which id makes two deliveries "the same event".
//!
//! The claim/commit protocol lives in [`crate::store`] (and the key it is
//! kept under in [`crate::store::keys`]); this module only decides identity,
//! so it stays pure and testable against fixed vectors.

use serde::Deserialize;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::cloudevent::CloudEvent;

/// How a handler identifies an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum IdMode {
    /// The CloudEvent `id`: the producer's promise of identity (the default).
    #[default]
    CloudeventId,
    /// Derived from content, for producers that mint a new id per send:
    /// `sha256("{type}:{data.id}:{time}")`, the background document's formula.
    Content,
}

/// Why an id could not be derived; the event is dead-lettered with this.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("id-mode `content` needs the event's data to be a JSON object with an `id`")]
    /// No `data.id` to derive the id from.
    NoDataId,
    #[error("id-mode `content` needs the event's `time` attribute")]
    /// No `time` to derive the id from.
    NoTime,
}

/// The id under which `event` is deduplicated, per the handler's mode.
pub fn event_id(event: &CloudEvent, mode: IdMode) -> Result<String, IdError> {
    match mode {
        IdMode::CloudeventId => Ok(event.id.clone()),
        IdMode::Content => {
            let data_id = event.data_json();
            let data_id = data_id.as_ref().and_then(|d| d.get("id")).ok_or(IdError::NoDataId)?;
            let time = event.time.as_deref().ok_or(IdError::NoTime)?;
            Ok(background_content_id(&event.ty, data_id, time))
        }
    }
}

/// The background document's idempotency key, kept byte-for-byte compatible
/// with its Python: `hashlib.sha256(f"{type}:{data['id']}:{timestamp}")`.
/// Python formats a string id as itself and a number as its `str()`, which is
/// what `Value`'s text form gives for integers. The format is ambiguous (a `:`
/// inside `type` shifts fields); it is kept for compatibility, and the store
/// key built from it (below) is not ambiguous.
pub fn background_content_id(ty: &str, data_id: &Value, time: &str) -> String {
    let id_text = match data_id {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    hex::encode(Sha256::digest(format!("{ty}:{id_text}:{time}").as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    // Vectors computed with Python 3's hashlib:
    //   hashlib.sha256(f"{t}:{i}:{ts}".encode()).hexdigest()
    #[test]
    fn content_id_matches_the_python_formula() {
        assert_eq!(
            background_content_id("task-created", &json!(42), "2026-11-26T10:00:00Z"),
            "9297e74394d895cb3b8e27fc8a37304986203cbc40c26b7594b01eafc436415f"
        );
        assert_eq!(
            background_content_id("task.updated", &json!("a7f3"), "2026-01-02T03:04:05.678+01:00"),
            "833198b01ed2133057895d8e847e55d8439bb5abbb936dee0e72b69d67bdd02b"
        );
        assert_eq!(background_content_id("", &json!(""), ""), "71546855d6279ef70d20909b292c42c2dcb02cd06bde01485da52d13e304ebf4");
    }

    #[test]
    fn content_mode_needs_data_id_and_time() {
        let body = json!({"id": "e", "source": "s", "type": "task-created", "specversion": "1.0",
                          "time": "2026-11-26T10:00:00Z", "data": {"id": 42}});
        let event = CloudEvent::parse(&bytes::Bytes::from(body.to_string()), "p", "t").unwrap();
        assert_eq!(event_id(&event, IdMode::CloudeventId).unwrap(), "e");
        assert_eq!(event_id(&event, IdMode::Content).unwrap(), "9297e74394d895cb3b8e27fc8a37304986203cbc40c26b7594b01eafc436415f");

        let mut no_time = event.clone();
        no_time.time = None;
        assert_eq!(event_id(&no_time, IdMode::Content), Err(IdError::NoTime));
        let mut no_data = event;
        no_data.data = b"[1, 2]".to_vec();
        assert_eq!(event_id(&no_data, IdMode::Content), Err(IdError::NoDataId));
    }
}
