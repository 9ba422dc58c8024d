//! Streaming subscriptions: topics added while the host runs.
//!
//! Dapr reads an app's programmatic subscriptions (`/dapr/subscribe`) once,
//! at start-up. A handler deployed later for a topic nobody subscribed to
//! would never see an event; for those topics the host opens a streaming
//! subscription over the sidecar's gRPC API (`SubscribeTopicEventsAlpha1`,
//! an alpha API: no routing rules or bulk there). Each event on the stream
//! becomes a [`Delivery`] for the [`Door`], as one delivered over HTTP, and
//! the door's answer goes back on the stream. A broken stream is reopened
//! with backoff; events not answered are redelivered by the broker.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use dapr::dapr::proto::runtime::v1::dapr_client::DaprClient;
use dapr::dapr::proto::runtime::v1::subscribe_topic_events_request_alpha1::SubscribeTopicEventsRequestType;
use dapr::dapr::proto::runtime::v1::subscribe_topic_events_response_alpha1::SubscribeTopicEventsResponseType;
use dapr::dapr::proto::runtime::v1::topic_event_response::TopicEventResponseStatus;
use dapr::dapr::proto::runtime::v1::{
    SubscribeTopicEventsRequestAlpha1, SubscribeTopicEventsRequestInitialAlpha1, SubscribeTopicEventsRequestProcessedAlpha1,
    TopicEventRequest, TopicEventResponse,
};
use bytes::Bytes;
use serde_json::{Map, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cloudevent::is_json_media_type;
use crate::control::registry::Registry;
use crate::delivery::{Delivery, Destination, Door};
use crate::pipeline::outcome::DaprStatus;
use crate::pipeline::receive::Payload;
use crate::pipeline::retry::Backoff;

/// First and longest wait between attempts to (re)open a stream.
const FIRST_RECONNECT_WAIT: Duration = Duration::from_millis(250);
const MAX_RECONNECT_WAIT: Duration = Duration::from_secs(30);
/// Answers buffered towards the sidecar per stream.
const ANSWER_BUFFER: usize = 256;

/// Opens a streaming subscription for each topic it is told about, once.
#[derive(Clone)]
pub struct StreamingSubscriptions {
    grpc_url: String,
    door: Arc<Door>,
    tasks: TaskTracker,
    shutdown: CancellationToken,
    /// Topics Dapr already delivers (start-up subscriptions, open streams).
    covered: Arc<Mutex<HashSet<(String, String)>>>,
}

impl StreamingSubscriptions {
    /// Streams through the sidecar at `grpc_url`; the topics `registry`
    /// subscribes to at start-up are covered by `/dapr/subscribe` already.
    pub fn new(grpc_url: String, registry: &Registry, door: Arc<Door>, tasks: TaskTracker, shutdown: CancellationToken) -> Self {
        let covered = registry.topics().into_iter().map(|(topic, _)| topic).collect();
        Self { grpc_url, door, tasks, shutdown, covered: Arc::new(Mutex::new(covered)) }
    }

    /// Makes sure events of `topic` reach the host.
    pub fn ensure(&self, pubsub: &str, topic: &str) {
        let key = (pubsub.to_owned(), topic.to_owned());
        if !self.covered.lock().unwrap_or_else(|p| p.into_inner()).insert(key) {
            return;
        }
        tracing::info!(%pubsub, %topic, "topic added at runtime: opening a streaming subscription");
        let this = self.clone();
        let (pubsub, topic) = (pubsub.to_owned(), topic.to_owned());
        self.tasks.spawn(async move { this.keep_subscribed(pubsub, topic).await });
    }

    async fn keep_subscribed(self, pubsub: String, topic: String) {
        let mut backoff = Backoff::new(FIRST_RECONNECT_WAIT, MAX_RECONNECT_WAIT);
        while !self.shutdown.is_cancelled() {
            if let Err(error) = self.stream(&pubsub, &topic).await {
                tracing::warn!(%pubsub, %topic, error = %format!("{error:#}"), "streaming subscription broke; reopening");
            } else {
                backoff.reset();
            }
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tokio::time::sleep(backoff.next_delay()) => {}
            }
        }
    }

    async fn stream(&self, pubsub: &str, topic: &str) -> anyhow::Result<()> {
        let mut client = DaprClient::connect(self.grpc_url.clone()).await?;
        let (answers, outgoing) = mpsc::channel(ANSWER_BUFFER);
        let initial = SubscribeTopicEventsRequestInitialAlpha1 {
            pubsub_name: pubsub.to_owned(),
            topic: topic.to_owned(),
            metadata: Default::default(),
            dead_letter_topic: None,
        };
        answers
            .send(SubscribeTopicEventsRequestAlpha1 { subscribe_topic_events_request_type: Some(SubscribeTopicEventsRequestType::InitialRequest(initial)) })
            .await?;
        let mut incoming = client.subscribe_topic_events_alpha1(tokio_stream::wrappers::ReceiverStream::new(outgoing)).await?.into_inner();
        loop {
            let message = tokio::select! {
                _ = self.shutdown.cancelled() => return Ok(()),
                message = incoming.message() => message?,
            };
            let Some(message) = message else { return Ok(()) };
            match message.subscribe_topic_events_response_type {
                Some(SubscribeTopicEventsResponseType::InitialResponse(_)) => tracing::info!(%pubsub, %topic, "streaming subscription open"),
                Some(SubscribeTopicEventsResponseType::EventMessage(event)) => {
                    let (door, answers) = (self.door.clone(), answers.clone());
                    tokio::spawn(async move {
                        let status = door.deliver(delivery_of(&event)).await;
                        let answer = SubscribeTopicEventsRequestProcessedAlpha1 { id: event.id, status: Some(TopicEventResponse { status: status_code(status) as i32 }) };
                        let _ = answers
                            .send(SubscribeTopicEventsRequestAlpha1 { subscribe_topic_events_request_type: Some(SubscribeTopicEventsRequestType::EventProcessed(answer)) })
                            .await;
                    });
                }
                None => {}
            }
        }
    }
}

fn status_code(status: DaprStatus) -> TopicEventResponseStatus {
    match status {
        DaprStatus::Success => TopicEventResponseStatus::Success,
        DaprStatus::Retry => TopicEventResponseStatus::Retry,
        DaprStatus::Drop => TopicEventResponseStatus::Drop,
    }
}

/// The event as a delivery: its envelope built from the stream's fields,
/// so the door does not parse text that was never sent as text.
fn delivery_of(event: &TopicEventRequest) -> Delivery {
    let destination = Destination::Topic { pubsub: event.pubsub_name.clone(), topic: event.topic.clone() };
    let json = Bytes::from(serde_json::to_vec(&envelope(event)).expect("a JSON object serialises"));
    let payload = Payload::Envelope { json, size: event.data.len() };
    Delivery { destination, payload, content_type: Some(crate::cloudevent::CLOUDEVENTS_JSON.to_owned()) }
}

/// The structured CloudEvent the HTTP routes would have received.
fn envelope(event: &TopicEventRequest) -> Map<String, Value> {
    let mut object = Map::new();
    object.insert("id".into(), event.id.clone().into());
    object.insert("source".into(), event.source.clone().into());
    object.insert("type".into(), event.r#type.clone().into());
    object.insert("specversion".into(), event.spec_version.clone().into());
    object.insert("datacontenttype".into(), event.data_content_type.clone().into());
    object.insert("topic".into(), event.topic.clone().into());
    object.insert("pubsubname".into(), event.pubsub_name.clone().into());
    if let Some(extensions) = &event.extensions {
        for (name, value) in &extensions.fields {
            if let Some(prost_types::value::Kind::StringValue(text)) = &value.kind
                && !object.contains_key(name)
            {
                object.insert(name.clone(), text.clone().into());
            }
        }
    }
    let json = is_json_media_type(&event.data_content_type).then(|| serde_json::from_slice::<Value>(&event.data).ok()).flatten();
    match json {
        Some(data) => object.insert("data".into(), data),
        None => object.insert("data_base64".into(), base64::engine::general_purpose::STANDARD.encode(&event.data).into()),
    };
    object
}
