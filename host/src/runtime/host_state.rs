//! What one attempt's store holds, and the host functions the guest imports
//! (`log`, `state`, `publisher`). Each attempt gets a fresh `AttemptState`:
//! no buffer, counter or WASI resource outlives the attempt.

use std::sync::{Arc, Mutex};

use wasmtime::component::ResourceTable;
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{FsPerms, WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use super::bindings::{GuestLogLevel, log, publisher, state, types};
use super::limits::GuestLimiter;
use crate::manifest::{Capabilities, check_topic_name};
use crate::text::printable;
use crate::pipeline::effects::{self, Effects, PendingPublish};
use crate::store::DeliveryStore;

/// Longest single log line kept; longer lines are cut.
pub const MAX_LOG_LINE_BYTES: usize = 4 * 1024;
/// Guest stdout and stderr kept per attempt, each; writes beyond it fail in
/// the guest. Stderr also carries a panic's message into the trap reason.
pub const MAX_STDIO_BYTES: usize = 16 * 1024;

/// Who the attempt runs for, and what it may touch.
#[derive(Clone)]
pub struct AttemptContext {
    /// The tenant.
    pub tenant: Arc<str>,
    /// The tenant's state namespace in the store.
    pub namespace: Arc<str>,
    /// The handler.
    pub handler: Arc<str>,
    /// The version's short hash, for logs.
    pub version: Arc<str>,
    /// The event's id, for logs.
    pub event_id: Arc<str>,
    /// Where committed state is read from.
    pub store: Arc<dyn DeliveryStore>,
    /// Topics the tenant may publish to (`*` for any).
    pub publish_topics: Arc<[String]>,
    /// WASI capabilities granted beyond the default-deny.
    pub capabilities: Arc<Capabilities>,
    /// Linear memory limit, in bytes.
    pub memory_bytes: usize,
    /// Table size limit, in elements.
    pub table_elements: usize,
    /// Log bytes per attempt, log lines and stdio together.
    pub max_log_bytes: usize,
    /// Fuel per attempt, if the tenant meters it.
    pub fuel: Option<u64>,
    /// Time the guest may spend running (epoch ticks while in wasm).
    pub cpu_time: std::time::Duration,
    /// Time the attempt may take in all, blocked in WASI calls included.
    pub wall_time: std::time::Duration,
    /// State the tenant may hold: bytes of keys and values, and keys.
    pub max_state_bytes: u64,
    /// See `max_state_bytes`.
    pub max_state_keys: u64,
    /// Where the guest's log lines go instead of the host's log (target
    /// `wasmsub::guest`) when set: `wasmsub invoke` prints them in its report.
    pub guest_log: Option<GuestLog>,
}

/// A sink for the lines a guest writes (see [`AttemptContext::guest_log`]).
pub type GuestLog = Arc<Mutex<Vec<GuestLine>>>;

/// One line a guest wrote, as it wrote it (cut like the host's log lines,
/// not escaped: escape it before it reaches a terminal).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestLine {
    /// The level `log.write` was called with; `INFO` for stdout and stderr.
    pub level: tracing::Level,
    /// `log` (the handler world's `log.write`), `stdout` or `stderr`.
    pub source: &'static str,
    /// The text.
    pub message: String,
}

impl AttemptContext {
    /// Hands a guest's line to [`Self::guest_log`]; false if there is none
    /// (the caller logs it).
    pub(super) fn capture(&self, level: tracing::Level, source: &'static str, message: &str) -> bool {
        let Some(sink) = &self.guest_log else { return false };
        let line = GuestLine { level, source, message: message.to_owned() };
        sink.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(line);
        true
    }
}

pub struct AttemptState {
    pub(super) ctx: AttemptContext,
    pub(super) effects: Effects,
    pub(super) limits: GuestLimiter,
    /// Set when a host call failed for a reason that is the host's, not the
    /// guest's (the store was down): the attempt is then not held against
    /// the guest's retry budget.
    pub(super) infrastructure_error: Option<String>,
    pub(super) stdout: MemoryOutputPipe,
    pub(super) stderr: MemoryOutputPipe,
    pub(super) log_bytes: usize,
    pub(super) log_lines_dropped: u32,
    /// How long making the instance took, once it is made.
    pub(super) instantiated_in: Option<std::time::Duration>,
    /// How this attempt's buffered writes change the tenant's state usage.
    state_delta: (i64, i64),
    wasi: WasiCtx,
    table: ResourceTable,
}

impl AttemptState {
    pub fn new(ctx: AttemptContext) -> Self {
        let stdout = MemoryOutputPipe::new(MAX_STDIO_BYTES);
        let stderr = MemoryOutputPipe::new(MAX_STDIO_BYTES);
        let wasi = wasi_context(&ctx.capabilities, &stdout, &stderr);
        let limits = GuestLimiter::new(ctx.memory_bytes, ctx.table_elements);
        Self {
            ctx,
            effects: Effects::default(),
            limits,
            infrastructure_error: None,
            stdout,
            stderr,
            log_bytes: 0,
            log_lines_dropped: 0,
            instantiated_in: None,
            state_delta: (0, 0),
            wasi,
            table: ResourceTable::new(),
        }
    }

    fn check_publish_topic(&self, topic: &str) -> Result<(), String> {
        check_topic_name(topic)?;
        let allowed = &self.ctx.publish_topics;
        if allowed.iter().any(|t| t == "*" || t == topic) {
            return Ok(());
        }
        Err(format!("tenant `{}` may not publish to topic `{topic}` (allowed: {:?})", self.ctx.tenant, allowed))
    }

    /// Charges `bytes` to the attempt's log budget; false when spent.
    pub(super) fn charge_log(&mut self, bytes: usize) -> bool {
        if self.log_bytes + bytes > self.ctx.max_log_bytes {
            self.log_lines_dropped += 1;
            return false;
        }
        self.log_bytes += bytes;
        true
    }
}

/// WASI for one attempt: default-deny. No preopened directories, no
/// environment, no arguments, no network, empty stdin, stdout and stderr
/// captured (bounded). Clocks and random numbers stay available. A tenant's
/// `capabilities` grant exceptions.
fn wasi_context(capabilities: &Capabilities, stdout: &MemoryOutputPipe, stderr: &MemoryOutputPipe) -> WasiCtx {
    let mut builder = WasiCtxBuilder::new();
    builder.stdout(stdout.clone()).stderr(stderr.clone());
    for (name, value) in &capabilities.env {
        builder.env(name, value);
    }
    if capabilities.network {
        builder.inherit_network().allow_ip_name_lookup(true);
    }
    for dir in &capabilities.dirs {
        let perms = if dir.writable { FsPerms::ReadWrite } else { FsPerms::ReadOnly };
        if let Err(error) = builder.preopened_dir(&dir.host, &dir.guest, perms) {
            // Checked at start-up; a directory removed since is not granted.
            tracing::warn!(dir = %dir.host.display(), %error, "granted directory cannot be opened; not granted");
        }
    }
    builder.build()
}

impl WasiView for AttemptState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

impl types::Host for AttemptState {}

impl log::Host for AttemptState {
    async fn write(&mut self, level: GuestLogLevel, message: String) {
        if !self.charge_log(message.len().min(MAX_LOG_LINE_BYTES)) {
            return;
        }
        let mut line = message;
        if line.len() > MAX_LOG_LINE_BYTES {
            let mut cut = MAX_LOG_LINE_BYTES;
            while !line.is_char_boundary(cut) {
                cut -= 1;
            }
            line.truncate(cut);
            line.push_str(" [cut]");
        }
        let ctx = &self.ctx;
        let as_tracing = match level {
            GuestLogLevel::Trace => tracing::Level::TRACE,
            GuestLogLevel::Debug => tracing::Level::DEBUG,
            GuestLogLevel::Info => tracing::Level::INFO,
            GuestLogLevel::Warn => tracing::Level::WARN,
            GuestLogLevel::Error => tracing::Level::ERROR,
        };
        if ctx.capture(as_tracing, "log", &line) {
            return;
        }
        macro_rules! guest_log {
            ($level:expr) => {
                tracing::event!(target: "wasmsub::guest", $level,
                    tenant = %ctx.tenant, handler = %ctx.handler, handler.version = %ctx.version,
                    messaging.message.id = %printable(&ctx.event_id), "{}", printable(&line))
            };
        }
        match level {
            GuestLogLevel::Trace => guest_log!(tracing::Level::TRACE),
            GuestLogLevel::Debug => guest_log!(tracing::Level::DEBUG),
            GuestLogLevel::Info => guest_log!(tracing::Level::INFO),
            GuestLogLevel::Warn => guest_log!(tracing::Level::WARN),
            GuestLogLevel::Error => guest_log!(tracing::Level::ERROR),
        }
    }
}

impl state::Host for AttemptState {
    async fn get(&mut self, key: String) -> Result<Option<Vec<u8>>, String> {
        effects::check_key(&key)?;
        if let Some(buffered) = self.effects.buffered_read(&key) {
            return Ok(buffered.map(<[u8]>::to_vec));
        }
        let ctx = &self.ctx;
        match ctx.store.read_state(&ctx.namespace, &key).await {
            Ok(read) => {
                self.effects.record_read(&key, read.version);
                Ok(read.value)
            }
            Err(error) => {
                let reason = format!("state store unavailable: {error}");
                self.infrastructure_error = Some(reason.clone());
                Err(reason)
            }
        }
    }

    async fn set(&mut self, key: String, value: Vec<u8>) -> Result<(), String> {
        effects::check_key(&key)?;
        let delta = self.quota_checked(&key, Some(value.len())).await?;
        self.effects.set(key, value)?;
        self.state_delta = delta;
        Ok(())
    }

    async fn delete(&mut self, key: String) -> Result<(), String> {
        effects::check_key(&key)?;
        let delta = self.quota_checked(&key, None).await?;
        self.effects.delete(key)?;
        self.state_delta = delta;
        Ok(())
    }
}

impl AttemptState {
    /// The attempt's state delta if `key` becomes `new` bytes (or is
    /// deleted), refused when the tenant would hold more than its quota.
    /// Stores that do not count usage (Dapr's) are not held to one.
    async fn quota_checked(&mut self, key: &str, new: Option<usize>) -> Result<(i64, i64), String> {
        let Some(usage) = self.ctx.store.state_usage(&self.ctx.namespace) else { return Ok(self.state_delta) };
        let old = match self.effects.buffered_read(key) {
            Some(buffered) => buffered.map(<[u8]>::len),
            None => match self.ctx.store.get_state(&self.ctx.namespace, key).await {
                Ok(value) => value.map(|v| v.len()),
                Err(error) => {
                    let reason = format!("state store unavailable: {error}");
                    self.infrastructure_error = Some(reason.clone());
                    return Err(reason);
                }
            },
        };
        let size = |len: Option<usize>| len.map_or(0, |l| (key.len() + l) as i64);
        let delta = (
            self.state_delta.0 + size(new) - size(old),
            self.state_delta.1 + i64::from(new.is_some()) - i64::from(old.is_some()),
        );
        let bytes = usage.bytes as i64 + delta.0;
        let keys = usage.keys as i64 + delta.1;
        // Limits above i64::MAX (no limit, in effect) must not wrap negative.
        let limit = |max: u64| i64::try_from(max).unwrap_or(i64::MAX);
        if delta.0 > self.state_delta.0 && bytes > limit(self.ctx.max_state_bytes) {
            return Err(format!("state quota: tenant `{}` would hold {bytes} bytes of state, over its max_state_bytes of {}", self.ctx.tenant, self.ctx.max_state_bytes));
        }
        if delta.1 > self.state_delta.1 && keys > limit(self.ctx.max_state_keys) {
            return Err(format!("state quota: tenant `{}` would hold {keys} state keys, over its max_state_keys of {}", self.ctx.tenant, self.ctx.max_state_keys));
        }
        Ok(delta)
    }
}

impl publisher::Host for AttemptState {
    async fn publish(&mut self, topic: String, data: Vec<u8>, content_type: String) -> Result<(), String> {
        self.check_publish_topic(&topic)?;
        if content_type.len() > 255 {
            return Err("content type is longer than 255 bytes".into());
        }
        self.effects.publish(PendingPublish { topic, data, content_type })
    }
}
