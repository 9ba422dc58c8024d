//! The embedded store: one redb file holding the idempotency records, the
//! tenants' state, the embedded broker's queue and recent dead letters, so
//! all of it survives a crash or a restart with no external service.
//!
//! - A publish the broker answers 2xx is on disk first ([`MessageQueue`]).
//! - A finished event's publishes go straight onto the queue in its commit:
//!   nothing sits between "committed" and "queued".
//! - Every change goes through one writer thread that commits what is
//!   waiting together, with one fsync (`writer.rs`).
//! - Claims in progress live in memory (`leases.rs`): the file is this
//!   process's alone, and a claim never has to outlive it. Only the done
//!   record, written in the event's commit, is on disk.
//! - A write that fails (a full disk) closes the file and has it reopened
//!   with backoff (`handle.rs`); meanwhile events are deferred and publishes
//!   refused, and nothing restarts.
//!
//! redb gives serialisable write transactions, which is what makes the claim
//! a true insert-if-absent and the finish commit atomic.

pub(crate) mod codec;
mod handle;
mod leases;
mod writer;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use async_trait::async_trait;
use bytes::Bytes;
use redb::{ReadableDatabase, ReadableTable};

use super::claim::{self, Claim, ClaimToken, Record};
use super::{
    Commit, DedupeKey, DeliveryStore, MessageId, MessageQueue, OutboundMessage, OutboxId, QueueError, QueueLimits, QueuedMessage, Settle,
    SharedIndex, StateRead, StateUsage, StoreError, Taken,
};
use crate::clock::{self, SharedClock};
use crate::cloudevent::CLOUDEVENTS_JSON;
use codec::{CLAIMS, DEAD_LETTERS, LEGACY_OUTBOX, QUEUE, RECORDS, STATE, decode_message, decode_origin_and_size};
use handle::DbHandle;
use leases::{Leases, Taking};
use writer::{Applied, FinishOp, Op, SharedUsage, Writer};

/// How the embedded store is opened.
#[derive(Clone)]
pub struct EmbeddedOptions {
    /// redb's page cache: the store's share of the host's memory bound.
    pub cache_bytes: usize,
    /// What the queue may hold before publishers are refused.
    pub queue_limits: QueueLimits,
    /// The clock leases and expiries are read from.
    pub clock: SharedClock,
}

impl Default for EmbeddedOptions {
    /// A 64 MiB cache: the hot part of the idempotency records and state of
    /// a busy host, a sixteenth of redb's default of 1 GiB.
    fn default() -> Self {
        Self { cache_bytes: 64 * 1024 * 1024, queue_limits: QueueLimits::default(), clock: clock::system() }
    }
}

/// The redb-backed store, also the embedded broker's queue.
pub struct EmbeddedStore {
    handle: Arc<DbHandle>,
    writer: Writer,
    index: SharedIndex,
    usage: SharedUsage,
    leases: Arc<Leases>,
    limits: QueueLimits,
    clock: SharedClock,
}

impl EmbeddedStore {
    /// Opens (or creates) the store file with default options.
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        Self::open_with(path, EmbeddedOptions::default())
    }

    /// Opens (or creates) the store file; its directory is created if missing.
    /// Messages queued by an earlier run are due at once.
    pub fn open_with(path: &Path, options: EmbeddedOptions) -> anyhow::Result<Self> {
        let handle = Arc::new(DbHandle::open(path, options.cache_bytes).map_err(anyhow::Error::msg)?);
        codec::upgrade(&*handle.get()?).with_context(|| format!("upgrading the format of {}", path.display()))?;
        move_legacy_outbox(&handle).with_context(|| format!("moving old outbox entries to the queue in {}", path.display()))?;
        let index = SharedIndex::default();
        let next_id = load_queue(&handle, &index).with_context(|| format!("reading the queue of {}", path.display()))?;
        let queued = index.depth().0;
        if queued > 0 {
            tracing::info!(path = %path.display(), messages = queued, "messages queued by an earlier run will be delivered");
        }
        let (usage, newest_version) = load_usage(&handle).with_context(|| format!("counting tenant state in {}", path.display()))?;
        let usage = SharedUsage::new(usage.into());
        let leases = Arc::new(Leases::default());
        let writer = Writer::start(handle.clone(), index.clone(), usage.clone(), leases.clone(), next_id, newest_version)
            .context("starting the embedded store's writer thread")?;
        Ok(Self { handle, writer, index, usage, leases, limits: options.queue_limits, clock: options.clock })
    }

    /// Why the store cannot be used now (reopening after an I/O error), if
    /// it cannot.
    pub fn trouble(&self) -> Option<String> {
        self.handle.trouble()
    }

    fn read<T>(&self, what: &str, work: impl FnOnce(&redb::ReadTransaction) -> Result<T, redb::Error>) -> Result<T, StoreError> {
        let db = self.handle.get()?;
        let txn = db.begin_read().map_err(|e| read_failed(what, &self.handle, e.into()))?;
        work(&txn).map_err(|e| read_failed(what, &self.handle, e))
    }

    /// The record on disk for an encoded dedupe key: a done record, or a
    /// claim an earlier process left when it stopped mid-event.
    fn stored_record(&self, key: &str) -> Result<Option<Record>, StoreError> {
        let bytes = self.read("reading a claim record", |txn| Ok(txn.open_table(CLAIMS)?.get(key)?.map(|row| row.value().to_vec())))?;
        bytes.as_deref().map(claim::decode).transpose()
    }
}

fn read_failed(what: &str, handle: &DbHandle, error: redb::Error) -> StoreError {
    StoreError::Unavailable(anyhow::Error::new(error).context(format!("{what} in embedded store {}", handle.path().display())))
}

/// Indexes every queued message (due at once); returns the next free id.
fn load_queue(handle: &DbHandle, index: &SharedIndex) -> anyhow::Result<MessageId> {
    let db = handle.get()?;
    let txn = db.begin_read()?;
    let queue = txn.open_table(QUEUE)?;
    let mut next_id = 0;
    index.with(|index| -> anyhow::Result<()> {
        for row in queue.iter()? {
            let (id, bytes) = row?;
            let (origin, size) = decode_origin_and_size(bytes.value()).map_err(anyhow::Error::msg)?;
            index.add(id.value(), size, 0, origin.as_deref().map(Arc::from));
            next_id = id.value() + 1;
        }
        Ok(())
    })?;
    Ok(next_id)
}

/// What each state namespace holds, and the newest state version (one pass
/// over the state at start).
fn load_usage(handle: &DbHandle) -> anyhow::Result<(std::collections::HashMap<String, StateUsage>, u64)> {
    let db = handle.get()?;
    let txn = db.begin_read()?;
    let state = txn.open_table(STATE)?;
    let mut usage: std::collections::HashMap<String, StateUsage> = std::collections::HashMap::new();
    let mut newest = 0;
    for row in state.iter()? {
        let (key, value) = row?;
        let (namespace, key) = key.value();
        let (version, value) = codec::decode_state(value.value());
        newest = newest.max(version);
        usage.entry(namespace.to_owned()).or_default().apply(key.len(), None, Some(value.len()));
    }
    Ok((usage, newest))
}

/// Stores written before the queue existed kept committed publishes in an
/// outbox table for a relay: they go onto the queue, once.
fn move_legacy_outbox(handle: &DbHandle) -> anyhow::Result<()> {
    let db = handle.get()?;
    let txn = db.begin_write()?;
    let moved = {
        let Ok(mut outbox) = txn.open_table(LEGACY_OUTBOX) else { return Ok(()) };
        let mut queue = txn.open_table(QUEUE)?;
        let mut next = queue.last()?.map_or(0, |(id, _)| id.value() + 1);
        let mut moved = 0;
        while let Some((_, bytes)) = outbox.pop_first()? {
            let message: OutboundMessage = serde_json::from_slice(bytes.value())?;
            queue.insert(next, codec::encode_message(&queued(&message)).as_slice())?;
            next += 1;
            moved += 1;
        }
        moved
    };
    txn.delete_table(LEGACY_OUTBOX)?;
    txn.commit()?;
    if moved > 0 {
        tracing::info!(messages = moved, "moved committed publishes of an older store onto the queue");
    }
    Ok(())
}

/// A committed outbox entry as a queued message (a structured CloudEvent).
fn queued(message: &OutboundMessage) -> QueuedMessage {
    QueuedMessage {
        pubsub: message.pubsub.clone(),
        topic: message.topic.clone(),
        body: Bytes::from(serde_json::to_vec(&*message.event).expect("a JSON object always serialises")),
        content_type: Some(CLOUDEVENTS_JSON.to_owned()),
        origin: message.origin.clone(),
    }
}

fn unexpected(applied: Applied) -> StoreError {
    StoreError::Unavailable(anyhow::anyhow!("embedded store writer answered {applied:?} out of turn"))
}

#[async_trait]
impl DeliveryStore for EmbeddedStore {
    /// Takes the lease in memory first (a copy of an event in progress
    /// goes no further), then asks the disk whether the event is done. A
    /// commit removes its lease only once its done record is on disk, so a
    /// lease taken after that always finds the record.
    async fn claim(&self, key: &DedupeKey, lease: Duration) -> Result<Claim, StoreError> {
        if self.handle.trouble().is_some() {
            // Claims do not pass through the writer, which is what reopens
            // a failed file: ask it to try (its backoff decides).
            let _ = self.writer.apply(Op::Probe).await;
        }
        let key = key.encoded();
        let now_ms = self.clock.now_ms();
        let token = match self.leases.take(&key, now_ms, lease) {
            Taking::Held { lease_until_ms } => return Ok(Claim::HeldElsewhere { lease_until_ms }),
            Taking::Taken(token) => token,
        };
        match self.stored_record(&key) {
            Ok(Some(Record::Done { kind, expires_ms })) if expires_ms > now_ms => {
                self.leases.release(&token);
                Ok(Claim::AlreadyDone(kind))
            }
            // A claim on disk was left by an earlier process that stopped
            // mid-event (this store wrote them before claims moved to
            // memory): nothing of it was committed, take it over.
            Ok(Some(Record::InFlight { .. })) => Ok(Claim::Acquired(ClaimToken { took_over: true, ..token })),
            Ok(_) => Ok(Claim::Acquired(token)),
            Err(error) => {
                self.leases.release(&token);
                Err(error)
            }
        }
    }

    async fn release(&self, claim: &ClaimToken) -> Result<(), StoreError> {
        self.leases.release(claim);
        Ok(())
    }

    /// Commits, and puts the commit's publishes on the queue in the same
    /// transaction: there is nothing left for the caller to publish.
    async fn finish(&self, commit: Commit<'_>) -> Result<Vec<OutboxId>, StoreError> {
        let finish = FinishOp {
            claim: commit.claim.clone(),
            done: Record::Done { kind: commit.completion.into(), expires_ms: clock::after_ms(self.clock.now_ms(), commit.ttl) },
            tenant: commit.tenant.to_owned(),
            writes: commit.state_writes.to_vec(),
            reads: commit.reads.to_vec(),
            messages: commit.outbox.iter().map(queued).collect(),
            dead_letter: commit.dead_letter.map(<[u8]>::to_vec),
        };
        self.writer.apply(Op::Finish(Box::new(finish))).await?;
        Ok(Vec::new())
    }

    async fn read_state(&self, tenant: &str, key: &str) -> Result<StateRead, StoreError> {
        // Reads are short and redb readers never wait for writers: run inline.
        self.read("reading state", |txn| {
            let state = txn.open_table(STATE)?;
            Ok(match state.get((tenant, key))? {
                Some(row) => {
                    let (version, value) = codec::decode_state(row.value());
                    StateRead { value: Some(value.to_vec()), version: Some(version.to_string()) }
                }
                None => StateRead::default(),
            })
        })
    }

    async fn get_record(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.read("reading a host record", |txn| match txn.open_table(RECORDS) {
            Ok(table) => Ok(table.get(key)?.map(|row| row.value().to_vec())),
            Err(redb::TableError::TableDoesNotExist(_)) => Ok(None),
            Err(error) => Err(error.into()),
        })
    }

    /// Deploys are rare: a transaction of its own (it waits for the
    /// writer's current batch), fsynced before returning.
    async fn put_record(&self, key: &str, value: Option<&[u8]>) -> Result<(), StoreError> {
        let db = self.handle.get()?;
        let (key, value) = (key.to_owned(), value.map(<[u8]>::to_vec));
        let written = tokio::task::spawn_blocking(move || -> Result<(), redb::Error> {
            let txn = db.begin_write()?;
            {
                let mut table = txn.open_table(RECORDS)?;
                match &value {
                    Some(value) => drop(table.insert(key.as_str(), value.as_slice())?),
                    None => drop(table.remove(key.as_str())?),
                }
            }
            txn.commit()?;
            Ok(())
        })
        .await
        .map_err(|error| StoreError::Unavailable(anyhow::anyhow!("writing a host record: {error}")))?;
        written.map_err(|error| read_failed("writing a host record", &self.handle, error))
    }

    async fn pending_outbox(&self, _limit: usize) -> Result<Vec<(OutboxId, OutboundMessage)>, StoreError> {
        Ok(Vec::new())
    }

    async fn remove_outbox(&self, _id: OutboxId) -> Result<(), StoreError> {
        Ok(())
    }

    async fn purge_expired(&self) -> Result<usize, StoreError> {
        let now_ms = self.clock.now_ms();
        let forgotten = self.leases.forget_expired(now_ms);
        match self.writer.apply(Op::Purge { now_ms }).await? {
            Applied::Purged(count) => Ok(count + forgotten),
            other => Err(unexpected(other)),
        }
    }

    async fn recent_dead_letters(&self, limit: usize) -> Result<Option<Vec<Vec<u8>>>, StoreError> {
        self.read("reading dead letters", |txn| {
            let table = txn.open_table(DEAD_LETTERS)?;
            let mut newest_first = Vec::new();
            for row in table.iter()?.rev().take(limit) {
                newest_first.push(row?.1.value().to_vec());
            }
            newest_first.reverse();
            Ok(Some(newest_first))
        })
    }

    fn trouble(&self) -> Option<String> {
        self.handle.trouble()
    }

    fn state_usage(&self, namespace: &str) -> Option<StateUsage> {
        Some(self.usage.lock().unwrap_or_else(|p| p.into_inner()).get(namespace).copied().unwrap_or_default())
    }
}

#[async_trait]
impl MessageQueue for EmbeddedStore {
    async fn push(&self, messages: Vec<QueuedMessage>, respect_limits: bool) -> Result<(), QueueError> {
        if respect_limits {
            let sizes: Vec<usize> = messages.iter().map(|m| m.body.len()).collect();
            self.index.with(|index| index.check_room(&sizes, &self.limits))?;
        }
        self.writer.apply(Op::Push { messages }).await?;
        Ok(())
    }

    async fn take(&self, max: usize, now_ms: u64) -> Result<Vec<Taken>, StoreError> {
        let due = self.index.with(|index| index.take(max, now_ms));
        if due.is_empty() {
            return Ok(Vec::new());
        }
        let rows = self.read("reading the queue", |txn| {
            let queue = txn.open_table(QUEUE)?;
            let mut rows = Vec::with_capacity(due.len());
            for (id, retries) in &due {
                rows.push((*id, *retries, queue.get(*id)?.map(|row| row.value().to_vec())));
            }
            Ok(rows)
        });
        let rows = match rows {
            Ok(rows) => rows,
            Err(error) => {
                // Not delivered: back to the front, for when the store is back.
                self.index.with(|index| due.iter().rev().for_each(|(id, _)| index.put_back(*id)));
                return Err(error);
            }
        };
        let mut taken = Vec::with_capacity(rows.len());
        for (id, retries, row) in rows {
            match row.as_deref().map(decode_message) {
                Some(Ok(message)) => taken.push(Taken { id, message, retries }),
                Some(Err(why)) => {
                    // A row that does not decode can never be delivered: say
                    // so loudly, and keep it on disk for an operator.
                    tracing::error!(message.id = id, error = %why, "embedded store: queued message is corrupt; skipping it");
                    self.index.with(|index| index.settle(id, Settle::Done));
                }
                None => self.index.with(|index| index.settle(id, Settle::Done)),
            }
        }
        Ok(taken)
    }

    async fn settle(&self, id: MessageId, how: Settle) -> Result<(), StoreError> {
        match how {
            Settle::Done => self.writer.apply(Op::Ack { id }).await.map(drop),
            Settle::RetryAt(_) => {
                self.index.with(|index| index.settle(id, how));
                Ok(())
            }
        }
    }

    fn index(&self) -> &SharedIndex {
        &self.index
    }
}
