//! Brokers: where outgoing messages go (guest publishes and dead letters)
//! and where deliveries come from.
//!
//! - [`embedded`]: the in-process pub/sub used when no Dapr sidecar is
//!   configured, with Dapr's publish API shape;
//!
//! Only transport lives here: parsing, routing, replying. Deciding what to do
//! with an event is the pipeline's job.

pub mod embedded;

use async_trait::async_trait;

use crate::store::OutboundMessage;

/// Sends a message to a topic. Implementations return only once the broker
/// has accepted the message: the outbox entry is removed after that.
#[async_trait]
pub trait Publisher: Send + Sync + 'static {
    async fn publish(&self, message: &OutboundMessage) -> anyhow::Result<()>;
}
