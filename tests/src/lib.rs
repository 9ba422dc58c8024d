//! Shared harness for wasmsub's integration tests: the guest fixtures (built
//! by `build.rs` from `guests/`) and a host on the embedded broker with a
//! throw-away store, driven through its real pipeline.
//!
//! - `process`: child processes on free ports, killed by pid on drop.
//! - `dapr`: Redis, daprd sidecars and host processes behind them.
//! - `brokers`: the pub/sub broker a Dapr test runs on (Redis Streams,
//!   `kafka`: a real Kafka broker, `moto`: AWS SNS/SQS), with its
//!   component YAMLs and its "nothing left to redeliver" check.
//! - `embedded`: an embedded host as a process.

use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::broadcast;
use wasmsub::cloudevent::CLOUDEVENTS_JSON;
use wasmsub::transport::PublishError;
use wasmsub::{DaprStatus, EventReport, Host, HostOptions, Manifest};

pub mod brokers;
pub mod dapr;
pub mod embedded;
pub mod kafka;
pub mod moto;
pub mod process;

/// Paths of the guest components, one constant per guest crate.
pub mod guests {
    include!(concat!(env!("OUT_DIR"), "/guests.rs"));
}

/// How long a test waits for an outcome before it fails (not a performance
/// bound: the slowest expected path is a few short retries).
pub const SETTLE_TIMEOUT: Duration = Duration::from_secs(60);

/// A retry policy that keeps tests quick: 50 ms, 100 ms, 200 ms...
pub const FAST_RETRY: &str = r#"{ max_attempts = 3, multiplier = 0.05, min = "50ms", max = "200ms" }"#;

/// One handler line-up for a test manifest.
pub struct HandlerSpec<'a> {
    pub name: &'a str,
    pub component: &'a str,
    pub topic: &'a str,
    /// Extra TOML keys for the handler table, e.g. `id_mode = "content"`.
    pub extra: &'a str,
}

impl<'a> HandlerSpec<'a> {
    pub fn new(name: &'a str, component: &'a str, topic: &'a str) -> Self {
        Self { name, component, topic, extra: "" }
    }

    pub fn with(mut self, extra: &'a str) -> Self {
        self.extra = extra;
        self
    }
}

/// A manifest with one tenant `acme` running `handlers`.
pub fn manifest_text(limits: &str, handlers: &[HandlerSpec<'_>]) -> String {
    let mut text = format!("[idempotency]\nlease_margin = \"5s\"\n\n[[tenant]]\nname = \"acme\"\nlimits = {{ {limits} }}\n");
    for handler in handlers {
        let retry = if handler.extra.contains("retry") { String::new() } else { format!("retry = {FAST_RETRY}\n") };
        text.push_str(&format!(
            "\n[[tenant.handler]]\nname = \"{}\"\ncomponent = {:?}\ntopic = \"{}\"\n{retry}{}\n",
            handler.name, handler.component, handler.topic, handler.extra
        ));
    }
    text
}

/// A structured CloudEvent as Dapr would deliver it.
pub fn cloud_event(id: &str, data: Value) -> Value {
    json!({"specversion": "1.0", "id": id, "source": "tests", "type": "test.event",
           "time": "2026-11-26T12:00:00Z", "datacontenttype": "application/json", "data": data})
}

/// A host on the embedded broker and a temporary store.
pub struct TestHost {
    pub host: Host,
    reports: broadcast::Receiver<EventReport>,
    pub data_dir: tempfile::TempDir,
}

impl TestHost {
    pub async fn start(manifest: &str) -> anyhow::Result<Self> {
        let data_dir = tempfile::tempdir()?;
        Self::start_in(manifest, data_dir).await
    }

    /// Starts on an existing data directory (a restart).
    pub async fn start_in(manifest: &str, data_dir: tempfile::TempDir) -> anyhow::Result<Self> {
        let manifest = Manifest::parse(manifest, Path::new("/"))?;
        let options = HostOptions::embedded(data_dir.path().to_owned());
        let host = Host::start(&manifest, &options).await?;
        let reports = host.reports();
        Ok(Self { host, reports, data_dir })
    }

    /// Publishes a CloudEvent to `topic` of pub/sub `pubsub`.
    pub async fn publish(&self, topic: &str, event: &Value) -> Result<(), PublishError> {
        self.host.publish("pubsub", topic, event.to_string().into(), Some(CLOUDEVENTS_JSON)).await
    }

    /// The next report that settles a delivery (not a "retry later").
    pub async fn next_settled(&mut self) -> EventReport {
        loop {
            let report = tokio::time::timeout(SETTLE_TIMEOUT, self.reports.recv())
                .await
                .expect("no delivery settled in time")
                .expect("report channel closed");
            if report.outcome.dapr_status() != DaprStatus::Retry {
                return report;
            }
        }
    }

    pub async fn settled(&mut self, count: usize) -> Vec<EventReport> {
        let mut reports = Vec::with_capacity(count);
        for _ in 0..count {
            reports.push(self.next_settled().await);
        }
        reports
    }

    /// Tenant `acme`'s committed value of `key`, as text.
    pub async fn state(&self, key: &str) -> Option<String> {
        let value = self.host.store().get_state("acme", key).await.expect("reading state");
        value.map(|v| String::from_utf8(v).expect("utf-8 state"))
    }

    /// Waits until the host has a fresh instance made ahead of its next
    /// attempt (the background making is not timed: a busy machine just
    /// takes longer).
    pub async fn wait_for_an_instance_made_ahead(&self) {
        let deadline = tokio::time::Instant::now() + SETTLE_TIMEOUT;
        while self.host.instances_ready() == 0 {
            assert!(tokio::time::Instant::now() < deadline, "no instance was made ahead");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Waits until `key` has a committed value (effects of relayed messages
    /// land a little after the delivery that caused them).
    pub async fn wait_for_state(&self, key: &str) -> String {
        let deadline = tokio::time::Instant::now() + SETTLE_TIMEOUT;
        loop {
            if let Some(value) = self.state(key).await {
                return value;
            }
            assert!(tokio::time::Instant::now() < deadline, "state key {key} never appeared");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until the embedded queue is empty: every accepted message
    /// delivered and settled (reports may lag behind a busy run; this does not).
    pub async fn wait_drained(&self) {
        let deadline = tokio::time::Instant::now() + SETTLE_TIMEOUT * 5;
        while self.host.queue_depth() != Some((0, 0)) {
            assert!(tokio::time::Instant::now() < deadline, "the queue never drained: {:?}", self.host.queue_depth());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn stop(self) -> tempfile::TempDir {
        self.host.shutdown().await;
        self.data_dir
    }
}

/// A new version of a component: the same code with a custom section that
/// makes its bytes (and so its sha256 version) distinct.
pub fn component_variant(path: &str, n: usize) -> Vec<u8> {
    let bytes = std::fs::read(path).expect("reading a guest component");
    with_custom_section(&bytes, &format!("wasmsub-test-variant-{n}"))
}

/// Appends a custom section (id 0) to a component: same code, new bytes
/// (a new version, as far as the host can tell). Tests and benchmarks use it.
pub fn with_custom_section(component: &[u8], name: &str) -> Vec<u8> {
    let mut payload = Vec::new();
    leb128(&mut payload, name.len() as u64);
    payload.extend_from_slice(name.as_bytes());
    let mut bytes = component.to_vec();
    bytes.push(0);
    leb128(&mut bytes, payload.len() as u64);
    bytes.extend_from_slice(&payload);
    bytes
}

fn leb128(out: &mut Vec<u8>, mut value: u64) {
    loop {
        let byte = (value & 0x7f) as u8;
        value >>= 7;
        if value == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}


