//! Marking done records' outboxes as published, in the background and many
//! at a time.
//!
//! Once every publish of a committed event is out, its done record is
//! rewritten without the outbox, so that a redelivery of the event is
//! acknowledged without publishing again. Nobody waits for that rewrite (the
//! event was answered already), so instead of a read and a save per event,
//! the records finished within `GATHER` are read in one bulk read and
//! rewritten in one save. A rewrite that never happens (the host stopped,
//! the sidecar was down) costs only a republish, with the same CloudEvent
//! ids, if the event is ever redelivered.

use std::sync::Mutex;
use std::time::Duration;

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

/// The queue of done records whose outbox is out.
pub(super) struct PublishedMarks {
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
        Self { queue, idle: Mutex::new(Some(Rewriter { records, sidecar, store, clock })) }
    }

    /// `record_key`'s outbox is all published: clear it soon.
    pub(super) fn mark(&self, record_key: String) {
        if let Some(rewriter) = self.idle.lock().unwrap_or_else(|p| p.into_inner()).take() {
            tokio::spawn(rewrite_in_rounds(rewriter));
        }
        let _ = self.queue.send(record_key);
    }
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
