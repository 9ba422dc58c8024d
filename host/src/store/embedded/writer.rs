//! The embedded store's one writer: every change goes through this thread,
//! which applies whatever is waiting in one redb transaction and fsyncs it
//! once (group commit). Accepting a publish and committing an event both
//! need an fsync; with many of them waiting, they share one.
//!
//! A batch is fsynced (`Durability::Immediate`) when it holds anything that
//! must survive a crash: an accepted message, a commit, a purge.
//! Acknowledgements alone are not: a lost acknowledgement means a done event
//! is delivered again and skipped as a duplicate. Claims in progress never
//! come here: they live in memory (`leases.rs`); a commit seals its lease
//! while its transaction is written.
//!
//! An operation that fails its own check (a claim that was lost) fails
//! alone; a storage failure fails the whole batch, closes the database and
//! has it reopened (see `handle.rs`). While it is failing, the thread also
//! probes on its own every [`PROBE_EVERY`]: an idle host (or one whose
//! traffic waits for `/readyz`) learns that space is back without a write
//! of its own.

use std::sync::Arc;
use std::sync::mpsc;

use redb::{Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata, Table};
use tokio::sync::oneshot;

use super::codec::{self, CLAIMS, DEAD_LETTERS, META, QUEUE, STATE, decode_origin_and_size, encode_message};
use super::handle::{Availability, DbHandle};
use super::leases::Leases;
use crate::pipeline::StateWrite;
use crate::store::claim::{self, ClaimToken, Record};
use crate::store::{MessageId, QueuedMessage, ReadVersion, Settle, SharedIndex, StateUsage, StoreError};

/// Operations applied in one transaction at most; more wait for the next.
const MAX_BATCH: usize = 512;
/// Expired records removed per purge, so a purge never holds the writer long.
const PURGE_BATCH: usize = 10_000;
/// Dead letters kept for listing; the dead-letter topic is the record.
pub const DEAD_LETTERS_KEPT: u64 = 1000;
/// How often a failing store is probed when nothing else is written: the
/// README promises it is written again "within seconds" of space returning.
const PROBE_EVERY: std::time::Duration = std::time::Duration::from_secs(2);
/// The `META` entry a probe writes (its count): a write that must reach the
/// disk, the only proof that the disk takes writes again.
const PROBE_KEY: &str = "disk_probes";

/// A change to make.
pub enum Op {
    /// Commits a finished event.
    Finish(Box<FinishOp>),
    /// Accepts messages onto the queue.
    Push { messages: Vec<QueuedMessage> },
    /// Removes a settled message.
    Ack { id: MessageId },
    /// Removes expired claims and done markers.
    Purge { now_ms: u64 },
    /// Has a closed database reopened, if its backoff allows; while the
    /// store is failing, also writes (and fsyncs) a probe record.
    Probe,
}

/// What a finished event commits.
pub struct FinishOp {
    pub claim: ClaimToken,
    pub done: Record,
    pub tenant: String,
    pub writes: Vec<StateWrite>,
    /// Keys the attempt read, with the versions it saw.
    pub reads: Vec<ReadVersion>,
    /// Its publishes (and dead letter), straight onto the queue.
    pub messages: Vec<QueuedMessage>,
    /// The dead-letter record to keep for listing, as JSON.
    pub dead_letter: Option<Vec<u8>>,
}

impl Op {
    fn must_survive_a_crash(&self) -> bool {
        matches!(self, Op::Finish(_) | Op::Push { .. } | Op::Purge { .. })
    }
}

/// What an operation came to.
#[derive(Debug)]
pub enum Applied {
    Done,
    Purged(usize),
}

struct Request {
    op: Op,
    reply: oneshot::Sender<Result<Applied, StoreError>>,
}

/// The sending side; the thread stops when the last one is dropped.
pub struct Writer {
    requests: Option<mpsc::Sender<Request>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Writer {
    /// Starts the writer thread for `handle`; committed queue changes are
    /// told to `index`. `next_id` is the first free message id.
    pub fn start(handle: Arc<DbHandle>, index: SharedIndex, usage: SharedUsage, leases: Arc<Leases>, next_id: MessageId, state_version: u64) -> std::io::Result<Self> {
        let (requests, incoming) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("wasmsub-store-writer".into())
            .spawn(move || WriterThread { handle, index, usage, leases, next_id, state_version }.run(incoming))?;
        Ok(Self { requests: Some(requests), thread: Some(thread) })
    }

    /// Applies `op` in the next batch; answers once the batch is committed.
    pub async fn apply(&self, op: Op) -> Result<Applied, StoreError> {
        let (reply, answer) = oneshot::channel();
        let stopped = || StoreError::Unavailable(anyhow::anyhow!("the embedded store's writer has stopped"));
        self.requests.as_ref().ok_or_else(stopped)?.send(Request { op, reply }).map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

impl Drop for Writer {
    /// Stops the thread and waits for it, so the file is closed when the
    /// store is dropped (a restart in the same process can open it again).
    fn drop(&mut self) {
        drop(self.requests.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

struct WriterThread {
    handle: Arc<DbHandle>,
    index: SharedIndex,
    usage: SharedUsage,
    leases: Arc<Leases>,
    next_id: MessageId,
    /// The newest state version written; each commit takes the next.
    state_version: u64,
}

/// State held per namespace, kept current by the writer.
pub type SharedUsage = Arc<std::sync::Mutex<std::collections::HashMap<String, StateUsage>>>;

/// Index changes a batch makes, applied once it is committed.
#[derive(Default)]
struct QueueChanges {
    added: Vec<(MessageId, usize, Option<String>)>,
    acked: Vec<MessageId>,
    /// State writes: (namespace, key length, old size, new size).
    state: Vec<(String, usize, Option<usize>, Option<usize>)>,
}

impl WriterThread {
    fn run(mut self, incoming: mpsc::Receiver<Request>) {
        loop {
            let first = if self.handle.trouble().is_some() {
                match incoming.recv_timeout(PROBE_EVERY) {
                    Ok(request) => request,
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        // Nobody waits for this answer.
                        let (reply, _) = oneshot::channel();
                        Request { op: Op::Probe, reply }
                    }
                    Err(mpsc::RecvTimeoutError::Disconnected) => return,
                }
            } else {
                match incoming.recv() {
                    Ok(request) => request,
                    Err(_) => return,
                }
            };
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match incoming.try_recv() {
                    Ok(request) => batch.push(request),
                    Err(_) => break,
                }
            }
            self.serve(batch);
        }
    }

    fn serve(&mut self, batch: Vec<Request>) {
        let available = self.handle.recover();
        if available == Availability::Reopened {
            self.reindex();
        }
        let db = match self.handle.get() {
            Ok(db) => db,
            Err(_) => {
                let why = self.handle.trouble().unwrap_or_default();
                for request in batch {
                    let _ = request.reply.send(Err(unavailable_because(&self.handle, &why)));
                }
                return;
            }
        };
        let (ops, replies): (Vec<Op>, Vec<_>) = batch.into_iter().map(|r| (r.op, r.reply)).unzip();
        // A probe writes only while the store is failing; then it must
        // reach the disk, or it proves nothing.
        let probing = self.handle.trouble().is_some() && ops.iter().any(|op| matches!(op, Op::Probe));
        let durable = probing || ops.iter().any(Op::must_survive_a_crash);
        let finishing: Vec<(usize, ClaimToken)> =
            ops.iter().enumerate().filter_map(|(at, op)| if let Op::Finish(finish) = op { Some((at, finish.claim.clone())) } else { None }).collect();
        match self.commit(&db, ops, durable, probing) {
            Ok((results, changes)) => {
                drop(db);
                // On disk now: a committed event's done record answers its
                // copies, so its lease goes; a refused one's is live again.
                for (at, claim) in &finishing {
                    self.leases.unseal(claim, results[*at].is_ok());
                }
                if durable {
                    // Only an fsynced commit proves the disk takes writes again.
                    self.handle.succeeded();
                }
                self.index.with(|index| {
                    for (id, size, origin) in &changes.added {
                        index.add(*id, *size, 0, origin.as_deref().map(Arc::from));
                    }
                    for id in &changes.acked {
                        index.settle(*id, Settle::Done);
                    }
                });
                if !changes.added.is_empty() {
                    self.index.notify();
                }
                if !changes.state.is_empty() {
                    let mut usage = self.usage.lock().unwrap_or_else(|p| p.into_inner());
                    for (namespace, key_len, old, new) in changes.state {
                        usage.entry(namespace).or_default().apply(key_len, old, new);
                    }
                }
                for (reply, result) in replies.into_iter().zip(results) {
                    let _ = reply.send(result);
                }
            }
            Err(error) => {
                drop(db);
                for (_, claim) in &finishing {
                    self.leases.unseal(claim, false);
                }
                let why = format!("{error}");
                self.handle.fail(why.clone());
                for reply in replies {
                    let _ = reply.send(Err(unavailable_because(&self.handle, &why)));
                }
            }
        }
    }

    /// One transaction for the whole batch. The outer error is a storage
    /// failure (nothing committed); inner errors belong to one operation.
    fn commit(&mut self, db: &Database, ops: Vec<Op>, durable: bool, probing: bool) -> Result<(Vec<Result<Applied, StoreError>>, QueueChanges), redb::Error> {
        let mut txn = db.begin_write()?;
        txn.set_durability(if durable { Durability::Immediate } else { Durability::None })?;
        if probing {
            let mut meta = txn.open_table(META)?;
            let probes = meta.get(PROBE_KEY)?.map_or(0, |count| count.value());
            meta.insert(PROBE_KEY, probes + 1)?;
        }
        let mut changes = QueueChanges::default();
        let mut results = Vec::with_capacity(ops.len());
        {
            let mut tables = Tables {
                claims: txn.open_table(CLAIMS)?,
                state: txn.open_table(STATE)?,
                queue: txn.open_table(QUEUE)?,
                dead_letters: txn.open_table(DEAD_LETTERS)?,
            };
            for op in ops {
                results.push(self.apply(&mut tables, op, &mut changes)?);
            }
        }
        txn.commit()?;
        Ok((results, changes))
    }

    fn apply(&mut self, tables: &mut Tables<'_>, op: Op, changes: &mut QueueChanges) -> Result<Result<Applied, StoreError>, redb::Error> {
        Ok(match op {
            Op::Finish(finish) => {
                if let Err(lost) = self.leases.seal(&finish.claim) {
                    return Ok(Err(lost));
                }
                for (key, seen) in &finish.reads {
                    let now = tables.state.get((finish.tenant.as_str(), key.as_str()))?.map(|row| codec::decode_state(row.value()).0.to_string());
                    if now != *seen {
                        return Ok(Err(StoreError::Conflict(key.clone())));
                    }
                }
                tables.claims.insert(finish.claim.key.as_str(), claim::encode(&finish.done).as_slice())?;
                self.state_version += 1;
                for (key, value) in &finish.writes {
                    let old = match value {
                        Some(value) => tables.state.insert((finish.tenant.as_str(), key.as_str()), codec::encode_state(self.state_version, value).as_slice())?,
                        None => tables.state.remove((finish.tenant.as_str(), key.as_str()))?,
                    };
                    let old = old.map(|v| codec::decode_state(v.value()).1.len());
                    changes.state.push((finish.tenant.clone(), key.len(), old, value.as_ref().map(Vec::len)));
                }
                self.enqueue(&mut tables.queue, &finish.messages, changes)?;
                if let Some(record) = &finish.dead_letter {
                    keep_dead_letter(&mut tables.dead_letters, record)?;
                }
                Ok(Applied::Done)
            }
            Op::Push { messages } => {
                self.enqueue(&mut tables.queue, &messages, changes)?;
                Ok(Applied::Done)
            }
            Op::Probe => Ok(Applied::Done),
            Op::Ack { id } => {
                tables.queue.remove(id)?;
                changes.acked.push(id);
                Ok(Applied::Done)
            }
            Op::Purge { now_ms } => {
                let mut expired = Vec::new();
                for row in tables.claims.iter()? {
                    let (key, bytes) = row?;
                    if claim::decode(bytes.value()).is_ok_and(|record| claim::is_expired(&record, now_ms)) {
                        expired.push(key.value().to_owned());
                        if expired.len() == PURGE_BATCH {
                            break;
                        }
                    }
                }
                for key in &expired {
                    tables.claims.remove(key.as_str())?;
                }
                Ok(Applied::Purged(expired.len()))
            }
        })
    }

    fn enqueue(&mut self, queue: &mut Table<'_, u64, &'static [u8]>, messages: &[QueuedMessage], changes: &mut QueueChanges) -> Result<(), redb::Error> {
        for message in messages {
            let id = self.next_id;
            self.next_id += 1;
            queue.insert(id, encode_message(message).as_slice())?;
            changes.added.push((id, message.body.len(), message.origin.clone()));
        }
        Ok(())
    }

    /// After a reopen, what was not durable is gone: messages whose
    /// acknowledgement was lost are on the queue again, and must be known
    /// to the index to be delivered (again; their events dedupe).
    fn reindex(&mut self) {
        let Ok(db) = self.handle.get() else { return };
        let rows = (|| -> Result<Vec<(MessageId, usize, Option<String>)>, redb::Error> {
            let txn = db.begin_read()?;
            let queue = txn.open_table(QUEUE)?;
            let mut rows = Vec::new();
            for row in queue.iter()? {
                let (id, bytes) = row?;
                // A row that does not decode is left out (and said so when taken).
                if let Ok((origin, size)) = decode_origin_and_size(bytes.value()) {
                    rows.push((id.value(), size, origin));
                }
            }
            Ok(rows)
        })();
        match rows {
            Ok(rows) => {
                let found = self.index.with(|index| {
                    let mut found = 0;
                    for (id, size, origin) in rows {
                        self.next_id = self.next_id.max(id + 1);
                        if !index.knows(id) {
                            index.add(id, size, 0, origin.as_deref().map(Arc::from));
                            found += 1;
                        }
                    }
                    found
                });
                if found > 0 {
                    tracing::info!(messages = found, "queued messages whose settling was lost with the failure will be delivered again");
                    self.index.notify();
                }
            }
            Err(error) => tracing::warn!(%error, "could not re-read the queue after reopening the embedded store"),
        }
    }
}

struct Tables<'txn> {
    claims: Table<'txn, &'static str, &'static [u8]>,
    state: Table<'txn, (&'static str, &'static str), &'static [u8]>,
    queue: Table<'txn, u64, &'static [u8]>,
    dead_letters: Table<'txn, u64, &'static [u8]>,
}

/// Appends a dead letter and forgets the oldest beyond [`DEAD_LETTERS_KEPT`].
fn keep_dead_letter(table: &mut Table<'_, u64, &'static [u8]>, record: &[u8]) -> Result<(), redb::Error> {
    let next = table.last()?.map_or(0, |(id, _)| id.value() + 1);
    table.insert(next, record)?;
    if table.len()? > DEAD_LETTERS_KEPT {
        let oldest = table.first()?.map(|(id, _)| id.value());
        if let Some(oldest) = oldest {
            table.remove(oldest)?;
        }
    }
    Ok(())
}

fn unavailable_because(handle: &DbHandle, why: &str) -> StoreError {
    StoreError::Unavailable(anyhow::anyhow!("embedded store {} is unavailable: {why}", handle.path().display()))
}
