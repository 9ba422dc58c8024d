//! The embedded broker: in-process pub/sub for running without Dapr.
//!
//! It accepts publishes in the shape of Dapr's publish API (the HTTP route
//! lives in [`crate::server`]) and delivers each message to every handler
//! subscribed to its topic, redelivering while the pipeline answers "retry",
//! as Dapr would. Like Dapr's `pubsub.in-memory` component it keeps messages
//! in memory only: messages not yet handled are lost with the process (the
//! idempotency records, state and outbox are on disk). Use Dapr with a real
//! broker where that matters.

use std::sync::{Arc, Weak};
use std::time::Duration;

use async_trait::async_trait;
use serde_json::{Map, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::Publisher;
use crate::cloudevent::{CLOUDEVENTS_JSON, CloudEvent};
use crate::outcome::DaprStatus;
use crate::pipeline::Pipeline;
use crate::receive::Rejection;
use crate::registry::{Handler, Registry};
use crate::store::OutboundMessage;

/// Messages accepted but not yet dispatched; a publisher waits beyond this.
const QUEUE_CAPACITY: usize = 10_000;
/// First wait before redelivering a message answered "retry"; doubles up to
/// [`MAX_REDELIVERY_WAIT`]. Redelivery never gives up: only the pipeline
/// decides that an event is dead.
const FIRST_REDELIVERY_WAIT: Duration = Duration::from_millis(250);
const MAX_REDELIVERY_WAIT: Duration = Duration::from_secs(30);

/// A message on its way to subscribers.
#[derive(Debug, Clone)]
pub struct Message {
    pub pubsub: String,
    pub topic: String,
    pub body: bytes::Bytes,
    pub content_type: Option<String>,
}

/// Why a publish was refused (the HTTP layer maps these to statuses).
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("pubsub `{name}` is not configured (known: {known})")]
    UnknownPubsub { name: String, known: String },
    #[error("{0}; the event was dead-lettered")]
    Rejected(Rejection),
    #[error("the host is shutting down")]
    Closed,
}

#[derive(Clone)]
pub struct EmbeddedBroker {
    registry: Arc<Registry>,
    /// Weak: the pipeline holds the broker as its publisher, and a strong
    /// reference both ways would keep both (and the store's file lock)
    /// alive after the host stops.
    pipeline: Weak<Pipeline>,
    queue: mpsc::Sender<Message>,
}

impl EmbeddedBroker {
    /// The broker, and the receiving end for [`run_dispatcher`].
    pub fn new(registry: Arc<Registry>, pipeline: Arc<Pipeline>) -> (Self, mpsc::Receiver<Message>) {
        let (queue, receiver) = mpsc::channel(QUEUE_CAPACITY);
        (Self { registry, pipeline: Arc::downgrade(&pipeline), queue }, receiver)
    }

    /// Dapr's publish API: `body` with `content_type` becomes the data of a
    /// new CloudEvent, unless it is a CloudEvent already (then it is checked
    /// and sent as is) or `raw` is set (then it is sent without an envelope).
    pub async fn publish_api(&self, pubsub: &str, topic: &str, body: bytes::Bytes, content_type: Option<&str>, raw: bool) -> Result<(), PublishError> {
        if !self.registry.pubsub_names().iter().any(|name| name == pubsub) {
            return Err(PublishError::UnknownPubsub { name: pubsub.to_owned(), known: self.registry.pubsub_names().join(", ") });
        }
        let is_cloudevent = content_type.is_some_and(|ct| ct.starts_with(CLOUDEVENTS_JSON));
        let (body, content_type) = if raw {
            (body, content_type.map(str::to_owned))
        } else if is_cloudevent {
            if let Err(malformed) = CloudEvent::parse(&body, pubsub, topic) {
                let rejection = Rejection::Malformed(malformed);
                let pipeline = self.pipeline.upgrade().ok_or(PublishError::Closed)?;
                for handler in self.registry.subscribers(pubsub, topic) {
                    pipeline.reject(&handler, &body, content_type, rejection.clone()).await;
                }
                return Err(PublishError::Rejected(rejection));
            }
            (body, Some(CLOUDEVENTS_JSON.to_owned()))
        } else {
            let envelope = wrap_like_dapr(pubsub, topic, &body, content_type.unwrap_or("application/json"));
            (Value::Object(envelope).to_string().into(), Some(CLOUDEVENTS_JSON.to_owned()))
        };
        self.enqueue(Message { pubsub: pubsub.to_owned(), topic: topic.to_owned(), body, content_type }).await
    }

    async fn enqueue(&self, message: Message) -> Result<(), PublishError> {
        self.queue.send(message).await.map_err(|_| PublishError::Closed)
    }
}

/// Relayed outbox entries (guest publishes, dead letters) go through the
/// same queue as API publishes.
#[async_trait]
impl Publisher for EmbeddedBroker {
    async fn publish(&self, message: &OutboundMessage) -> anyhow::Result<()> {
        let body = Value::Object(message.event.clone()).to_string().into();
        let message = Message {
            pubsub: message.pubsub.clone(),
            topic: message.topic.clone(),
            body,
            content_type: Some(CLOUDEVENTS_JSON.to_owned()),
        };
        self.enqueue(message).await.map_err(anyhow::Error::from)
    }
}

/// The envelope Dapr's publish API puts around a payload.
fn wrap_like_dapr(pubsub: &str, topic: &str, body: &[u8], content_type: &str) -> Map<String, Value> {
    let mut event = CloudEvent::new_outgoing(uuid::Uuid::new_v4().to_string(), "wasmsub", "com.dapr.event.sent", body, content_type);
    event.insert("time".into(), humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string().into());
    event.insert("topic".into(), topic.into());
    event.insert("pubsubname".into(), pubsub.into());
    event
}

/// Delivers queued messages to their subscribers until `shutdown`; each
/// delivery runs as its own task, tracked by `tasks` for a clean stop.
pub async fn run_dispatcher(
    mut queue: mpsc::Receiver<Message>,
    registry: Arc<Registry>,
    pipeline: Arc<Pipeline>,
    tasks: TaskTracker,
    shutdown: CancellationToken,
) {
    loop {
        let message = tokio::select! {
            _ = shutdown.cancelled() => return,
            message = queue.recv() => match message { Some(m) => m, None => return },
        };
        // The event type decides routing rules (`match_type`), as in Dapr;
        // the body is only looked into when the topic has rules.
        let event_type = || {
            serde_json::from_slice::<Value>(&message.body)
                .ok()
                .and_then(|v| v.get("type").and_then(Value::as_str).map(str::to_owned))
        };
        let subscribers = registry.recipients(&message.pubsub, &message.topic, event_type);
        if subscribers.is_empty() {
            tracing::debug!(messaging.destination.name = %message.topic, "no handler subscribes to this topic; message not delivered");
        }
        for handler in subscribers {
            let (pipeline, message, shutdown) = (pipeline.clone(), message.clone(), shutdown.clone());
            tasks.spawn(deliver_until_settled(handler, pipeline, message, shutdown));
        }
    }
}

/// Delivers one message to one handler, redelivering on "retry".
async fn deliver_until_settled(handler: Arc<Handler>, pipeline: Arc<Pipeline>, message: Message, shutdown: CancellationToken) {
    let mut wait = FIRST_REDELIVERY_WAIT;
    loop {
        let outcome = pipeline.deliver(&handler, &message.body, message.content_type.as_deref()).await;
        if outcome.dapr_status() != DaprStatus::Retry {
            return;
        }
        tokio::select! {
            _ = shutdown.cancelled() => {
                tracing::warn!(messaging.destination.name = %message.topic, "shutting down with a message awaiting redelivery; the embedded broker does not keep it");
                return;
            }
            _ = tokio::time::sleep(wait) => {}
        }
        wait = (wait * 2).min(MAX_REDELIVERY_WAIT);
    }
}
