//! The delivery store on a Dapr state store, shared by every replica of the
//! app (Dapr prefixes keys with the app id, so replicas see one keyspace).
//!
//! - A claim is a record under [`keys::dapr_claim_key`], created with
//!   first-write concurrency (insert-if-absent) and replaced only with its
//!   ETag, so two replicas can never both hold it. The insert is tried
//!   first: a new event (the common case) costs one call. A failed insert
//!   is classified by reading the record back: done, held by another run,
//!   expired (taken over with its ETag), or the store being down.
//! - A finished event is one compare-and-set of the claim record into a
//!   done record carrying the attempt's writes and outbox; the writes are
//!   applied after it (see [`commit`]), holding the commit locks of the
//!   keys read or written (see [`key_locks`]).
//! - Dapr's state API cannot list keys, so the outbox travels inside the
//!   done record: the pipeline publishes it right after the commit, and a
//!   redelivery that finds a done record with unpublished entries publishes
//!   them before it is acknowledged, unless this host remembers publishing
//!   them. Entries keep stable CloudEvent ids. A redelivery then has the
//!   record rewritten without them, in the background and many records at a
//!   time ([`published`]); an event never redelivered pays no rewrite.
//! - Tenant state lives under [`keys::dapr_state_key`].

mod commit;
mod key_locks;
mod published;
mod values;

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use commit::CommittedWrites;
use key_locks::LocalTurns;
use published::PublishedMarks;

use super::claim::{self, Claim, ClaimToken, Record};
use super::keys::{self, DedupeKey};
use super::{Commit, DeliveryStore, OutboundMessage, OutboxId, StateRead, StoreError};
use crate::clock::SharedClock;
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
    /// A committed event's state writes, kept so that a commit whose host
    /// died before applying them can be rolled forward.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    writes: Option<CommittedWrites>,
}

/// The delivery store behind a Dapr sidecar's state API.
pub struct DaprStore {
    sidecar: Sidecar,
    store_name: String,
    clock: SharedClock,
    pending: Mutex<Pending>,
    turns: LocalTurns,
    published: PublishedMarks,
}

/// Outbox entries this process knows are committed and not yet published.
#[derive(Default)]
struct Pending {
    next_id: OutboxId,
    entries: BTreeMap<OutboxId, (String, OutboundMessage)>,
    /// Claim keys with pending entries.
    keys: HashMap<String, PendingRecord>,
}

/// A done record whose outbox entries are not all published yet.
struct PendingRecord {
    /// The done record they belong to (what [`published`] remembers).
    done: Record,
    /// A redelivery found them: the record is cleared once they are out.
    redelivered: bool,
    /// Entries still in [`Pending::entries`].
    unpublished: usize,
}

fn unavailable(error: SidecarError) -> StoreError {
    StoreError::Unavailable(anyhow::Error::new(error))
}


impl DaprStore {
    /// The memory this store keeps besides what is in flight: which done
    /// records this host published ([`published`]).
    pub const MEMORY_BYTES: usize = published::REMEMBERED_BYTES;

    /// The store `store_name` (a Dapr state component) behind `sidecar`.
    pub fn new(sidecar: Sidecar, store_name: &str, clock: SharedClock) -> Self {
        let published = PublishedMarks::new(sidecar.clone(), store_name.to_owned(), clock.clone());
        Self { sidecar, store_name: store_name.to_owned(), clock, pending: Mutex::new(Pending::default()), turns: LocalTurns::default(), published }
    }

    async fn load(&self, key: &str) -> Result<Option<(StoredClaim, Option<String>)>, StoreError> {
        let Some((raw, etag)) = self.sidecar.get_state(&self.store_name, key).await.map_err(unavailable)? else {
            return Ok(None);
        };
        let stored = serde_json::from_str(raw.get())
            .map_err(|e| StoreError::Unavailable(anyhow::anyhow!("corrupt claim record {key}: {e}")))?;
        Ok(Some((stored, etag)))
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues the outbox of `key`'s done record `done` for publishing (once
    /// per process); `redelivered`: a redelivery found it (see [`published`]).
    fn remember_outbox(&self, key: &str, done: &Record, outbox: &[OutboundMessage], redelivered: bool) -> Vec<OutboxId> {
        if outbox.is_empty() {
            // Nothing to publish, and nothing to remember: a key queued
            // without entries would never be taken off the queue.
            return Vec::new();
        }
        let mut pending = self.pending();
        if let Some(record) = pending.keys.get_mut(key) {
            record.redelivered |= redelivered;
            return Vec::new(); // already queued by this process
        }
        pending.keys.insert(key.to_owned(), PendingRecord { done: done.clone(), redelivered, unpublished: outbox.len() });
        let mut ids = Vec::with_capacity(outbox.len());
        for message in outbox {
            let id = pending.next_id;
            pending.next_id += 1;
            pending.entries.insert(id, (key.to_owned(), message.clone()));
            ids.push(id);
        }
        ids
    }

    /// If `record_key`'s commit may still be unapplied (a lock on one of
    /// its keys is still held in its name), when that lock expires; expired
    /// ones are taken over here, which rolls the writes forward.
    async fn unapplied_commit(&self, writes: &CommittedWrites, record_key: &str) -> Result<Option<u64>, StoreError> {
        let mut stale = std::collections::BTreeSet::new();
        for (key, _) in &writes.entries {
            let Some((lock, _)) = self.load_lock(&writes.namespace, key).await? else { continue };
            if !lock.covers(record_key) {
                continue;
            }
            if !lock.expired(self.clock.now_ms()) {
                return Ok(Some(lock.until_ms()));
            }
            stale.insert(key.clone());
        }
        if !stale.is_empty() {
            let held = self.lock_keys(&writes.namespace, &stale, record_key).await?;
            self.unlock(held).await;
        }
        Ok(None)
    }

    /// Decides a claim against the record that made the insert fail.
    async fn claim_existing(&self, encoded: &str, lease: Duration, stored: StoredClaim, etag: Option<String>) -> Result<Claim, StoreError> {
        let record_key = keys::dapr_claim_key(encoded);
        let (answer, record) = claim::decide_claim(encoded, Some(&stored.record), self.clock.now_ms(), lease, claim::new_token());
        if let (Claim::AlreadyDone(_), Some(writes)) = (&answer, &stored.writes)
            && let Some(lease_until_ms) = self.unapplied_commit(writes, &record_key).await?
        {
            // Committed by a host that died before applying the writes, and
            // its tenant lock has not expired yet: ask for a redelivery,
            // which rolls them forward (acknowledging now could leave them
            // unapplied until the tenant's next commit).
            return Ok(Claim::HeldElsewhere { lease_until_ms });
        }
        if let Claim::AlreadyDone(_) = answer
            && !stored.outbox.is_empty()
        {
            if self.published.published_here(&record_key, &stored.record) {
                // A redelivery of an event this host finished: clear the
                // record, so no replica publishes its outbox again.
                self.published.clear(record_key);
                return Ok(answer);
            }
            // Committed but maybe never published (the last holder died,
            // or another replica, or this host before a restart).
            self.remember_outbox(&record_key, &stored.record, &stored.outbox, true);
            return Ok(Claim::DonePublishPending);
        }
        let Some(record) = record else { return Ok(answer) };
        // An expired claim or done record: replace it, guarded by its ETag.
        let replacement = StoredClaim { record, outbox: Vec::new(), writes: None };
        let item = StateItem::json(record_key.clone(), &replacement).first_write(etag).ttl(lease + CLAIM_TTL_SLACK);
        match self.sidecar.save_state(&self.store_name, vec![item]).await {
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
        let fresh = StoredClaim { record, outbox: Vec::new(), writes: None };
        let item = StateItem::json(keys::dapr_claim_key(&encoded), &fresh).first_write(None).ttl(lease + CLAIM_TTL_SLACK);
        match self.sidecar.save_state(&self.store_name, vec![item]).await {
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
        let released = StoredClaim { record: Record::InFlight { token: token.token, lease_until_ms: 0 }, outbox: Vec::new(), writes: None };
        let item = StateItem::json(record_key, &released).first_write(etag).ttl(CLAIM_TTL_SLACK);
        match self.sidecar.save_state(&self.store_name, vec![item]).await {
            Ok(()) | Err(SidecarError::Conflict { .. }) => Ok(()),
            Err(error) => Err(unavailable(error)),
        }
    }

    async fn finish(&self, commit: Commit<'_>) -> Result<Vec<OutboxId>, StoreError> {
        self.finish_commit(commit).await
    }

    async fn get_record(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        match self.sidecar.get_state(&self.store_name, &keys::dapr_record_key(key)).await.map_err(unavailable)? {
            Some((raw, _)) => Ok(Some(values::decode_body(raw.get().as_bytes())?)),
            None => Ok(None),
        }
    }

    async fn put_record(&self, key: &str, value: Option<&[u8]>) -> Result<(), StoreError> {
        let key = keys::dapr_record_key(key);
        let result = match value {
            Some(value) => self.sidecar.save_state(&self.store_name, vec![StateItem::json(key, &values::encode(value))]).await,
            None => self.sidecar.transaction(&self.store_name, vec![Operation::delete(key)]).await,
        };
        result.map_err(unavailable)
    }

    async fn read_state(&self, tenant: &str, key: &str) -> Result<StateRead, StoreError> {
        match self.sidecar.get_state(&self.store_name, &keys::dapr_state_key(tenant, key)).await.map_err(unavailable)? {
            Some((raw, etag)) => Ok(StateRead { value: Some(values::decode_body(raw.get().as_bytes())?), version: etag }),
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
            let record = pending.keys.get_mut(&key).expect("every pending entry's key is queued");
            record.unpublished -= 1;
            if record.unpublished > 0 {
                None
            } else {
                pending.keys.remove(&key).map(|record| (key, record))
            }
        };
        if let Some((key, record)) = finished {
            self.published.published(key, record.done, record.redelivered);
        }
        Ok(())
    }

    async fn purge_expired(&self) -> Result<usize, StoreError> {
        // Records carry TTLs: the state store expires them itself.
        Ok(0)
    }
}
