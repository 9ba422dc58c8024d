//! The embedded broker's queue: messages accepted for delivery, each kept
//! until the host has settled it (handled, or dead-lettered), and handed
//! out again after a delay while the answer is "retry".
//!
//! [`MessageQueue`] is what the embedded transport drains; [`QueueIndex`]
//! is the bookkeeping every implementation shares (which messages are due,
//! which are out for delivery, how full the queue is), kept in memory over
//! wherever the messages themselves live.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use super::StoreError;

/// A queued message's number, in order of acceptance.
pub type MessageId = u64;

/// A message on its way to a topic's subscribers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QueuedMessage {
    /// The pub/sub component it was published to.
    pub pubsub: String,
    /// The topic it was published to.
    pub topic: String,
    /// The body as it will be delivered (a structured CloudEvent, or a raw
    /// payload).
    #[serde(with = "serde_bytes_base64")]
    pub body: Bytes,
    /// The content type it will be delivered with.
    pub content_type: Option<String>,
    /// The tenant whose handler published it (`None`: the publish API).
    pub origin: Option<String>,
}

/// A message handed out for delivery.
#[derive(Debug, Clone)]
pub struct Taken {
    /// Its number, to settle it with.
    pub id: MessageId,
    /// The message.
    pub message: QueuedMessage,
    /// Deliveries before this one that were answered "retry".
    pub retries: u32,
}

/// How a delivered message ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settle {
    /// Handled (or dead-lettered): remove it.
    Done,
    /// Deliver it again at this time (Unix ms).
    RetryAt(u64),
}

/// Why a push was refused.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// The queue holds as much as it may; the publisher should come back.
    #[error("the queue is full ({messages} messages, {bytes} bytes queued; limits {max_messages} messages, {max_bytes} bytes)")]
    Full {
        /// Messages queued now.
        messages: usize,
        /// Bytes queued now.
        bytes: usize,
        /// The message bound.
        max_messages: usize,
        /// The byte bound.
        max_bytes: usize,
    },
    /// The queue's storage failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// How much a queue may hold: the bound that makes publishers wait
/// (HTTP 429) instead of growing the host without limit.
#[derive(Debug, Clone, Copy)]
pub struct QueueLimits {
    /// Messages queued at once.
    pub max_messages: usize,
    /// Bytes of message bodies queued at once.
    pub max_bytes: usize,
}

impl Default for QueueLimits {
    /// 10,000 messages or 64 MiB: a few seconds of work for a busy host,
    /// and a bound on the memory a backlog can take.
    fn default() -> Self {
        Self { max_messages: 10_000, max_bytes: 64 * 1024 * 1024 }
    }
}

/// The embedded broker's queue.
#[async_trait]
pub trait MessageQueue: Send + Sync + 'static {
    /// Accepts messages (all or none). `respect_limits` is false for
    /// messages the host itself committed (a handler's publishes, dead
    /// letters), which must not be refused once their event is done.
    async fn push(&self, messages: Vec<QueuedMessage>, respect_limits: bool) -> Result<(), QueueError>;

    /// Up to `max` messages that are due at `now_ms`, handed out until settled.
    async fn take(&self, max: usize, now_ms: u64) -> Result<Vec<Taken>, StoreError>;

    /// Settles a message handed out by [`MessageQueue::take`].
    async fn settle(&self, id: MessageId, how: Settle) -> Result<(), StoreError>;

    /// The bookkeeping: depth, due times, and a notification on push.
    fn index(&self) -> &SharedIndex;
}

/// The index, shared by a queue and whoever waits on it.
pub type SharedIndex = Arc<IndexHandle>;

/// The index behind a lock, with a notification for new messages.
#[derive(Default)]
pub struct IndexHandle {
    index: std::sync::Mutex<QueueIndex>,
    pushed: Notify,
}

impl IndexHandle {
    /// Runs `f` on the index.
    pub fn with<T>(&self, f: impl FnOnce(&mut QueueIndex) -> T) -> T {
        f(&mut self.index.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Wakes whoever waits for messages.
    pub fn notify(&self) {
        self.pushed.notify_one();
    }

    /// Resolves after the next [`IndexHandle::notify`] (or at once if one
    /// came since the last wait).
    pub async fn pushed(&self) {
        self.pushed.notified().await;
    }

    /// (messages, bytes) queued, handed-out ones included.
    pub fn depth(&self) -> (usize, usize) {
        self.with(|index| index.depth())
    }

    /// When the earliest delayed message is due (Unix ms), if any.
    pub fn next_due_ms(&self) -> Option<u64> {
        self.with(|index| index.delayed.first().map(|(due, _)| *due))
    }
}

/// Who put a message on the queue: a tenant (its handlers' publishes and
/// dead letters), or `None` for the publish API.
pub type Origin = Option<Arc<str>>;

/// One queued message's bookkeeping.
struct Entry {
    size: usize,
    retries: u32,
    origin: Origin,
}

/// Which messages are due, delayed or out, and how much is queued, overall
/// and per origin.
///
/// Due messages wait in one line per origin, and [`QueueIndex::take`]
/// serves the lines in turn: a tenant whose handler floods the queue with
/// its own publishes gets its share of the dispatcher, not all of it.
#[derive(Default)]
pub struct QueueIndex {
    ready: HashMap<Origin, VecDeque<MessageId>>,
    /// Origins with due messages, in the order they are served.
    turn: VecDeque<Origin>,
    delayed: BTreeSet<(u64, MessageId)>,
    entries: HashMap<MessageId, Entry>,
    bytes: usize,
    by_origin: HashMap<Origin, (usize, usize)>,
}

impl QueueIndex {
    /// Checks that `sizes` more messages fit.
    pub fn check_room(&self, sizes: &[usize], limits: &QueueLimits) -> Result<(), QueueError> {
        let (messages, bytes) = (self.entries.len(), self.bytes);
        let adding: usize = sizes.iter().sum();
        if messages + sizes.len() > limits.max_messages || bytes + adding > limits.max_bytes {
            return Err(QueueError::Full { messages, bytes, max_messages: limits.max_messages, max_bytes: limits.max_bytes });
        }
        Ok(())
    }

    /// (messages, bytes) that `origin` has queued, handed-out ones included.
    pub fn backlog(&self, origin: &Origin) -> (usize, usize) {
        self.by_origin.get(origin).copied().unwrap_or_default()
    }

    /// Records a message that is due now (new, or found at start-up).
    pub fn add(&mut self, id: MessageId, size: usize, retries: u32, origin: Origin) {
        let backlog = self.by_origin.entry(origin.clone()).or_default();
        backlog.0 += 1;
        backlog.1 += size;
        self.bytes += size;
        self.entries.insert(id, Entry { size, retries, origin: origin.clone() });
        self.make_due(id, origin, false);
    }

    fn make_due(&mut self, id: MessageId, origin: Origin, front: bool) {
        let line = self.ready.entry(origin.clone()).or_default();
        if line.is_empty() {
            self.turn.push_back(origin);
        }
        if front { line.push_front(id) } else { line.push_back(id) }
    }

    /// Whether `id` is queued (due, delayed or out for delivery).
    pub fn knows(&self, id: MessageId) -> bool {
        self.entries.contains_key(&id)
    }

    /// Takes up to `max` due messages, origins in turn: (id, retries so far).
    pub fn take(&mut self, max: usize, now_ms: u64) -> Vec<(MessageId, u32)> {
        while let Some(&(due, id)) = self.delayed.first() {
            if due > now_ms {
                break;
            }
            self.delayed.pop_first();
            if let Some(origin) = self.entries.get(&id).map(|e| e.origin.clone()) {
                self.make_due(id, origin, false);
            }
        }
        let mut taken = Vec::with_capacity(max.min(64));
        while taken.len() < max {
            let Some(origin) = self.turn.pop_front() else { break };
            let Some(line) = self.ready.get_mut(&origin) else { continue };
            if let Some(id) = line.pop_front() {
                taken.push((id, self.entries.get(&id).map_or(0, |e| e.retries)));
            }
            if line.is_empty() {
                self.ready.remove(&origin);
            } else {
                self.turn.push_back(origin);
            }
        }
        taken
    }

    /// Settles a taken message.
    pub fn settle(&mut self, id: MessageId, how: Settle) {
        match how {
            Settle::Done => {
                if let Some(entry) = self.entries.remove(&id) {
                    self.bytes -= entry.size;
                    if let Some(backlog) = self.by_origin.get_mut(&entry.origin) {
                        backlog.0 -= 1;
                        backlog.1 -= entry.size;
                        if backlog.0 == 0 {
                            self.by_origin.remove(&entry.origin);
                        }
                    }
                }
            }
            Settle::RetryAt(due) => {
                if let Some(entry) = self.entries.get_mut(&id) {
                    entry.retries += 1;
                    self.delayed.insert((due, id));
                }
            }
        }
    }

    /// Puts a taken message back, due now, without counting a retry (its
    /// delivery never ended: a settle that could not be stored).
    pub fn put_back(&mut self, id: MessageId) {
        if let Some(origin) = self.entries.get(&id).map(|e| e.origin.clone()) {
            self.make_due(id, origin, true);
        }
    }

    /// (messages, bytes) queued, handed-out ones included.
    fn depth(&self) -> (usize, usize) {
        (self.entries.len(), self.bytes)
    }
}

/// A queue in memory: for tests and benchmarks, and for a host that runs on
/// the in-memory store. Nothing survives the process.
pub struct MemoryQueue {
    index: SharedIndex,
    messages: std::sync::Mutex<(MessageId, HashMap<MessageId, QueuedMessage>)>,
    limits: QueueLimits,
}

impl MemoryQueue {
    /// An empty queue bounded by `limits`.
    pub fn new(limits: QueueLimits) -> Self {
        Self { index: SharedIndex::default(), messages: std::sync::Mutex::default(), limits }
    }

    fn messages(&self) -> std::sync::MutexGuard<'_, (MessageId, HashMap<MessageId, QueuedMessage>)> {
        self.messages.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait]
impl MessageQueue for MemoryQueue {
    async fn push(&self, messages: Vec<QueuedMessage>, respect_limits: bool) -> Result<(), QueueError> {
        let sizes: Vec<usize> = messages.iter().map(|m| m.body.len()).collect();
        let mut stored = self.messages();
        self.index.with(|index| {
            if respect_limits {
                index.check_room(&sizes, &self.limits)?;
            }
            for (message, size) in messages.into_iter().zip(sizes) {
                let id = stored.0;
                stored.0 += 1;
                let origin = message.origin.as_deref().map(Arc::from);
                stored.1.insert(id, message);
                index.add(id, size, 0, origin);
            }
            Ok::<(), QueueError>(())
        })?;
        drop(stored);
        self.index.notify();
        Ok(())
    }

    async fn take(&self, max: usize, now_ms: u64) -> Result<Vec<Taken>, StoreError> {
        let taken = self.index.with(|index| index.take(max, now_ms));
        let stored = self.messages();
        Ok(taken
            .into_iter()
            .filter_map(|(id, retries)| stored.1.get(&id).map(|message| Taken { id, message: message.clone(), retries }))
            .collect())
    }

    async fn settle(&self, id: MessageId, how: Settle) -> Result<(), StoreError> {
        if how == Settle::Done {
            self.messages().1.remove(&id);
        }
        self.index.with(|index| index.settle(id, how));
        Ok(())
    }

    fn index(&self) -> &SharedIndex {
        &self.index
    }
}

/// Bodies are bytes; stored queues keep them as base64 in JSON.
mod serde_bytes_base64 {
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD;
    use bytes::Bytes;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &Bytes, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Bytes, D::Error> {
        let text = String::deserialize(deserializer)?;
        STANDARD.decode(text).map(Bytes::from).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(body: &str) -> QueuedMessage {
        QueuedMessage { pubsub: "p".into(), topic: "t".into(), body: Bytes::from(body.to_owned()), content_type: None, origin: None }
    }

    #[tokio::test]
    async fn messages_come_out_in_order_and_again_when_retried() {
        let queue = MemoryQueue::new(QueueLimits::default());
        queue.push(vec![message("a"), message("b")], true).await.unwrap();
        let taken = queue.take(10, 0).await.unwrap();
        assert_eq!(taken.iter().map(|t| t.message.body.clone()).collect::<Vec<_>>(), vec!["a", "b"]);
        assert!(queue.take(10, 0).await.unwrap().is_empty(), "handed out until settled");
        queue.settle(taken[0].id, Settle::Done).await.unwrap();
        queue.settle(taken[1].id, Settle::RetryAt(500)).await.unwrap();
        assert!(queue.take(10, 499).await.unwrap().is_empty(), "not due yet");
        assert_eq!(queue.index().next_due_ms(), Some(500));
        let again = queue.take(10, 500).await.unwrap();
        assert_eq!((again.len(), again[0].retries), (1, 1));
        assert_eq!(queue.index().depth(), (1, 1));
    }

    #[test]
    fn origins_are_served_in_turn() {
        let mut index = QueueIndex::default();
        let flood: Origin = Some("flood".into());
        for id in 0..5 {
            index.add(id, 1, 0, flood.clone());
        }
        index.add(10, 1, 0, None);
        index.add(11, 1, 0, Some("quiet".into()));
        let taken: Vec<_> = index.take(4, 0).into_iter().map(|(id, _)| id).collect();
        assert_eq!(taken, vec![0, 10, 11, 1], "one of each origin before the flood's second");
        assert_eq!(index.backlog(&flood), (5, 5));
        index.settle(0, Settle::Done);
        assert_eq!(index.backlog(&flood), (4, 4));
        index.put_back(1);
        assert_eq!(index.take(1, 0), vec![(1, 0)], "a message put back is next in its line");
    }

    #[tokio::test]
    async fn a_full_queue_refuses_publishers_but_not_the_hosts_own_messages() {
        let queue = MemoryQueue::new(QueueLimits { max_messages: 2, max_bytes: 100 });
        queue.push(vec![message("a"), message("b")], true).await.unwrap();
        assert!(matches!(queue.push(vec![message("c")], true).await, Err(QueueError::Full { messages: 2, .. })));
        queue.push(vec![message("d")], false).await.unwrap();
        assert_eq!(queue.index().depth(), (3, 3));
        let big = QueuedMessage { body: Bytes::from(vec![0u8; 101]), ..message("") };
        let empty = MemoryQueue::new(QueueLimits { max_messages: 2, max_bytes: 100 });
        assert!(matches!(empty.push(vec![big], true).await, Err(QueueError::Full { .. })));
    }
}
