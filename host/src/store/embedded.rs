//! The embedded delivery store: one redb file, so the idempotency records,
//! tenant state and outbox survive a restart with no external service.
//!
//! redb gives serialisable write transactions, which is what makes the claim
//! a true insert-if-absent and the finish commit atomic. Claims are committed
//! without fsync (`Durability::None`): a claim lost in a crash only means the
//! event runs again, which is correct because none of its effects were
//! committed. Every `finish` is fsynced (`Durability::Immediate`), and makes
//! the claims before it durable too.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use async_trait::async_trait;
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};

use super::claim::{self, Claim, ClaimToken, Record};
use super::{Commit, DedupeKey, DeliveryStore, OutboundMessage, OutboxId, StoreError};
use crate::clock::{self, SharedClock};

const CLAIMS: TableDefinition<&str, &[u8]> = TableDefinition::new("claims");
/// Tenant state under a (tenant, key) tuple: the tenant is a separate field,
/// so no key string can reach another tenant's entries.
const STATE: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("state");
const OUTBOX: TableDefinition<u64, &[u8]> = TableDefinition::new("outbox");

/// Expired records removed per purge transaction, so a purge never holds the
/// write lock for long.
const PURGE_BATCH: usize = 10_000;

/// The redb-backed store.
#[derive(Clone)]
pub struct EmbeddedStore {
    db: Arc<Database>,
    path: Arc<PathBuf>,
    clock: SharedClock,
}

impl EmbeddedStore {
    /// Opens (or creates) the store file; its directory is created if missing.
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        Self::open_with_clock(path, clock::system())
    }

    /// As [`EmbeddedStore::open`], reading time from `clock`.
    pub fn open_with_clock(path: &Path, clock: SharedClock) -> anyhow::Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("creating store directory {}", dir.display()))?;
        }
        let db = Database::create(path).with_context(|| format!("opening embedded store {}", path.display()))?;
        let txn = db.begin_write()?;
        txn.open_table(CLAIMS)?;
        txn.open_table(STATE)?;
        txn.open_table(OUTBOX)?;
        txn.commit().with_context(|| format!("initialising embedded store {}", path.display()))?;
        Ok(Self { db: Arc::new(db), path: Arc::new(path.to_owned()), clock })
    }

    /// Runs blocking redb work off the async runtime, naming the file in errors.
    async fn blocking<T: Send + 'static>(
        &self,
        what: &'static str,
        work: impl FnOnce(&Database) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let db = self.db.clone();
        let path = self.path.clone();
        let result = tokio::task::spawn_blocking(move || work(&db))
            .await
            .map_err(|e| StoreError::Unavailable(anyhow::anyhow!("store task failed: {e}")))?;
        result.map_err(|e| match e {
            StoreError::Unavailable(err) => {
                StoreError::Unavailable(err.context(format!("{what} in embedded store {}", path.display())))
            }
            other => other,
        })
    }
}

fn unavailable(e: impl Into<anyhow::Error>) -> StoreError {
    StoreError::Unavailable(e.into())
}

fn load(table: &impl ReadableTable<&'static str, &'static [u8]>, key: &str) -> Result<Option<Record>, StoreError> {
    match table.get(key).map_err(unavailable)? {
        Some(bytes) => claim::decode(bytes.value()).map(Some),
        None => Ok(None),
    }
}

#[async_trait]
impl DeliveryStore for EmbeddedStore {
    async fn claim(&self, key: &DedupeKey, lease: Duration) -> Result<Claim, StoreError> {
        let key = key.encoded();
        let now = self.clock.now_ms();
        self.blocking("claiming an event", move |db| {
            let mut txn = db.begin_write().map_err(unavailable)?;
            txn.set_durability(Durability::None).map_err(unavailable)?;
            let answer = {
                let mut claims = txn.open_table(CLAIMS).map_err(unavailable)?;
                let existing = load(&claims, &key)?;
                let (answer, record) = claim::decide_claim(&key, existing.as_ref(), now, lease, claim::new_token());
                if let Some(record) = record {
                    claims.insert(key.as_str(), claim::encode(&record).as_slice()).map_err(unavailable)?;
                }
                answer
            };
            txn.commit().map_err(unavailable)?;
            Ok(answer)
        })
        .await
    }

    async fn release(&self, claim: &ClaimToken) -> Result<(), StoreError> {
        let claim = claim.clone();
        self.blocking("releasing a claim", move |db| {
            let mut txn = db.begin_write().map_err(unavailable)?;
            txn.set_durability(Durability::None).map_err(unavailable)?;
            {
                let mut claims = txn.open_table(CLAIMS).map_err(unavailable)?;
                if claim::owns(load(&claims, &claim.key)?.as_ref(), &claim) {
                    claims.remove(claim.key.as_str()).map_err(unavailable)?;
                }
            }
            txn.commit().map_err(unavailable)
        })
        .await
    }

    async fn finish(&self, commit: Commit<'_>) -> Result<Vec<OutboxId>, StoreError> {
        let claim = commit.claim.clone();
        let tenant = commit.tenant.to_owned();
        let writes = commit.state_writes.to_vec();
        let outbox: Vec<Vec<u8>> = commit.outbox.iter().map(|m| serde_json::to_vec(m).expect("outbox entries serialise")).collect();
        let done = Record::Done { kind: commit.completion.into(), expires_ms: clock::after_ms(self.clock.now_ms(), commit.ttl) };
        self.blocking("committing an event", move |db| {
            let txn = db.begin_write().map_err(unavailable)?;
            let ids = {
                let mut claims = txn.open_table(CLAIMS).map_err(unavailable)?;
                claim::check_owner(load(&claims, &claim.key)?.as_ref(), &claim)?;
                claims.insert(claim.key.as_str(), claim::encode(&done).as_slice()).map_err(unavailable)?;
                let mut state = txn.open_table(STATE).map_err(unavailable)?;
                for (key, value) in &writes {
                    match value {
                        Some(value) => state.insert((tenant.as_str(), key.as_str()), value.as_slice()).map_err(unavailable)?,
                        None => state.remove((tenant.as_str(), key.as_str())).map_err(unavailable)?,
                    };
                }
                let mut table = txn.open_table(OUTBOX).map_err(unavailable)?;
                let first = table.last().map_err(unavailable)?.map_or(0, |(id, _)| id.value() + 1);
                let mut ids = Vec::with_capacity(outbox.len());
                for (id, entry) in (first..).zip(&outbox) {
                    table.insert(id, entry.as_slice()).map_err(unavailable)?;
                    ids.push(id);
                }
                ids
            };
            txn.commit().map_err(unavailable)?;
            Ok(ids)
        })
        .await
    }

    async fn get_state(&self, tenant: &str, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        // Reads are short and redb readers never wait for writers: run inline.
        let txn = self.db.begin_read().map_err(unavailable)?;
        let state = txn.open_table(STATE).map_err(unavailable)?;
        let value = state.get((tenant, key)).map_err(unavailable)?;
        Ok(value.map(|v| v.value().to_vec()))
    }

    async fn pending_outbox(&self, limit: usize) -> Result<Vec<(OutboxId, OutboundMessage)>, StoreError> {
        self.blocking("reading the outbox", move |db| {
            let txn = db.begin_read().map_err(unavailable)?;
            let table = txn.open_table(OUTBOX).map_err(unavailable)?;
            let mut entries = Vec::new();
            for row in table.iter().map_err(unavailable)?.take(limit) {
                let (id, bytes) = row.map_err(unavailable)?;
                let message = serde_json::from_slice(bytes.value())
                    .map_err(|e| unavailable(anyhow::anyhow!("corrupt outbox entry {}: {e}", id.value())))?;
                entries.push((id.value(), message));
            }
            Ok(entries)
        })
        .await
    }

    async fn remove_outbox(&self, id: OutboxId) -> Result<(), StoreError> {
        self.blocking("removing an outbox entry", move |db| {
            let txn = db.begin_write().map_err(unavailable)?;
            txn.open_table(OUTBOX).map_err(unavailable)?.remove(id).map_err(unavailable)?;
            txn.commit().map_err(unavailable)
        })
        .await
    }

    async fn purge_expired(&self) -> Result<usize, StoreError> {
        let now = self.clock.now_ms();
        self.blocking("purging expired records", move |db| {
            let txn = db.begin_write().map_err(unavailable)?;
            let purged = {
                let mut claims = txn.open_table(CLAIMS).map_err(unavailable)?;
                let mut expired = Vec::new();
                for row in claims.iter().map_err(unavailable)? {
                    let (key, bytes) = row.map_err(unavailable)?;
                    if claim::decode(bytes.value()).is_ok_and(|r| claim::is_expired(&r, now)) {
                        expired.push(key.value().to_owned());
                        if expired.len() == PURGE_BATCH {
                            break;
                        }
                    }
                }
                for key in &expired {
                    claims.remove(key.as_str()).map_err(unavailable)?;
                }
                expired.len()
            };
            txn.commit().map_err(unavailable)?;
            Ok(purged)
        })
        .await
    }
}
