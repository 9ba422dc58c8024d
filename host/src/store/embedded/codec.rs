//! How the embedded store lays its rows out: tables, and the compact
//! encoding of queued messages (a message body can be megabytes; JSON with
//! base64 would grow it by a third and cost a parse per delivery).

use bytes::Bytes;
use redb::TableDefinition;

use crate::store::QueuedMessage;

/// Claims and done markers, by encoded dedupe key.
pub const CLAIMS: TableDefinition<&str, &[u8]> = TableDefinition::new("claims");
/// Tenant state under a (tenant, key) tuple: the tenant is a separate field,
/// so no key string can reach another tenant's entries. A value is the
/// version that wrote it (8 bytes, big-endian: the commit's number, for read
/// validation) followed by the bytes.
pub const STATE: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("state");
/// The embedded broker's queue: messages accepted and not yet settled.
pub const QUEUE: TableDefinition<u64, &[u8]> = TableDefinition::new("queue");
/// Recent dead letters (JSON), oldest first, bounded.
pub const DEAD_LETTERS: TableDefinition<u64, &[u8]> = TableDefinition::new("dead_letters");
/// Outbox entries of stores written before the queue existed; moved to
/// the queue when such a store is opened.
pub const LEGACY_OUTBOX: TableDefinition<u64, &[u8]> = TableDefinition::new("outbox");

/// Host records (the deploy journal), by key; apart from tenant state.
pub const RECORDS: TableDefinition<&str, &[u8]> = TableDefinition::new("records");

/// The file's format: what [`upgrade`] brings an older file to.
pub const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// Version 2: state values carry their version.
const FORMAT: u64 = 2;

/// Brings a file written by an older host to the current format, once:
/// state values written before they had versions get version 0.
pub fn upgrade(db: &redb::Database) -> Result<(), redb::Error> {
    use redb::ReadableTable;
    let txn = db.begin_write()?;
    {
        let mut meta = txn.open_table(META)?;
        let format = meta.get("format")?.map(|v| v.value());
        if format != Some(FORMAT) {
            let mut state = txn.open_table(STATE)?;
            if format.is_none() {
                let rows: Vec<((String, String), Vec<u8>)> = state
                    .iter()?
                    .map(|row| row.map(|(k, v)| ((k.value().0.to_owned(), k.value().1.to_owned()), v.value().to_vec())))
                    .collect::<Result<_, _>>()?;
                for ((namespace, key), value) in rows {
                    state.insert((namespace.as_str(), key.as_str()), encode_state(0, &value).as_slice())?;
                }
            }
            meta.insert("format", FORMAT)?;
        }
    }
    txn.commit()?;
    Ok(())
}

/// A state value as stored: its version, then its bytes.
pub fn encode_state(version: u64, value: &[u8]) -> Vec<u8> {
    let mut row = Vec::with_capacity(8 + value.len());
    row.extend_from_slice(&version.to_be_bytes());
    row.extend_from_slice(value);
    row
}

/// (version, bytes) of a stored state value; a row too short to hold a
/// version is version 0.
pub fn decode_state(row: &[u8]) -> (u64, &[u8]) {
    match row.split_first_chunk::<8>() {
        Some((version, value)) => (u64::from_be_bytes(*version), value),
        None => (0, row),
    }
}

/// A message as a row: `pubsub`, `topic`, the content type and the origin
/// tenant each as a 2-byte length and the bytes (a length of 0xFFFF is an
/// absent field), then the body.
pub fn encode_message(message: &QueuedMessage) -> Vec<u8> {
    let fields = [Some(message.pubsub.as_str()), Some(message.topic.as_str()), message.content_type.as_deref(), message.origin.as_deref()];
    let mut row = Vec::with_capacity(8 + fields.iter().flatten().map(|f| f.len()).sum::<usize>() + message.body.len());
    for field in fields {
        match field {
            Some(text) => {
                // Names, content types and tenants are short (checked on the
                // way in); a longer one is cut rather than corrupt the row.
                let len = text.len().min(0xFFFE);
                row.extend_from_slice(&(len as u16).to_be_bytes());
                row.extend_from_slice(&text.as_bytes()[..len]);
            }
            None => row.extend_from_slice(&0xFFFFu16.to_be_bytes()),
        }
    }
    row.extend_from_slice(&message.body);
    row
}

/// A row's fields and the offset of its body.
fn decode_fields(row: &[u8]) -> Result<([Option<String>; 4], usize), String> {
    let mut at = 0;
    let mut fields: [Option<String>; 4] = Default::default();
    for field in &mut fields {
        let len = row.get(at..at + 2).ok_or("row ends inside a length")?;
        let len = u16::from_be_bytes([len[0], len[1]]);
        at += 2;
        if len == 0xFFFF {
            continue;
        }
        let text = row.get(at..at + len as usize).ok_or("row ends inside a field")?;
        *field = Some(String::from_utf8(text.to_vec()).map_err(|e| e.to_string())?);
        at += len as usize;
    }
    Ok((fields, at))
}

/// Reads a row written by [`encode_message`].
pub fn decode_message(row: &[u8]) -> Result<QueuedMessage, String> {
    let ([pubsub, topic, content_type, origin], body_at) = decode_fields(row)?;
    Ok(QueuedMessage {
        pubsub: pubsub.ok_or("no pubsub")?,
        topic: topic.ok_or("no topic")?,
        content_type,
        origin,
        body: Bytes::copy_from_slice(&row[body_at..]),
    })
}

/// A row's origin tenant and body size, without copying the body.
pub fn decode_origin_and_size(row: &[u8]) -> Result<(Option<String>, usize), String> {
    let ([_, _, _, origin], body_at) = decode_fields(row)?;
    Ok((origin, row.len() - body_at))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip() {
        for (content_type, origin) in [(None, None), (Some("application/cloudevents+json".to_owned()), Some("acme".to_owned())), (Some(String::new()), None)] {
            let message = QueuedMessage { pubsub: "p".into(), topic: "orders".into(), body: Bytes::from_static(b"\x00{\"x\":1}"), content_type, origin };
            let row = encode_message(&message);
            assert_eq!(decode_message(&row).unwrap(), message);
            assert_eq!(decode_origin_and_size(&row).unwrap(), (message.origin.clone(), 8));
        }
        assert!(decode_message(b"\x00").is_err());
    }
}
