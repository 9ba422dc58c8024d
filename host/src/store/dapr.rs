//! The delivery store on a Dapr state store, shared by every replica of the
//! app (Dapr prefixes keys with the app id, so replicas see one keyspace).
//!
//! - A claim is a record under [`keys::dapr_claim_key`], created with
//!   first-write concurrency (insert-if-absent) and replaced only with its
//!   ETag, so two replicas can never both hold it. The insert is tried
//!   first: a new event (the common case) costs one call. A failed insert
//!   is classified by reading the record back: done, held by another run,
//!   expired (taken over with its ETag), or the store being down.
//! - A finished event is one state transaction: the claim record becomes
//!   "done" (ETag-checked, with a TTL) and the tenant state writes apply.
//! - Dapr's state API cannot list keys, so the outbox travels inside the
//!   done record: the pipeline publishes it right after the commit, and a
//!   redelivery that finds a done record with unpublished entries publishes
//!   them before it is acknowledged. Entries keep stable CloudEvent ids.
//!   Once published, the record is rewritten without them. That rewrite
//!   needs the record's ETag (a key created with first-write concurrency
//!   accepts no write without one on Redis), so it costs a read too.
//! - Tenant state lives under [`keys::dapr_state_key`].

use std::collections::{BTreeMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::claim::{self, Claim, ClaimToken, Record};
use super::keys::{self, DedupeKey};
use super::{Commit, DeliveryStore, OutboundMessage, OutboxId, StateRead, StoreError};
use crate::clock::{self, SharedClock};
use crate::sidecar::{Operation, Sidecar, SidecarError, StateItem};

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

/// The delivery store behind a Dapr sidecar's state API.
pub struct DaprStore {
    sidecar: Sidecar,
    store_name: String,
    clock: SharedClock,
    pending: Mutex<Pending>,
}

/// Outbox entries this process knows are committed and not yet published.
#[derive(Default)]
struct Pending {
    next_id: OutboxId,
    entries: BTreeMap<OutboxId, (String, OutboundMessage)>,
    /// Claim keys with pending entries.
    keys: HashSet<String>,
}

fn unavailable(error: SidecarError) -> StoreError {
    StoreError::Unavailable(anyhow::Error::new(error))
}

fn to_value(stored: &StoredClaim) -> Value {
    serde_json::to_value(stored).expect("a claim record always serialises")
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
    /// The store `store_name` (a Dapr state component) behind `sidecar`.
    pub fn new(sidecar: Sidecar, store_name: &str, clock: SharedClock) -> Self {
        Self { sidecar, store_name: store_name.to_owned(), clock, pending: Mutex::new(Pending::default()) }
    }

    async fn load(&self, key: &str) -> Result<Option<(StoredClaim, Option<String>)>, StoreError> {
        let Some((bytes, etag)) = self.sidecar.get_state(&self.store_name, key).await.map_err(unavailable)? else {
            return Ok(None);
        };
        let stored = serde_json::from_slice(&bytes)
            .map_err(|e| StoreError::Unavailable(anyhow::anyhow!("corrupt claim record {key}: {e}")))?;
        Ok(Some((stored, etag)))
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a done record's outbox for publishing (once per process).
    fn remember_outbox(&self, key: &str, outbox: &[OutboundMessage]) -> Vec<OutboxId> {
        let mut pending = self.pending();
        if !pending.keys.insert(key.to_owned()) {
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

    /// Rewrites a done record without its outbox once all of it is out.
    async fn clear_outbox(&self, key: &str) -> Result<(), StoreError> {
        let Some((stored, etag)) = self.load(key).await? else { return Ok(()) };
        let Record::Done { expires_ms, .. } = stored.record else { return Ok(()) };
        if stored.outbox.is_empty() {
            return Ok(());
        }
        let ttl = Duration::from_millis(expires_ms.saturating_sub(self.clock.now_ms()));
        let cleared = StoredClaim { record: stored.record, outbox: Vec::new() };
        let item = StateItem::new(key.to_owned(), Some(to_value(&cleared))).first_write(etag).ttl(ttl);
        match self.sidecar.save_state(&self.store_name, &[item]).await {
            // Someone else changed it meanwhile: their copy is newer.
            Ok(()) | Err(SidecarError::Conflict { .. }) => Ok(()),
            Err(error) => Err(unavailable(error)),
        }
    }

    /// Decides a claim against the record that made the insert fail.
    async fn claim_existing(&self, encoded: &str, lease: Duration, stored: StoredClaim, etag: Option<String>) -> Result<Claim, StoreError> {
        let record_key = keys::dapr_claim_key(encoded);
        let (answer, record) = claim::decide_claim(encoded, Some(&stored.record), self.clock.now_ms(), lease, claim::new_token());
        if let Claim::AlreadyDone(_) = answer
            && !stored.outbox.is_empty()
        {
            // Committed but maybe never published (the last holder died).
            self.remember_outbox(&record_key, &stored.outbox);
            return Ok(Claim::DonePublishPending);
        }
        let Some(record) = record else { return Ok(answer) };
        // An expired claim or done record: replace it, guarded by its ETag.
        let replacement = StoredClaim { record, outbox: Vec::new() };
        let item = StateItem::new(record_key.clone(), Some(to_value(&replacement))).first_write(etag).ttl(lease + CLAIM_TTL_SLACK);
        match self.sidecar.save_state(&self.store_name, &[item]).await {
            Ok(()) => Ok(answer),
            Err(error) => self.read_back(encoded, &replacement.record, answer, lease, error).await,
        }
    }

    /// After a failed claim write: did it land after all (a lost answer),
    /// did another run win the race, or is the store down?
    async fn read_back(&self, encoded: &str, written: &Record, answer: Claim, lease: Duration, error: SidecarError) -> Result<Claim, StoreError> {
        match self.load(&keys::dapr_claim_key(encoded)).await? {
            Some((now_stored, _)) if now_stored.record == *written => Ok(answer),
            Some((now_stored, _)) => match claim::decide_claim(encoded, Some(&now_stored.record), self.clock.now_ms(), lease, 0).0 {
                Claim::Acquired(_) => Err(unavailable(error)),
                other => Ok(other),
            },
            None => Err(unavailable(error)),
        }
    }
}

#[async_trait]
impl DeliveryStore for DaprStore {
    async fn claim(&self, key: &DedupeKey, lease: Duration) -> Result<Claim, StoreError> {
        let encoded = key.encoded();
        let (answer, record) = claim::decide_claim(&encoded, None, self.clock.now_ms(), lease, claim::new_token());
        let record = record.expect("a claim on an absent record is always written");
        let fresh = StoredClaim { record, outbox: Vec::new() };
        let item = StateItem::new(keys::dapr_claim_key(&encoded), Some(to_value(&fresh))).first_write(None).ttl(lease + CLAIM_TTL_SLACK);
        match self.sidecar.save_state(&self.store_name, &[item]).await {
            Ok(()) => Ok(answer),
            // Redis answers 500, not 409, to a first-write conflict: whatever
            // the error, the record decides.
            Err(error) => match self.load(&keys::dapr_claim_key(&encoded)).await? {
                Some((stored, _)) if stored.record == fresh.record => Ok(answer),
                Some((stored, etag)) => self.claim_existing(&encoded, lease, stored, etag).await,
                // The insert failed, yet there is nothing: the store is in trouble.
                None => Err(unavailable(error)),
            },
        }
    }

    async fn release(&self, token: &ClaimToken) -> Result<(), StoreError> {
        let record_key = keys::dapr_claim_key(&token.key);
        let Some((stored, etag)) = self.load(&record_key).await? else { return Ok(()) };
        if !claim::owns(Some(&stored.record), token) {
            return Ok(());
        }
        // Expire the claim now (keeping the key, whose first-write marker
        // makes later writes ETag-checked).
        let released = StoredClaim { record: Record::InFlight { token: token.token, lease_until_ms: 0 }, outbox: Vec::new() };
        let item = StateItem::new(record_key, Some(to_value(&released))).first_write(etag).ttl(CLAIM_TTL_SLACK);
        match self.sidecar.save_state(&self.store_name, &[item]).await {
            Ok(()) | Err(SidecarError::Conflict { .. }) => Ok(()),
            Err(error) => Err(unavailable(error)),
        }
    }

    async fn finish(&self, commit: Commit<'_>) -> Result<Vec<OutboxId>, StoreError> {
        let record_key = keys::dapr_claim_key(&commit.claim.key);
        let (stored, etag) = self.load(&record_key).await?.ok_or_else(|| StoreError::ClaimLost(commit.claim.key.clone()))?;
        claim::check_owner(Some(&stored.record), commit.claim)?;
        let record = Record::Done { kind: commit.completion.into(), expires_ms: clock::after_ms(self.clock.now_ms(), commit.ttl) };
        let done = StoredClaim { record, outbox: commit.outbox.to_vec() };
        let mut operations = vec![Operation::upsert(StateItem::new(record_key.clone(), Some(to_value(&done))).first_write(etag).ttl(commit.ttl))];
        for (key, value) in commit.state_writes {
            let key = keys::dapr_state_key(commit.tenant, key);
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
        if commit.outbox.is_empty() {
            return Ok(Vec::new());
        }
        Ok(self.remember_outbox(&record_key, commit.outbox))
    }

    async fn read_state(&self, tenant: &str, key: &str) -> Result<StateRead, StoreError> {
        match self.sidecar.get_state(&self.store_name, &keys::dapr_state_key(tenant, key)).await.map_err(unavailable)? {
            Some((bytes, etag)) => Ok(StateRead { value: Some(decode_value(&bytes)?), version: etag }),
            None => Ok(StateRead::default()),
        }
    }

    async fn pending_outbox(&self, limit: usize) -> Result<Vec<(OutboxId, OutboundMessage)>, StoreError> {
        Ok(self.pending().entries.iter().take(limit).map(|(id, (_, m))| (*id, m.clone())).collect())
    }

    async fn remove_outbox(&self, id: OutboxId) -> Result<(), StoreError> {
        let finished = {
            let mut pending = self.pending();
            let Some((key, _)) = pending.entries.remove(&id) else { return Ok(()) };
            if pending.entries.values().any(|(k, _)| *k == key) {
                None
            } else {
                pending.keys.remove(&key);
                Some(key)
            }
        };
        match finished {
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
}
