//! Retry policy: how many attempts a handler gets and how long the host waits
//! between them. Pure functions only; the pipeline does the waiting.
//!
//! The delay follows the background document's publisher, which used
//! tenacity's `wait_exponential(multiplier, min, max)`: before retry `n`
//! (after attempt `n` failed) the wait is `multiplier * 2^(n-1)` seconds,
//! clamped to `[min, max]`. Optional jitter spreads retries of many events
//! that failed together (a broker outage) so they do not return in lockstep.

use std::time::Duration;

use serde::Deserialize;

/// The background document's attempts: 3 in all (the first and two retries).
pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;
/// The background document's multiplier.
pub const DEFAULT_MULTIPLIER: f64 = 1.0;
/// The background document's shortest wait: 4 s.
pub const DEFAULT_MIN_DELAY: Duration = Duration::from_secs(4);
/// The background document's longest wait: 10 s.
pub const DEFAULT_MAX_DELAY: Duration = Duration::from_secs(10);
/// No jitter by default, so the schedule is the documented one exactly.
pub const DEFAULT_JITTER: f64 = 0.0;
/// Attempts beyond this are refused: each attempt holds the event's lease, and
/// a budget this large is a misconfiguration, not a policy.
pub const MAX_ALLOWED_ATTEMPTS: u32 = 100;

/// A handler's retry policy, as written in the manifest's `retry` table.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryPolicy {
    /// Attempts in all, the first included (1 means "never retry").
    pub max_attempts: u32,
    /// Seconds multiplied by `2^(retry-1)` before clamping.
    pub multiplier: f64,
    /// The shortest wait between attempts.
    #[serde(with = "humantime_serde")]
    pub min: Duration,
    /// The longest wait between attempts.
    #[serde(with = "humantime_serde")]
    pub max: Duration,
    /// Fraction (0 to 1) of each wait that is randomised: a wait `d` becomes a
    /// value in `[d * (1 - jitter), d]`.
    pub jitter: f64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            multiplier: DEFAULT_MULTIPLIER,
            min: DEFAULT_MIN_DELAY,
            max: DEFAULT_MAX_DELAY,
            jitter: DEFAULT_JITTER,
        }
    }
}

impl RetryPolicy {
    /// Checks the policy's values; the message names the field and why.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_attempts == 0 || self.max_attempts > MAX_ALLOWED_ATTEMPTS {
            return Err(format!(
                "retry.max_attempts must be between 1 and {MAX_ALLOWED_ATTEMPTS}, not {}",
                self.max_attempts
            ));
        }
        if !(self.multiplier.is_finite() && self.multiplier > 0.0) {
            return Err(format!("retry.multiplier must be a positive number, not {}", self.multiplier));
        }
        if self.min > self.max {
            return Err(format!(
                "retry.min ({}) is greater than retry.max ({})",
                humantime::format_duration(self.min),
                humantime::format_duration(self.max)
            ));
        }
        if !(0.0..=1.0).contains(&self.jitter) {
            return Err(format!("retry.jitter must be between 0 and 1, not {}", self.jitter));
        }
        Ok(())
    }

    /// The wait after attempt `attempt` (1-based) failed, before jitter.
    pub fn next_delay(&self, attempt: u32) -> Duration {
        let exponent = attempt.saturating_sub(1).min(62) as i32;
        let seconds = self.multiplier * 2f64.powi(exponent);
        let unclamped = Duration::try_from_secs_f64(seconds).unwrap_or(self.max);
        unclamped.clamp(self.min, self.max)
    }

    /// `next_delay` with jitter applied; `unit` is a random number in `[0, 1)`.
    /// Kept separate so the randomness is an argument, not a hidden input.
    pub fn next_delay_jittered(&self, attempt: u32, unit: f64) -> Duration {
        let base = self.next_delay(attempt);
        base.mul_f64(1.0 - self.jitter * unit.clamp(0.0, 1.0))
    }

    /// Whether an attempt that asked for a retry gets another one.
    pub fn has_attempt_after(&self, attempt: u32) -> bool {
        attempt < self.max_attempts
    }

    /// The longest the retry waits of one event can add up to: the lease that
    /// guards an event against concurrent copies must outlast them.
    pub fn worst_case_waits(&self) -> Duration {
        (1..self.max_attempts).map(|attempt| self.next_delay(attempt)).sum()
    }
}

/// A growing wait for the host's own loops that retry until something
/// comes back (the outbox relay while the broker is down, the embedded
/// broker's redeliveries, a broken streaming subscription): the same
/// exponential schedule as [`RetryPolicy::next_delay`], without a limit on
/// the number of tries, and reset by the first success.
#[derive(Debug, Clone)]
pub struct Backoff {
    policy: RetryPolicy,
    failures: u32,
}

impl Backoff {
    /// Waits that start at `first` and double up to `max`.
    pub fn new(first: Duration, max: Duration) -> Self {
        let policy = RetryPolicy { max_attempts: u32::MAX, multiplier: first.as_secs_f64(), min: first, max, jitter: 0.0 };
        Self { policy, failures: 0 }
    }

    /// The wait after one more failure.
    pub fn next_delay(&mut self) -> Duration {
        self.failures = self.failures.saturating_add(1);
        self.policy.next_delay(self.failures)
    }

    /// The wait after `failures` failures in a row (for callers that keep
    /// the count themselves, e.g. with a queued message).
    pub fn delay_after(&self, failures: u32) -> Duration {
        self.policy.next_delay(failures.max(1))
    }

    /// Back to the first wait (after a success).
    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn default_policy_is_the_background_documents() {
        let policy = RetryPolicy::default();
        assert_eq!(policy.max_attempts, 3);
        // multiplier 1: 1 s, 2 s, 4 s, 8 s, 16 s clamped to [4 s, 10 s].
        let waits: Vec<_> = (1..=5).map(|a| policy.next_delay(a)).collect();
        assert_eq!(waits, vec![secs(4), secs(4), secs(4), secs(8), secs(10)]);
        assert!(policy.has_attempt_after(2));
        assert!(!policy.has_attempt_after(3));
        assert_eq!(policy.worst_case_waits(), secs(8));
    }

    #[test]
    fn delays_grow_exponentially_between_the_bounds() {
        let policy = RetryPolicy {
            multiplier: 0.1,
            min: Duration::from_millis(150),
            max: secs(1),
            ..RetryPolicy::default()
        };
        let waits: Vec<_> = (1..=6).map(|a| policy.next_delay(a).as_millis()).collect();
        assert_eq!(waits, vec![150, 200, 400, 800, 1000, 1000]);
    }

    #[test]
    fn huge_attempt_numbers_saturate_at_max() {
        let policy = RetryPolicy::default();
        assert_eq!(policy.next_delay(u32::MAX), secs(10));
    }

    #[test]
    fn jitter_stays_within_its_fraction() {
        let policy = RetryPolicy { jitter: 0.5, ..RetryPolicy::default() };
        assert_eq!(policy.next_delay_jittered(1, 0.0), secs(4));
        assert_eq!(policy.next_delay_jittered(1, 1.0), secs(2));
        assert_eq!(policy.next_delay_jittered(1, 0.5), secs(3));
    }

    #[test]
    fn a_backoff_doubles_to_its_bound_and_resets() {
        let mut backoff = Backoff::new(Duration::from_millis(250), secs(1));
        let waits: Vec<_> = (0..4).map(|_| backoff.next_delay().as_millis()).collect();
        assert_eq!(waits, vec![250, 500, 1000, 1000]);
        backoff.reset();
        assert_eq!(backoff.next_delay(), Duration::from_millis(250));
        assert_eq!(backoff.delay_after(2), Duration::from_millis(500));
    }

    #[test]
    fn validation_names_the_field() {
        let bad = |p: RetryPolicy| p.validate().unwrap_err();
        assert!(bad(RetryPolicy { max_attempts: 0, ..Default::default() }).contains("retry.max_attempts"));
        assert!(bad(RetryPolicy { multiplier: -1.0, ..Default::default() }).contains("retry.multiplier"));
        assert!(bad(RetryPolicy { min: secs(20), ..Default::default() }).contains("retry.min (20s) is greater"));
        assert!(bad(RetryPolicy { jitter: 1.5, ..Default::default() }).contains("retry.jitter"));
        RetryPolicy::default().validate().unwrap();
    }
}
