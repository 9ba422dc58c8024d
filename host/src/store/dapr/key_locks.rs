//! Per-key commit locks, for Dapr state stores whose transactions are not
//! atomic (Redis runs one as MULTI/EXEC: an operation whose ETag check fails
//! is skipped, the others still apply).
//!
//! Validating an attempt's reads and applying its writes must happen with no
//! other commit touching those keys in between, and on such a store no
//! single call can check several keys and write several keys at once. So a
//! commit locks every state key it read or writes: one record per key,
//! created insert-if-absent, taken in sorted key order (two commits never
//! wait for each other in a cycle) and deleted with its ETag when the commit
//! is done. Commits on distinct keys do not wait for each other. Within one
//! host a local mutex per key queues its commits first, so only one of them
//! at a time polls the record.
//!
//! A holder that dies (or stalls past the lock's lease) may have committed
//! (its done record carries its writes) without applying them. The next
//! commit to take the expired lock over first rolls the dead holder's write
//! of that key forward. A stalled holder that wakes up later cannot
//! overwrite anything: its writes are checked against the ETags it read
//! under the locks, which the roll-forward changed.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::OwnedMutexGuard;

use super::{DaprStore, unavailable};
use crate::clock;
use crate::sidecar::{Operation, Sidecar, StateItem};
use crate::store::StoreError;
use crate::store::claim;
use crate::store::keys;

/// How long a commit may hold a key's lock before another host may take it
/// over (a commit is a few sidecar calls). Short, because a host that dies
/// holding it stalls that key's commits this long; a holder that outlives
/// it is harmless (its writes are fenced by ETags).
const LOCK_LEASE: Duration = Duration::from_secs(2);
/// How long a commit waits for its turn on a key before giving the event back.
const LOCK_WAIT: Duration = Duration::from_secs(30);
/// Unfinished commits remembered in a lock record (a chain of holders that
/// each died right after taking an expired lock over).
const MAX_UNFINISHED: usize = 16;

/// What a lock record holds. It has no TTL: a holder that died leaves it
/// (with what must be rolled forward) until the next commit takes it over.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct LockRecord {
    /// The claim record key of the commit holding the lock.
    pub holder: String,
    token: u64,
    until_ms: u64,
    /// Claim record keys of earlier holders whose write of this key may not
    /// be applied yet (rolled forward by whoever takes the lock over next).
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

/// One held key lock.
pub(super) struct KeyLock {
    /// The lock record's state key.
    pub record: String,
    token: u64,
    /// The record's ETag once known (read with the commit's other keys):
    /// giving the lock back then needs no read.
    pub etag: Option<String>,
    _turn: OwnedMutexGuard<()>,
}

/// The locks one commit holds; give them back with [`DaprStore::unlock`].
pub(super) struct HeldLocks(pub Vec<KeyLock>);

/// Per-key local queues, so one host's commits do not poll each other.
#[derive(Default)]
pub(super) struct LocalTurns {
    keys: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl LocalTurns {
    async fn wait(&self, record: &str) -> OwnedMutexGuard<()> {
        let turn = {
            let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
            // Forget queues nobody holds or waits on, so the map stays small.
            if keys.len() > 4096 {
                keys.retain(|_, turn| Arc::strong_count(turn) > 1);
            }
            keys.entry(record.to_owned()).or_default().clone()
        };
        turn.lock_owned().await
    }
}

impl DaprStore {
    /// The lock record of `namespace`'s `key` and its ETag, if any.
    pub(super) async fn load_lock(&self, namespace: &str, key: &str) -> Result<Option<(LockRecord, Option<String>)>, StoreError> {
        let record = keys::dapr_lock_key(namespace, key);
        let Some((raw, etag)) = self.sidecar.get_state(&self.store_name, &record).await.map_err(unavailable)? else {
            return Ok(None);
        };
        // A record we cannot read is treated as expired: it is replaced.
        let lock = serde_json::from_str(raw.get())
            .unwrap_or(LockRecord { holder: String::new(), token: 0, until_ms: 0, unfinished: Vec::new() });
        Ok(Some((lock, etag)))
    }

    /// Locks every key of `state_keys` (of `namespace`) for the commit of
    /// `holder` (a claim record key), in sorted order.
    pub(super) async fn lock_keys(&self, namespace: &str, state_keys: &BTreeSet<String>, holder: &str) -> Result<HeldLocks, StoreError> {
        let mut held = HeldLocks(Vec::with_capacity(state_keys.len()));
        for key in state_keys {
            match self.lock_key(namespace, key, holder).await {
                Ok(lock) => held.0.push(lock),
                Err(error) => {
                    self.unlock(held).await;
                    return Err(error);
                }
            }
        }
        Ok(held)
    }

    async fn lock_key(&self, namespace: &str, key: &str, holder: &str) -> Result<KeyLock, StoreError> {
        let record = keys::dapr_lock_key(namespace, key);
        let turn = self.turns.wait(&record).await;
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
            let fresh = StateItem::json(record.clone(), &mine(Vec::new())).first_write(None);
            if self.sidecar.save_state(&self.store_name, vec![fresh]).await.is_ok() {
                return Ok(KeyLock { record, token, etag: None, _turn: turn });
            }
            if let Some((current, etag)) = self.load_lock(namespace, key).await? {
                if current.token == token {
                    // One of our writes landed though it was answered with
                    // an error: the insert, or a takeover. A takeover is
                    // "refused" after landing whenever its save was merged
                    // with other calls, the merged request failed on
                    // someone else's item, and our item, sent again alone,
                    // failed its ETag check against itself (Redis applies
                    // a save item by item). So finish what the record we
                    // wrote promises: roll its `unfinished` commits forward
                    // (none for an insert). Returning without it let the
                    // lock be given back with a dead holder's committed
                    // write never applied.
                    for earlier in &current.unfinished {
                        self.roll_forward(earlier, namespace, key).await?;
                    }
                    if !current.unfinished.is_empty() {
                        tracing::info!(tenant = namespace, "took over an expired state key lock (answer lost); rolled its commit forward");
                    }
                    return Ok(KeyLock { record, token, etag: None, _turn: turn });
                }
                if current.expired(self.clock.now_ms()) {
                    let mut unfinished = current.unfinished.clone();
                    if !current.holder.is_empty() {
                        unfinished.push(current.holder.clone());
                    }
                    let keep_from = unfinished.len().saturating_sub(MAX_UNFINISHED);
                    unfinished.drain(..keep_from);
                    let takeover = StateItem::json(record.clone(), &mine(unfinished.clone())).first_write(etag);
                    if self.sidecar.save_state(&self.store_name, vec![takeover]).await.is_ok() {
                        for earlier in &unfinished {
                            self.roll_forward(earlier, namespace, key).await?;
                        }
                        tracing::info!(tenant = namespace, dead_holder = %current.holder, "took over an expired state key lock; rolled its commit forward");
                        return Ok(KeyLock { record, token, etag: None, _turn: turn });
                    }
                }
            }
            if Instant::now() >= deadline {
                return Err(StoreError::Unavailable(anyhow::anyhow!("waited {LOCK_WAIT:?} for the commit lock on state key {record}")));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(50));
        }
    }

    /// Gives the locks back (those still ours), in one call when their
    /// ETags are known.
    pub(super) async fn unlock(&self, held: HeldLocks) {
        give_back(self.sidecar.clone(), self.store_name.clone(), held).await;
    }

    /// Gives the locks of an applied commit back without waiting: nothing
    /// the event's answer depends on is left, and this host's next commit
    /// on those keys waits for its turn, which the locks keep until they
    /// are given back.
    pub(super) fn unlock_soon(&self, held: HeldLocks) {
        tokio::spawn(give_back(self.sidecar.clone(), self.store_name.clone(), held));
    }
}

async fn give_back(sidecar: Sidecar, store: String, held: HeldLocks) {
    let mut deletes = Vec::new();
    for lock in &held.0 {
        match &lock.etag {
            Some(etag) => deletes.push(Operation::delete_if(lock.record.clone(), etag.clone())),
            None => {
                if let Some(etag) = current_etag_if_ours(&sidecar, &store, lock).await {
                    deletes.push(Operation::delete_if(lock.record.clone(), etag));
                }
            }
        }
    }
    if deletes.is_empty() {
        return;
    }
    if let Err(error) = sidecar.transaction(&store, deletes).await {
        // Those still ours expire with their lease; the next commit on
        // their keys waits that long.
        tracing::warn!(%error, "could not give state key locks back; they expire with their lease");
    }
}

async fn current_etag_if_ours(sidecar: &Sidecar, store: &str, lock: &KeyLock) -> Option<String> {
    let (raw, etag) = sidecar.get_state(store, &lock.record).await.ok()??;
    let record: LockRecord = serde_json::from_str(raw.get()).ok()?;
    (record.token == lock.token).then_some(etag).flatten()
}
