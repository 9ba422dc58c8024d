//! An in-memory delivery store: the same claim protocol without a disk. For
//! unit tests and for the benchmark's breakdown of where time goes; nothing
//! survives a restart, so the service never uses it.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;

use super::claim::{self, Claim, ClaimToken, Record};
use super::{Commit, DedupeKey, DeliveryStore, OutboundMessage, OutboxId, StateRead, StateUsage, StoreError};
use crate::clock::{self, SharedClock};

/// Claims, state and outbox in memory, behind one lock.
pub struct MemoryStore {
    inner: Mutex<Inner>,
    clock: SharedClock,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::with_clock(clock::system())
    }
}

#[derive(Default)]
struct Inner {
    claims: HashMap<String, Record>,
    /// Values with the version (commit number) that wrote them.
    state: HashMap<(String, String), (Vec<u8>, u64)>,
    next_version: u64,
    outbox: BTreeMap<OutboxId, OutboundMessage>,
    next_outbox_id: OutboxId,
    dead_letters: VecDeque<Vec<u8>>,
    usage: HashMap<String, StateUsage>,
    records: HashMap<String, Vec<u8>>,
}

/// Dead-letter records kept for listing.
const DEAD_LETTERS_KEPT: usize = 1000;

impl MemoryStore {
    /// An empty store reading time from `clock`.
    pub fn with_clock(clock: SharedClock) -> Self {
        Self { inner: Mutex::default(), clock }
    }

    /// Writes `value` under `key` in `namespace` outside any event, as a
    /// commit would (a new version, counted in the namespace's usage):
    /// `wasmsub invoke` seeds the state a handler reads this way.
    pub fn seed_state(&self, namespace: &str, key: &str, value: Vec<u8>) {
        let mut inner = self.lock();
        inner.next_version += 1;
        let version = inner.next_version;
        let new = value.len();
        let old = inner.state.insert((namespace.to_owned(), key.to_owned()), (value, version));
        inner.usage.entry(namespace.to_owned()).or_default().apply(key.len(), old.map(|(o, _)| o.len()), Some(new));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave a half-applied commit
        // (each commit checks before it writes), so poisoning is ignored.
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[async_trait]
impl DeliveryStore for MemoryStore {
    async fn get_record(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.lock().records.get(key).cloned())
    }

    async fn put_record(&self, key: &str, value: Option<&[u8]>) -> Result<(), StoreError> {
        let mut inner = self.lock();
        match value {
            Some(value) => inner.records.insert(key.to_owned(), value.to_vec()),
            None => inner.records.remove(key),
        };
        Ok(())
    }

    async fn claim(&self, key: &DedupeKey, lease: Duration) -> Result<Claim, StoreError> {
        let key = key.encoded();
        let mut inner = self.lock();
        let (answer, record) = claim::decide_claim(&key, inner.claims.get(&key), self.clock.now_ms(), lease, claim::new_token());
        if let Some(record) = record {
            inner.claims.insert(key, record);
        }
        Ok(answer)
    }

    async fn release(&self, claim: &ClaimToken) -> Result<(), StoreError> {
        let mut inner = self.lock();
        if claim::owns(inner.claims.get(&claim.key), claim) {
            inner.claims.remove(&claim.key);
        }
        Ok(())
    }

    async fn finish(&self, commit: Commit<'_>) -> Result<Vec<OutboxId>, StoreError> {
        let mut inner = self.lock();
        claim::check_owner(inner.claims.get(&commit.claim.key), commit.claim)?;
        for (key, seen) in commit.reads {
            let now = inner.state.get(&(commit.tenant.to_owned(), key.clone())).map(|(_, version)| version.to_string());
            if now != *seen {
                return Err(StoreError::Conflict(key.clone()));
            }
        }
        inner.next_version += 1;
        let version = inner.next_version;
        let expires_ms = clock::after_ms(self.clock.now_ms(), commit.ttl);
        inner.claims.insert(commit.claim.key.clone(), Record::Done { kind: commit.completion.into(), expires_ms });
        for (key, value) in commit.state_writes {
            let key_len = key.len();
            let key = (commit.tenant.to_owned(), key.clone());
            let old = match value {
                Some(value) => inner.state.insert(key, (value.clone(), version)),
                None => inner.state.remove(&key),
            };
            let usage = inner.usage.entry(commit.tenant.to_owned()).or_default();
            usage.apply(key_len, old.map(|(o, _)| o.len()), value.as_ref().map(Vec::len));
        }
        if let Some(record) = commit.dead_letter {
            if inner.dead_letters.len() == DEAD_LETTERS_KEPT {
                inner.dead_letters.pop_front();
            }
            inner.dead_letters.push_back(record.to_vec());
        }
        let mut ids = Vec::with_capacity(commit.outbox.len());
        for message in commit.outbox {
            let id = inner.next_outbox_id;
            inner.next_outbox_id += 1;
            inner.outbox.insert(id, message.clone());
            ids.push(id);
        }
        Ok(ids)
    }

    async fn read_state(&self, tenant: &str, key: &str) -> Result<StateRead, StoreError> {
        let inner = self.lock();
        let found = inner.state.get(&(tenant.to_owned(), key.to_owned()));
        Ok(StateRead { value: found.map(|(v, _)| v.clone()), version: found.map(|(_, version)| version.to_string()) })
    }

    async fn pending_outbox(&self, limit: usize) -> Result<Vec<(OutboxId, OutboundMessage)>, StoreError> {
        Ok(self.lock().outbox.iter().take(limit).map(|(id, m)| (*id, m.clone())).collect())
    }

    async fn remove_outbox(&self, id: OutboxId) -> Result<(), StoreError> {
        self.lock().outbox.remove(&id);
        Ok(())
    }

    async fn recent_dead_letters(&self, limit: usize) -> Result<Option<Vec<Vec<u8>>>, StoreError> {
        let inner = self.lock();
        let skip = inner.dead_letters.len().saturating_sub(limit);
        Ok(Some(inner.dead_letters.iter().skip(skip).cloned().collect()))
    }

    fn state_usage(&self, namespace: &str) -> Option<StateUsage> {
        Some(self.lock().usage.get(namespace).copied().unwrap_or_default())
    }

    async fn purge_expired(&self) -> Result<usize, StoreError> {
        let now = self.clock.now_ms();
        let mut inner = self.lock();
        let before = inner.claims.len();
        inner.claims.retain(|_, record| !claim::is_expired(record, now));
        Ok(before - inner.claims.len())
    }
}
