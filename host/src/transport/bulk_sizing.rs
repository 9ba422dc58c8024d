//! Notices bulk deliveries that Dapr holds back for lack of company.
//!
//! Unless the broker's component batches itself, Dapr sends a bulk request
//! once it holds `max_messages` events or `max_await_ms` has passed. Redis
//! Streams hands over at most its `concurrency` messages at once (10 by
//! default), so with `max_messages` above that no request ever fills: each
//! waits the full `max_await_ms`, and a backlog drains at `concurrency`
//! events per `max_await_ms` (10 per second with Dapr's defaults). Nothing
//! fails and Dapr logs nothing, so the host says it once per route: when
//! most recent requests carry the same number of events, fewer than
//! `max_messages`, and arrive about `max_await_ms` after the previous answer.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::manifest::BulkConfig;

/// Requests looked at: enough that a few odd sizes do not hide a cap.
const WINDOW: usize = 20;
/// Of those, how many must be at the cap and have waited.
const AT_CAP: usize = 12;
/// A request "waited" if it came at least this share of `max_await_ms`
/// after the previous answer (the ticker restarts when a request is sent).
const WAITED_SHARE: f64 = 0.8;

/// What one route's requests suggest: at most `cap` events arrive at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CappedBatches {
    /// The most events any recent request carried.
    pub cap: usize,
}

/// One route's recent requests.
#[derive(Debug, Default)]
struct RouteWatch {
    /// (events, waited about `max_await_ms` since the previous answer).
    recent: std::collections::VecDeque<(usize, bool)>,
    last_answer: Option<Instant>,
    told: bool,
}

impl RouteWatch {
    /// Records a request; the finding the first time the pattern shows.
    fn arrived(&mut self, events: usize, since_last_answer: Option<Duration>, config: &BulkConfig) -> Option<CappedBatches> {
        let waited = since_last_answer.is_some_and(|gap| gap.as_secs_f64() * 1000.0 >= f64::from(config.max_await_ms) * WAITED_SHARE);
        self.recent.push_back((events, waited));
        if self.recent.len() > WINDOW {
            self.recent.pop_front();
        }
        if self.told || self.recent.len() < WINDOW {
            return None;
        }
        let cap = self.recent.iter().map(|(n, _)| *n).max().unwrap_or(0);
        let capped = self.recent.iter().filter(|(n, waited)| *n == cap && *waited).count();
        // A cap of 1 is a quiet topic, not a component holding messages back.
        if cap >= 2 && cap < config.max_messages as usize && capped >= AT_CAP {
            self.told = true;
            return Some(CappedBatches { cap });
        }
        None
    }
}

/// Every bulk route's watch.
#[derive(Debug, Default)]
pub(crate) struct BulkSizing {
    routes: Mutex<HashMap<String, RouteWatch>>,
}

impl BulkSizing {
    /// A bulk request of `events` reached `route`; logs the finding once.
    pub fn arrived(&self, route: &str, events: usize, config: &BulkConfig) {
        let now = Instant::now();
        let found = {
            let mut routes = self.routes.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let watch = routes.entry(route.to_owned()).or_default();
            let gap = watch.last_answer.map(|answered| now.saturating_duration_since(answered));
            watch.arrived(events, gap, config)
        };
        if let Some(CappedBatches { cap }) = found {
            tracing::warn!(
                route,
                events_per_request = cap,
                max_messages = config.max_messages,
                max_await_ms = config.max_await_ms,
                "bulk requests on this route carry at most {cap} events and each waits about max_await_ms: the pub/sub component \
                 hands Dapr no more than {cap} messages at once (Redis Streams: its `concurrency`), so a request never reaches \
                 max_messages; set the handler's bulk max_messages to {cap} or less (README, \"Sizing bulk deliveries\")"
            );
        }
    }

    /// The answer to a bulk request on `route` went back.
    pub fn answered(&self, route: &str) {
        let mut routes = self.routes.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(watch) = routes.get_mut(route) {
            watch.last_answer = Some(Instant::now());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: BulkConfig = BulkConfig { max_messages: 100, max_await_ms: 1000 };
    const WAITED: Option<Duration> = Some(Duration::from_millis(1000));

    #[test]
    fn requests_held_at_the_components_concurrency_are_reported_once() {
        let mut watch = RouteWatch::default();
        let found: Vec<_> = (0..3 * WINDOW).filter_map(|_| watch.arrived(32, WAITED, &CONFIG)).collect();
        assert_eq!(found, vec![CappedBatches { cap: 32 }]);
    }

    #[test]
    fn full_requests_quiet_topics_and_prompt_requests_are_not() {
        let full = BulkConfig { max_messages: 32, ..CONFIG };
        let mut watch = RouteWatch::default();
        assert!((0..3 * WINDOW).all(|_| watch.arrived(32, WAITED, &full).is_none()), "requests that reach max_messages are as asked");

        let mut watch = RouteWatch::default();
        assert!((0..3 * WINDOW).all(|_| watch.arrived(1, WAITED, &CONFIG).is_none()), "one event per wait is a quiet topic");

        let mut watch = RouteWatch::default();
        let prompt = Some(Duration::from_millis(20));
        assert!((0..3 * WINDOW).all(|_| watch.arrived(32, prompt, &CONFIG).is_none()), "requests that did not wait were not held back");
    }

    #[test]
    fn sizes_that_vary_are_traffic_not_a_cap() {
        let mut watch = RouteWatch::default();
        let sizes = [3, 7, 2, 9, 4, 5, 8, 6, 3, 2];
        assert!((0..3 * WINDOW).all(|i| watch.arrived(sizes[i % sizes.len()], WAITED, &CONFIG).is_none()));
    }
}
