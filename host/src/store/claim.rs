//! The claim state machine, shared by every store: pure functions of the
//! existing record, the clock and the lease. Stores only load and save.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::StoreError;
use crate::clock::after_ms;

/// How an event ended, as remembered by its done marker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DoneKind {
    /// The handler succeeded.
    Processed,
    /// The event went to the dead-letter topic.
    DeadLettered,
}

/// What the store keeps per dedupe key. Times are Unix milliseconds: records
/// outlive the process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Record {
    InFlight { token: u64, lease_until_ms: u64 },
    Done { kind: DoneKind, expires_ms: u64 },
}

/// Proof of a claim, passed back to `finish` and `release`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimToken {
    /// The encoded dedupe key.
    pub key: String,
    /// The claim's random token.
    pub token: u64,
    /// The claim replaced an expired one (a run that crashed or stalled).
    pub took_over: bool,
}

/// The answer to a claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// The claim is this run's.
    Acquired(ClaimToken),
    /// The event is done: a duplicate delivery.
    AlreadyDone(DoneKind),
    /// Another run holds a live claim: this copy should come back later.
    HeldElsewhere {
        /// When the other run's lease ends (Unix ms).
        lease_until_ms: u64,
    },
    /// The event is done, but publishes it committed are not all out yet
    /// (their run died before relaying them). The store has queued them for
    /// the relay; this copy should come back later, to be acknowledged only
    /// once they are published.
    DonePublishPending,
}

/// A fresh claim token. 53 bits: JSON stores that read numbers as doubles
/// (Dapr re-encodes state values through Go's `float64`) keep it exact.
pub fn new_token() -> u64 {
    rand::random::<u64>() >> 11
}

/// Decides a claim on `key`; returns the answer and the record to save, if any.
/// Never returns [`Claim::DonePublishPending`]: only a store that keeps the
/// outbox inside the done record knows about that.
pub fn decide_claim(key: &str, existing: Option<&Record>, now_ms: u64, lease: Duration, token: u64) -> (Claim, Option<Record>) {
    let acquire = |took_over| {
        let record = Record::InFlight { token, lease_until_ms: after_ms(now_ms, lease) };
        (Claim::Acquired(ClaimToken { key: key.to_owned(), token, took_over }), Some(record))
    };
    match existing {
        None => acquire(false),
        Some(Record::Done { expires_ms, .. }) if *expires_ms <= now_ms => acquire(false),
        Some(Record::Done { kind, .. }) => (Claim::AlreadyDone(*kind), None),
        Some(Record::InFlight { lease_until_ms, .. }) if *lease_until_ms <= now_ms => acquire(true),
        Some(Record::InFlight { lease_until_ms, .. }) => (Claim::HeldElsewhere { lease_until_ms: *lease_until_ms }, None),
    }
}

/// Checks that `claim` still owns its key before a commit. An expired lease
/// nobody took over is still ours: the work is done, and committing it is
/// better than running the handler again.
pub fn check_owner(existing: Option<&Record>, claim: &ClaimToken) -> Result<(), StoreError> {
    match existing {
        Some(Record::InFlight { token, .. }) if *token == claim.token => Ok(()),
        _ => Err(StoreError::ClaimLost(claim.key.clone())),
    }
}

/// Whether `claim` still owns the record (for `release`, which is a no-op
/// otherwise).
pub fn owns(existing: Option<&Record>, claim: &ClaimToken) -> bool {
    check_owner(existing, claim).is_ok()
}

pub fn is_expired(record: &Record, now_ms: u64) -> bool {
    match record {
        Record::InFlight { lease_until_ms, .. } => *lease_until_ms <= now_ms,
        Record::Done { expires_ms, .. } => *expires_ms <= now_ms,
    }
}

pub fn encode(record: &Record) -> Vec<u8> {
    serde_json::to_vec(record).expect("a claim record always serialises")
}

pub fn decode(bytes: &[u8]) -> Result<Record, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Unavailable(anyhow::anyhow!("corrupt claim record: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEASE: Duration = Duration::from_secs(10);

    #[test]
    fn first_claim_acquires_and_a_second_waits() {
        let (claim, record) = decide_claim("k", None, 1_000, LEASE, 7);
        assert_eq!(claim, Claim::Acquired(ClaimToken { key: "k".into(), token: 7, took_over: false }));
        let record = record.unwrap();
        assert_eq!(record, Record::InFlight { token: 7, lease_until_ms: 11_000 });
        let (second, write) = decide_claim("k", Some(&record), 5_000, LEASE, 8);
        assert_eq!(second, Claim::HeldElsewhere { lease_until_ms: 11_000 });
        assert!(write.is_none());
    }

    #[test]
    fn an_expired_lease_is_taken_over() {
        let stale = Record::InFlight { token: 7, lease_until_ms: 11_000 };
        let (claim, _) = decide_claim("k", Some(&stale), 11_000, LEASE, 8);
        assert!(matches!(claim, Claim::Acquired(ClaimToken { took_over: true, token: 8, .. })));
        // The stale run may no longer commit.
        let old = ClaimToken { key: "k".into(), token: 7, took_over: false };
        let new_record = Record::InFlight { token: 8, lease_until_ms: 21_000 };
        assert!(matches!(check_owner(Some(&new_record), &old), Err(StoreError::ClaimLost(_))));
    }

    #[test]
    fn done_events_are_duplicates_until_they_expire() {
        let done = Record::Done { kind: DoneKind::Processed, expires_ms: 50_000 };
        assert_eq!(decide_claim("k", Some(&done), 49_999, LEASE, 1).0, Claim::AlreadyDone(DoneKind::Processed));
        assert!(matches!(decide_claim("k", Some(&done), 50_000, LEASE, 1).0, Claim::Acquired(_)));
        let mine = ClaimToken { key: "k".into(), token: 1, took_over: false };
        assert!(check_owner(Some(&done), &mine).is_err());
        assert!(!owns(None, &mine));
    }

    #[test]
    fn records_round_trip() {
        let record = Record::Done { kind: DoneKind::DeadLettered, expires_ms: 3 };
        assert_eq!(decode(&encode(&record)).unwrap(), record);
        assert!(decode(b"garbage").is_err());
    }
}
