//! The outbox relay: publishes committed outbox entries (guest publishes and
//! dead letters) and removes each once the broker has accepted it.
//!
//! Entries are written in the same commit as the event's done marker, so a
//! crash between commit and publish loses nothing: the relay finds them at
//! the next start. A broker that is down is retried with backoff; entries
//! are published in commit order and at least once, with stable CloudEvent
//! ids so consumers can dedupe a repeat.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::broker::Publisher;
use crate::store::DeliveryStore;

/// Entries read per pass.
const BATCH: usize = 256;
/// Even with no notification the relay looks at the outbox this often, so an
/// entry left by a crash or a failed pass is not stranded.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);
/// Longest wait between tries while the broker refuses messages.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

#[derive(Clone, Default)]
pub struct RelayTrigger(Arc<Notify>);

impl RelayTrigger {
    /// Asks the relay to run a pass now (after a commit).
    pub fn poke(&self) {
        self.0.notify_one();
    }
}

/// Runs until `shutdown` is cancelled.
pub async fn run(store: Arc<dyn DeliveryStore>, publisher: Arc<dyn Publisher>, trigger: RelayTrigger, shutdown: CancellationToken) {
    let mut backoff = Duration::ZERO;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = trigger.0.notified() => {}
            _ = tokio::time::sleep(SWEEP_INTERVAL.max(backoff)) => {}
        }
        match relay_pass(&*store, &*publisher).await {
            Ok(()) => backoff = Duration::ZERO,
            Err(error) => {
                backoff = (backoff * 2).clamp(Duration::from_millis(200), MAX_BACKOFF);
                tracing::warn!(error = %format!("{error:#}"), retry_in = ?backoff, "outbox relay: publish failed; entries kept");
            }
        }
    }
}

/// Publishes pending entries in order; stops at the first failure.
pub async fn relay_pass(store: &dyn DeliveryStore, publisher: &dyn Publisher) -> anyhow::Result<()> {
    loop {
        let pending = store.pending_outbox(BATCH).await?;
        if pending.is_empty() {
            return Ok(());
        }
        let full_batch = pending.len() == BATCH;
        for (id, message) in pending {
            publisher.publish(&message).await?;
            store.remove_outbox(id).await?;
            tracing::debug!(topic = %message.topic, id = ?message.event.get("id"), "outbox entry published");
        }
        if !full_batch {
            return Ok(());
        }
    }
}
