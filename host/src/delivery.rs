//! The one door every delivery comes through.
//!
//! Every transport (Dapr's HTTP routes, single and bulk; Dapr streaming
//! subscriptions; the embedded broker's queue) turns what it received into
//! a [`Delivery`] and hands it to [`Door::deliver`]. Behind the door, once
//! for every transport: the payload is parsed once, the handlers are chosen
//! (routing rules on the event type, fan-out to every handler without one),
//! a malformed or oversized payload is dead-lettered, each handler's
//! pipeline runs, and their answers are combined into the one status the
//! broker gets.
//!
//! Transports never reach past this door, and nothing behind it knows
//! which transport a delivery came from.

use std::sync::Arc;

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::cloudevent::{CloudEvent, MalformedEvent};
use crate::control::registry::{Handler, Registry, RouteTarget};
use crate::pipeline::Pipeline;
use crate::pipeline::outcome::{DaprStatus, Outcome};
use crate::pipeline::receive::{self, Payload, Rejection};

/// Where a delivery is addressed.
#[derive(Debug, Clone)]
pub enum Destination {
    /// A topic: the door routes by the registry (rules, then fan-out).
    Topic {
        /// The pub/sub component's name.
        pubsub: String,
        /// The topic.
        topic: String,
    },
    /// An app route Dapr posted to: Dapr has applied the routing rules
    /// already, so the route's handlers are the recipients.
    Route(String),
}

/// One event as a transport received it.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// Where it is addressed.
    pub destination: Destination,
    /// The event's bytes (or envelope).
    pub payload: Payload,
    /// The content type it came with.
    pub content_type: Option<String>,
}

impl Delivery {
    /// A delivery of `body` to a topic.
    pub fn to_topic(pubsub: &str, topic: &str, body: bytes::Bytes, content_type: Option<String>) -> Self {
        let destination = Destination::Topic { pubsub: pubsub.to_owned(), topic: topic.to_owned() };
        Self { destination, payload: Payload::Bytes(body), content_type }
    }
}

/// Routes deliveries to handlers' pipelines and combines their answers.
pub struct Door {
    registry: Arc<Registry>,
    pipeline: Arc<Pipeline>,
    /// Deliveries inside the door at once; beyond it, the broker is asked
    /// to come back (RETRY) instead of the host queueing without bound.
    admission: Arc<Semaphore>,
    max_in_flight: usize,
    stopping: CancellationToken,
}

impl Door {
    /// A door onto `pipeline`, routing by `registry`, admitting at most
    /// `max_in_flight` deliveries at once; answers RETRY once `stopping`.
    pub(crate) fn new(registry: Arc<Registry>, pipeline: Arc<Pipeline>, max_in_flight: usize, stopping: CancellationToken) -> Self {
        let max_in_flight = max_in_flight.max(1);
        Self { registry, pipeline, admission: Arc::new(Semaphore::new(max_in_flight)), max_in_flight, stopping }
    }

    /// Deliveries inside the door now.
    pub fn in_flight(&self) -> usize {
        self.max_in_flight.saturating_sub(self.admission.available_permits())
    }

    /// Handles one delivery; the answer for the broker.
    pub async fn deliver(&self, delivery: Delivery) -> DaprStatus {
        if self.stopping.is_cancelled() {
            tracing::debug!("host stopping; asking for redelivery");
            return DaprStatus::Retry;
        }
        let Ok(_admitted) = self.admission.try_acquire() else {
            tracing::debug!(destination = ?delivery.destination, "host at its in-flight bound; asking for redelivery");
            return DaprStatus::Retry;
        };
        self.route_and_run(delivery).await
    }

    async fn route_and_run(&self, delivery: Delivery) -> DaprStatus {
        let Some((pubsub, topic, group)) = self.addressees(&delivery.destination) else {
            // Dapr drops an event answered 404 or SUCCESS: an unknown route
            // keeps the event by asking for it again.
            tracing::warn!(destination = ?delivery.destination, "delivery to a route no handler serves; asking for redelivery");
            return DaprStatus::Retry;
        };
        if group.is_empty() {
            tracing::debug!(%pubsub, %topic, "no handler subscribes to this topic; nothing to deliver");
            return DaprStatus::Success;
        }
        let largest_limit = group.iter().map(|h| h.tenant.limits.max_payload_bytes).max().unwrap_or(0);
        let parsed = if delivery.payload.len() > largest_limit {
            None // over every recipient's limit: not worth parsing
        } else {
            Some(receive::parse(&delivery.payload, delivery.content_type.as_deref(), &pubsub, &topic))
        };
        let event_type = match &parsed {
            Some(Ok(event)) => Some(event.ty.as_str()),
            _ => None,
        };
        let recipients = self.recipients(&delivery.destination, group, event_type);
        let runs = recipients.iter().map(|handler| self.run_one(handler, &delivery, parsed.as_ref()));
        combine(&futures_util::future::join_all(runs).await)
    }

    /// Handles many deliveries (a bulk request) concurrently; one answer each,
    /// in order.
    pub async fn deliver_all(self: &Arc<Self>, deliveries: Vec<Delivery>) -> Vec<DaprStatus> {
        let runs: Vec<_> = deliveries
            .into_iter()
            .map(|delivery| {
                let door = self.clone();
                tokio::spawn(async move { door.deliver(delivery).await })
            })
            .collect();
        let mut statuses = Vec::with_capacity(runs.len());
        for run in runs {
            // A delivery whose task failed must come again.
            statuses.push(run.await.unwrap_or(DaprStatus::Retry));
        }
        statuses
    }

    /// The (pubsub, topic) and the handlers subscribed to it; `None` for a
    /// route nobody serves.
    fn addressees(&self, destination: &Destination) -> Option<(String, String, Vec<Arc<Handler>>)> {
        match destination {
            Destination::Topic { pubsub, topic } => Some((pubsub.clone(), topic.clone(), self.registry.subscribers(pubsub, topic))),
            Destination::Route(route) => {
                let handlers = match self.registry.by_route(route)? {
                    RouteTarget::Handler(handler) => vec![handler],
                    RouteTarget::FanOut(handlers) => handlers,
                };
                let first = &handlers.first()?.config;
                Some((first.pubsub.clone(), first.topic.clone(), handlers))
            }
        }
    }

    /// Who gets the event: for a route, its handlers; for a topic, the
    /// handler whose `match_type` is the event's type, else every handler
    /// without one. An event whose type is unknown (malformed, or too large
    /// to parse) goes to the handlers without a rule, or, if there are none,
    /// to all of them, so someone dead-letters it.
    fn recipients(&self, destination: &Destination, group: Vec<Arc<Handler>>, event_type: Option<&str>) -> Vec<Arc<Handler>> {
        if let Destination::Route(_) = destination {
            return group;
        }
        if let Some(ty) = event_type
            && let Some(matched) = group.iter().find(|h| h.config.match_type.as_deref() == Some(ty))
        {
            return vec![matched.clone()];
        }
        let defaults: Vec<_> = group.iter().filter(|h| h.config.match_type.is_none()).cloned().collect();
        if defaults.is_empty() && event_type.is_none() { group } else { defaults }
    }

    async fn run_one(&self, handler: &Arc<Handler>, delivery: &Delivery, parsed: Option<&Result<CloudEvent, MalformedEvent>>) -> DaprStatus {
        let limit = handler.tenant.limits.max_payload_bytes;
        // Unparsed means over every recipient's limit, this one's included.
        let outcome = match (receive::check_size(&delivery.payload, limit), parsed) {
            (Ok(()), Some(Ok(event))) => self.pipeline.process(handler, event).await,
            (Ok(()), Some(Err(malformed))) => self.reject(handler, delivery, Rejection::Malformed(malformed.clone())).await,
            (Err(too_large), _) => self.reject(handler, delivery, too_large).await,
            (Ok(()), None) => self.reject(handler, delivery, Rejection::TooLarge { size: delivery.payload.len(), limit }).await,
        };
        outcome.dapr_status()
    }

    async fn reject(&self, handler: &Arc<Handler>, delivery: &Delivery, rejection: Rejection) -> Outcome {
        let body = delivery.payload.to_bytes();
        self.pipeline.reject(handler, &body, delivery.content_type.as_deref(), rejection).await
    }
}

/// One answer for the broker from every recipient's: RETRY if any must see
/// the event again (each recipient dedupes, so the others skip it then),
/// DROP if every one dead-lettered it, else SUCCESS.
pub fn combine(statuses: &[DaprStatus]) -> DaprStatus {
    if statuses.contains(&DaprStatus::Retry) {
        DaprStatus::Retry
    } else if !statuses.is_empty() && statuses.iter().all(|s| *s == DaprStatus::Drop) {
        DaprStatus::Drop
    } else {
        DaprStatus::Success
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_combine_so_that_nothing_unfinished_is_acknowledged() {
        use DaprStatus::*;
        assert_eq!(combine(&[Success, Retry, Drop]), Retry);
        assert_eq!(combine(&[Drop, Drop]), Drop);
        assert_eq!(combine(&[Drop, Success]), Success);
        assert_eq!(combine(&[Success]), Success);
    }
}
