//! A native test double for [`Host`]: state in a map, publishes and log
//! lines recorded, so a handler's `cargo test` runs without a component or
//! a host. Like the real host, writes made by a handler that does not
//! answer success are the test's to ignore: [`TestHost::run`] keeps them
//! only on success.

use std::collections::BTreeMap;

use crate::{Disposition, Event, Host, Level};

/// One queued publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    /// The topic.
    pub topic: String,
    /// The payload.
    pub data: Vec<u8>,
    /// Its media type.
    pub content_type: String,
}

impl Published {
    /// The payload as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.data).expect("the published payload is JSON")
    }
}

/// State, publishes and logs in memory.
#[derive(Debug, Default, Clone)]
pub struct TestHost {
    /// Committed state (seed it before a run; read it after).
    pub state: BTreeMap<String, Vec<u8>>,
    /// Publishes of the successful runs, in order.
    pub published: Vec<Published>,
    /// Every log line, successful run or not.
    pub logs: Vec<(Level, String)>,
    /// Topics a publish is refused for (as a tenant's `publish_topics`
    /// would), to test how a handler answers a refusal.
    pub refused_topics: Vec<String>,
    pending: Option<(BTreeMap<String, Option<Vec<u8>>>, Vec<Published>)>,
}

impl TestHost {
    /// A host whose state holds `entries`.
    pub fn with_state<'a>(entries: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        Self { state: entries.into_iter().map(|(k, v)| (k.to_owned(), v.as_bytes().to_vec())).collect(), ..Self::default() }
    }

    /// Runs `handle` on `event` as the host would: its writes and publishes
    /// are applied only if it answers success.
    pub fn run<F>(&mut self, event: &Event, handle: F) -> Disposition
    where
        F: FnOnce(&Event, &mut Self) -> Disposition,
    {
        self.pending = Some((BTreeMap::new(), Vec::new()));
        let disposition = handle(event, self);
        let (writes, publishes) = self.pending.take().expect("the run's buffers");
        if matches!(disposition, Disposition::Success) {
            for (key, value) in writes {
                match value {
                    Some(value) => self.state.insert(key, value),
                    None => self.state.remove(&key),
                };
            }
            self.published.extend(publishes);
        }
        disposition
    }

    /// A host that refuses publishes to `topics`.
    pub fn refusing_topics(topics: &[&str]) -> Self {
        Self { refused_topics: topics.iter().map(|t| t.to_string()).collect(), ..Self::default() }
    }

    /// The value under `key` as text.
    pub fn text(&self, key: &str) -> Option<String> {
        self.state.get(key).map(|v| String::from_utf8_lossy(v).into_owned())
    }

    /// The value under `key` as JSON.
    pub fn json(&self, key: &str) -> Option<serde_json::Value> {
        self.state.get(key).map(|v| serde_json::from_slice(v).expect("the state value is JSON"))
    }

    fn buffers(&mut self) -> &mut (BTreeMap<String, Option<Vec<u8>>>, Vec<Published>) {
        self.pending.get_or_insert_with(Default::default)
    }
}

impl Host for TestHost {
    fn get(&mut self, key: &str) -> Result<Option<Vec<u8>>, String> {
        if let Some(written) = self.buffers().0.get(key) {
            return Ok(written.clone());
        }
        Ok(self.state.get(key).cloned())
    }
    fn set(&mut self, key: &str, value: &[u8]) -> Result<(), String> {
        self.buffers().0.insert(key.to_owned(), Some(value.to_vec()));
        Ok(())
    }
    fn delete(&mut self, key: &str) -> Result<(), String> {
        self.buffers().0.insert(key.to_owned(), None);
        Ok(())
    }
    fn publish(&mut self, topic: &str, data: &[u8], content_type: &str) -> Result<(), String> {
        if self.refused_topics.iter().any(|t| t == topic) {
            return Err(format!("topic `{topic}` is not in the tenant's publish_topics"));
        }
        let publish = Published { topic: topic.to_owned(), data: data.to_vec(), content_type: content_type.to_owned() };
        self.buffers().1.push(publish);
        Ok(())
    }
    fn log(&mut self, level: Level, message: &str) {
        self.logs.push((level, message.to_owned()));
    }
}

/// A CloudEvent as the host would deliver it: `data` as JSON, attempt 1,
/// on topic `topic`.
pub fn event(id: &str, topic: &str, data: serde_json::Value) -> Event {
    Event {
        id: id.to_owned(),
        source: "tests".to_owned(),
        type_: "com.dapr.event.sent".to_owned(),
        specversion: "1.0".to_owned(),
        subject: None,
        time: None,
        datacontenttype: Some("application/json".to_owned()),
        data: serde_json::to_vec(&data).expect("JSON encodes"),
        extensions: Vec::new(),
        topic: topic.to_owned(),
        pubsubname: "pubsub".to_owned(),
        attempt: 1,
    }
}
