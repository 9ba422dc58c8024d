//! `wasmsub invoke`: one event through one handler component on the host's
//! own runtime (the same sandbox, imports and tenant limits as a served
//! event), against an in-memory store, with nothing committed anywhere. It
//! prints what the handler answered, the state writes and publishes the host
//! would commit, and the lines the guest logged: a handler author's test
//! harness and debugger.
//!
//! One attempt, not the pipeline: no claim, no retry, no dead letter (the
//! report says what the host would do next). `--attempt` sets the attempt
//! number the guest sees, so a retry path can be tried as well.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use anyhow::{Context, anyhow, bail};
use serde_json::{Map, Value, json};

use super::client::{Output, emit, emit_json};
use crate::cloudevent::{CloudEvent, is_json_media_type};
use crate::manifest::{Capabilities, DEFAULT_PUBSUB, Manifest, TenantLimits};
use crate::pipeline::dispatch::to_wit_event;
use crate::pipeline::effects::{self, PendingPublish, StateWrite};
use crate::pipeline::receive::{Payload, check_size};
use crate::runtime::{AttemptContext, AttemptResult, Dispatched, EngineConfig, GuestLine, Runtime};
use crate::store::MemoryStore;
use crate::text::printable;

/// Exit code when the handler answered `retry`.
pub const EXIT_RETRY: u8 = 3;
/// Exit code when the handler answered `drop`.
pub const EXIT_DROP: u8 = 4;
/// Exit code when the guest trapped or hit a limit.
pub const EXIT_TRAP: u8 = 5;
/// Exit code when the host failed (not the handler's answer).
pub const EXIT_INFRASTRUCTURE: u8 = 1;

/// The tenant an invocation runs as without `--manifest` (its state
/// namespace too).
pub const DEFAULT_TENANT: &str = "invoke";
/// The topic of an event that names none, without `--topic`.
pub const DEFAULT_TOPIC: &str = "invoke";

/// What to run, and with what.
#[derive(Debug, Clone)]
pub struct Invocation {
    /// The handler component.
    pub component: PathBuf,
    /// The event file; `-` reads stdin.
    pub event: PathBuf,
    /// The topic (default: the event's `topic` attribute, else [`DEFAULT_TOPIC`]).
    pub topic: Option<String>,
    /// The attempt number the guest sees (1 for a first delivery).
    pub attempt: u32,
    /// State to seed, applied after `state_file`: (key, value).
    pub state: Vec<(String, String)>,
    /// A JSON object of state to seed: string values as their text, any
    /// other JSON as its JSON text.
    pub state_file: Option<PathBuf>,
    /// Topics the handler may publish to (empty: any); not with `manifest`.
    pub publish_topics: Vec<String>,
    /// Run as a tenant of this manifest (its limits, capabilities, publish
    /// topics and state namespace) instead of the default limits.
    pub manifest: Option<PathBuf>,
    /// The manifest's tenant (may be left out when it has only one).
    pub tenant: Option<String>,
}

/// The handler did not answer `success`. The report is printed already;
/// the command exits with `code` and says nothing more.
#[derive(Debug, thiserror::Error)]
#[error("the handler's disposition was {disposition}")]
pub struct Unsuccessful {
    /// `retry`, `drop`, `trap` or `infrastructure`.
    pub disposition: &'static str,
    /// The exit code ([`EXIT_RETRY`], ...).
    pub code: u8,
}

/// Who the attempt runs as.
struct Tenant {
    name: String,
    namespace: String,
    limits: TenantLimits,
    capabilities: Capabilities,
}

/// Runs the invocation and prints its report. `Ok` when the handler
/// answered `success`, [`Unsuccessful`] when it answered anything else.
pub async fn run(invocation: Invocation, output: Output) -> anyhow::Result<()> {
    let tenant = tenant(&invocation)?;
    let (origin, body) = read_event(&invocation.event)?;
    check_size(&Payload::Bytes(body.clone().into()), tenant.limits.max_payload_bytes)
        .with_context(|| format!("the event in {origin}: the host would dead-letter it without running the handler"))?;
    let event = event_from(&body, &origin, invocation.topic.as_deref())?;
    let store = Arc::new(MemoryStore::default());
    seed(&store, &tenant.namespace, &invocation)?;

    let engine = EngineConfig {
        instance_slots: 1,
        // One attempt, nothing to make ahead for.
        ready_instances: 0,
        max_memory_bytes: EngineConfig::default().max_memory_bytes.max(tenant.limits.memory_mib as usize * 1024 * 1024),
        consume_fuel: tenant.limits.fuel.is_some(),
        cache_dir: None,
        ..EngineConfig::default()
    };
    let runtime = Runtime::new(&engine)?;
    let component = Arc::new(runtime.load(&invocation.component)?);
    let handler = invocation.component.file_stem().map_or("handler".into(), |stem| stem.to_string_lossy().into_owned());
    let lines = Arc::new(Mutex::new(Vec::new()));
    let limits = &tenant.limits;
    let ctx = AttemptContext {
        tenant: tenant.name.as_str().into(),
        namespace: tenant.namespace.as_str().into(),
        handler: handler.into(),
        version: component.short_version().into(),
        event_id: event.id.as_str().into(),
        store,
        publish_topics: limits.publish_topics.clone().into(),
        capabilities: Arc::new(tenant.capabilities.clone()),
        memory_bytes: limits.memory_mib as usize * 1024 * 1024,
        table_elements: limits.table_elements as usize,
        max_log_bytes: limits.max_log_bytes,
        fuel: limits.fuel,
        cpu_time: limits.cpu_time,
        wall_time: limits.wall_time,
        max_state_bytes: limits.max_state_bytes,
        max_state_keys: limits.max_state_keys,
        guest_log: Some(lines.clone()),
    };
    let started = Instant::now();
    let Dispatched { mut result, .. } = runtime.dispatch(component.clone(), ctx, to_wit_event(&event, invocation.attempt)).await;
    let took = started.elapsed();
    let (writes, publishes) = match &mut result {
        AttemptResult::Succeeded(effects) => {
            let parts = std::mem::take(effects).into_parts();
            (parts.writes, parts.publishes)
        }
        _ => (Vec::new(), Vec::new()),
    };
    let lines = std::mem::take(&mut *lines.lock().unwrap_or_else(PoisonError::into_inner));
    let report = Report { component: &invocation.component, version: &component.version, event: &event, attempt: invocation.attempt, result: &result, took, writes, publishes, lines };
    match output {
        Output::Text => emit(&report.text())?,
        Output::Json => emit_json(&report.json())?,
    }
    match exit_code(&result) {
        0 => Ok(()),
        code => Err(Unsuccessful { disposition: result.label(), code }.into()),
    }
}

/// The command's exit code for an attempt's result.
pub fn exit_code(result: &AttemptResult) -> u8 {
    match result {
        AttemptResult::Succeeded(_) => 0,
        AttemptResult::GuestRetry(_) => EXIT_RETRY,
        AttemptResult::GuestDrop(_) => EXIT_DROP,
        AttemptResult::Trapped { .. } => EXIT_TRAP,
        AttemptResult::Infrastructure(_) => EXIT_INFRASTRUCTURE,
    }
}

/// A `--state KEY=VALUE` argument (split at the first `=`).
pub fn parse_state_arg(arg: &str) -> Result<(String, String), String> {
    let (key, value) = arg.split_once('=').ok_or("expected KEY=VALUE (a key with `=` in it needs --state-file)")?;
    effects::check_key(key)?;
    Ok((key.to_owned(), value.to_owned()))
}

/// The default tenant with the given publish topics, or a manifest's tenant.
fn tenant(invocation: &Invocation) -> anyhow::Result<Tenant> {
    let Some(path) = &invocation.manifest else {
        let publish_topics = if invocation.publish_topics.is_empty() { vec!["*".to_owned()] } else { invocation.publish_topics.clone() };
        let limits = TenantLimits { publish_topics, ..TenantLimits::default() };
        return Ok(Tenant { name: DEFAULT_TENANT.into(), namespace: DEFAULT_TENANT.into(), limits, capabilities: Capabilities::default() });
    };
    let manifest = Manifest::load(path)?;
    let names = || manifest.tenants.iter().map(|t| t.name.as_str()).collect::<Vec<_>>().join(", ");
    let config = match &invocation.tenant {
        Some(name) => manifest.tenants.iter().find(|t| &t.name == name).ok_or_else(|| anyhow!("{} has no tenant `{name}` (it has: {})", path.display(), names()))?,
        None if manifest.tenants.len() == 1 => &manifest.tenants[0],
        None => bail!("{} has several tenants: name one with --tenant ({})", path.display(), names()),
    };
    let namespace = config.state_namespace().to_owned();
    Ok(Tenant { name: config.name.clone(), namespace, limits: config.limits.clone(), capabilities: config.capabilities.clone() })
}

/// The event's bytes, and where they came from (for messages).
fn read_event(source: &Path) -> anyhow::Result<(String, Vec<u8>)> {
    if source == Path::new("-") {
        let mut body = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin().lock(), &mut body).context("reading the event from stdin")?;
        return Ok(("stdin".into(), body));
    }
    let body = std::fs::read(source).with_context(|| format!("reading the event file {}", source.display()))?;
    Ok((source.display().to_string(), body))
}

/// A structured CloudEvent (JSON with `specversion`), or JSON data wrapped
/// in one as a publish through Dapr would wrap it.
fn event_from(body: &[u8], origin: &str, topic: Option<&str>) -> anyhow::Result<CloudEvent> {
    let value: Value = serde_json::from_slice(body).with_context(|| format!("the event in {origin} is not JSON (a CloudEvent, or JSON data to wrap in one)"))?;
    let object = match value {
        Value::Object(object) if object.contains_key("specversion") => object,
        data => {
            let time = humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
            let id = uuid::Uuid::new_v4().to_string();
            let wrapped = json!({"specversion": "1.0", "id": id, "source": "wasmsub/invoke", "type": "com.dapr.event.sent",
                                 "time": time, "datacontenttype": "application/json", "data": data});
            let Value::Object(object) = wrapped else { unreachable!("json! of an object literal") };
            object
        }
    };
    let mut event = CloudEvent::from_object(object, DEFAULT_PUBSUB, topic.unwrap_or(DEFAULT_TOPIC)).with_context(|| format!("the CloudEvent in {origin}"))?;
    if let Some(topic) = topic {
        event.topic = topic.to_owned();
    }
    Ok(event)
}

/// Writes `--state-file`, then every `--state`, into the tenant's namespace.
fn seed(store: &MemoryStore, namespace: &str, invocation: &Invocation) -> anyhow::Result<()> {
    if let Some(path) = &invocation.state_file {
        let text = std::fs::read(path).with_context(|| format!("reading the state file {}", path.display()))?;
        let object: Map<String, Value> = serde_json::from_slice(&text).with_context(|| format!("the state file {} is not a JSON object of key to value", path.display()))?;
        for (key, value) in object {
            effects::check_key(&key).map_err(|why| anyhow!("the state file {}: key `{}`: {why}", path.display(), printable(&key)))?;
            let bytes = match value {
                Value::String(text) => text.into_bytes(),
                other => other.to_string().into_bytes(),
            };
            store.seed_state(namespace, &key, bytes);
        }
    }
    for (key, value) in &invocation.state {
        store.seed_state(namespace, key, value.clone().into_bytes());
    }
    Ok(())
}

/// What one invocation came to.
struct Report<'a> {
    component: &'a Path,
    version: &'a str,
    event: &'a CloudEvent,
    attempt: u32,
    result: &'a AttemptResult,
    took: std::time::Duration,
    writes: Vec<StateWrite>,
    publishes: Vec<PendingPublish>,
    lines: Vec<GuestLine>,
}

impl Report<'_> {
    fn reason(&self) -> Option<&str> {
        match self.result {
            AttemptResult::Succeeded(_) => None,
            AttemptResult::GuestRetry(reason) | AttemptResult::GuestDrop(reason) | AttemptResult::Infrastructure(reason) => Some(reason),
            AttemptResult::Trapped { reason, .. } => Some(reason),
        }
    }

    fn limit(&self) -> Option<&'static str> {
        match self.result {
            AttemptResult::Trapped { limit, .. } => limit.map(|l| l.label()),
            _ => None,
        }
    }

    /// What the host would do with this result.
    fn next(&self) -> &'static str {
        match self.result {
            AttemptResult::Succeeded(_) => "the host would commit these writes and publishes with the event's done mark",
            AttemptResult::GuestRetry(_) | AttemptResult::Trapped { .. } => {
                "the host would run it again after a backoff, and dead-letter it once the retry budget is spent; nothing is committed"
            }
            AttemptResult::GuestDrop(_) => "the host would dead-letter the event now; nothing else is committed",
            AttemptResult::Infrastructure(_) => "the host failed, not the handler: it would ask the broker to redeliver; nothing is committed",
        }
    }

    fn text(&self) -> String {
        let mut text = format!("disposition: {}", self.result.label());
        if let Some(limit) = self.limit() {
            text.push_str(&format!(" (limit {limit})"));
        }
        if let Some(reason) = self.reason() {
            text.push_str(&format!(": {}", printable(reason)));
        }
        text.push_str(&format!("\n  {}\n", self.next()));
        text.push_str(&format!(
            "event {} on topic {}, attempt {}; {} version {}, {} ms\n",
            printable(&self.event.id),
            printable(&self.event.topic),
            self.attempt,
            self.component.display(),
            self.version.get(..12).unwrap_or(self.version),
            self.took.as_millis()
        ));
        section(&mut text, "state writes", self.writes.iter().map(|(key, value)| match value {
            Some(value) => format!("set {} = {}", printable(key), shown(value, true).text()),
            None => format!("delete {}", printable(key)),
        }));
        section(&mut text, "publishes", self.publishes.iter().map(|p| {
            format!("{} ({}): {}", printable(&p.topic), printable(&p.content_type), shown(&p.data, is_json_media_type(&p.content_type)).text())
        }));
        section(&mut text, "guest log", self.lines.iter().map(|line| {
            format!("{:<5} {:<6} {}", line.level.as_str().to_ascii_lowercase(), line.source, printable(&line.message))
        }));
        text
    }

    fn json(&self) -> Value {
        let writes: Vec<Value> = self.writes.iter().map(|(key, value)| match value {
            Some(value) => shown(value, true).json(json!({"key": key})),
            None => json!({"key": key, "delete": true}),
        }).collect();
        let publishes: Vec<Value> = self.publishes.iter().map(|p| {
            shown(&p.data, is_json_media_type(&p.content_type)).json(json!({"topic": p.topic, "content_type": p.content_type}))
        }).collect();
        let lines: Vec<Value> = self.lines.iter().map(|line| {
            json!({"level": line.level.as_str().to_ascii_lowercase(), "source": line.source, "message": line.message})
        }).collect();
        let mut report = json!({
            "disposition": self.result.label(),
            "exit_code": exit_code(self.result),
            "event": {"id": self.event.id, "topic": self.event.topic, "attempt": self.attempt},
            "component": {"path": self.component.display().to_string(), "version": self.version},
            "duration_ms": self.took.as_secs_f64() * 1000.0,
            "state_writes": writes,
            "publishes": publishes,
            "logs": lines,
        });
        if let Some(reason) = self.reason() {
            report["reason"] = reason.into();
        }
        if let Some(limit) = self.limit() {
            report["limit"] = limit.into();
        }
        report
    }
}

/// A titled list of lines, or "none".
fn section(text: &mut String, title: &str, items: impl Iterator<Item = String>) {
    let items: Vec<String> = items.collect();
    if items.is_empty() {
        text.push_str(&format!("{title}: none\n"));
        return;
    }
    text.push_str(&format!("{title} ({}):\n", items.len()));
    for item in items {
        text.push_str(&format!("  {item}\n"));
    }
}

/// A value or payload as the report shows it.
enum Shown {
    Json(Value),
    Text(String),
    Base64(String),
}

/// JSON (when `json` allows it and the bytes parse), else UTF-8 text, else base64.
fn shown(bytes: &[u8], json: bool) -> Shown {
    if json && let Ok(value) = serde_json::from_slice(bytes) {
        return Shown::Json(value);
    }
    match std::str::from_utf8(bytes) {
        Ok(text) => Shown::Text(text.to_owned()),
        Err(_) => {
            use base64::Engine;
            Shown::Base64(base64::engine::general_purpose::STANDARD.encode(bytes))
        }
    }
}

impl Shown {
    /// On one line, escaped.
    fn text(&self) -> String {
        match self {
            Shown::Json(value) => printable(&value.to_string()).into_owned(),
            Shown::Text(text) => printable(text).into_owned(),
            Shown::Base64(encoded) => format!("base64:{encoded}"),
        }
    }

    /// `entry` with a `json`, `text` or `base64` field added.
    fn json(self, mut entry: Value) -> Value {
        let (field, value) = match self {
            Shown::Json(value) => ("json", value),
            Shown::Text(text) => ("text", text.into()),
            Shown::Base64(encoded) => ("base64", encoded.into()),
        };
        entry[field] = value;
        entry
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_arguments_split_at_the_first_equals_sign() {
        assert_eq!(parse_state_arg("count:k=41").unwrap(), ("count:k".into(), "41".into()));
        assert_eq!(parse_state_arg("k=a=b").unwrap(), ("k".into(), "a=b".into()));
        assert_eq!(parse_state_arg("k=").unwrap(), ("k".into(), String::new()));
        assert!(parse_state_arg("no-value").unwrap_err().contains("KEY=VALUE"));
        assert!(parse_state_arg("=v").unwrap_err().contains("empty"));
    }

    #[test]
    fn data_is_wrapped_and_a_cloudevent_is_taken_as_it_is() {
        let wrapped = event_from(br#"{"id": 7}"#, "test", None).unwrap();
        assert_eq!((wrapped.ty.as_str(), wrapped.source.as_str(), wrapped.topic.as_str()), ("com.dapr.event.sent", "wasmsub/invoke", DEFAULT_TOPIC));
        assert_eq!(wrapped.data_json(), Some(json!({"id": 7})));
        assert_ne!(wrapped.id, event_from(br#"{"id": 7}"#, "test", None).unwrap().id);

        let structured = br#"{"specversion":"1.0","id":"e-1","source":"s","type":"t","topic":"orders","data":[1]}"#;
        let event = event_from(structured, "test", None).unwrap();
        assert_eq!((event.id.as_str(), event.topic.as_str()), ("e-1", "orders"));
        assert_eq!(event_from(structured, "test", Some("other")).unwrap().topic, "other");

        let malformed = event_from(br#"{"specversion":"1.0","type":"t"}"#, "e.json", None).unwrap_err();
        assert!(format!("{malformed:#}").contains("e.json") && format!("{malformed:#}").contains("`id`"), "{malformed:#}");
        assert!(format!("{:#}", event_from(b"not json", "e.json", None).unwrap_err()).contains("not JSON"));
    }

    #[test]
    fn payloads_show_as_json_text_or_base64() {
        assert_eq!(shown(b"{\"a\": 1}", true).text(), r#"{"a":1}"#);
        assert_eq!(shown(b"{\"a\": 1}", false).text(), r#"{"a": 1}"#);
        assert_eq!(shown(b"line\nbreak", true).text(), r"line\nbreak");
        assert_eq!(shown(&[0xff, 0x00], true).text(), "base64:/wA=");
        assert_eq!(shown(b"42", true).json(json!({"key": "k"})), json!({"key": "k", "json": 42}));
    }
}
