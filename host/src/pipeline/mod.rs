//! The pipeline: one parsed event and one handler, from claim to decision.
//!
//! [`receive`] (run once per delivery by [`crate::delivery`]) → [`dedupe`]
//! (which id, then a claim in the store) → [`dispatch`] (one attempt on a
//! fresh instance) → [`retry`] (backoff within the handler's budget) →
//! [`commit`] (effects, outbox and done marker at once) → [`outcome`] (the
//! broker's answer), or [`dead_letter`]. Every path ends in one
//! [`Outcome`], one log line and one [`EventReport`].

pub(crate) mod commit;
pub(crate) mod dead_letter;
pub(crate) mod dedupe;
pub(crate) mod dispatch;
pub(crate) mod effects;
pub(crate) mod flow;
pub(crate) mod outcome;
pub(crate) mod receive;
pub(crate) mod retry;

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::clock::SharedClock;
use crate::cloudevent::CloudEvent;
use crate::control::registry::{Handler, HandlerCounts};
use crate::manifest::IdempotencyConfig;
use crate::metrics::Metrics;
use crate::outbox::Publisher;
use crate::outbox::relay::RelayTrigger;
use crate::runtime::{AttemptResult, HandlerComponent, Runtime};
use crate::store::{Claim, ClaimToken, DedupeKey, DeliveryStore};
use crate::telemetry::TraceContext;
use crate::text::printable;
use dead_letter::DeadLetterLog;
use commit::Conflict;
use dispatch::Attempt;

pub use commit::outgoing_id;
pub use dead_letter::DeadLetter;
pub use dedupe::{IdError, IdMode, background_content_id};
pub use effects::{PendingPublish, StateWrite};
pub use outcome::{DaprStatus, DuplicateOf, Outcome};
pub use receive::{Payload, Rejection};
pub use retry::{Backoff, RetryPolicy};

/// Reruns of one attempt after read-validation conflicts before the event
/// goes back to the broker: a hot key under heavy contention still makes
/// progress, and a livelock cannot hold a claim for ever.
const MAX_CONFLICT_RERUNS: u32 = 16;

/// The version label of a delivery no attempt ran for.
static NO_VERSION: std::sync::LazyLock<Arc<str>> = std::sync::LazyLock::new(|| Arc::from(""));

/// Reports buffered for slow subscribers (the demo, tests); older ones are
/// skipped rather than slowing the pipeline.
const REPORT_BUFFER: usize = 4096;

/// What happened to one delivery, for whoever watches (demo, tests, admin).
#[derive(Debug, Clone, Serialize)]
pub struct EventReport {
    /// The tenant that owns the handler.
    pub tenant: String,
    /// The handler the delivery went to.
    pub handler: String,
    /// The version (component sha256) that made the last attempt; empty when
    /// no attempt ran (a duplicate, a malformed event).
    pub handler_version: String,
    /// The id the event was deduplicated by.
    pub event_id: String,
    /// The topic it arrived on.
    pub topic: String,
    /// How the delivery ended.
    #[serde(flatten)]
    pub outcome: Outcome,
}

/// The parts a pipeline works with.
pub(crate) struct PipelineParts {
    /// Claims, tenant state and the outbox.
    pub store: Arc<dyn DeliveryStore>,
    /// The WebAssembly runtime attempts run on.
    pub runtime: Runtime,
    /// Where committed messages go.
    pub publisher: Arc<dyn Publisher>,
    /// Wakes the outbox relay when an inline publish failed.
    pub relay: RelayTrigger,
    /// Done-marker TTL and lease margin.
    pub idempotency: IdempotencyConfig,
    /// Wall time, for dead-letter timestamps.
    pub clock: SharedClock,
    /// Cancelled when the host stops: events waiting to retry give up
    /// their claim and are redelivered later, instead of holding the stop.
    pub stopping: CancellationToken,
    /// Cancelled when the stop's drain times out: attempts still running
    /// are cut off (no effect committed; the event comes again).
    pub abandon: CancellationToken,
    /// Per-tenant publish quotas.
    pub flow: flow::FlowControl,
    /// Where deliveries and attempts are counted.
    pub metrics: Arc<Metrics>,
}

/// The stages, in order, for one event and one handler.
pub(crate) struct Pipeline {
    store: Arc<dyn DeliveryStore>,
    runtime: Runtime,
    publisher: Arc<dyn Publisher>,
    relay: RelayTrigger,
    idempotency: IdempotencyConfig,
    clock: SharedClock,
    stopping: CancellationToken,
    abandon: CancellationToken,
    flow: flow::FlowControl,
    metrics: Arc<Metrics>,
    dead_letters: DeadLetterLog,
    reports: broadcast::Sender<EventReport>,
}

/// One event on its way through, with what every stage needs to name it.
struct InFlight<'a> {
    handler: &'a Arc<Handler>,
    /// The version of the latest attempt (`None` before the first).
    component: Option<Arc<HandlerComponent>>,
    event_id: String,
    topic: String,
    /// When the delivery reached the pipeline.
    started: std::time::Instant,
    /// The trace context the event arrived with (empty for a malformed one).
    trace: TraceContext,
}

impl InFlight<'_> {
    fn version(&self) -> &str {
        self.component.as_ref().map_or("", |c| c.version.as_str())
    }
}

impl Pipeline {
    /// A pipeline over `parts`.
    pub fn new(parts: PipelineParts) -> Self {
        let (reports, _) = broadcast::channel(REPORT_BUFFER);
        Self {
            store: parts.store,
            runtime: parts.runtime,
            publisher: parts.publisher,
            relay: parts.relay,
            idempotency: parts.idempotency,
            clock: parts.clock,
            stopping: parts.stopping,
            abandon: parts.abandon,
            flow: parts.flow,
            metrics: parts.metrics,
            dead_letters: DeadLetterLog::default(),
            reports,
        }
    }

    /// The store the pipeline commits to.
    pub fn store(&self) -> &Arc<dyn DeliveryStore> {
        &self.store
    }

    /// Recent dead letters, newest last: from the store when it keeps them
    /// (they survive a restart), else those of this process.
    pub async fn dead_letters(&self) -> Vec<DeadLetter> {
        match self.store.recent_dead_letters(dead_letter::DEAD_LETTER_LOG_CAPACITY).await {
            Ok(Some(records)) => records.iter().filter_map(|r| serde_json::from_slice(r).ok()).collect(),
            Ok(None) => self.dead_letters.list(),
            Err(error) => {
                tracing::warn!(%error, "cannot read dead letters from the store; listing this process's");
                self.dead_letters.list()
            }
        }
    }

    /// Every later outcome, as it happens.
    pub fn subscribe_reports(&self) -> broadcast::Receiver<EventReport> {
        self.reports.subscribe()
    }

    /// Dead-letters a delivery that could not be received (malformed, too
    /// large): nothing runs, the payload goes to the handler's dead-letter
    /// topic byte for byte.
    pub async fn reject(&self, handler: &Arc<Handler>, body: &[u8], content_type: Option<&str>, rejection: Rejection) -> Outcome {
        let (event_id, original) = dead_letter::envelope_for_malformed(body, content_type);
        let flight = InFlight {
            handler,
            component: None,
            event_id,
            topic: handler.config.topic.clone(),
            started: std::time::Instant::now(),
            trace: TraceContext::default(),
        };
        let span = event_span(&flight);
        async {
            let outcome = self.dead_letter_unclaimed(&flight, &original, rejection.to_string()).await;
            self.report(&flight, outcome)
        }
        .instrument(span)
        .await
    }

    /// Handles one parsed event for `handler`.
    pub async fn process(&self, handler: &Arc<Handler>, event: &CloudEvent) -> Outcome {
        let mut flight = InFlight {
            handler,
            component: None,
            event_id: event.id.clone(),
            topic: event.topic.clone(),
            started: std::time::Instant::now(),
            trace: TraceContext::of_extensions(&event.extensions),
        };
        let derived = dedupe::event_id(event, handler.config.id_mode);
        if let Ok(id) = &derived {
            flight.event_id = id.clone();
        }
        let span = event_span(&flight);
        crate::telemetry::name_consumer_span(&span, &flight.topic);
        flight.trace.continue_in(&span);
        async {
            let outcome = match derived {
                Ok(_) if handler.tenant.saturated() => Outcome::Throttled {
                    reason: format!("tenant `{}` is running and queueing all it may; the event comes again later", handler.tenant.name),
                },
                Ok(_) => match self.flow.before_attempt(&handler.tenant) {
                    Ok(_probe) => self.claim_and_run(&mut flight, event).await,
                    Err(reason) => Outcome::Throttled { reason },
                },
                Err(error) => self.dead_letter_unclaimed(&flight, &event.original_object(), error.to_string()).await,
            };
            self.report(&flight, outcome)
        }
        .instrument(span)
        .await
    }

    /// Claim, then attempts until one succeeds, the guest drops the event,
    /// or the budget is spent.
    async fn claim_and_run(&self, flight: &mut InFlight<'_>, event: &CloudEvent) -> Outcome {
        let token = match self.claim(flight).await {
            Ok(token) => token,
            Err(outcome) => return outcome,
        };
        let handler = flight.handler;
        let policy = &handler.config.retry;
        let mut attempt = 1;
        let mut conflicts = 0;
        // Held from the first conflict to the end: see `Tenant::rerun_lane`.
        let mut rerun_lane = None;
        loop {
            let Attempt { result, component, slot } = self.attempt(flight, event, attempt).await;
            flight.component = component;
            let reason = match result {
                // The tenant's slot is held through the commit: a tenant with
                // `max_concurrency = 1` runs one event at a time, commit included.
                AttemptResult::Succeeded(effects) => match self.commit_success(flight, &token, effects, attempt, slot).await {
                    Ok(outcome) => return outcome,
                    // Another commit changed what this attempt read: its view
                    // was stale. Run it again on fresh reads; that is not the
                    // guest's failure, so it does not use up an attempt.
                    Err(Conflict(key)) if conflicts < MAX_CONFLICT_RERUNS => {
                        conflicts += 1;
                        HandlerCounts::add(&handler.counts.reruns);
                        if rerun_lane.is_none() {
                            rerun_lane = Some(handler.tenant.rerun_lane.clone().lock_owned().await);
                        }
                        tracing::debug!(state.key = %printable(&key), conflicts, "state read changed before the commit; running the attempt again");
                        continue;
                    }
                    Err(Conflict(key)) => {
                        return self.defer(&token, format!("state key `{}` kept changing under {conflicts} attempts; asking for redelivery", printable(&key))).await;
                    }
                },
                AttemptResult::GuestDrop(reason) => {
                    return self.dead_letter(flight, &token, &event.original_object(), format!("dropped by handler: {reason}"), attempt).await;
                }
                AttemptResult::Infrastructure(reason) => return self.defer(&token, reason).await,
                AttemptResult::GuestRetry(reason) | AttemptResult::Trapped { reason, .. } => reason,
            };
            drop(slot);
            if !policy.has_attempt_after(attempt) {
                return self.dead_letter(flight, &token, &event.original_object(), reason, attempt).await;
            }
            let delay = policy.next_delay_jittered(attempt, rand::random());
            HandlerCounts::add(&handler.counts.retries);
            tracing::info!(messaging.attempt = attempt, %reason, retry_in = %humantime::format_duration(delay), "attempt failed; will retry");
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = self.stopping.cancelled() => {
                    return self.defer(&token, format!("the host is stopping; attempt {attempt} failed ({reason}), the next comes with the redelivery")).await;
                }
            }
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
            Ok(Claim::DonePublishPending) => {
                self.relay.poke();
                Err(Outcome::Deferred { reason: "the event is done; its committed publishes are being relayed".into() })
            }
            Err(error) => {
                self.metrics.store_error("claim");
                Err(Outcome::Deferred { reason: format!("cannot claim the event: {error}") })
            }
        }
    }

    /// A claim must outlive every attempt (each cut off at its wall-clock
    /// limit) and every wait between them.
    fn lease(&self, handler: &Handler) -> Duration {
        let policy = &handler.config.retry;
        handler.tenant.limits.wall_time * policy.max_attempts + policy.worst_case_waits() + self.idempotency.lease_margin
    }

    /// The event's one decision line, its counter, and its report.
    fn report(&self, flight: &InFlight<'_>, outcome: Outcome) -> Outcome {
        let counts = &flight.handler.counts;
        HandlerCounts::add(match &outcome {
            Outcome::Processed { .. } => &counts.processed,
            Outcome::Duplicate { .. } => &counts.duplicates,
            Outcome::DeadLettered { .. } => &counts.dead_lettered,
            Outcome::InFlightElsewhere | Outcome::Deferred { .. } | Outcome::Throttled { .. } => &counts.deferred,
        });
        let version = flight.component.as_ref().map_or("", |c| c.short_version());
        let tenant = &flight.handler.tenant.name;
        let label = flight.component.as_ref().map_or_else(|| NO_VERSION.clone(), |c| c.label.clone());
        let took = flight.started.elapsed();
        self.metrics.delivery(tenant, &flight.handler.name, &label, outcome.label(), took);
        // Milliseconds to the microsecond: one field every line has.
        let duration_ms = Millis(took);
        match &outcome {
            Outcome::Processed { attempts } => {
                tracing::info!(outcome = %outcome.label(), messaging.attempt = attempts, handler.version = %version, %duration_ms, "event processed")
            }
            Outcome::Duplicate { earlier } => tracing::info!(outcome = %outcome.label(), ?earlier, %duration_ms, "duplicate delivery skipped"),
            Outcome::InFlightElsewhere => tracing::info!(outcome = %outcome.label(), %duration_ms, "another delivery holds this event; asking for redelivery"),
            Outcome::DeadLettered { reason, attempts } => tracing::warn!(outcome = %outcome.label(), messaging.attempt = attempts,
                handler.version = %version, dead_letter_topic = %flight.handler.dead_letter_topic, %reason, %duration_ms, "event dead-lettered"),
            Outcome::Deferred { reason } => tracing::warn!(outcome = %outcome.label(), %reason, %duration_ms, "event deferred; asking for redelivery"),
            Outcome::Throttled { reason } => tracing::debug!(outcome = %outcome.label(), %reason, %duration_ms, "event held back by a tenant quota; asking for redelivery"),
        }
        // Reports are for watchers (demo, tests, benchmarks): build none
        // when nobody listens.
        if self.reports.receiver_count() > 0 {
            let _ = self.reports.send(EventReport {
                tenant: flight.handler.tenant.name.to_string(),
                handler: flight.handler.name.to_string(),
                handler_version: flight.version().to_owned(),
                event_id: flight.event_id.clone(),
                topic: flight.topic.clone(),
                outcome: outcome.clone(),
            });
        }
        outcome
    }
}

/// A duration as milliseconds with three decimals (formatted only if the
/// line is written).
struct Millis(std::time::Duration);

impl std::fmt::Display for Millis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:.3}", self.0.as_secs_f64() * 1000.0)
    }
}

/// The span every line about one event is logged in, with OpenTelemetry's
/// messaging fields; exported, it is the delivery's consumer span (named
/// only then, so text logs do not repeat it on every line).
fn event_span(flight: &InFlight<'_>) -> tracing::Span {
    tracing::info_span!("event",
        otel.name = tracing::field::Empty,
        otel.kind = tracing::field::Empty,
        messaging.system = %"dapr",
        messaging.destination.name = %flight.topic,
        messaging.message.id = %printable(&flight.event_id),
        tenant = %flight.handler.tenant.name,
        handler = %flight.handler.name,
    )
}
