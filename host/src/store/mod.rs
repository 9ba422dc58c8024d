//! The delivery store: the idempotency records, the tenants' state and the
//! outbox of messages to publish, behind one trait because they must change
//! together. An attempt's state writes, its publishes (as outbox entries) and
//! the "processed" marker are one commit; a crash can never leave one without
//! the others.
//!
//! Claim protocol (see [`claim`]): before running a handler the pipeline
//! claims the event's [`DedupeKey`] with a lease. Concurrent copies find the
//! claim held and back off; a claim left by a crashed run expires with its
//! lease and the next copy takes it over. Only [`DeliveryStore::finish`] marks
//! the event done, and only while the claim is still this run's.

mod claim;
mod dapr;
pub(crate) mod embedded;
pub mod keys;
mod memory;
mod queue;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::pipeline::effects::StateWrite;

pub use claim::{Claim, ClaimToken, DoneKind};
pub use dapr::DaprStore;
pub use embedded::{EmbeddedOptions, EmbeddedStore};
pub use keys::DedupeKey;
pub use memory::MemoryStore;
pub use queue::{IndexHandle, Origin, MemoryQueue, MessageId, MessageQueue, QueueError, QueueIndex, QueueLimits, QueuedMessage, SharedIndex, Settle, Taken};

/// A message waiting in the outbox to be published.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutboundMessage {
    /// The pub/sub component to publish through.
    pub pubsub: String,
    /// The topic to publish to.
    pub topic: String,
    /// The CloudEvent to publish (structured JSON), with a stable id.
    /// Shared: a message is kept in the done record, the pending outbox and
    /// the publish request at once, and copying the JSON tree for each was
    /// a visible share of the host's CPU per event.
    pub event: Arc<Map<String, Value>>,
    /// The tenant whose handler published it (for per-tenant fairness and
    /// quotas on the embedded queue).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
}

/// A state value as read, with the version it had.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StateRead {
    /// The value; `None` when the key is absent.
    pub value: Option<Vec<u8>>,
    /// The version read (`None`: absent). Opaque: a counter in the embedded
    /// store, an ETag in a Dapr state store.
    pub version: Option<String>,
}

/// A key an attempt read, and the version it saw then (`None`: absent).
pub type ReadVersion = (String, Option<String>);

/// What a state namespace holds: keys, and bytes of keys and values.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StateUsage {
    /// Bytes of keys and values.
    pub bytes: u64,
    /// Keys.
    pub keys: u64,
}

impl StateUsage {
    /// Counts a write of `key` from `old` bytes (or absent) to `new` bytes
    /// (or deleted).
    pub fn apply(&mut self, key_len: usize, old: Option<usize>, new: Option<usize>) {
        if let Some(old) = old {
            self.bytes = self.bytes.saturating_sub((key_len + old) as u64);
            self.keys = self.keys.saturating_sub(1);
        }
        if let Some(new) = new {
            self.bytes += (key_len + new) as u64;
            self.keys += 1;
        }
    }
}

/// Outbox entries are numbered in commit order.
pub type OutboxId = u64;

/// Store failures, split by what the caller does about them.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Another run took the event over (our lease expired): discard this
    /// run's result; the other run owns the event now.
    #[error("the claim on {0} was taken over by another run after its lease expired")]
    ClaimLost(String),
    /// A state key the attempt read was changed by another commit before
    /// this one: the attempt's view is stale, it must run again with fresh
    /// reads. Nothing was written.
    #[error("state key `{0}` changed after the attempt read it")]
    Conflict(String),
    /// The store could not be read or written (disk full, sidecar down):
    /// an infrastructure error, answered with "retry later".
    #[error("store unavailable: {0:#}")]
    Unavailable(#[from] anyhow::Error),
}

/// What a finished event leaves behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Completion {
    /// The handler succeeded: apply its writes and publishes.
    Processed,
    /// The event was dead-lettered: only the dead-letter message is published.
    DeadLettered,
}

impl From<Completion> for DoneKind {
    fn from(completion: Completion) -> Self {
        match completion {
            Completion::Processed => DoneKind::Processed,
            Completion::DeadLettered => DoneKind::DeadLettered,
        }
    }
}

/// Everything one finished event commits at once.
#[derive(Debug)]
pub struct Commit<'a> {
    /// The claim this run holds; the commit fails if it no longer does.
    pub claim: &'a ClaimToken,
    /// How the event ended.
    pub completion: Completion,
    /// The tenant whose state `state_writes` change.
    pub tenant: &'a str,
    /// The attempt's state writes, applied with the commit.
    pub state_writes: &'a [StateWrite],
    /// Messages to publish once the commit holds (guest publishes, or the
    /// dead letter).
    pub outbox: &'a [OutboundMessage],
    /// A dead-lettered event's record (JSON), for stores that keep recent
    /// dead letters for listing.
    pub dead_letter: Option<&'a [u8]>,
    /// Every state key the attempt read from the store, with the version it
    /// saw: if any has changed since, the commit fails with
    /// [`StoreError::Conflict`] and writes nothing.
    pub reads: &'a [ReadVersion],
    /// How long the done marker is remembered.
    pub ttl: Duration,
}

/// The store behind the pipeline: claims, tenant state and the outbox.
#[async_trait]
pub trait DeliveryStore: Send + Sync + 'static {
    /// Claims `key` for `lease`, unless it is done or held by a live claim.
    async fn claim(&self, key: &DedupeKey, lease: Duration) -> Result<Claim, StoreError>;

    /// Gives a claim up after a failure that should be retried later (an
    /// infrastructure error), so the next delivery need not wait for the lease.
    async fn release(&self, claim: &ClaimToken) -> Result<(), StoreError>;

    /// Applies a finished event's effects, queues its outbox entries and marks
    /// it done, atomically. Returns the new outbox entries' ids.
    async fn finish(&self, commit: Commit<'_>) -> Result<Vec<OutboxId>, StoreError>;

    /// A tenant's committed state value.
    async fn get_state(&self, tenant: &str, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.read_state(tenant, key).await?.value)
    }

    /// A tenant's committed state value with its version, for read
    /// validation: a commit that names this version fails if the key has
    /// changed since.
    async fn read_state(&self, tenant: &str, key: &str) -> Result<StateRead, StoreError>;

    /// Outbox entries not yet published, oldest first.
    async fn pending_outbox(&self, limit: usize) -> Result<Vec<(OutboxId, OutboundMessage)>, StoreError>;

    /// Removes a published outbox entry.
    async fn remove_outbox(&self, id: OutboxId) -> Result<(), StoreError>;

    /// Forgets done markers and claims past their expiry; returns how many.
    async fn purge_expired(&self) -> Result<usize, StoreError>;

    /// The newest `limit` dead-letter records (oldest first), or `None` if
    /// this store does not keep them (the dead-letter topic is the record).
    async fn recent_dead_letters(&self, _limit: usize) -> Result<Option<Vec<Vec<u8>>>, StoreError> {
        Ok(None)
    }

    /// A host record (the deploy journal: `control/journal.rs`), kept
    /// apart from every tenant's state; `None` if absent.
    async fn get_record(&self, _key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(None)
    }

    /// Writes a host record (durably, before returning); `None` deletes it.
    async fn put_record(&self, _key: &str, _value: Option<&[u8]>) -> Result<(), StoreError> {
        Err(StoreError::Unavailable(anyhow::anyhow!("this store keeps no host records")))
    }

    /// Why the store cannot be used right now, if it knows (readiness).
    fn trouble(&self) -> Option<String> {
        None
    }

    /// What a state namespace holds, for state quotas; `None` if this store
    /// does not count (a Dapr state store: the quota is then not enforced).
    fn state_usage(&self, _namespace: &str) -> Option<StateUsage> {
        None
    }
}
