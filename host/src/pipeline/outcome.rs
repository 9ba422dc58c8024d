//! Outcome: how one delivery ended, and the one place that maps it to the
//! answer Dapr (or the embedded broker) gets.

use serde::Serialize;

use crate::store::DoneKind;

/// How a delivery ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "outcome", rename_all = "kebab-case")]
pub enum Outcome {
    /// The handler succeeded on attempt `attempts`; its effects are committed.
    Processed {
        /// The attempt that succeeded.
        attempts: u32,
    },
    /// The event was already done (processed or dead-lettered) for this
    /// handler: the delivery was a duplicate and nothing ran.
    Duplicate {
        /// How the earlier delivery ended.
        earlier: DuplicateOf,
    },
    /// Another delivery of the same event holds its claim right now.
    InFlightElsewhere,
    /// The event is in the dead-letter topic with this reason.
    DeadLettered {
        /// Why.
        reason: String,
        /// Attempts made (0: it never reached the handler).
        attempts: u32,
    },
    /// The host could not process the event now (store or sidecar down,
    /// instance pool full): the event must come back later.
    Deferred {
        /// Why.
        reason: String,
    },
    /// A tenant quota held the event back (its concurrency, publish rate
    /// or queued publishes): it comes again later. Expected under load, so
    /// logged quietly.
    Throttled {
        /// Which quota.
        reason: String,
    },
}

/// What the earlier delivery of a duplicate did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DuplicateOf {
    /// Processed.
    Processed,
    /// Dead-lettered.
    DeadLettered,
}

impl From<DoneKind> for DuplicateOf {
    fn from(kind: DoneKind) -> Self {
        match kind {
            DoneKind::Processed => DuplicateOf::Processed,
            DoneKind::DeadLettered => DuplicateOf::DeadLettered,
        }
    }
}

/// Dapr's subscriber statuses (`{"status": "..."}` in a 200 answer).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum DaprStatus {
    /// Done: Dapr acknowledges the message.
    Success,
    /// Not now: Dapr redelivers the message later.
    Retry,
    /// Dapr drops the message. It does NOT dead-letter it (Dapr treats DROP
    /// like SUCCESS), so the host only answers DROP after it has put the
    /// event in the dead-letter topic itself.
    Drop,
}

impl Outcome {
    /// The single mapping from outcomes to broker answers.
    pub fn dapr_status(&self) -> DaprStatus {
        match self {
            Outcome::Processed { .. } | Outcome::Duplicate { .. } => DaprStatus::Success,
            Outcome::DeadLettered { .. } => DaprStatus::Drop,
            Outcome::InFlightElsewhere | Outcome::Deferred { .. } | Outcome::Throttled { .. } => DaprStatus::Retry,
        }
    }

    /// A short word for logs and the demo's table.
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Processed { .. } => "processed",
            Outcome::Duplicate { .. } => "duplicate-skipped",
            Outcome::InFlightElsewhere => "in-flight-elsewhere",
            Outcome::DeadLettered { .. } => "dead-lettered",
            Outcome::Deferred { .. } => "deferred",
            Outcome::Throttled { .. } => "throttled",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_unfinished_is_acknowledged() {
        assert_eq!(Outcome::Processed { attempts: 1 }.dapr_status(), DaprStatus::Success);
        assert_eq!(Outcome::Duplicate { earlier: DuplicateOf::Processed }.dapr_status(), DaprStatus::Success);
        assert_eq!(Outcome::DeadLettered { reason: "x".into(), attempts: 3 }.dapr_status(), DaprStatus::Drop);
        assert_eq!(Outcome::InFlightElsewhere.dapr_status(), DaprStatus::Retry);
        assert_eq!(Outcome::Deferred { reason: "down".into() }.dapr_status(), DaprStatus::Retry);
        assert_eq!(serde_json::to_string(&DaprStatus::Retry).unwrap(), "\"RETRY\"");
    }
}
