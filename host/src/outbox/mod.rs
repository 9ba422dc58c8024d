//! The outbox: messages a commit queued (guest publishes, dead letters),
//! and how they leave the host.
//!
//! - [`Publisher`]: where committed messages go (the Dapr sidecar, or the
//!   embedded broker's queue);
//! - [`relay`]: the safety net that publishes entries the pipeline could not
//!   publish inline (a broker that was down, a run that crashed).

pub mod relay;

use async_trait::async_trait;

use crate::store::OutboundMessage;

/// Sends a message to a topic. Implementations return only once the broker
/// has accepted the message: the outbox entry is removed after that.
#[async_trait]
pub trait Publisher: Send + Sync + 'static {
    /// Publishes `message`; an error leaves it in the outbox for a retry.
    async fn publish(&self, message: &OutboundMessage) -> anyhow::Result<()>;
}
