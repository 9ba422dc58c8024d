//! Committing a finished event on a Dapr state store.
//!
//! The commit point is one single-key compare-and-set: the claim record
//! becomes the done record, written with the ETag the claim had when this
//! run read it. The done record carries the attempt's state writes and its
//! outbox, so a run whose claim was taken over writes nothing anywhere
//! (the ETag no longer matches), and a host that dies after the commit point
//! leaves everything needed to finish the job.
//!
//! An event with state reads or writes commits holding the commit locks of
//! those keys ([`super::key_locks`]): the reads are validated (each key's
//! ETag is still the one the attempt saw), the done record is written, then
//! the writes are applied, each checked against the ETag read under the lock.

use std::collections::BTreeSet;


use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::key_locks::HeldLocks;
use super::{DaprStore, StoredClaim, unavailable, values};
use crate::clock;
use crate::pipeline::effects::StateWrite;
use crate::sidecar::{Operation, StateItem};
use crate::store::claim::{self, Record};
use crate::store::{Commit, OutboxId, StoreError, keys};

/// A committed event's state writes, in the stored (JSON) form.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(super) struct CommittedWrites {
    /// The tenant state namespace they belong to.
    pub namespace: String,
    /// Each key and its new value (`None`: deleted).
    pub entries: Vec<(String, Option<Value>)>,
}

impl CommittedWrites {
    fn of(namespace: &str, writes: &[StateWrite]) -> Option<Self> {
        if writes.is_empty() {
            return None;
        }
        let entries = writes.iter().map(|(key, value)| (key.clone(), value.as_deref().map(values::encode))).collect();
        Some(Self { namespace: namespace.to_owned(), entries })
    }

    fn store_keys(&self) -> Vec<String> {
        self.entries.iter().map(|(key, _)| keys::dapr_state_key(&self.namespace, key)).collect()
    }
}

impl DaprStore {
    pub(super) async fn finish_commit(&self, commit: Commit<'_>) -> Result<Vec<OutboxId>, StoreError> {
        let record_key = keys::dapr_claim_key(&commit.claim.key);
        if commit.state_writes.is_empty() && commit.reads.is_empty() {
            // Nothing to validate or apply: the commit point is the whole commit.
            let claim_etag = self.owned_claim_etag(&record_key, &commit).await?;
            let done = self.write_done(&record_key, &commit, None, claim_etag).await?;
            return Ok(self.remember_outbox(&record_key, &done, commit.outbox, false));
        }
        let touched: BTreeSet<String> = commit.reads.iter().map(|(key, _)| key.clone()).chain(commit.state_writes.iter().map(|(key, _)| key.clone())).collect();
        let mut locks = self.lock_keys(commit.tenant, &touched, &record_key).await?;
        match self.commit_locked(&record_key, &commit, &mut locks).await {
            Ok((done, applied)) => {
                if applied {
                    self.unlock_soon(locks);
                } else {
                    // Committed, not applied: the locks stay until they
                    // expire, and the next holder rolls the writes forward.
                    tracing::warn!(event = %commit.claim.key, "state writes committed but not yet applied; the next commit on their keys applies them");
                }
                Ok(self.remember_outbox(&record_key, &done, commit.outbox, false))
            }
            Err(error) => {
                self.unlock(locks).await;
                Err(error)
            }
        }
    }

    /// The claim record's ETag, if this run still holds the claim.
    async fn owned_claim_etag(&self, record_key: &str, commit: &Commit<'_>) -> Result<Option<String>, StoreError> {
        let (stored, etag) = self.load(record_key).await?.ok_or_else(|| StoreError::ClaimLost(commit.claim.key.clone()))?;
        claim::check_owner(Some(&stored.record), commit.claim)?;
        Ok(etag)
    }

    /// Validates, commits and applies under the keys' locks: the done
    /// record written, and whether the writes were applied (`false`:
    /// committed, but not applied yet).
    async fn commit_locked(&self, record_key: &str, commit: &Commit<'_>, locks: &mut HeldLocks) -> Result<(Record, bool), StoreError> {
        let writes = CommittedWrites::of(commit.tenant, commit.state_writes);
        let read_keys: Vec<String> = commit.reads.iter().map(|(key, _)| keys::dapr_state_key(commit.tenant, key)).collect();
        let written_keys = writes.as_ref().map(CommittedWrites::store_keys).unwrap_or_default();
        // One read: the claim, every key read (to validate), every key
        // written (its ETag fences the write), and the locks (their ETags
        // give them back).
        let wanted: Vec<String> = std::iter::once(record_key.to_owned())
            .chain(locks.0.iter().map(|lock| lock.record.clone()))
            .chain(read_keys.iter().cloned())
            .chain(written_keys.iter().cloned())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let current = self.sidecar.get_bulk(&self.store_name, &wanted).await.map_err(unavailable)?;
        // What the bulk read returned for `key` (`None`: absent); an absent
        // key has no ETag.
        let entry = |key: &str| {
            let index = wanted.binary_search_by(|k| k.as_str().cmp(key)).expect("every key was asked for");
            current[index].as_ref()
        };
        let etag_of = |key: &str| entry(key).and_then(|(_, etag)| etag.clone());
        for lock in &mut locks.0 {
            lock.etag = etag_of(&lock.record);
        }
        let claimed = entry(record_key).and_then(|(raw, _)| serde_json::from_str::<StoredClaim>(raw.get()).ok());
        claim::check_owner(claimed.as_ref().map(|c| &c.record), commit.claim)?;
        for ((key, seen), store_key) in commit.reads.iter().zip(&read_keys) {
            if etag_of(store_key) != *seen {
                return Err(StoreError::Conflict(key.clone()));
            }
        }
        crate::faults::pause("before-commit", &commit.claim.key).await;
        let done = self.write_done(record_key, commit, writes.clone(), etag_of(record_key)).await?;
        let Some(writes) = writes else { return Ok((done, true)) };
        let etags: Vec<Option<String>> = written_keys.iter().map(|key| etag_of(key)).collect();
        match self.apply(&writes, &etags).await {
            Ok(()) => Ok((done, true)),
            Err(error) => {
                tracing::warn!(event = %commit.claim.key, %error, "applying committed state writes failed");
                Ok((done, false))
            }
        }
    }

    /// The commit point: the claim record becomes the done record (returned),
    /// if its ETag is still `claim_etag`.
    async fn write_done(&self, record_key: &str, commit: &Commit<'_>, writes: Option<CommittedWrites>, claim_etag: Option<String>) -> Result<Record, StoreError> {
        let record = Record::Done { kind: commit.completion.into(), expires_ms: clock::after_ms(self.clock.now_ms(), commit.ttl) };
        let done = StoredClaim { record, outbox: commit.outbox.to_vec(), writes };
        let item = StateItem::json(record_key.to_owned(), &done).first_write(claim_etag).ttl(commit.ttl);
        // A transaction, not a save: Dapr's Redis store runs a save of
        // several items as one goroutine and one round trip per item, a
        // transaction as one pipeline, so merged done records cost daprd
        // and Redis far less this way. (Only an update can go this way: a
        // transaction's upsert does not set the first-write marker that
        // insert-if-absent relies on; the claim's insert set it already.)
        let write = self.sidecar.transaction(&self.store_name, vec![Operation::upsert(item)]).await;
        let Err(error) = write else { return Ok(done.record) };
        // Refused (someone took the claim over) or lost on the way?
        match self.load(record_key).await {
            Ok(Some((now_stored, _))) if now_stored.record == done.record => Ok(done.record),
            Ok(Some((now_stored, _))) if !claim::owns(Some(&now_stored.record), commit.claim) => Err(StoreError::ClaimLost(commit.claim.key.clone())),
            Ok(None) => Err(StoreError::ClaimLost(commit.claim.key.clone())),
            _ => Err(unavailable(error)),
        }
    }

    /// Applies committed writes, each checked against the ETag its key had
    /// when read under the lock (`None`: the key was absent then). A write
    /// whose check fails was overtaken: a later holder rolled it forward.
    async fn apply(&self, writes: &CommittedWrites, etags: &[Option<String>]) -> Result<(), StoreError> {
        let mut operations = Vec::with_capacity(writes.entries.len());
        for ((key, value), etag) in writes.entries.iter().zip(etags) {
            let key = keys::dapr_state_key(&writes.namespace, key);
            match (value, etag) {
                (Some(value), etag) => operations.push(Operation::upsert(StateItem::json(key, value).first_write(etag.clone()))),
                (None, Some(etag)) => operations.push(Operation::delete_if(key, etag.clone())),
                (None, None) => {} // deleting an absent key
            }
        }
        if operations.is_empty() {
            return Ok(());
        }
        self.sidecar.transaction(&self.store_name, operations).await.map_err(unavailable)
    }

    /// Applies `record_key`'s write of `namespace`'s `key`, if that commit
    /// happened and wrote it (its holder died between the commit point and
    /// applying it). Runs under the key's lock; applying it again is
    /// harmless (the same value).
    pub(super) async fn roll_forward(&self, record_key: &str, namespace: &str, key: &str) -> Result<(), StoreError> {
        let Some((stored, _)) = self.load(record_key).await? else { return Ok(()) };
        let (Record::Done { .. }, Some(writes)) = (&stored.record, &stored.writes) else { return Ok(()) };
        if writes.namespace != namespace {
            return Ok(());
        }
        let entries: Vec<_> = writes.entries.iter().filter(|(k, _)| k == key).cloned().collect();
        if entries.is_empty() {
            return Ok(());
        }
        let only = CommittedWrites { namespace: namespace.to_owned(), entries };
        let current = self.sidecar.get_bulk(&self.store_name, &only.store_keys()).await.map_err(unavailable)?;
        let etags: Vec<Option<String>> = current.into_iter().map(|c| c.and_then(|(_, etag)| etag)).collect();
        self.apply(&only, &etags).await?;
        tracing::info!(event = record_key, "rolled a committed event's state write forward");
        Ok(())
    }
}
