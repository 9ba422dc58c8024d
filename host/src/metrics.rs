//! Prometheus metrics: what deliveries and attempts came to, per tenant,
//! handler and version, and how full the host is. Served at `GET /metrics`
//! (`server/metrics.rs`).
//!
//! One registry per host (no process-global recorder), so several hosts in
//! one process (tests, benchmarks) count apart. Labels are bounded by the
//! configuration: tenant, handler, version (a handler keeps its serving
//! version and a short rollback window), outcome and limit names from fixed
//! sets. Never an event id or a reason text.
//!
//! Label values are `Arc<str>` clones of names the registry already holds
//! and `&'static str` kinds, so counting an event allocates nothing once its
//! series exists.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

/// A delivery's series: whose handler, which version, how it ended.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DeliveryLabels {
    tenant: Arc<str>,
    handler: Arc<str>,
    /// Empty when no attempt ran (a duplicate, a throttled delivery).
    version: Arc<str>,
    outcome: &'static str,
}

/// An attempt's series: how the guest's run ended.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AttemptLabels {
    tenant: Arc<str>,
    handler: Arc<str>,
    version: Arc<str>,
    result: &'static str,
}

/// A handler's series (latency histograms).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HandlerLabels {
    tenant: Arc<str>,
    handler: Arc<str>,
}

/// A tenant limit that stopped a guest.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LimitLabels {
    tenant: Arc<str>,
    limit: &'static str,
}

/// A change of a handler's serving version.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DeployLabels {
    tenant: Arc<str>,
    handler: Arc<str>,
    action: &'static str,
}

/// A store operation that failed for the host's reasons (not a lost claim).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StoreLabels {
    operation: &'static str,
}

/// Histograms from 100 µs to about 100 s: an echo handler answers in tens
/// of microseconds in process, a delivery through retries takes seconds.
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 2.0, 21))
}

/// Instantiation takes tens of microseconds: buckets from 5 µs to 2.6 s.
fn instantiation_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.000005, 2.0, 20))
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// The host's metrics.
pub struct Metrics {
    registry: Registry,
    deliveries: Family<DeliveryLabels, Counter>,
    delivery_seconds: HistogramFamily<HandlerLabels>,
    attempts: Family<AttemptLabels, Counter>,
    attempt_seconds: HistogramFamily<HandlerLabels>,
    instantiation_seconds: HistogramFamily<HandlerLabels>,
    made_ahead: Family<HandlerLabels, Counter>,
    limit_hits: Family<LimitLabels, Counter>,
    deploys: Family<DeployLabels, Counter>,
    store_errors: Family<StoreLabels, Counter>,
    /// Occupancy, set from the live values when scraped.
    pub occupancy: Occupancy,
}

/// Gauges of how full the host is, set at scrape time.
#[derive(Default)]
pub struct Occupancy {
    /// Instance slots running an attempt now.
    pub instances_in_use: Gauge,
    /// Instance slots in all.
    pub instance_slots: Gauge,
    /// Instances made ahead and waiting for an attempt.
    pub instances_ready: Gauge,
    /// Deliveries admitted through the door and not yet answered.
    pub deliveries_in_flight: Gauge,
    /// Messages on the embedded broker's queue (0 behind Dapr).
    pub queue_messages: Gauge,
    /// Their bytes.
    pub queue_bytes: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// An empty registry with every metric described.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("wasmsub");
        let deliveries = Family::default();
        registry.register("deliveries", "Deliveries to a handler by how they ended: processed, duplicate-skipped, dead-lettered, deferred, throttled, in-flight-elsewhere", deliveries.clone());
        let delivery_seconds: HistogramFamily<HandlerLabels> = Family::new_with_constructor(latency_histogram);
        registry.register_with_unit("delivery_duration", "From a delivery reaching the handler's pipeline to its answer (claim, attempts, waits between them, commit)", Unit::Seconds, delivery_seconds.clone());
        let attempts = Family::default();
        registry.register("attempts", "Attempts on a fresh instance by result: success, retry, drop, trap, infrastructure", attempts.clone());
        let attempt_seconds: HistogramFamily<HandlerLabels> = Family::new_with_constructor(latency_histogram);
        registry.register_with_unit("attempt_duration", "One attempt: waiting for an instance slot, instantiation and the guest's call", Unit::Seconds, attempt_seconds.clone());
        let instantiation_seconds: HistogramFamily<HandlerLabels> = Family::new_with_constructor(instantiation_histogram);
        registry.register_with_unit("instantiation_duration", "Making an attempt's fresh instance (part of the attempt's duration)", Unit::Seconds, instantiation_seconds.clone());
        let made_ahead = Family::default();
        registry.register("attempts_made_ahead", "Attempts whose fresh instance was made ahead of them (off the event's path; it still served only that attempt)", made_ahead.clone());
        let limit_hits = Family::default();
        registry.register("limit_hits", "Attempts stopped by a tenant limit: cpu_time, wall_time, memory, table, fuel, stack", limit_hits.clone());
        let deploys = Family::default();
        registry.register("deploys", "Changes of a handler's serving version: deploy, rollback, refused", deploys.clone());
        let store_errors = Family::default();
        registry.register("store_errors", "Store or sidecar operations that failed (the event was handed back for redelivery)", store_errors.clone());
        let occupancy = Occupancy::default();
        registry.register("instances_in_use", "Instance slots running an attempt now", occupancy.instances_in_use.clone());
        registry.register("instance_slots", "Instance slots in the pool", occupancy.instance_slots.clone());
        registry.register("instances_ready", "Instances made ahead and waiting for an attempt", occupancy.instances_ready.clone());
        registry.register("deliveries_in_flight", "Deliveries admitted and not yet answered", occupancy.deliveries_in_flight.clone());
        registry.register("queue_messages", "Messages on the embedded broker's queue", occupancy.queue_messages.clone());
        registry.register_with_unit("queue", "Bytes on the embedded broker's queue", Unit::Bytes, occupancy.queue_bytes.clone());
        Self { registry, deliveries, delivery_seconds, attempts, attempt_seconds, instantiation_seconds, made_ahead, limit_hits, deploys, store_errors, occupancy }
    }

    /// A delivery to `handler` of `tenant` ended with `outcome` after `took`.
    pub fn delivery(&self, tenant: &Arc<str>, handler: &Arc<str>, version: &Arc<str>, outcome: &'static str, took: Duration) {
        let labels = DeliveryLabels { tenant: tenant.clone(), handler: handler.clone(), version: version.clone(), outcome };
        self.deliveries.get_or_create(&labels).inc();
        let handler = HandlerLabels { tenant: tenant.clone(), handler: handler.clone() };
        self.delivery_seconds.get_or_create(&handler).observe(took.as_secs_f64());
    }

    /// An attempt ended with `result` after `took`; `limit` names the tenant
    /// limit that stopped it, if one did.
    pub fn attempt(&self, tenant: &Arc<str>, handler: &Arc<str>, version: &Arc<str>, result: &'static str, limit: Option<&'static str>, took: Duration) {
        let labels = AttemptLabels { tenant: tenant.clone(), handler: handler.clone(), version: version.clone(), result };
        self.attempts.get_or_create(&labels).inc();
        let series = HandlerLabels { tenant: tenant.clone(), handler: handler.clone() };
        self.attempt_seconds.get_or_create(&series).observe(took.as_secs_f64());
        if let Some(limit) = limit {
            self.limit_hits.get_or_create(&LimitLabels { tenant: tenant.clone(), limit }).inc();
        }
    }

    /// An attempt's fresh instance took `took` to make.
    pub fn instantiation(&self, tenant: &Arc<str>, handler: &Arc<str>, took: Duration) {
        let series = HandlerLabels { tenant: tenant.clone(), handler: handler.clone() };
        self.instantiation_seconds.get_or_create(&series).observe(took.as_secs_f64());
    }

    /// An attempt of `handler` ran on an instance made ahead of it.
    pub fn made_ahead(&self, tenant: &Arc<str>, handler: &Arc<str>) {
        self.made_ahead.get_or_create(&HandlerLabels { tenant: tenant.clone(), handler: handler.clone() }).inc();
    }

    /// A handler's serving version changed (`deploy`, `rollback`) or a
    /// version was refused (`refused`).
    pub fn deploy(&self, tenant: &str, handler: &str, action: &'static str) {
        self.deploys.get_or_create(&DeployLabels { tenant: Arc::from(tenant), handler: Arc::from(handler), action }).inc();
    }

    /// A store operation failed for the host's reasons.
    pub fn store_error(&self, operation: &'static str) {
        self.store_errors.get_or_create(&StoreLabels { operation }).inc();
    }

    /// The registry in Prometheus' text format.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_come_out_with_their_labels_and_prometheus_names() {
        let metrics = Metrics::new();
        let (tenant, handler, version): (Arc<str>, Arc<str>, Arc<str>) = (Arc::from("acme"), Arc::from("orders"), Arc::from("0123456789ab"));
        metrics.delivery(&tenant, &handler, &version, "processed", Duration::from_millis(3));
        metrics.delivery(&tenant, &handler, &version, "processed", Duration::from_millis(5));
        metrics.attempt(&tenant, &handler, &version, "trap", Some("cpu_time"), Duration::from_millis(1));
        metrics.deploy("acme", "orders", "rollback");
        let text = metrics.encode();
        assert!(text.contains(r#"wasmsub_deliveries_total{tenant="acme",handler="orders",version="0123456789ab",outcome="processed"} 2"#), "{text}");
        assert!(text.contains(r#"wasmsub_delivery_duration_seconds_count{tenant="acme",handler="orders"} 2"#), "{text}");
        assert!(text.contains(r#"wasmsub_limit_hits_total{tenant="acme",limit="cpu_time"} 1"#), "{text}");
        assert!(text.contains(r#"wasmsub_deploys_total{tenant="acme",handler="orders",action="rollback"} 1"#), "{text}");
        assert!(text.contains("# HELP wasmsub_instances_in_use"), "{text}");
    }
}
