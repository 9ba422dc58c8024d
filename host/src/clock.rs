//! The clock that leases, expiries and dead-letter times are read from.
//!
//! Stores never call the system clock themselves: they are given a
//! [`Clock`], so a test can let a lease expire by advancing a
//! [`ManualClock`] instead of sleeping past it (a sleep that a busy machine
//! can outrun proves nothing, and one it cannot outrun is slow).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Wall-clock time in Unix milliseconds. Records that outlive the process
/// (claims, done markers) hold such times, so this is wall time, not a
/// monotonic instant.
pub trait Clock: Send + Sync + 'static {
    /// Now, in milliseconds since the Unix epoch.
    fn now_ms(&self) -> u64;
}

/// A shared clock, as the host's parts hold it.
pub type SharedClock = Arc<dyn Clock>;

/// The system's wall clock: what the service runs on.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
    }
}

/// The system clock, shared.
pub fn system() -> SharedClock {
    Arc::new(SystemClock)
}

/// A clock that moves only when told to: tests advance it past a lease or
/// an expiry and the store sees the time as passed, at once.
#[derive(Debug)]
pub struct ManualClock {
    now_ms: AtomicU64,
}

impl ManualClock {
    /// A clock that starts at the system's current time (so records written
    /// with it look plausible to anything else that reads them).
    pub fn starting_now() -> Arc<Self> {
        Arc::new(Self { now_ms: AtomicU64::new(SystemClock.now_ms()) })
    }

    /// Moves the clock forward by `by`.
    pub fn advance(&self, by: Duration) {
        self.now_ms.fetch_add(by.as_millis() as u64, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> u64 {
        self.now_ms.load(Ordering::SeqCst)
    }
}

/// `now_ms + duration`, saturating.
pub fn after_ms(now_ms: u64, duration: Duration) -> u64 {
    now_ms.saturating_add(duration.as_millis().min(u64::MAX as u128) as u64)
}

/// A Unix-milliseconds time as RFC 3339 (for dead letters and views).
pub fn rfc3339(ms: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manual_clock_moves_only_when_advanced() {
        let clock = ManualClock::starting_now();
        let start = clock.now_ms();
        assert_eq!(clock.now_ms(), start);
        clock.advance(Duration::from_secs(3));
        assert_eq!(clock.now_ms(), start + 3000);
        assert_eq!(after_ms(u64::MAX - 1, Duration::from_secs(1)), u64::MAX);
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
    }
}
