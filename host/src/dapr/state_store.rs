//! The delivery store on a Dapr state store, shared by every replica of the
//! app (Dapr prefixes keys with the app id, so replicas see one keyspace).
//!
//! - A claim is a record under `wasmsub|claim|{dedupe key}`, created with
//!   first-write concurrency (insert-if-absent) and replaced only with its
//!   ETag, so two replicas can never both hold it. A failed write is
//!   classified by reading the record back: another holder, or the store
//!   being down.
//! - A finished event is one state transaction: the claim record becomes
//!   "done" (ETag-checked, with a TTL) and the tenant state writes apply.
//! - Dapr's state API cannot list keys, so the outbox travels inside the
//!   done record: the pipeline publishes it right after the commit, and a
//!   redelivery that finds a done record with unpublished entries publishes
//!   them before it is acknowledged. Entries keep stable CloudEvent ids.
//! - Tenant state lives under `wasmsub|state|{len}:{tenant}|{key}`: the
//!   length prefix means no key string can reach another tenant's entries.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::sidecar::{Operation, Sidecar, SidecarError, StateItem};
use crate::dedupe::DedupeKey;
use crate::store::claim::{self, Claim, ClaimToken, Record};
use crate::store::{Commit, DeliveryStore, OutboundMessage, OutboxId, StoreError};

/// Claims outlive their lease by this much in the store, so an expired claim
/// is still there to be taken over (with its ETag), then vanishes by TTL.
const CLAIM_TTL_SLACK: Duration = Duration::from_secs(300);

/// What is stored under a claim key.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredClaim {
    record: Record,
    /// Publishes committed with the event and not yet relayed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    outbox: Vec<OutboundMessage>,
}

pub struct DaprStore {
    sidecar: Sidecar,
    store_name: String,
    pending: Mutex<Pending>,
}

/// Outbox entries this process knows are committed and not yet published.
#[derive(Default)]
struct Pending {
    next_id: OutboxId,
    entries: BTreeMap<OutboxId, (String, OutboundMessage)>,
}

fn unavailable(error: SidecarError) -> StoreError {
    StoreError::Unavailable(anyhow::Error::new(error))
}

fn claim_key(encoded: &str) -> String {
    format!("wasmsub|claim|{encoded}")
}

fn state_key(tenant: &str, key: &str) -> String {
    format!("wasmsub|state|{}:{tenant}|{key}", tenant.len())
}

/// Guest values are bytes; Dapr stores JSON. UTF-8 text is stored as a JSON
/// string (readable through Dapr's state API), other bytes as base64 in an
/// object, so every value round-trips exactly.
fn encode_value(bytes: &[u8]) -> Value {
    match std::str::from_utf8(bytes) {
        Ok(text) => Value::String(text.to_owned()),
        Err(_) => serde_json::json!({ "base64": BASE64.encode(bytes) }),
    }
}

fn decode_value(stored: &[u8]) -> Result<Vec<u8>, StoreError> {
    let corrupt = |why: String| StoreError::Unavailable(anyhow::anyhow!("state value is not in wasmsub's encoding: {why}"));
    match serde_json::from_slice::<Value>(stored).map_err(|e| corrupt(e.to_string()))? {
        Value::String(text) => Ok(text.into_bytes()),
        Value::Object(object) => match object.get("base64") {
            Some(Value::String(encoded)) => BASE64.decode(encoded).map_err(|e| corrupt(e.to_string())),
            _ => Err(corrupt("an object without `base64`".into())),
        },
        other => Err(corrupt(format!("unexpected {other}"))),
    }
}

impl DaprStore {
    pub fn new(sidecar: Sidecar, store_name: &str) -> Self {
        Self { sidecar, store_name: store_name.to_owned(), pending: Mutex::new(Pending::default()) }
    }

    async fn load(&self, key: &str) -> Result<Option<(StoredClaim, Option<String>)>, StoreError> {
        let Some((bytes, etag)) = self.sidecar.get_state(&self.store_name, key).await.map_err(unavailable)? else {
            return Ok(None);
        };
        let stored = serde_json::from_slice(&bytes)
            .map_err(|e| StoreError::Unavailable(anyhow::anyhow!("corrupt claim record {key}: {e}")))?;
        Ok(Some((stored, etag)))
    }

    fn remember_outbox(&self, key: &str, outbox: &[OutboundMessage]) -> Vec<OutboxId> {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        if pending.entries.values().any(|(k, _)| k == key) {
            return Vec::new(); // already queued by this process
        }
        let mut ids = Vec::with_capacity(outbox.len());
        for message in outbox {
            let id = pending.next_id;
            pending.next_id += 1;
            pending.entries.insert(id, (key.to_owned(), message.clone()));
            ids.push(id);
        }
        ids
    }

    /// Clears a done record's outbox once all its entries are published.
    async fn clear_outbox(&self, key: &str) -> Result<(), StoreError> {
        let Some((mut stored, etag)) = self.load(key).await? else { return Ok(()) };
        if stored.outbox.is_empty() {
            return Ok(());
        }
        stored.outbox.clear();
        let ttl = match stored.record {
            Record::Done { expires_ms, .. } => Duration::from_millis(expires_ms.saturating_sub(claim::now_ms())),
            Record::InFlight { .. } => return Ok(()),
        };
        let item = StateItem::new(key.to_owned(), Some(serde_json::to_value(&stored).expect("record serialises")))
            .first_write(etag)
            .ttl(ttl);
        match self.sidecar.save_state(&self.store_name, &[item]).await {
            // Someone else changed it meanwhile: their copy is newer.
            Ok(()) | Err(SidecarError::Conflict { .. }) => Ok(()),
            Err(error) => Err(unavailable(error)),
        }
    }
}

#[async_trait]
impl DeliveryStore for DaprStore {
    async fn claim(&self, key: &DedupeKey, lease: Duration) -> Result<Claim, StoreError> {
        let encoded = key.encoded();
        let record_key = claim_key(&encoded);
        let existing = self.load(&record_key).await?;
        let now = claim::now_ms();
        let (answer, record) = claim::decide_claim(&encoded, existing.as_ref().map(|(s, _)| &s.record), now, lease, claim::new_token());
        if let (Claim::AlreadyDone(_), Some((stored, _))) = (&answer, &existing)
            && !stored.outbox.is_empty()
        {
            // Committed but maybe never published (the last holder died).
            self.remember_outbox(&record_key, &stored.outbox);
            return Ok(Claim::DonePublishPending);
        }
        let Some(record) = record else { return Ok(answer) };
        let stored = StoredClaim { record, outbox: Vec::new() };
        let etag = existing.and_then(|(_, etag)| etag);
        let item = StateItem::new(record_key.clone(), Some(serde_json::to_value(&stored).expect("record serialises")))
            .first_write(etag)
            .ttl(lease + CLAIM_TTL_SLACK);
        match self.sidecar.save_state(&self.store_name, &[item]).await {
            Ok(()) => Ok(answer),
            Err(save_error) => {
                // A lost race and a store failure look alike on some stores
                // (Redis answers 500 to a first-write conflict): read back.
                match self.load(&record_key).await {
                    Ok(Some((now_stored, _))) if now_stored.record == stored.record => Ok(answer),
                    Ok(Some((now_stored, _))) => {
                        let (answer, _) = claim::decide_claim(&encoded, Some(&now_stored.record), claim::now_ms(), lease, 0);
                        match answer {
                            Claim::Acquired(_) => Err(unavailable(save_error)),
                            other => Ok(other),
                        }
                    }
                    _ => Err(unavailable(save_error)),
                }
            }
        }
    }

    async fn release(&self, token: &ClaimToken) -> Result<(), StoreError> {
        let record_key = claim_key(&token.key);
        let Some((stored, etag)) = self.load(&record_key).await? else { return Ok(()) };
        if !claim::owns(Some(&stored.record), token) {
            return Ok(());
        }
        // Expire the claim now (keeping the key, whose first-write marker
        // makes later writes ETag-checked).
        let released = StoredClaim { record: Record::InFlight { token: token.token, lease_until_ms: 0 }, outbox: Vec::new() };
        let item = StateItem::new(record_key, Some(serde_json::to_value(&released).expect("record serialises")))
            .first_write(etag)
            .ttl(CLAIM_TTL_SLACK);
        match self.sidecar.save_state(&self.store_name, &[item]).await {
            Ok(()) | Err(SidecarError::Conflict { .. }) => Ok(()),
            Err(error) => Err(unavailable(error)),
        }
    }

    async fn finish(&self, commit: Commit<'_>) -> Result<Vec<OutboxId>, StoreError> {
        let record_key = claim_key(&commit.claim.key);
        let (stored, etag) = self.load(&record_key).await?.ok_or_else(|| StoreError::ClaimLost(commit.claim.key.clone()))?;
        claim::check_owner(Some(&stored.record), commit.claim)?;
        let done = StoredClaim {
            record: Record::Done { kind: commit.completion.into(), expires_ms: claim::after_ms(claim::now_ms(), commit.ttl) },
            outbox: commit.outbox.to_vec(),
        };
        let mut operations = vec![Operation::upsert(
            StateItem::new(record_key.clone(), Some(serde_json::to_value(&done).expect("record serialises")))
                .first_write(etag)
                .ttl(commit.ttl),
        )];
        for (key, value) in commit.state_writes {
            let key = state_key(commit.tenant, key);
            operations.push(match value {
                Some(bytes) => Operation::upsert(StateItem::new(key, Some(encode_value(bytes)))),
                None => Operation::delete(key),
            });
        }
        if let Err(error) = self.sidecar.transaction(&self.store_name, &operations).await {
            // Did someone take the claim over, or is the store down?
            return match self.load(&record_key).await {
                Ok(Some((now_stored, _))) if !claim::owns(Some(&now_stored.record), commit.claim) => {
                    Err(StoreError::ClaimLost(commit.claim.key.clone()))
                }
                _ => Err(unavailable(error)),
            };
        }
        Ok(self.remember_outbox(&record_key, commit.outbox))
    }

    async fn get_state(&self, tenant: &str, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        match self.sidecar.get_state(&self.store_name, &state_key(tenant, key)).await.map_err(unavailable)? {
            Some((bytes, _)) => decode_value(&bytes).map(Some),
            None => Ok(None),
        }
    }

    async fn pending_outbox(&self, limit: usize) -> Result<Vec<(OutboxId, OutboundMessage)>, StoreError> {
        let pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        Ok(pending.entries.iter().take(limit).map(|(id, (_, m))| (*id, m.clone())).collect())
    }

    async fn remove_outbox(&self, id: OutboxId) -> Result<(), StoreError> {
        let finished_key = {
            let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            let Some((key, _)) = pending.entries.remove(&id) else { return Ok(()) };
            (!pending.entries.values().any(|(k, _)| *k == key)).then_some(key)
        };
        match finished_key {
            Some(key) => self.clear_outbox(&key).await,
            None => Ok(()),
        }
    }

    async fn purge_expired(&self) -> Result<usize, StoreError> {
        // Records carry TTLs: the state store expires them itself.
        Ok(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip_exactly() {
        for bytes in [&b"{\"id\": 1}"[..], b"plain text", b"", &[0xff, 0x00, 0x10]] {
            let stored = serde_json::to_vec(&encode_value(bytes)).unwrap();
            assert_eq!(decode_value(&stored).unwrap(), bytes);
        }
        assert_eq!(encode_value(b"{\"id\":1}"), Value::String("{\"id\":1}".into()));
    }

    #[test]
    fn tenant_keys_cannot_collide() {
        assert_ne!(state_key("a", "b|c"), state_key("a|b", "c"));
        assert_eq!(state_key("todo", "task:1"), "wasmsub|state|4:todo|task:1");
    }
}
