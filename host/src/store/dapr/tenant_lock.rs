//! A tenant's commit lock, for Dapr state stores whose transactions are not
//! atomic (Redis runs one as MULTI/EXEC: an operation whose ETag check fails
//! is skipped, the others still apply).
//!
//! Validating an attempt's reads and applying its writes must happen with no
//! other commit of the tenant in between, and on such a store no single call
//! can check several keys and write several keys at once. So a tenant's
//! state commits take turns: one record per tenant, created insert-if-absent
//! and deleted with its ETag when the commit is done. Within one host a
//! local mutex queues the tenant's commits first, so only one of them at a
//! time polls the record.
//!
//! A holder that dies (or stalls past the lock's lease) may have committed
//! (its done record carries its writes) without applying the writes. The
//! next holder takes the expired lock over with its ETag and first rolls
//! the dead holder's writes forward. A stalled holder that wakes up later
//! cannot overwrite anything: its writes are checked against the ETags it
//! read under the lock, which the roll-forward changed.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::OwnedMutexGuard;

use super::{DaprStore, unavailable};
use crate::clock;
use crate::store::claim;
use crate::store::keys;
use crate::store::StoreError;
use crate::sidecar::StateItem;

/// How long a commit may hold its tenant's lock before another host may
/// take it over (a commit is a few sidecar calls). Short, because a host
/// that dies holding it stalls its tenant's commits this long; a holder
/// that outlives it is harmless (its writes are fenced by ETags).
const LOCK_LEASE: Duration = Duration::from_secs(2);
/// How long a commit waits for its turn before giving the event back.
const LOCK_WAIT: Duration = Duration::from_secs(30);
/// Unfinished commits remembered in a lock record (a chain of holders that
/// each died right after taking an expired lock over).
const MAX_UNFINISHED: usize = 16;

/// What the lock record holds. It has no TTL: a holder that died leaves it
/// (with what must be rolled forward) until the next commit takes it over.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct LockRecord {
    /// The claim record key of the commit holding the lock.
    pub holder: String,
    token: u64,
    until_ms: u64,
    /// Claim record keys of earlier holders whose writes may not be applied
    /// yet (rolled forward by whoever takes the lock over next).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unfinished: Vec<String>,
}

impl LockRecord {
    /// Whether `record_key`'s commit may still be waiting to be applied.
    pub(super) fn covers(&self, record_key: &str) -> bool {
        self.holder == record_key || self.unfinished.iter().any(|k| k == record_key)
    }
    pub(super) fn expired(&self, now_ms: u64) -> bool {
        self.until_ms <= now_ms
    }
    pub(super) fn until_ms(&self) -> u64 {
        self.until_ms
    }
}

/// A held tenant lock; give it back with [`DaprStore::unlock_tenant`].
pub(super) struct TenantLock {
    /// The lock record's state key.
    pub key: String,
    token: u64,
    /// The record's ETag once known (read with the commit's other keys):
    /// giving the lock back is then one call.
    pub etag: Option<String>,
    _turn: OwnedMutexGuard<()>,
}

/// Per-tenant local queues, so one host's commits do not poll each other.
#[derive(Default)]
pub(super) struct LocalTurns {
    tenants: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl LocalTurns {
    async fn wait(&self, namespace: &str) -> OwnedMutexGuard<()> {
        let turn = {
            let mut tenants = self.tenants.lock().unwrap_or_else(|p| p.into_inner());
            tenants.entry(namespace.to_owned()).or_default().clone()
        };
        turn.lock_owned().await
    }
}

impl DaprStore {
    /// The lock record of `namespace` and its ETag, if any.
    pub(super) async fn load_lock(&self, namespace: &str) -> Result<Option<(LockRecord, Option<String>)>, StoreError> {
        let key = keys::dapr_lock_key(namespace);
        let Some((bytes, etag)) = self.sidecar.get_state(&self.store_name, &key).await.map_err(unavailable)? else {
            return Ok(None);
        };
        // A record we cannot read is treated as expired: it is replaced.
        let record = serde_json::from_slice(&bytes)
            .unwrap_or(LockRecord { holder: String::new(), token: 0, until_ms: 0, unfinished: Vec::new() });
        Ok(Some((record, etag)))
    }

    /// Takes `namespace`'s commit lock for the commit of `holder` (a claim
    /// record key), rolling forward the writes of a holder that died.
    pub(super) async fn lock_tenant(&self, namespace: &str, holder: &str) -> Result<TenantLock, StoreError> {
        let turn = self.turns.wait(namespace).await;
        let key = keys::dapr_lock_key(namespace);
        let token = claim::new_token();
        let deadline = Instant::now() + LOCK_WAIT;
        let mut pause = Duration::from_millis(2);
        loop {
            let mine = |unfinished: Vec<String>| LockRecord {
                holder: holder.to_owned(),
                token,
                until_ms: clock::after_ms(self.clock.now_ms(), LOCK_LEASE),
                unfinished,
            };
            let fresh = StateItem::new(key.clone(), Some(to_value(&mine(Vec::new())))).first_write(None);
            if self.sidecar.save_state(&self.store_name, &[fresh]).await.is_ok() {
                return Ok(TenantLock { key, token, etag: None, _turn: turn });
            }
            if let Some((current, etag)) = self.load_lock(namespace).await? {
                if current.token == token {
                    return Ok(TenantLock { key, token, etag: None, _turn: turn }); // the insert landed; its answer was lost
                }
                if current.expired(self.clock.now_ms()) {
                    let mut unfinished = current.unfinished.clone();
                    if !current.holder.is_empty() {
                        unfinished.push(current.holder.clone());
                    }
                    let keep_from = unfinished.len().saturating_sub(MAX_UNFINISHED);
                    unfinished.drain(..keep_from);
                    let takeover = StateItem::new(key.clone(), Some(to_value(&mine(unfinished.clone())))).first_write(etag);
                    if self.sidecar.save_state(&self.store_name, &[takeover]).await.is_ok() {
                        for earlier in &unfinished {
                            self.roll_forward(earlier).await?;
                        }
                        tracing::info!(tenant = namespace, dead_holder = %current.holder, "took over an expired commit lock; rolled its commit forward");
                        return Ok(TenantLock { key, token, etag: None, _turn: turn });
                    }
                }
            }
            if Instant::now() >= deadline {
                return Err(StoreError::Unavailable(anyhow::anyhow!(
                    "waited {LOCK_WAIT:?} for tenant `{namespace}`'s commit lock (state key {key})"
                )));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(50));
        }
    }

    /// Gives the lock back, if it is still ours.
    pub(super) async fn unlock_tenant(&self, lock: TenantLock) {
        let namespace_key = lock.key.clone();
        let result = async {
            if let Some(etag) = &lock.etag {
                return self.sidecar.delete_state(&self.store_name, &lock.key, etag).await.map_err(unavailable);
            }
            let Some((bytes, Some(etag))) = self.sidecar.get_state(&self.store_name, &lock.key).await.map_err(unavailable)? else {
                return Ok(());
            };
            match serde_json::from_slice::<LockRecord>(&bytes) {
                Ok(record) if record.token == lock.token => self.sidecar.delete_state(&self.store_name, &lock.key, &etag).await.map_err(unavailable),
                _ => Ok(()),
            }
        }
        .await;
        if let Err(error) = result {
            // It expires with its lease; the next commit waits that long.
            tracing::warn!(lock = namespace_key, %error, "could not give a tenant's commit lock back; it expires with its lease");
        }
    }
}

fn to_value(record: &LockRecord) -> serde_json::Value {
    serde_json::to_value(record).expect("a lock record always serialises")
}
