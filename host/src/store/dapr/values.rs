//! How guest state values are kept in a Dapr state store: Dapr stores JSON,
//! guest values are bytes. UTF-8 text is stored as a JSON string (readable
//! through Dapr's state API), other bytes as base64 in an object, so every
//! value round-trips exactly.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde_json::Value;

use crate::store::StoreError;

/// The stored form of `bytes`.
pub(super) fn encode(bytes: &[u8]) -> Value {
    match std::str::from_utf8(bytes) {
        Ok(text) => Value::String(text.to_owned()),
        Err(_) => serde_json::json!({ "base64": BASE64.encode(bytes) }),
    }
}

/// The bytes of a stored value, from the raw body Dapr returned.
pub(super) fn decode_body(stored: &[u8]) -> Result<Vec<u8>, StoreError> {
    let value = serde_json::from_slice::<Value>(stored).map_err(|e| corrupt(e.to_string()))?;
    decode(&value)
}

/// The bytes of a stored value.
pub(super) fn decode(value: &Value) -> Result<Vec<u8>, StoreError> {
    match value {
        Value::String(text) => Ok(text.clone().into_bytes()),
        Value::Object(object) => match object.get("base64") {
            Some(Value::String(encoded)) => BASE64.decode(encoded).map_err(|e| corrupt(e.to_string())),
            _ => Err(corrupt("an object without `base64`".into())),
        },
        other => Err(corrupt(format!("unexpected {other}"))),
    }
}

fn corrupt(why: String) -> StoreError {
    StoreError::Unavailable(anyhow::anyhow!("state value is not in wasmsub's encoding: {why}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip_exactly() {
        for bytes in [&b"{\"id\": 1}"[..], b"plain text", b"", &[0xff, 0x00, 0x10]] {
            let stored = serde_json::to_vec(&encode(bytes)).unwrap();
            assert_eq!(decode_body(&stored).unwrap(), bytes);
            assert_eq!(decode(&encode(bytes)).unwrap(), bytes);
        }
        assert_eq!(encode(b"{\"id\":1}"), Value::String("{\"id\":1}".into()));
    }
}
