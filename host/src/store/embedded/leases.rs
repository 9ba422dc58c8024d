//! Claims in progress on the embedded store, kept in memory.
//!
//! The store file is this process's alone (redb locks it), so a claim in
//! progress never has to be seen by another process, nor survive a crash:
//! after a crash nothing of the event was committed, and its redelivery runs
//! it again. Keeping live claims here takes claims and releases off the
//! writer thread: they no longer wait behind another batch's fsync, and the
//! writer's batches hold only what must reach the disk. The done record
//! still goes to disk, in the event's own commit.
//!
//! A commit *seals* its lease when the writer checks ownership, and the lease
//! goes once the commit is on disk (or back to live if it failed). A sealed
//! lease is never taken over, even past its end: a taker could otherwise
//! look for the done record just before it lands and run the event twice.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use crate::clock::after_ms;
use crate::store::StoreError;
use crate::store::claim::{self, ClaimToken};

/// How long a sealed lease past its end tells a copy to wait: the commit is
/// being written, so it is about to be a duplicate.
const SEALED_WAIT_MS: u64 = 100;

#[derive(Default)]
pub struct Leases {
    live: Mutex<HashMap<String, Lease>>,
}

struct Lease {
    token: u64,
    until_ms: u64,
    /// Its commit is being written.
    sealed: bool,
}

/// What taking a lease came to.
#[derive(Debug, PartialEq, Eq)]
pub enum Taking {
    /// The lease is ours; whether the event is done is for the disk to say.
    Taken(ClaimToken),
    /// Another run of this process holds it.
    Held { lease_until_ms: u64 },
}

impl Leases {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Lease>> {
        // Every change below is a single map operation: a panic elsewhere
        // cannot leave a half-made lease.
        self.live.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Takes the lease on `key`, or says who holds it. An expired lease
    /// that is not sealed is taken over (its run stalled past its lease).
    pub fn take(&self, key: &str, now_ms: u64, lease: Duration) -> Taking {
        let token = claim::new_token();
        let until_ms = after_ms(now_ms, lease);
        let mut live = self.lock();
        let took_over = match live.get(key) {
            Some(held) if held.sealed => return Taking::Held { lease_until_ms: held.until_ms.max(now_ms + SEALED_WAIT_MS) },
            Some(held) if held.until_ms > now_ms => return Taking::Held { lease_until_ms: held.until_ms },
            Some(_) => true,
            None => false,
        };
        live.insert(key.to_owned(), Lease { token, until_ms, sealed: false });
        Taking::Taken(ClaimToken { key: key.to_owned(), token, took_over })
    }

    /// Gives the lease up, if it is still `claim`'s and not being committed.
    pub fn release(&self, claim: &ClaimToken) {
        let mut live = self.lock();
        if live.get(&claim.key).is_some_and(|held| held.token == claim.token && !held.sealed) {
            live.remove(&claim.key);
        }
    }

    /// Checks that `claim` still holds its lease and seals it for its
    /// commit. Called by the writer, inside the commit's transaction.
    pub fn seal(&self, claim: &ClaimToken) -> Result<(), StoreError> {
        match self.lock().get_mut(&claim.key) {
            Some(held) if held.token == claim.token => {
                held.sealed = true;
                Ok(())
            }
            _ => Err(StoreError::ClaimLost(claim.key.clone())),
        }
    }

    /// After the commit: on disk, the lease goes (the done record answers
    /// from now on); not written, the claim is live again (a conflict reruns
    /// the attempt under it; a failed store has it released).
    pub fn unseal(&self, claim: &ClaimToken, committed: bool) {
        let mut live = self.lock();
        if committed {
            if live.get(&claim.key).is_some_and(|held| held.token == claim.token) {
                live.remove(&claim.key);
            }
        } else if let Some(held) = live.get_mut(&claim.key).filter(|held| held.token == claim.token) {
            held.sealed = false;
        }
    }

    /// Forgets leases that ended long ago and were never finished or
    /// released (their task is gone); returns how many.
    pub fn forget_expired(&self, now_ms: u64) -> usize {
        let mut live = self.lock();
        let before = live.len();
        live.retain(|_, held| held.sealed || held.until_ms > now_ms);
        before - live.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEASE: Duration = Duration::from_secs(10);

    fn taken(taking: Taking) -> ClaimToken {
        match taking {
            Taking::Taken(token) => token,
            other => panic!("expected the lease, got {other:?}"),
        }
    }

    #[test]
    fn a_lease_is_exclusive_until_released_and_taken_over_once_expired() {
        let leases = Leases::default();
        let first = taken(leases.take("k", 1_000, LEASE));
        assert!(!first.took_over);
        assert_eq!(leases.take("k", 5_000, LEASE), Taking::Held { lease_until_ms: 11_000 });
        let second = taken(leases.take("k", 11_000, LEASE));
        assert!(second.took_over);
        assert!(matches!(leases.seal(&first), Err(StoreError::ClaimLost(_))), "the stalled run may not commit");
        leases.release(&first);
        assert!(matches!(leases.take("k", 12_000, LEASE), Taking::Held { .. }), "a stale release leaves the new lease");
        leases.release(&second);
        assert!(!taken(leases.take("k", 12_000, LEASE)).took_over);
    }

    #[test]
    fn a_sealed_lease_is_never_taken_over_and_goes_once_committed() {
        let leases = Leases::default();
        let claim = taken(leases.take("k", 1_000, LEASE));
        leases.seal(&claim).unwrap();
        assert_eq!(leases.take("k", 50_000, LEASE), Taking::Held { lease_until_ms: 50_100 }, "past its end, still not taken");
        leases.release(&claim);
        assert_eq!(leases.forget_expired(50_000), 0);
        leases.unseal(&claim, false);
        assert!(taken(leases.take("k", 50_000, LEASE)).took_over, "a failed commit leaves a live lease, which expires");

        let claim = taken(leases.take("j", 1_000, LEASE));
        leases.seal(&claim).unwrap();
        leases.unseal(&claim, true);
        assert!(!taken(leases.take("j", 2_000, LEASE)).took_over, "committed: gone, the disk answers");
    }

    #[test]
    fn forgotten_leases_are_forgotten() {
        let leases = Leases::default();
        taken(leases.take("a", 1_000, LEASE));
        taken(leases.take("b", 1_000, Duration::from_secs(100)));
        assert_eq!(leases.forget_expired(11_000), 1);
        assert!(matches!(leases.take("b", 11_000, LEASE), Taking::Held { .. }));
    }
}
