//! What happens once a done record's outbox is published.
//!
//! A done record keeps its outbox after the publishes are out: clearing it
//! would cost every event a read and a write (on Redis, a Lua script of
//! five to seven commands) for the sake of the rare redelivery of an event
//! already done. Instead this host remembers, in a bounded memory, which
//! records it published ([`PublishedMarks::published_here`]), and a
//! redelivery is what clears a record: one that finds a done record with an
//! outbox is acknowledged at once if this host published it, and has it
//! published first (same CloudEvent ids) if not (another replica's event,
//! or one from before a restart); either way the record is then rewritten
//! without its outbox, so no later redelivery, on any replica, publishes it
//! again. Those rewrites gather for `GATHER` and go out as one bulk read and
//! one save. A rewrite that never happens (the host stopped, the sidecar
//! was down) costs only a republish with the same ids, which consumers
//! dedupe.

use std::num::NonZeroUsize;
use std::sync::Mutex;
use std::time::Duration;

use lru::LruCache;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use super::StoredClaim;
use crate::clock::SharedClock;
use crate::sidecar::{Sidecar, SidecarError, StateItem};
use crate::store::claim::Record;

/// How long finished records gather before they are rewritten together.
/// Longer makes bigger batches; a redelivery inside the window publishes
/// the event's messages again (same ids), which consumers dedupe.
const GATHER: Duration = Duration::from_millis(50);
/// Records rewritten per round at most (bounds the bulk read and the save).
const MAX_RECORDS: usize = 256;
/// Records this host remembers having published: a minute of 500 events/s,
/// longer than the redelivery timeouts brokers use. Past it the oldest are
/// forgotten: a redelivery of one of those is published again, as after a
/// restart.
const REMEMBERED: NonZeroUsize = NonZeroUsize::new(32_768).expect("not zero");
/// What one remembered record costs at most: the sha256 of its key (event
/// ids are the producers' and may be long), its done record, and the
/// cache's links and hash slot.
const BYTES_PER_RECORD: usize = 128;
/// The memory the remembered records may take (counted in the host's
/// memory bound, `budget.rs`).
pub(super) const REMEMBERED_BYTES: usize = REMEMBERED.get() * BYTES_PER_RECORD;

/// The done records whose outbox this host published, and the queue of
/// those to rewrite without it.
pub(super) struct PublishedMarks {
    /// Claim record keys (hashed) and the done record published (an event
    /// run again once its record expired has a new one), most recent last.
    here: Mutex<LruCache<[u8; 32], Record>>,
    queue: mpsc::UnboundedSender<String>,
    /// Started by the first record, inside the runtime.
    idle: Mutex<Option<Rewriter>>,
}

/// What the background rounds need: the queue's receiving end and where to write.
struct Rewriter {
    records: mpsc::UnboundedReceiver<String>,
    sidecar: Sidecar,
    store: String,
    clock: SharedClock,
}

impl PublishedMarks {
    pub(super) fn new(sidecar: Sidecar, store: String, clock: SharedClock) -> Self {
        let (queue, records) = mpsc::unbounded_channel();
        Self { here: Mutex::new(LruCache::new(REMEMBERED)), queue, idle: Mutex::new(Some(Rewriter { records, sidecar, store, clock })) }
    }

    fn here(&self) -> std::sync::MutexGuard<'_, LruCache<[u8; 32], Record>> {
        self.here.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The outbox of `record_key`'s done record `done` is all published by
    /// this host. `redelivered`: a redelivery found it unpublished, so clear
    /// the record now.
    pub(super) fn published(&self, record_key: String, done: Record, redelivered: bool) {
        self.here().put(fingerprint(&record_key), done);
        if redelivered {
            self.clear(record_key);
        }
    }

    /// Whether this host published the outbox of `record_key`'s done record
    /// `done` (as far as it remembers).
    pub(super) fn published_here(&self, record_key: &str, done: &Record) -> bool {
        self.here().peek(&fingerprint(record_key)) == Some(done)
    }

    /// Rewrites `record_key` without its outbox, soon.
    pub(super) fn clear(&self, record_key: String) {
        if let Some(rewriter) = self.idle.lock().unwrap_or_else(|p| p.into_inner()).take() {
            tokio::spawn(rewrite_in_rounds(rewriter));
        }
        let _ = self.queue.send(record_key);
    }
}

/// What the memory keeps of a claim record key: its sha256, so an entry's
/// size does not depend on the producer's event id.
fn fingerprint(record_key: &str) -> [u8; 32] {
    Sha256::digest(record_key).into()
}

async fn rewrite_in_rounds(Rewriter { mut records, sidecar, store, clock }: Rewriter) {
    while let Some(first) = records.recv().await {
        tokio::time::sleep(GATHER).await;
        let mut round = vec![first];
        while round.len() < MAX_RECORDS {
            match records.try_recv() {
                Ok(key) => round.push(key),
                Err(_) => break,
            }
        }
        if let Err(error) = rewrite(&sidecar, &store, &clock, &round).await {
            tracing::debug!(%error, records = round.len(), "could not mark done records' outboxes as published; a redelivery publishes them again");
        }
    }
}

/// Rewrites each record of `keys` that is still a done record with an
/// outbox, guarded by the ETag read here (a record changed meanwhile is
/// someone else's newer copy, left alone).
async fn rewrite(sidecar: &Sidecar, store: &str, clock: &SharedClock, keys: &[String]) -> Result<(), SidecarError> {
    let reads = sidecar.get_bulk(store, keys).await?;
    let now_ms = clock.now_ms();
    let items: Vec<StateItem> = keys
        .iter()
        .zip(reads)
        .filter_map(|(key, read)| {
            let (raw, etag) = read?;
            let stored: StoredClaim = serde_json::from_str(raw.get()).ok()?;
            let Record::Done { expires_ms, .. } = stored.record else { return None };
            if stored.outbox.is_empty() {
                return None;
            }
            let ttl = Duration::from_millis(expires_ms.saturating_sub(now_ms));
            let cleared = StoredClaim { record: stored.record, outbox: Vec::new(), writes: stored.writes };
            Some(StateItem::json(key.clone(), &cleared).first_write(etag).ttl(ttl))
        })
        .collect();
    // One call per record, sent together: the sidecar's batches merge them
    // into one request, and a conflict on one record fails only that one.
    let saves = items.into_iter().map(|item| sidecar.save_state(store, vec![item]));
    for result in futures_util::future::join_all(saves).await {
        match result {
            Ok(()) | Err(SidecarError::Conflict { .. }) => {}
            Err(error) => return Err(error),
        }
    }
    Ok(())
}
