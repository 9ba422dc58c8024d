//! How the embedded store lays its rows out: tables, and the compact
//! encoding of queued messages (a message body can be megabytes; JSON with
//! base64 would grow it by a third and cost a parse per delivery).

use bytes::Bytes;
use redb::TableDefinition;

use crate::store::QueuedMessage;

/// Claims and done markers, by encoded dedupe key.
pub const CLAIMS: TableDefinition<&str, &[u8]> = TableDefinition::new("claims");
/// Tenant state under a (tenant, key) tuple: the tenant is a separate field,
/// so no key string can reach another tenant's entries.
pub const STATE: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("state");
/// The embedded broker's queue: messages accepted and not yet settled.
pub const QUEUE: TableDefinition<u64, &[u8]> = TableDefinition::new("queue");
/// Recent dead letters (JSON), oldest first, bounded.
pub const DEAD_LETTERS: TableDefinition<u64, &[u8]> = TableDefinition::new("dead_letters");
/// Outbox entries of stores written before the queue existed; moved to
/// the queue when such a store is opened.
pub const LEGACY_OUTBOX: TableDefinition<u64, &[u8]> = TableDefinition::new("outbox");

/// A message as a row: `pubsub`, `topic` and the content type each as a
/// 2-byte length and the bytes (a content type of length 0xFFFF is
/// absent), then the body.
pub fn encode_message(message: &QueuedMessage) -> Vec<u8> {
    let ct = message.content_type.as_deref();
    let mut row = Vec::with_capacity(6 + message.pubsub.len() + message.topic.len() + ct.map_or(0, str::len) + message.body.len());
    for field in [Some(message.pubsub.as_str()), Some(message.topic.as_str()), ct] {
        match field {
            Some(text) => {
                let len = u16::try_from(text.len()).expect("names and content types are short (checked on the way in)");
                row.extend_from_slice(&len.min(0xFFFE).to_be_bytes());
                row.extend_from_slice(&text.as_bytes()[..len.min(0xFFFE) as usize]);
            }
            None => row.extend_from_slice(&0xFFFFu16.to_be_bytes()),
        }
    }
    row.extend_from_slice(&message.body);
    row
}

/// Reads a row written by [`encode_message`].
pub fn decode_message(row: &[u8]) -> Result<QueuedMessage, String> {
    let mut rest = row;
    let mut fields: [Option<String>; 3] = Default::default();
    for field in &mut fields {
        let (len, tail) = rest.split_at_checked(2).ok_or("row ends inside a length")?;
        let len = u16::from_be_bytes([len[0], len[1]]);
        if len == 0xFFFF {
            rest = tail;
            continue;
        }
        let (text, tail) = tail.split_at_checked(len as usize).ok_or("row ends inside a field")?;
        *field = Some(String::from_utf8(text.to_vec()).map_err(|e| e.to_string())?);
        rest = tail;
    }
    let [pubsub, topic, content_type] = fields;
    Ok(QueuedMessage {
        pubsub: pubsub.ok_or("no pubsub")?,
        topic: topic.ok_or("no topic")?,
        content_type,
        body: Bytes::copy_from_slice(rest),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip() {
        for content_type in [None, Some("application/cloudevents+json".to_owned()), Some(String::new())] {
            let message = QueuedMessage { pubsub: "p".into(), topic: "orders".into(), body: Bytes::from_static(b"\x00{\"x\":1}"), content_type };
            assert_eq!(decode_message(&encode_message(&message)).unwrap(), message);
        }
        assert!(decode_message(b"\x00").is_err());
    }
}
