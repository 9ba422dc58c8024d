//! The pipeline: one delivery from bytes to a decision.
//!
//! receive → dedupe (claim) → dispatch (one attempt on a fresh instance) →
//! retry (backoff within the handler's budget) → commit the effects and ack,
//! or dead-letter. Every path ends in one [`Outcome`] and one log line.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::sync::broadcast;
use tracing::Instrument;

use crate::broker::Publisher;
use crate::cloudevent::CloudEvent;
use crate::dead_letter::{self, DeadLetter, DeadLetterLog};
use crate::dedupe::{self, DedupeKey};
use crate::manifest::IdempotencyConfig;
use crate::outcome::{DuplicateOf, Outcome};
use crate::receive::{self, Rejection};
use crate::registry::{Handler, HandlerCounts};
use crate::relay::RelayTrigger;
use crate::runtime::{AttemptContext, AttemptResult, Event, HandlerComponent, Runtime};
use crate::store::{Claim, ClaimToken, Commit, Completion, DeliveryStore, OutboundMessage, OutboxId, StoreError};

/// Reports buffered for slow subscribers (the demo, tests); older ones are
/// skipped rather than slowing the pipeline.
const REPORT_BUFFER: usize = 4096;

/// What happened to one delivery, for whoever watches (demo, tests, admin).
#[derive(Debug, Clone, Serialize)]
pub struct EventReport {
    pub tenant: String,
    pub handler: String,
    pub handler_version: String,
    pub event_id: String,
    pub topic: String,
    #[serde(flatten)]
    pub outcome: Outcome,
}

pub struct Pipeline {
    store: Arc<dyn DeliveryStore>,
    runtime: Runtime,
    relay: RelayTrigger,
    /// Where committed publishes go; set once the broker exists (the
    /// embedded broker needs the pipeline first).
    publisher: OnceLock<Arc<dyn Publisher>>,
    idempotency: IdempotencyConfig,
    pub dead_letters: DeadLetterLog,
    reports: broadcast::Sender<EventReport>,
}

/// One event on its way through, with what every stage needs to name it.
struct InFlight<'a> {
    handler: &'a Arc<Handler>,
    component: Arc<HandlerComponent>,
    event_id: String,
    topic: String,
}

impl Pipeline {
    pub fn new(store: Arc<dyn DeliveryStore>, runtime: Runtime, relay: RelayTrigger, idempotency: IdempotencyConfig) -> Self {
        let (reports, _) = broadcast::channel(REPORT_BUFFER);
        Self { store, runtime, relay, publisher: OnceLock::new(), idempotency, dead_letters: DeadLetterLog::default(), reports }
    }

    /// Sets the publisher for committed publishes (once).
    pub fn set_publisher(&self, publisher: Arc<dyn Publisher>) {
        let _ = self.publisher.set(publisher);
    }

    pub fn store(&self) -> &Arc<dyn DeliveryStore> {
        &self.store
    }

    pub fn runtime(&self) -> &Runtime {
        &self.runtime
    }

    /// Every later outcome, as it happens.
    pub fn subscribe_reports(&self) -> broadcast::Receiver<EventReport> {
        self.reports.subscribe()
    }

    /// Handles one delivery of `body` to `handler`.
    pub async fn deliver(&self, handler: &Arc<Handler>, body: &[u8], content_type: Option<&str>) -> Outcome {
        let limit = handler.tenant.limits.max_payload_bytes;
        match receive::receive(body, content_type, &handler.config.pubsub, &handler.config.topic, limit) {
            Ok(event) => self.process(handler, event).await,
            Err(rejection) => self.reject(handler, body, content_type, rejection).await,
        }
    }

    /// Dead-letters a delivery that could not be received.
    pub async fn reject(&self, handler: &Arc<Handler>, body: &[u8], content_type: Option<&str>, rejection: Rejection) -> Outcome {
        let (event_id, original) = dead_letter::envelope_for_malformed(body, content_type);
        let flight = InFlight { handler, component: handler.current(), event_id, topic: handler.config.topic.clone() };
        let span = event_span(&flight);
        async {
            let outcome = self.dead_letter_unclaimed(&flight, &original, rejection.to_string()).await;
            self.report(&flight, outcome)
        }
        .instrument(span)
        .await
    }

    /// Handles one parsed event.
    pub async fn process(&self, handler: &Arc<Handler>, event: CloudEvent) -> Outcome {
        let mut flight = InFlight { handler, component: handler.current(), event_id: event.id.clone(), topic: event.topic.clone() };
        let derived = dedupe::event_id(&event, handler.config.id_mode);
        if let Ok(id) = &derived {
            flight.event_id = id.clone();
        }
        let span = event_span(&flight);
        async {
            let outcome = match derived {
                Ok(_) => self.claim_and_run(&flight, &event).await,
                Err(error) => self.dead_letter_unclaimed(&flight, &event.original, error.to_string()).await,
            };
            self.report(&flight, outcome)
        }
        .instrument(span)
        .await
    }

    async fn claim_and_run(&self, flight: &InFlight<'_>, event: &CloudEvent) -> Outcome {
        let token = match self.claim(flight).await {
            Ok(token) => token,
            Err(outcome) => return outcome,
        };
        let handler = flight.handler;
        let policy = &handler.config.retry;
        let mut attempt = 1;
        loop {
            let result = self.attempt(flight, event, attempt).await;
            let reason = match result {
                AttemptResult::Succeeded(effects) => return self.commit_success(flight, &token, effects, attempt).await,
                AttemptResult::GuestDrop(reason) => {
                    return self.dead_letter(flight, &token, &event.original, format!("dropped by handler: {reason}"), attempt).await;
                }
                AttemptResult::Infrastructure(reason) => return self.defer(&token, reason).await,
                AttemptResult::GuestRetry(reason) => reason,
                AttemptResult::Trapped(reason) => reason,
            };
            if !policy.has_attempt_after(attempt) {
                return self.dead_letter(flight, &token, &event.original, reason, attempt).await;
            }
            let delay = policy.next_delay_jittered(attempt, rand::random());
            HandlerCounts::add(&handler.counts.retries);
            tracing::info!(messaging.attempt = attempt, %reason, retry_in = %humantime::format_duration(delay), "attempt failed; will retry");
            tokio::time::sleep(delay).await;
            attempt += 1;
        }
    }

    async fn claim(&self, flight: &InFlight<'_>) -> Result<ClaimToken, Outcome> {
        let handler = flight.handler;
        let key = DedupeKey {
            tenant: handler.tenant.name.to_string(),
            handler: handler.name.to_string(),
            event_id: flight.event_id.clone(),
        };
        match self.store.claim(&key, self.lease(handler)).await {
            Ok(Claim::Acquired(token)) => {
                if token.took_over {
                    tracing::info!("an earlier claim on this event expired (crashed or stalled run); running it again");
                }
                Ok(token)
            }
            Ok(Claim::AlreadyDone(kind)) => Err(Outcome::Duplicate { earlier: DuplicateOf::from(kind) }),
            Ok(Claim::HeldElsewhere { .. }) => Err(Outcome::InFlightElsewhere),
            Ok(Claim::DonePublishPending) => Err(Outcome::Deferred { reason: "the event is done; its committed publishes are being relayed".into() }),
            Err(error) => Err(Outcome::Deferred { reason: format!("cannot claim the event: {error}") }),
        }
    }

    /// A claim must outlive every attempt and every wait between them.
    fn lease(&self, handler: &Handler) -> Duration {
        let policy = &handler.config.retry;
        handler.tenant.limits.cpu_time * policy.max_attempts + policy.worst_case_waits() + self.idempotency.lease_margin
    }

    async fn attempt(&self, flight: &InFlight<'_>, event: &CloudEvent, attempt: u32) -> AttemptResult {
        let handler = flight.handler;
        let tenant = &handler.tenant;
        // Held only while the guest runs, not during backoff waits.
        let Ok(_permit) = tenant.concurrency.acquire().await else {
            return AttemptResult::Infrastructure("tenant concurrency gate closed".into());
        };
        let ctx = AttemptContext {
            tenant: tenant.name.clone(),
            namespace: tenant.namespace.clone(),
            handler: handler.name.clone(),
            version: flight.component.short_version().into(),
            event_id: flight.event_id.as_str().into(),
            store: self.store.clone(),
            publish_topics: tenant.publish_topics.clone(),
            capabilities: tenant.capabilities.clone(),
            memory_bytes: tenant.limits.memory_mib as usize * 1024 * 1024,
            table_elements: tenant.limits.table_elements as usize,
            max_log_bytes: tenant.limits.max_log_bytes,
            fuel: tenant.limits.fuel,
            runtime: tokio::runtime::Handle::current(),
        };
        let wit_event = to_wit_event(event, attempt);
        self.runtime.dispatch(flight.component.clone(), ctx, wit_event, tenant.limits.cpu_time).await
    }

    async fn commit_success(&self, flight: &InFlight<'_>, token: &ClaimToken, effects: crate::effects::Effects, attempts: u32) -> Outcome {
        let handler = flight.handler;
        let (writes, publishes) = effects.into_parts();
        let source = format!("wasmsub/{}/{}", handler.tenant.name, handler.name);
        let outbox: Vec<_> = publishes
            .into_iter()
            .enumerate()
            .map(|(index, publish)| OutboundMessage {
                pubsub: handler.config.pubsub.clone(),
                event: CloudEvent::new_outgoing(outgoing_id(token, index), &source, &publish.topic, &publish.data, &publish.content_type),
                topic: publish.topic,
            })
            .collect();
        let commit = Commit {
            claim: token,
            completion: Completion::Processed,
            tenant: &handler.tenant.namespace,
            state_writes: &writes,
            outbox: &outbox,
            ttl: self.idempotency.ttl,
        };
        match self.store.finish(commit).await {
            Ok(ids) => match self.publish_committed(&ids, &outbox).await {
                Ok(()) => Outcome::Processed { attempts },
                Err(reason) => Outcome::Deferred { reason },
            },
            Err(error) => self.commit_failed(token, error).await,
        }
    }

    /// Publishes what a commit queued before the event is acknowledged, so an
    /// acknowledged event's publishes are out. If the broker refuses, the
    /// entries stay committed for the relay, and the event is deferred: its
    /// redelivery is a duplicate, acknowledged once they are published.
    async fn publish_committed(&self, ids: &[OutboxId], outbox: &[OutboundMessage]) -> Result<(), String> {
        let Some(publisher) = self.publisher.get() else {
            self.relay.poke();
            return Ok(());
        };
        for (id, message) in ids.iter().zip(outbox) {
            let published = match publisher.publish(message).await {
                Ok(()) => self.store.remove_outbox(*id).await.map_err(anyhow::Error::from),
                Err(error) => Err(error),
            };
            if let Err(error) = published {
                self.relay.poke();
                return Err(format!("effects committed; publishing to `{}` failed (the relay retries it): {error:#}", message.topic));
            }
        }
        Ok(())
    }

    async fn commit_failed(&self, token: &ClaimToken, error: StoreError) -> Outcome {
        match error {
            StoreError::ClaimLost(_) => Outcome::InFlightElsewhere,
            StoreError::Unavailable(_) => self.defer(token, format!("cannot commit: {error}")).await,
        }
    }

    /// Gives the event back to the broker: nothing was committed.
    async fn defer(&self, token: &ClaimToken, reason: String) -> Outcome {
        if let Err(error) = self.store.release(token).await {
            // The lease expires on its own; the redelivery waits for it.
            tracing::warn!(%error, "could not release the claim; it will expire with its lease");
        }
        Outcome::Deferred { reason }
    }

    /// Claims, then dead-letters, an event that cannot reach its handler.
    async fn dead_letter_unclaimed(&self, flight: &InFlight<'_>, original: &serde_json::Map<String, serde_json::Value>, reason: String) -> Outcome {
        match self.claim(flight).await {
            Ok(token) => self.dead_letter(flight, &token, original, reason, 0).await,
            Err(outcome) => outcome,
        }
    }

    async fn dead_letter(
        &self,
        flight: &InFlight<'_>,
        token: &ClaimToken,
        original: &serde_json::Map<String, serde_json::Value>,
        reason: String,
        attempts: u32,
    ) -> Outcome {
        let handler = flight.handler;
        let entry = DeadLetter {
            tenant: handler.tenant.name.to_string(),
            handler: handler.name.to_string(),
            handler_version: if attempts > 0 { flight.component.version.clone() } else { String::new() },
            event_id: flight.event_id.clone(),
            topic: flight.topic.clone(),
            dead_letter_topic: handler.dead_letter_topic.clone(),
            reason: reason.clone(),
            attempts,
            at: humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
        };
        let message = entry.message_for(&handler.config.pubsub, original);
        let commit = Commit {
            claim: token,
            completion: Completion::DeadLettered,
            tenant: &handler.tenant.namespace,
            state_writes: &[],
            outbox: std::slice::from_ref(&message),
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

    /// The event's one decision line, and its report.
    fn report(&self, flight: &InFlight<'_>, outcome: Outcome) -> Outcome {
        let counts = &flight.handler.counts;
        HandlerCounts::add(match &outcome {
            Outcome::Processed { .. } => &counts.processed,
            Outcome::Duplicate { .. } => &counts.duplicates,
            Outcome::DeadLettered { .. } => &counts.dead_lettered,
            Outcome::InFlightElsewhere | Outcome::Deferred { .. } => &counts.deferred,
        });
        match &outcome {
            Outcome::Processed { attempts } => tracing::info!(outcome = outcome.label(), messaging.attempt = attempts, "event processed"),
            Outcome::Duplicate { earlier } => tracing::info!(outcome = outcome.label(), ?earlier, "duplicate delivery skipped"),
            Outcome::InFlightElsewhere => tracing::info!(outcome = outcome.label(), "another delivery holds this event; asking for redelivery"),
            Outcome::DeadLettered { reason, attempts } => tracing::warn!(outcome = outcome.label(), messaging.attempt = attempts,
                dead_letter_topic = %flight.handler.dead_letter_topic, %reason, "event dead-lettered"),
            Outcome::Deferred { reason } => tracing::warn!(outcome = outcome.label(), %reason, "event deferred; asking for redelivery"),
        }
        // Reports are for watchers (demo, tests, benchmarks): build none
        // when nobody listens.
        if self.reports.receiver_count() == 0 {
            return outcome;
        }
        let _ = self.reports.send(EventReport {
            tenant: flight.handler.tenant.name.to_string(),
            handler: flight.handler.name.to_string(),
            handler_version: flight.component.version.clone(),
            event_id: flight.event_id.clone(),
            topic: flight.topic.clone(),
            outcome: outcome.clone(),
        });
        outcome
    }
}

fn event_span(flight: &InFlight<'_>) -> tracing::Span {
    tracing::info_span!("event",
        messaging.system = "dapr",
        messaging.destination.name = %flight.topic,
        messaging.message.id = %flight.event_id,
        tenant = %flight.handler.tenant.name,
        handler = %flight.handler.name,
        handler.version = %flight.component.short_version(),
    )
}

/// A published event's id: stable across retries of the commit and relays of
/// the outbox, so downstream consumers can dedupe it.
fn outgoing_id(token: &ClaimToken, index: usize) -> String {
    let mut hasher = Sha256::new();
    hasher.update(token.key.as_bytes());
    hasher.update((index as u64).to_be_bytes());
    hex::encode(hasher.finalize())
}

fn to_wit_event(event: &CloudEvent, attempt: u32) -> Event {
    Event {
        id: event.id.clone(),
        source: event.source.clone(),
        type_: event.ty.clone(),
        specversion: event.specversion.clone(),
        subject: event.subject.clone(),
        time: event.time.clone(),
        datacontenttype: event.datacontenttype.clone(),
        data: event.data.clone(),
        extensions: event.extensions.clone(),
        topic: event.topic.clone(),
        pubsubname: event.pubsubname.clone(),
        attempt,
    }
}
