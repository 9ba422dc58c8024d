//! The embedded broker: pub/sub without Dapr, with Dapr's publish API.
//!
//! Publishing puts a message on the queue ([`crate::store::MessageQueue`]);
//! the dispatcher takes what it can run (never more than its in-flight
//! bound), hands each message through the [`Door`] as a [`Delivery`], and
//! settles it by the answer: gone on SUCCESS or DROP, back on the queue
//! after a growing wait on RETRY, as Dapr would redeliver. Routing, fan-out
//! and malformed events are the door's business, not this transport's.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use serde_json::{Map, Value};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::clock::{self, SharedClock};
use crate::cloudevent::{CLOUDEVENTS_JSON, CloudEvent, MalformedEvent};
use crate::control::registry::Registry;
use crate::delivery::{Delivery, Door};
use crate::manifest::check_topic_name;
use crate::outbox::Publisher;
use crate::pipeline::outcome::DaprStatus;
use crate::pipeline::retry::Backoff;
use crate::store::{MessageQueue, OutboundMessage, QueueError, QueuedMessage, Settle, Taken};
use crate::telemetry::TraceContext;

/// First wait before redelivering a message answered "retry"; doubles up to
/// [`MAX_REDELIVERY_WAIT`]. Redelivery never gives up: only the pipeline
/// decides that an event is dead.
const FIRST_REDELIVERY_WAIT: Duration = Duration::from_millis(250);
const MAX_REDELIVERY_WAIT: Duration = Duration::from_secs(10);
/// How long the dispatcher waits before trying a queue that failed.
const QUEUE_FAILURE_WAIT: Duration = Duration::from_millis(500);

/// Why a publish was refused (the HTTP layer maps these to statuses).
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// No handler uses this pub/sub component name.
    #[error("pubsub `{name}` is not configured (known: {known})")]
    UnknownPubsub {
        /// The name asked for.
        name: String,
        /// The names the manifest uses.
        known: String,
    },
    /// The topic name breaks the topic-name rule.
    #[error("{0}")]
    InvalidTopic(String),
    /// The body says it is a CloudEvent and is not a valid one; nothing was
    /// published (Dapr's publish API refuses it the same way).
    #[error("malformed CloudEvent: {0}; nothing was published")]
    Malformed(MalformedEvent),
    /// The queue is at its bound: come back later.
    #[error("{0}")]
    Full(QueueError),
    /// The queue could not store the message.
    #[error("the message could not be queued: {0}")]
    Unavailable(QueueError),
}

/// Accepts publishes onto the queue.
#[derive(Clone)]
pub struct EmbeddedBroker {
    queue: Arc<dyn MessageQueue>,
    registry: Arc<Registry>,
    clock: SharedClock,
}

impl EmbeddedBroker {
    /// A broker publishing onto `queue`; `registry` says which pub/sub
    /// names exist.
    pub fn new(queue: Arc<dyn MessageQueue>, registry: Arc<Registry>, clock: SharedClock) -> Self {
        Self { queue, registry, clock }
    }

    /// Dapr's publish API: `body` with `content_type` becomes the data of a
    /// new CloudEvent, unless it is a CloudEvent already (then it is checked
    /// and sent as is) or `raw` is set (then it is sent without an envelope).
    /// A new envelope carries `trace`, the publisher's trace context.
    pub async fn publish_api(
        &self,
        pubsub: &str,
        topic: &str,
        body: Bytes,
        content_type: Option<&str>,
        raw: bool,
        trace: &TraceContext,
    ) -> Result<(), PublishError> {
        let known = self.registry.pubsub_names();
        if !known.iter().any(|name| name == pubsub) {
            return Err(PublishError::UnknownPubsub { name: pubsub.to_owned(), known: known.join(", ") });
        }
        check_topic_name(topic).map_err(PublishError::InvalidTopic)?;
        let is_cloudevent = content_type.is_some_and(|ct| ct.starts_with(CLOUDEVENTS_JSON));
        let (body, content_type) = if raw {
            (body, content_type.map(str::to_owned))
        } else if is_cloudevent {
            CloudEvent::parse(&body, pubsub, topic).map_err(PublishError::Malformed)?;
            (body, Some(CLOUDEVENTS_JSON.to_owned()))
        } else {
            let mut envelope = self.wrap_like_dapr(pubsub, topic, &body, content_type.unwrap_or("application/json"));
            trace.write_into(&mut envelope);
            (Bytes::from(Value::Object(envelope).to_string()), Some(CLOUDEVENTS_JSON.to_owned()))
        };
        let message = QueuedMessage { pubsub: pubsub.to_owned(), topic: topic.to_owned(), body, content_type, origin: None };
        self.queue.push(vec![message], true).await.map_err(|error| match error {
            QueueError::Full { .. } => PublishError::Full(error),
            QueueError::Store(_) => PublishError::Unavailable(error),
        })
    }

    /// The envelope Dapr's publish API puts around a payload.
    fn wrap_like_dapr(&self, pubsub: &str, topic: &str, body: &[u8], content_type: &str) -> Map<String, Value> {
        let mut event = CloudEvent::new_outgoing(uuid::Uuid::new_v4().to_string(), "wasmsub", "com.dapr.event.sent", body, content_type);
        event.insert("time".into(), clock::rfc3339(self.clock.now_ms()).into());
        event.insert("topic".into(), topic.into());
        event.insert("pubsubname".into(), pubsub.into());
        event
    }
}

/// Committed messages (guest publishes, dead letters) go on the same queue.
#[async_trait]
impl Publisher for EmbeddedBroker {
    async fn publish(&self, message: &OutboundMessage) -> anyhow::Result<()> {
        let queued = QueuedMessage {
            pubsub: message.pubsub.clone(),
            topic: message.topic.clone(),
            body: Bytes::from(serde_json::to_vec(&*message.event).expect("a JSON object always serialises")),
            content_type: Some(CLOUDEVENTS_JSON.to_owned()),
            origin: message.origin.clone(),
        };
        Ok(self.queue.push(vec![queued], false).await?)
    }
}

/// Drains the queue through the door until `shutdown`, with at most
/// `in_flight` deliveries under way; each runs as a task tracked by `tasks`.
pub async fn run_dispatcher(queue: Arc<dyn MessageQueue>, door: Arc<Door>, in_flight: usize, clock: SharedClock, tasks: TaskTracker, shutdown: CancellationToken) {
    let permits = Arc::new(Semaphore::new(in_flight.max(1)));
    let redelivery = Backoff::new(FIRST_REDELIVERY_WAIT, MAX_REDELIVERY_WAIT);
    loop {
        // A permit before taking: the bound counts what is taken, not what
        // is queued, so a backlog never becomes a pile of waiting tasks.
        let first = tokio::select! {
            _ = shutdown.cancelled() => return,
            permit = permits.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
        };
        let room = 1 + permits.available_permits();
        let batch = match queue.take(room, clock.now_ms()).await {
            Ok(batch) => batch,
            Err(error) => {
                tracing::warn!(%error, "embedded broker: cannot read the queue; trying again");
                drop(first);
                sleep_or_stop(QUEUE_FAILURE_WAIT, &shutdown).await;
                continue;
            }
        };
        if batch.is_empty() {
            drop(first);
            let wait = queue.index().next_due_ms().map_or(Duration::from_secs(1), |due| Duration::from_millis(due.saturating_sub(clock.now_ms())));
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = queue.index().pushed() => {}
                _ = tokio::time::sleep(wait) => {}
            }
            continue;
        }
        let mut slot = Some(first);
        for taken in batch {
            let permit = match slot.take() {
                Some(permit) => permit,
                None => permits.clone().try_acquire_owned().expect("taken no more than the permits available"),
            };
            let (queue, door, clock, redelivery) = (queue.clone(), door.clone(), clock.clone(), redelivery.clone());
            tasks.spawn(async move {
                deliver(&*queue, &door, &*clock, &redelivery, taken).await;
                drop(permit);
            });
        }
    }
}

/// Delivers one message and settles it by the answer.
async fn deliver(queue: &dyn MessageQueue, door: &Door, clock: &dyn clock::Clock, redelivery: &Backoff, taken: Taken) {
    let Taken { id, message, retries } = taken;
    let delivery = Delivery::to_topic(&message.pubsub, &message.topic, message.body, message.content_type);
    let how = match door.deliver(delivery).await {
        DaprStatus::Retry => Settle::RetryAt(clock::after_ms(clock.now_ms(), redelivery.delay_after(retries + 1))),
        DaprStatus::Success | DaprStatus::Drop => Settle::Done,
    };
    if let Err(error) = queue.settle(id, how).await {
        // The message stays queued and comes again; its event dedupes.
        tracing::warn!(%error, messaging.destination.name = %message.topic, "embedded broker: could not settle a message; it will be delivered again");
        queue.index().with(|index| index.put_back(id));
    }
}

async fn sleep_or_stop(wait: Duration, shutdown: &CancellationToken) {
    tokio::select! {
        _ = shutdown.cancelled() => {}
        _ = tokio::time::sleep(wait) => {}
    }
}
