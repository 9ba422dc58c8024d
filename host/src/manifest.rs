//! The manifest (`wasmsub.toml`): tenants, their limits, and their handlers.
//!
//! Parsing is strict: an unknown field or a bad value is refused with the
//! file, the field and why, because a typo in a limit silently falling back
//! to a default is how a sandbox gets looser than its operator thinks.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use serde::Deserialize;

use crate::pipeline::dedupe::IdMode;
use crate::pipeline::retry::RetryPolicy;

/// Seven days: long enough to outlast any broker's redelivery of the same
/// message (Dapr's Redis and Kafka components redeliver within minutes), short
/// enough that the store does not grow without bound.
pub const DEFAULT_PROCESSED_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// Added to an event's worst-case processing time to form its lease, so a
/// slow disk or a busy host does not let a live claim expire under it.
pub const DEFAULT_LEASE_MARGIN: Duration = Duration::from_secs(30);
/// Linear memory a guest instance may grow to. Handlers of JSON events rarely
/// need more than a few MiB; 64 MiB leaves room while bounding a tenant.
pub const DEFAULT_MEMORY_MIB: u32 = 64;
/// CPU time one attempt may take before it is interrupted (epoch deadline).
pub const DEFAULT_CPU_TIME: Duration = Duration::from_secs(1);
/// Wall-clock time one attempt may take, waiting included. A handler of an
/// event has no business sleeping; 5 s leaves room for a slow state read
/// through a sidecar while bounding how long a sleeper holds its slot.
pub const DEFAULT_WALL_TIME: Duration = Duration::from_secs(5);
/// Largest event body accepted, the same bound as Dapr's default HTTP body.
pub const DEFAULT_MAX_PAYLOAD_BYTES: usize = 4 * 1024 * 1024;
/// Events of one tenant handled at once; the rest wait their turn.
pub const DEFAULT_MAX_CONCURRENCY: u32 = 16;
/// Log bytes one attempt may write (log lines, stdout, stderr together).
pub const DEFAULT_MAX_LOG_BYTES: usize = 64 * 1024;
/// Table elements an instance may have (function-pointer tables of Rust
/// guests hold a few hundred to a few thousand).
pub const DEFAULT_TABLE_ELEMENTS: u32 = 20_000;
/// Largest component a tenant may deploy: Rust handlers are 50-500 KB, a
/// Python or JavaScript one with its interpreter some tens of MB.
pub const DEFAULT_MAX_COMPONENT_BYTES: usize = 64 * 1024 * 1024;
/// Publishes per second a tenant's handlers may make: far above what an
/// event-driven handler needs (a few per event), low enough that a handler
/// publishing to its own topic cannot take the host over.
pub const DEFAULT_MAX_PUBLISH_RATE: u32 = 1000;
/// Messages a tenant may have waiting on the embedded queue: a tenth of the
/// queue's default bound, so one tenant's backlog leaves room for the others.
pub const DEFAULT_MAX_QUEUED_PUBLISHES: usize = 1000;
/// State a tenant may hold: 64 MiB of keys and values.
pub const DEFAULT_MAX_STATE_BYTES: u64 = 64 << 20;
/// State keys a tenant may hold.
pub const DEFAULT_MAX_STATE_KEYS: u64 = 100_000;
/// The pub/sub component name Dapr's quick starts use.
pub const DEFAULT_PUBSUB: &str = "pubsub";

/// The whole manifest.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    #[serde(default)]
    /// How events are remembered and guarded.
    pub idempotency: IdempotencyConfig,
    #[serde(default, rename = "tenant")]
    /// The tenants (`[[tenant]]` tables).
    pub tenants: Vec<TenantConfig>,
}

/// How long the host remembers events and guards them while in flight.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IdempotencyConfig {
    /// How long a processed (or dead-lettered) event is remembered.
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
    /// Slack added to an event's lease (see [`DEFAULT_LEASE_MARGIN`]).
    #[serde(with = "humantime_serde")]
    pub lease_margin: Duration,
}

impl Default for IdempotencyConfig {
    fn default() -> Self {
        Self { ttl: DEFAULT_PROCESSED_TTL, lease_margin: DEFAULT_LEASE_MARGIN }
    }
}

/// One tenant: a namespace for state, a set of limits, and its handlers.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    /// The tenant's name: routes, logs and keys carry it.
    pub name: String,
    #[serde(default)]
    /// What its handlers may consume.
    pub limits: TenantLimits,
    /// What the tenant's handlers may reach beyond the handler world.
    #[serde(default)]
    pub capabilities: Capabilities,
    /// Where the tenant's state lives in the store; default: the tenant's name.
    pub state_namespace: Option<String>,
    #[serde(rename = "handler")]
    /// Its handlers (`[[tenant.handler]]` tables).
    pub handlers: Vec<HandlerConfig>,
}

/// What one tenant's handlers may consume.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TenantLimits {
    /// Linear memory per instance, in MiB.
    pub memory_mib: u32,
    /// Time an attempt may spend running guest code (the epoch deadline).
    #[serde(with = "humantime_serde")]
    pub cpu_time: Duration,
    /// Time an attempt may take in all, blocked in WASI calls (sleeping,
    /// polling) included. At least `cpu_time`.
    #[serde(with = "humantime_serde")]
    pub wall_time: Duration,
    /// Largest event body accepted, in bytes.
    pub max_payload_bytes: usize,
    /// Events handled at once across the tenant's handlers.
    pub max_concurrency: u32,
    /// Topics the tenant's handlers may publish to. Empty (the default)
    /// means none; `["*"]` means any.
    pub publish_topics: Vec<String>,
    /// Log bytes per attempt (log lines and captured stdout/stderr).
    pub max_log_bytes: usize,
    /// Table elements per instance.
    pub table_elements: u32,
    /// Largest component a deploy may upload for the tenant, in bytes.
    pub max_component_bytes: usize,
    /// Optional fuel per attempt (wasm instructions, roughly): a
    /// deterministic bound, where `cpu_time` is a wall-clock one.
    pub fuel: Option<u64>,
    /// Messages per second the tenant's handlers may publish (a burst of
    /// one second's worth is allowed). Past it, events are deferred.
    pub max_publish_rate: u32,
    /// Messages the tenant's handlers may have waiting on the embedded
    /// queue at once. Past it, events are deferred until the backlog drains.
    pub max_queued_publishes: usize,
    /// Bytes of state (keys and values) the tenant may hold.
    pub max_state_bytes: u64,
    /// State keys the tenant may hold.
    pub max_state_keys: u64,
}

/// Capabilities beyond the handler world. Everything is denied unless
/// granted here; clocks and random numbers are always available.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Capabilities {
    /// Environment variables the guest sees (none by default).
    pub env: BTreeMap<String, String>,
    /// Outbound TCP/UDP and name lookup (off by default).
    pub network: bool,
    /// Host directories the guest may open (none by default).
    pub dirs: Vec<DirGrant>,
}

/// One directory granted to a tenant's handlers.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DirGrant {
    /// The directory on the host.
    pub host: PathBuf,
    /// Where the guest sees it, e.g. `/data`.
    pub guest: String,
    /// Read-only unless set.
    #[serde(default)]
    pub writable: bool,
}

impl TenantConfig {
    /// Where the tenant's state lives: `state_namespace`, or its name.
    pub fn state_namespace(&self) -> &str {
        self.state_namespace.as_deref().unwrap_or(&self.name)
    }
}

impl Default for TenantLimits {
    fn default() -> Self {
        Self {
            memory_mib: DEFAULT_MEMORY_MIB,
            cpu_time: DEFAULT_CPU_TIME,
            wall_time: DEFAULT_WALL_TIME,
            max_payload_bytes: DEFAULT_MAX_PAYLOAD_BYTES,
            max_concurrency: DEFAULT_MAX_CONCURRENCY,
            publish_topics: Vec::new(),
            max_log_bytes: DEFAULT_MAX_LOG_BYTES,
            table_elements: DEFAULT_TABLE_ELEMENTS,
            max_component_bytes: DEFAULT_MAX_COMPONENT_BYTES,
            fuel: None,
            max_publish_rate: DEFAULT_MAX_PUBLISH_RATE,
            max_queued_publishes: DEFAULT_MAX_QUEUED_PUBLISHES,
            max_state_bytes: DEFAULT_MAX_STATE_BYTES,
            max_state_keys: DEFAULT_MAX_STATE_KEYS,
        }
    }
}

/// One handler: a component bound to a topic.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HandlerConfig {
    /// The handler's name within its tenant.
    pub name: String,
    /// Path of the `.wasm` component, relative to the manifest's directory.
    pub component: PathBuf,
    #[serde(default = "default_pubsub")]
    /// The Dapr pub/sub component it subscribes through.
    pub pubsub: String,
    /// The topic it handles.
    pub topic: String,
    /// The HTTP route Dapr delivers to; default `/events/{tenant}/{handler}`.
    pub route: Option<String>,
    /// Where failed events go; default `{topic}-dead-letter`.
    pub dead_letter_topic: Option<String>,
    #[serde(default)]
    /// Which id makes two deliveries the same event.
    pub id_mode: IdMode,
    #[serde(default)]
    /// Attempts and waits between them.
    pub retry: RetryPolicy,
    /// Ask Dapr to deliver payloads without a CloudEvent envelope (Dapr's
    /// `rawPayload`); the host wraps them, with a content-derived id.
    #[serde(default)]
    pub raw_payload: bool,
    /// Ask Dapr for bulk deliveries (many events per request).
    pub bulk: Option<BulkConfig>,
    /// Only events of this CloudEvent `type` (a Dapr routing rule,
    /// `event.type == "..."`); handlers without one on the same topic get
    /// the other events.
    pub match_type: Option<String>,
}

/// Dapr's bulk subscribe settings for one handler.
///
/// Dapr sends a request once it holds `max_messages` events or
/// `max_await_ms` has passed; a component that hands over at most its
/// `concurrency` messages at once (Redis Streams) never fills a larger
/// request, so each one waits the full `max_await_ms` (README, "Sizing bulk
/// deliveries").
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BulkConfig {
    /// Events per request at most.
    pub max_messages: u32,
    /// How long Dapr waits to fill a request, in milliseconds.
    pub max_await_ms: u32,
}

impl Default for BulkConfig {
    /// Dapr's own defaults.
    fn default() -> Self {
        Self { max_messages: 100, max_await_ms: 1000 }
    }
}

fn default_pubsub() -> String {
    DEFAULT_PUBSUB.to_owned()
}

impl HandlerConfig {
    /// A handler with every optional setting at its default (handlers
    /// created at runtime, which the manifest does not describe).
    pub fn new(name: &str, component: PathBuf, pubsub: &str, topic: &str) -> Self {
        Self {
            name: name.to_owned(),
            component,
            pubsub: pubsub.to_owned(),
            topic: topic.to_owned(),
            route: None,
            dead_letter_topic: None,
            id_mode: IdMode::default(),
            retry: RetryPolicy::default(),
            raw_payload: false,
            bulk: None,
            match_type: None,
        }
    }

    /// The app route Dapr delivers its events to.
    pub fn route(&self, tenant: &str) -> String {
        self.route.clone().unwrap_or_else(|| format!("/events/{tenant}/{}", self.name))
    }

    /// Where its failed events go.
    pub fn dead_letter_topic(&self) -> String {
        self.dead_letter_topic.clone().unwrap_or_else(|| format!("{}-dead-letter", self.topic))
    }
}

impl Manifest {
    /// Reads, parses and validates a manifest file. Component paths come back
    /// resolved against the manifest's directory.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading manifest {}", path.display()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::parse(&text, base).with_context(|| format!("invalid manifest {}", path.display()))
    }

    /// Parses and validates manifest text; `base` resolves component paths.
    pub fn parse(text: &str, base: &Path) -> anyhow::Result<Self> {
        let mut manifest: Manifest = toml::from_str(text)?;
        manifest.validate()?;
        for handler in manifest.tenants.iter_mut().flat_map(|t| t.handlers.iter_mut()) {
            if handler.component.is_relative() {
                handler.component = base.join(&handler.component);
            }
        }
        Ok(manifest)
    }

    fn validate(&self) -> anyhow::Result<()> {
        if self.tenants.is_empty() {
            bail!("no [[tenant]] is defined: the host would have nothing to run");
        }
        if self.idempotency.ttl.is_zero() {
            // A done record that expires at once dedupes nothing.
            bail!("idempotency.ttl must be longer than zero: it is how long a processed event is remembered against redeliveries");
        }
        let mut tenant_names = HashSet::new();
        let mut namespaces = HashSet::new();
        let mut routes = HashSet::new();
        for tenant in &self.tenants {
            check_name("tenant name", &tenant.name)?;
            if !tenant_names.insert(&tenant.name) {
                bail!("tenant `{}` is defined twice", tenant.name);
            }
            check_name("state_namespace", tenant.state_namespace()).with_context(|| format!("tenant `{}`", tenant.name))?;
            if !namespaces.insert(tenant.state_namespace()) {
                bail!("tenant `{}` shares state_namespace `{}` with another tenant", tenant.name, tenant.state_namespace());
            }
            for dir in &tenant.capabilities.dirs {
                if !dir.host.is_dir() {
                    bail!("tenant `{}` capabilities.dirs: {} is not a directory", tenant.name, dir.host.display());
                }
            }
            validate_limits(&tenant.limits).with_context(|| format!("tenant `{}` limits", tenant.name))?;
            if tenant.handlers.is_empty() {
                bail!("tenant `{}` has no [[tenant.handler]]", tenant.name);
            }
            let mut handler_names = HashSet::new();
            for handler in &tenant.handlers {
                let context = || format!("tenant `{}` handler `{}`", tenant.name, handler.name);
                check_name("handler name", &handler.name).with_context(context)?;
                if !handler_names.insert(&handler.name) {
                    bail!("tenant `{}` defines handler `{}` twice", tenant.name, handler.name);
                }
                validate_handler(handler).with_context(context)?;
                let route = handler.route(&tenant.name);
                if !routes.insert(route.clone()) {
                    bail!("route `{route}` is used by two handlers ({})", context());
                }
            }
        }
        check_topic_groups(self)
    }
}

/// Dapr delivers a topic to an app through one subscription: the handlers
/// sharing a (pubsub, topic) must agree on what that subscription asks for.
fn check_topic_groups(manifest: &Manifest) -> anyhow::Result<()> {
    let mut groups: std::collections::HashMap<(&str, &str), Vec<(&str, &HandlerConfig)>> = Default::default();
    for tenant in &manifest.tenants {
        for handler in &tenant.handlers {
            groups.entry((&handler.pubsub, &handler.topic)).or_default().push((&tenant.name, handler));
        }
    }
    for ((pubsub, topic), handlers) in groups {
        let (first_tenant, first) = handlers[0];
        for (tenant, handler) in &handlers[1..] {
            if handler.raw_payload != first.raw_payload || handler.bulk != first.bulk {
                bail!(
                    "handlers on topic `{topic}` of pubsub `{pubsub}` disagree on raw_payload or bulk \
                     (`{first_tenant}/{}` and `{tenant}/{}`): Dapr gives an app one subscription per topic",
                    first.name, handler.name
                );
            }
        }
        let mut types = HashSet::new();
        for (tenant, handler) in &handlers {
            if let Some(ty) = &handler.match_type
                && !types.insert(ty.as_str())
            {
                bail!("two handlers on topic `{topic}` match type `{ty}` (one is `{tenant}/{}`): a rule routes to one", handler.name);
            }
        }
    }
    Ok(())
}

fn validate_limits(limits: &TenantLimits) -> anyhow::Result<()> {
    if limits.memory_mib == 0 || limits.memory_mib > 4096 {
        bail!("memory_mib must be between 1 and 4096, not {}", limits.memory_mib);
    }
    if limits.cpu_time < Duration::from_millis(10) {
        bail!("cpu_time must be at least 10ms (the interruption tick), not {:?}", limits.cpu_time);
    }
    if limits.wall_time < limits.cpu_time {
        bail!(
            "wall_time ({}) must be at least cpu_time ({}): running is part of the wall-clock time",
            humantime::format_duration(limits.wall_time),
            humantime::format_duration(limits.cpu_time)
        );
    }
    if limits.max_payload_bytes == 0 {
        bail!("max_payload_bytes must be positive");
    }
    if limits.max_concurrency == 0 {
        bail!("max_concurrency must be positive");
    }
    if limits.fuel == Some(0) {
        bail!("fuel must be positive when set");
    }
    if limits.max_publish_rate == 0 {
        bail!("max_publish_rate must be positive (publish_topics = [] is how a tenant publishes nothing)");
    }
    for topic in &limits.publish_topics {
        if topic != "*" {
            check_topic("publish_topics entry", topic)?;
        }
    }
    Ok(())
}

/// The checks a handler created at runtime (not in the manifest) passes.
pub fn validate_runtime_handler(handler: &HandlerConfig) -> anyhow::Result<()> {
    check_name("handler name", &handler.name)?;
    validate_handler(handler)
}

fn validate_handler(handler: &HandlerConfig) -> anyhow::Result<()> {
    if handler.component.as_os_str().is_empty() {
        bail!("component path is empty");
    }
    check_topic("topic", &handler.topic)?;
    check_topic("pubsub", &handler.pubsub)?;
    if let Some(route) = &handler.route
        && (!route.starts_with('/') || route.contains(char::is_whitespace))
    {
        bail!("route `{route}` must start with `/` and contain no spaces");
    }
    let dead_letter = handler.dead_letter_topic();
    check_topic("dead_letter_topic", &dead_letter)?;
    if dead_letter == handler.topic {
        bail!("dead_letter_topic is the handler's own topic: failed events would loop back");
    }
    handler.retry.validate().map_err(anyhow::Error::msg)
}

/// Names appear in routes, logs and store keys: keep them to a safe alphabet.
fn check_name(what: &str, name: &str) -> anyhow::Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    if !ok {
        bail!("{what} `{name}` must be 1 to 64 characters of a-z, 0-9, `-` and `_`");
    }
    Ok(())
}

/// The one topic-name rule, for topics in the manifest, topics a guest
/// publishes to, and topics of the publish API. Topic names go into URLs,
/// logs and broker names (Kafka allows `[a-zA-Z0-9._-]`): 1 to 255
/// printable ASCII characters, none of `/ ? # %` or whitespace.
pub fn check_topic_name(topic: &str) -> Result<(), String> {
    let ok = !topic.is_empty()
        && topic.len() <= 255
        && topic.bytes().all(|b| b.is_ascii_graphic() && !b"/?#%".contains(&b));
    if !ok {
        let shown: String = topic.escape_debug().take(80).collect();
        return Err(format!("topic `{shown}` must be 1 to 255 printable ASCII characters without whitespace, `/`, `?`, `#` or `%`"));
    }
    Ok(())
}

fn check_topic(what: &str, topic: &str) -> anyhow::Result<()> {
    check_topic_name(topic).map_err(|why| anyhow::anyhow!("{what}: {why}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
        [idempotency]
        ttl = "1h"

        [[tenant]]
        name = "todo"
        limits = { memory_mib = 32, cpu_time = "250ms" }

        [[tenant.handler]]
        name = "task-created"
        component = "guests/task_created.wasm"
        topic = "task-created"
        id_mode = "content"
        retry = { max_attempts = 5, min = "100ms", max = "1s" }
    "#;

    fn error_of(text: &str) -> String {
        format!("{:#}", Manifest::parse(text, Path::new("/m")).unwrap_err())
    }

    #[test]
    fn parses_a_good_manifest_with_defaults() {
        let manifest = Manifest::parse(GOOD, Path::new("/srv/app")).unwrap();
        assert_eq!(manifest.idempotency.ttl, Duration::from_secs(3600));
        assert_eq!(manifest.idempotency.lease_margin, DEFAULT_LEASE_MARGIN);
        let tenant = &manifest.tenants[0];
        assert_eq!(tenant.limits.memory_mib, 32);
        assert_eq!(tenant.limits.max_concurrency, DEFAULT_MAX_CONCURRENCY);
        let handler = &tenant.handlers[0];
        assert_eq!(handler.component, Path::new("/srv/app/guests/task_created.wasm"));
        assert_eq!(handler.pubsub, "pubsub");
        assert_eq!(handler.id_mode, IdMode::Content);
        assert_eq!(handler.retry.max_attempts, 5);
        assert_eq!(handler.retry.multiplier, 1.0);
        assert_eq!(handler.route("todo"), "/events/todo/task-created");
        assert_eq!(handler.dead_letter_topic(), "task-created-dead-letter");
    }

    #[test]
    fn unknown_fields_are_refused_with_their_name() {
        let err = error_of(&GOOD.replace("id_mode", "idmode"));
        assert!(err.contains("unknown field `idmode`"), "{err}");
        let err = error_of(&GOOD.replace("memory_mib", "memory"));
        assert!(err.contains("unknown field `memory`"), "{err}");
    }

    #[test]
    fn bad_values_say_which_field_and_why() {
        let err = error_of(&GOOD.replace(r#"min = "100ms""#, r#"min = "5s""#));
        assert!(err.contains("tenant `todo` handler `task-created`") && err.contains("retry.min (5s) is greater"), "{err}");
        let err = error_of(&GOOD.replace(r#"id_mode = "content""#, r#"id_mode = "random""#));
        assert!(err.contains("unknown variant `random`"), "{err}");
        let err = error_of(&GOOD.replace(r#"cpu_time = "250ms""#, r#"cpu_time = "1ms""#));
        assert!(err.contains("tenant `todo` limits") && err.contains("cpu_time"), "{err}");
        let err = error_of(&GOOD.replace(r#"name = "todo""#, r#"name = "To Do""#));
        assert!(err.contains("tenant name `To Do`"), "{err}");
        let err = error_of(&GOOD.replace(r#"topic = "task-created""#, "topic = \"t\"\ndead_letter_topic = \"t\""));
        assert!(err.contains("loop back"), "{err}");
        let err = error_of(&GOOD.replace(r#"ttl = "1h""#, r#"ttl = "soon""#));
        assert!(err.contains("ttl"), "{err}");
        let err = error_of(&GOOD.replace(r#"ttl = "1h""#, r#"ttl = "0s""#));
        assert!(err.contains("idempotency.ttl must be longer than zero"), "{err}");
    }

    #[test]
    fn duplicates_and_empty_manifests_are_refused() {
        assert!(error_of("").contains("no [[tenant]]"));
        let twice = format!("{GOOD}\n[[tenant.handler]]\nname = \"task-created\"\ncomponent = \"x.wasm\"\ntopic = \"other\"\n");
        assert!(error_of(&twice).contains("defines handler `task-created` twice"));
    }

    #[test]
    fn load_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wasmsub.toml");
        std::fs::write(&path, "[[tenant]]\nname = 3\n").unwrap();
        let err = format!("{:#}", Manifest::load(&path).unwrap_err());
        assert!(err.contains("wasmsub.toml") && err.contains("name"), "{err}");
        let missing = format!("{:#}", Manifest::load(&dir.path().join("nope.toml")).unwrap_err());
        assert!(missing.contains("reading manifest") && missing.contains("nope.toml"), "{missing}");
    }
}
