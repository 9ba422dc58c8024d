//! The outbox relay: publishes committed outbox entries (guest publishes and
//! dead letters) and removes each once the broker has accepted it.
//!
//! Entries are written in the same commit as the event's done marker, so a
//! crash between commit and publish loses nothing: the relay finds them at
//! the next start. A broker that is down is retried with backoff; entries
//! are published in commit order and at least once, with stable CloudEvent
//! ids so consumers can dedupe a repeat.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::Publisher;
use crate::pipeline::retry::Backoff;
use crate::store::{DeliveryStore, OutboxId};

/// Entries read per pass.
const BATCH: usize = 256;
/// Even with no notification the relay looks at the outbox this often, so an
/// entry left by a crash or a failed pass is not stranded.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);
/// First and longest wait between tries while the broker refuses messages.
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Wakes the relay for a pass.
#[derive(Clone, Default)]
pub struct RelayTrigger(Arc<Notify>);

impl RelayTrigger {
    /// Asks the relay to run a pass now (after a commit).
    pub fn poke(&self) {
        self.0.notify_one();
    }
}

/// Runs until `shutdown` is cancelled.
///
/// The pipeline publishes each commit's entries itself before it
/// acknowledges the event; the relay is the safety net. A poke (a failed
/// inline publish, a start-up) publishes everything pending. A timed sweep
/// publishes only entries that were already pending at the previous sweep,
/// so it does not race the pipeline's own publish of a fresh commit.
pub async fn run(store: Arc<dyn DeliveryStore>, publisher: Arc<dyn Publisher>, trigger: RelayTrigger, shutdown: CancellationToken) {
    let mut backoff = Backoff::new(FIRST_BACKOFF, MAX_BACKOFF);
    let mut wait = SWEEP_INTERVAL;
    let mut seen_last_sweep = HashSet::new();
    loop {
        let poked = tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = trigger.0.notified() => true,
            _ = tokio::time::sleep(wait) => false,
        };
        let only = if poked { None } else { Some(&seen_last_sweep) };
        match relay_pass(&*store, &*publisher, only).await {
            Ok(still_pending) => {
                backoff.reset();
                wait = SWEEP_INTERVAL;
                seen_last_sweep = still_pending;
            }
            Err(error) => {
                wait = backoff.next_delay().max(SWEEP_INTERVAL);
                tracing::warn!(error = %format!("{error:#}"), retry_in = ?wait, "outbox relay: publish failed; entries kept");
            }
        }
    }
}

/// Publishes pending entries in order (those in `only`, if given); stops at
/// the first failure. Returns the ids left pending.
pub async fn relay_pass(store: &dyn DeliveryStore, publisher: &dyn Publisher, only: Option<&HashSet<OutboxId>>) -> anyhow::Result<HashSet<OutboxId>> {
    let mut left = HashSet::new();
    for (id, message) in store.pending_outbox(BATCH).await? {
        if only.is_some_and(|ids| !ids.contains(&id)) {
            left.insert(id);
            continue;
        }
        publisher.publish(&message).await?;
        store.remove_outbox(id).await?;
        tracing::info!(topic = %message.topic, id = ?message.event.get("id"), "outbox relay: published a committed message");
    }
    Ok(left)
}
