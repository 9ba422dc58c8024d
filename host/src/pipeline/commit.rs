//! Commit: the end of an event's run. A success commits the attempt's state
//! writes and publishes with the done marker; a dead letter commits the
//! dead-letter message with it. Either is one store commit, then the
//! committed messages are published before the broker is answered.

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use tokio::sync::OwnedSemaphorePermit;

use super::dead_letter::DeadLetter;
use super::effects::{EffectParts, Effects};
use super::outcome::Outcome;
use super::{InFlight, Pipeline};
use crate::clock;
use crate::cloudevent::CloudEvent;
use crate::store::{ClaimToken, Commit, Completion, OutboundMessage, OutboxId, StoreError};

/// A commit refused because a key the attempt read changed meanwhile.
pub(super) struct Conflict(pub String);

impl Pipeline {
    /// Commits a successful attempt. `slot` is the tenant's concurrency slot,
    /// released once the commit is done. A conflict (a key the attempt read
    /// has changed) commits nothing and keeps the claim: the caller runs the
    /// event again.
    pub(super) async fn commit_success(
        &self,
        flight: &InFlight<'_>,
        token: &ClaimToken,
        effects: Effects,
        attempts: u32,
        slot: Option<OwnedSemaphorePermit>,
    ) -> Result<Outcome, Conflict> {
        let handler = flight.handler;
        let EffectParts { writes, publishes, reads } = effects.into_parts();
        let source = format!("wasmsub/{}/{}", handler.tenant.name, handler.name);
        // What the handler publishes continues this delivery's trace.
        let trace = flight.trace.handed_on_from(&tracing::Span::current());
        let outbox: Vec<_> = publishes
            .into_iter()
            .enumerate()
            .map(|(index, publish)| {
                let mut event = CloudEvent::new_outgoing(outgoing_id(&token.key, index), &source, &publish.topic, &publish.data, &publish.content_type);
                trace.write_into(&mut event);
                OutboundMessage { pubsub: handler.config.pubsub.clone(), event: event.into(), topic: publish.topic, origin: Some(handler.tenant.name.to_string()) }
            })
            .collect();
        if let Err(reason) = self.flow.admit(&handler.tenant, outbox.len()) {
            // Nothing is committed: the event runs again when the tenant's
            // publishes have room.
            drop(slot);
            self.release(token).await;
            return Ok(Outcome::Throttled { reason });
        }
        let commit = Commit {
            claim: token,
            completion: Completion::Processed,
            tenant: &handler.tenant.namespace,
            state_writes: &writes,
            outbox: &outbox,
            dead_letter: None,
            reads: &reads,
            ttl: self.idempotency.ttl,
        };
        let committed = self.store.finish(commit).await;
        drop(slot);
        Ok(match committed {
            Ok(ids) => match self.publish_committed(&ids, &outbox).await {
                Ok(()) => Outcome::Processed { attempts },
                Err(reason) => Outcome::Deferred { reason },
            },
            Err(StoreError::Conflict(key)) => return Err(Conflict(key)),
            Err(error) => self.commit_failed(token, error).await,
        })
    }

    /// Claims, then dead-letters, an event that cannot reach its handler.
    pub(super) async fn dead_letter_unclaimed(&self, flight: &InFlight<'_>, original: &Map<String, Value>, reason: String) -> Outcome {
        match self.claim(flight).await {
            Ok(token) => self.dead_letter(flight, &token, original, reason, 0).await,
            Err(outcome) => outcome,
        }
    }

    /// Commits the event as dead-lettered, with the dead-letter message.
    pub(super) async fn dead_letter(&self, flight: &InFlight<'_>, token: &ClaimToken, original: &Map<String, Value>, reason: String, attempts: u32) -> Outcome {
        let handler = flight.handler;
        let entry = DeadLetter {
            tenant: handler.tenant.name.to_string(),
            handler: handler.name.to_string(),
            handler_version: flight.version().to_owned(),
            event_id: flight.event_id.clone(),
            topic: flight.topic.clone(),
            dead_letter_topic: handler.dead_letter_topic.clone(),
            reason: reason.clone(),
            attempts,
            at: clock::rfc3339(self.clock.now_ms()),
        };
        let trace = flight.trace.handed_on_from(&tracing::Span::current());
        let message = entry.message_for(&handler.config.pubsub, original, &trace);
        let record = serde_json::to_vec(&entry).expect("a dead letter serialises");
        let commit = Commit {
            claim: token,
            completion: Completion::DeadLettered,
            tenant: &handler.tenant.namespace,
            state_writes: &[],
            outbox: std::slice::from_ref(&message),
            dead_letter: Some(&record),
            reads: &[],
            ttl: self.idempotency.ttl,
        };
        match self.store.finish(commit).await {
            Ok(ids) => {
                self.dead_letters.record(entry);
                match self.publish_committed(&ids, std::slice::from_ref(&message)).await {
                    Ok(()) => Outcome::DeadLettered { reason, attempts },
                    Err(reason) => Outcome::Deferred { reason },
                }
            }
            Err(error) => self.commit_failed(token, error).await,
        }
    }

    /// Publishes what a commit queued before the event is acknowledged, so an
    /// acknowledged event's publishes are out. `ids` are the entries the
    /// store left for the caller to publish (a store that is itself the
    /// broker's queue leaves none). If the broker refuses, the entries stay
    /// committed for the relay, and the event is deferred: its redelivery is
    /// a duplicate, acknowledged once they are published.
    async fn publish_committed(&self, ids: &[OutboxId], outbox: &[OutboundMessage]) -> Result<(), String> {
        for (id, message) in ids.iter().zip(outbox) {
            let published = match self.publisher.publish(message).await {
                Ok(()) => self.store.remove_outbox(*id).await.map_err(anyhow::Error::from),
                Err(error) => Err(error),
            };
            if let Err(error) = published {
                self.metrics.store_error("publish");
                self.relay.poke();
                return Err(format!("effects committed; publishing to `{}` failed (the relay retries it): {error:#}", message.topic));
            }
        }
        Ok(())
    }

    async fn commit_failed(&self, token: &ClaimToken, error: StoreError) -> Outcome {
        match error {
            StoreError::ClaimLost(_) => Outcome::InFlightElsewhere,
            // Dead letters read nothing; a success's conflict is handled by
            // its caller before it gets here.
            StoreError::Conflict(key) => self.defer(token, format!("state key `{key}` changed under the commit")).await,
            StoreError::Unavailable(_) => {
                self.metrics.store_error("commit");
                self.defer(token, format!("cannot commit: {error}")).await
            }
        }
    }

    /// Gives the event back to the broker: nothing was committed.
    pub(super) async fn defer(&self, token: &ClaimToken, reason: String) -> Outcome {
        self.release(token).await;
        Outcome::Deferred { reason }
    }

    async fn release(&self, token: &ClaimToken) {
        if let Err(error) = self.store.release(token).await {
            // The lease expires on its own; the redelivery waits for it.
            tracing::warn!(%error, "could not release the claim; it will expire with its lease");
        }
    }
}

/// The id of the `index`-th event a handler published while handling the
/// event whose encoded dedupe key is `claim_key`: stable across retries of
/// the commit and relays of the outbox, so downstream consumers can dedupe it.
pub fn outgoing_id(claim_key: &str, index: usize) -> String {
    let mut hasher = Sha256::new();
    hasher.update(claim_key.as_bytes());
    hasher.update((index as u64).to_be_bytes());
    hex::encode(hasher.finalize())
}
