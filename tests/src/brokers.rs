//! The pub/sub broker behind daprd, chosen per test: Redis Streams, Kafka or
//! AWS SNS/SQS (moto). Whatever carries the events, Dapr's state store (the
//! host's claims, state and outbox) stays on Redis, so every broker starts a
//! Redis too; only the pub/sub component changes. Each broker writes the
//! repository's tested component YAMLs (components/, components/kafka/,
//! components/snssqs/) into a test's resources directory, pointed at the
//! servers it started, and knows when a consumer group has nothing left to
//! (re)deliver.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::dapr::{FAST_REDELIVERY, Redis, write_components};
use crate::kafka::Kafka;
use crate::moto::Moto;
use crate::process::repo_root;

/// Which broker carries the events.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BrokerKind {
    Redis,
    Kafka,
    SnsSqs,
}

/// SQS's visibility timeout in the tests, in seconds: a delivery whose host
/// died comes back this long after it was received (components/snssqs's
/// 60 s would make a crash test wait a minute). Still above anything the
/// tests' handlers take, except where a test shortens it on purpose.
pub const TEST_VISIBILITY_TIMEOUT: &str = "5";

/// One broker's servers for a test. Fields drop in order, killing the
/// pub/sub server, then Redis.
pub struct Broker {
    pub kind: BrokerKind,
    server: Server,
    /// Dapr's state store; the pub/sub too when `kind` is Redis.
    pub redis: Redis,
}

enum Server {
    Redis,
    Kafka(Kafka),
    Moto(Moto),
}

impl Broker {
    /// Starts the broker's servers (and Redis), logging into `dir`.
    pub fn start(kind: BrokerKind, dir: &Path) -> Self {
        let redis = Redis::start(dir);
        let server = match kind {
            BrokerKind::Redis => Server::Redis,
            BrokerKind::Kafka => Server::Kafka(Kafka::start(dir)),
            BrokerKind::SnsSqs => Server::Moto(Moto::start(dir)),
        };
        Self { kind, server, redis }
    }

    /// Writes the broker's components into `dir/components` and returns
    /// that directory (daprd's `--resources-path`).
    pub fn components(&self, dir: &Path) -> PathBuf {
        self.components_with(dir, &[])
    }

    /// As [`Broker::components`], with some of the pub/sub component's
    /// metadata values replaced (`(name, value)`; the name must be there).
    pub fn components_with(&self, dir: &Path, metadata: &[(&str, &str)]) -> PathBuf {
        let dir = dir.join("components");
        // The Redis line-up with the tests' timings: pubsub.yaml,
        // statestore.yaml, and resiliency.yaml, whose retries only Redis
        // Streams needs (the other brokers redeliver on their own: see
        // their YAMLs; the policy would stack on their retries).
        write_components(&dir, self.redis.port, &FAST_REDELIVERY);
        let pubsub = match &self.server {
            Server::Redis => std::fs::read_to_string(dir.join("pubsub.yaml")).unwrap(),
            Server::Kafka(kafka) => set_metadata(&read("components/kafka/pubsub.yaml"), "brokers", &kafka.bootstrap()),
            Server::Moto(moto) => {
                let yaml = set_metadata(&read("components/snssqs/pubsub.yaml"), "messageVisibilityTimeout", TEST_VISIBILITY_TIMEOUT);
                // moto checks no signature; the keys only have to be there.
                append_metadata(&yaml, &[("endpoint", &moto.endpoint()), ("accessKey", "test"), ("secretKey", "test")])
            }
        };
        if self.kind != BrokerKind::Redis {
            std::fs::remove_file(dir.join("resiliency.yaml")).unwrap();
        }
        let pubsub = metadata.iter().fold(pubsub, |yaml, (name, value)| set_metadata(&yaml, name, value));
        std::fs::write(dir.join("pubsub.yaml"), pubsub).unwrap();
        dir
    }

    /// Makes sure `topics` exist before anyone publishes to them. Kafka:
    /// created with several partitions, each with a leader (see
    /// [`Kafka::create_topics`]). Redis Streams and SNS: nothing to do
    /// (daprd creates streams, SNS topics and the SQS queue itself).
    pub fn create_topics(&self, topics: &[&str]) {
        if let Server::Kafka(kafka) = &self.server {
            kafka.create_topics(topics);
        }
    }

    /// Waits until the consumer group of `app_id` has nothing left to
    /// deliver or redeliver on `topics`: every message acknowledged
    /// (Redis Streams: none pending, none unread; Kafka: the end offset of
    /// every partition committed; SQS: the app id's queue empty). A count
    /// read afterwards is final. Fails only if the backlog does not move
    /// for `stall`.
    pub fn wait_drained(&self, topics: &[&str], app_id: &str, stall: Duration) {
        match &self.server {
            Server::Redis => topics.iter().for_each(|topic| self.redis.wait_drained(topic, app_id, stall)),
            Server::Kafka(kafka) => kafka.wait_drained(topics, app_id, stall),
            // One queue per app id, subscribed to all its topics.
            Server::Moto(moto) => moto.wait_drained(app_id, stall),
        }
    }

    /// The pub/sub server's log (empty for Redis).
    pub fn log_text(&self) -> String {
        match &self.server {
            Server::Redis => String::new(),
            Server::Kafka(kafka) => kafka.log_text(),
            Server::Moto(moto) => moto.log_text(),
        }
    }
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo_root().join(path)).unwrap_or_else(|e| panic!("reading {path}: {e}"))
}

/// Replaces the value of metadata entry `name` (`- name: X` followed by
/// its `value:` line) in a component YAML.
pub fn set_metadata(yaml: &str, name: &str, value: &str) -> String {
    let mut lines: Vec<String> = yaml.lines().map(str::to_owned).collect();
    let at = lines.iter().position(|l| l.trim() == format!("- name: {name}")).unwrap_or_else(|| panic!("no metadata {name} in:\n{yaml}"));
    let value_line = &mut lines[at + 1];
    assert!(value_line.trim_start().starts_with("value:"), "metadata {name} has no value line: {value_line}");
    let indent = &value_line[..value_line.len() - value_line.trim_start().len()];
    *value_line = format!("{indent}value: {value:?}");
    lines.join("\n") + "\n"
}

/// Appends metadata entries to a component YAML whose `metadata:` list is
/// its last block.
fn append_metadata(yaml: &str, entries: &[(&str, &str)]) -> String {
    let mut text = yaml.trim_end().to_owned();
    for (name, value) in entries {
        text.push_str(&format!("\n    - name: {name}\n      value: {value:?}"));
    }
    text + "\n"
}
