//! Running one attempt: a fresh store and instance, one call to `handle`,
//! and a verdict that keeps the failure classes apart (guest answer, guest
//! trap or limit, host infrastructure).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use wasmtime::{Engine, Store, Trap, UpdateDeadline};

use super::bindings::{Disposition, Event, Handler};
use super::component::HandlerComponent;
use super::engine::deadline_ticks;
use super::host_state::{AttemptContext, AttemptState};
use crate::pipeline::effects::Effects;
use super::limits::LimitHit;
use crate::text::printable;

/// A guest's `retry`/`drop` reason, and a trap's, is kept to this many bytes:
/// it travels in logs and dead-letter messages, and a guest must not be able
/// to make those large.
pub const MAX_REASON_BYTES: usize = 1024;

/// The result of one attempt, before the retry policy looks at it.
#[derive(Debug)]
pub enum AttemptResult {
    /// The guest answered `success`: its buffered effects, to commit.
    Succeeded(Effects),
    /// The guest asked to be retried.
    GuestRetry(String),
    /// The guest refused the event for good.
    GuestDrop(String),
    /// The guest trapped or hit a limit (CPU time, memory): retried within
    /// the budget like `GuestRetry`, with a reason naming what happened.
    Trapped {
        /// What happened, in words (with the guest's stderr).
        reason: String,
        /// The tenant limit that stopped it, if one did.
        limit: Option<StoppedBy>,
    },
    /// The host failed (store down, instance pool exhausted): not the
    /// guest's fault, so it does not use up an attempt.
    Infrastructure(String),
}

/// The tenant limit that stopped an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoppedBy {
    /// `cpu_time`: epoch ticks while running wasm.
    CpuTime,
    /// `wall_time`: the attempt's whole length, blocked calls included.
    WallTime,
    /// `memory_mib`.
    Memory,
    /// `table_elements`.
    Table,
    /// `fuel`.
    Fuel,
    /// The wasm stack.
    Stack,
}

impl StoppedBy {
    /// The limit's name, as the manifest spells it.
    pub fn label(self) -> &'static str {
        match self {
            StoppedBy::CpuTime => "cpu_time",
            StoppedBy::WallTime => "wall_time",
            StoppedBy::Memory => "memory",
            StoppedBy::Table => "table",
            StoppedBy::Fuel => "fuel",
            StoppedBy::Stack => "stack",
        }
    }
}

impl From<LimitHit> for StoppedBy {
    fn from(hit: LimitHit) -> Self {
        match hit {
            LimitHit::Memory { .. } => StoppedBy::Memory,
            LimitHit::Table { .. } => StoppedBy::Table,
        }
    }
}

impl AttemptResult {
    /// How the attempt ended, in one word (a metrics label).
    pub fn label(&self) -> &'static str {
        match self {
            AttemptResult::Succeeded(_) => "success",
            AttemptResult::GuestRetry(_) => "retry",
            AttemptResult::GuestDrop(_) => "drop",
            AttemptResult::Trapped { .. } => "trap",
            AttemptResult::Infrastructure(_) => "infrastructure",
        }
    }
}

/// A store whose instance is made and has not been called: made ahead of
/// its attempt (see [`super::ready`]), it serves exactly one attempt.
pub struct Prepared {
    store: Store<AttemptState>,
    handler: Handler,
}

/// A store for `ctx`: its data, WASI context and limiter.
fn new_store(engine: &Engine, ctx: AttemptContext) -> Store<AttemptState> {
    let mut store = Store::new(engine, AttemptState::new(ctx));
    store.limiter(|state| &mut state.limits);
    store
}

/// Arms the CPU-time and fuel limits of the store's context, counting from
/// now: each epoch tick the guest yields to the executor (so the
/// wall-clock timer can fire and others run); past its CPU-time ticks it
/// traps. Tenants without a fuel limit get all there is. `used_a_slice` is
/// set at the first tick: the guest computes for long (see
/// `Runtime::dispatch`).
fn arm_limits(store: &mut Store<AttemptState>, used_a_slice: Option<Arc<AtomicBool>>) {
    let (cpu_time, fuel) = (store.data().ctx.cpu_time, store.data().ctx.fuel);
    let cpu_ticks = deadline_ticks(cpu_time);
    let mut ticks_used = 0;
    store.set_epoch_deadline(1);
    store.epoch_deadline_callback(move |_| {
        if let Some(flag) = &used_a_slice {
            flag.store(true, Ordering::Relaxed);
        }
        ticks_used += 1;
        Ok(if ticks_used >= cpu_ticks { UpdateDeadline::Interrupt } else { UpdateDeadline::Yield(1) })
    });
    // Fails (harmlessly) when the engine does not meter fuel.
    let _ = store.set_fuel(fuel.unwrap_or(u64::MAX));
}

/// Makes an instance for `ctx` ahead of its attempt, held to the same
/// limits while the guest's start-up code runs. `None` if that failed or
/// took too long: the attempt then makes its own and reports why.
pub(super) async fn prepare(engine: &Engine, component: &HandlerComponent, ctx: AttemptContext, used_a_slice: Option<Arc<AtomicBool>>) -> Option<Prepared> {
    let wall_time = ctx.wall_time;
    let mut store = new_store(engine, ctx);
    arm_limits(&mut store, used_a_slice);
    let made = tokio::time::timeout(wall_time, component.pre.instantiate_async(&mut store)).await;
    match made {
        Ok(Ok(handler)) if store.data().limits.hit.is_none() => Some(Prepared { store, handler }),
        _ => None,
    }
}

/// Runs one attempt on a fresh instance: `ready`, made ahead for this
/// handler version and these limits, or one made here. The store is
/// returned with the result: dropping it returns the instance's memory to
/// the pool (resetting the pages it touched), which callers do after
/// passing the result on, so the answer does not wait for the clean-up.
pub async fn run_attempt(
    engine: &Engine,
    component: &HandlerComponent,
    ctx: AttemptContext,
    event: &Event,
    ready: Option<Prepared>,
    used_a_slice: Option<Arc<AtomicBool>>,
) -> (AttemptResult, Store<AttemptState>) {
    let (cpu_time, wall_time) = (ctx.cpu_time, ctx.wall_time);
    let (mut store, made) = match ready {
        Some(Prepared { mut store, handler }) => {
            // The per-event fields (event id, version label, store handle);
            // the limits and WASI context the store was built with are the
            // same (`ready::Fit`).
            store.data_mut().ctx = ctx;
            (store, Some(handler))
        }
        None => (new_store(engine, ctx), None),
    };
    arm_limits(&mut store, used_a_slice);

    let attempt = async {
        let handler = match made {
            Some(handler) => handler,
            None => {
                let instantiating = std::time::Instant::now();
                let handler = component.pre.instantiate_async(&mut store).await.map_err(Failure::Instantiate)?;
                store.data_mut().instantiated_in = Some(instantiating.elapsed());
                handler
            }
        };
        handler.call_handle(&mut store, event).await.map_err(Failure::Call)
    };
    let result = match tokio::time::timeout(wall_time, attempt).await {
        Ok(Ok(answer)) => verdict(store.data_mut(), Ok(answer), cpu_time),
        Ok(Err(Failure::Call(error))) => verdict(store.data_mut(), Err(error), cpu_time),
        Ok(Err(Failure::Instantiate(error))) => instantiate_failure(&store, error),
        Err(_) => {
            // Blocked in WASI (a sleep, a poll) or just slow: the attempt is
            // abandoned where it stands; its instance is dropped unused.
            let state = store.data_mut();
            let reason = with_stderr(format!("wall-clock limit {} exceeded", humantime::format_duration(wall_time)), state);
            forward_stdio(state);
            AttemptResult::Trapped { reason: cut(reason), limit: Some(StoppedBy::WallTime) }
        }
    };
    (result, store)
}

/// Where an attempt failed before it had an answer.
enum Failure {
    Instantiate(wasmtime::Error),
    Call(wasmtime::Error),
}

fn verdict(state: &mut AttemptState, answer: wasmtime::Result<Disposition>, cpu_time: Duration) -> AttemptResult {
    forward_stdio(state);
    if state.log_lines_dropped > 0 {
        tracing::warn!(tenant = %state.ctx.tenant, handler = %state.ctx.handler,
            messaging.message.id = %state.ctx.event_id, dropped = state.log_lines_dropped,
            "guest log lines over the per-attempt cap were dropped");
    }
    if let Some(reason) = state.infrastructure_error.take() {
        return AttemptResult::Infrastructure(reason);
    }
    match answer {
        Ok(Disposition::Success) => AttemptResult::Succeeded(std::mem::take(&mut state.effects)),
        Ok(Disposition::Retry(reason)) => AttemptResult::GuestRetry(cut(reason)),
        Ok(Disposition::Drop(reason)) => AttemptResult::GuestDrop(cut(reason)),
        Err(error) => {
            let (reason, limit) = trap_reason(&error, cpu_time, state);
            AttemptResult::Trapped { reason: cut(reason), limit }
        }
    }
}

/// Escapes `reason` (the guest wrote it; it goes to logs, dead letters and
/// terminals) and cuts it to [`MAX_REASON_BYTES`] on a character boundary.
pub(crate) fn cut(reason: String) -> String {
    let mut reason = match printable(&reason) {
        std::borrow::Cow::Borrowed(_) => reason,
        std::borrow::Cow::Owned(escaped) => escaped,
    };
    if reason.len() > MAX_REASON_BYTES {
        let mut end = MAX_REASON_BYTES;
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        let total = reason.len();
        reason.truncate(end);
        reason.push_str(&format!("... [cut from {total} bytes]"));
    }
    reason
}

/// The guest's stdout and stderr, line by line into the host's logs with
/// the attempt's fields (or the context's guest log), within the attempt's
/// log budget.
fn forward_stdio(state: &mut AttemptState) {
    for (stream, bytes) in [("stdout", state.stdout.contents()), ("stderr", state.stderr.contents())] {
        for line in String::from_utf8_lossy(&bytes).lines().filter(|l| !l.trim().is_empty()) {
            if !state.charge_log(line.len()) {
                break;
            }
            let ctx = &state.ctx;
            if ctx.capture(tracing::Level::INFO, stream, line) {
                continue;
            }
            tracing::info!(target: "wasmsub::guest", tenant = %ctx.tenant, handler = %ctx.handler,
                handler.version = %ctx.version, messaging.message.id = %printable(&ctx.event_id), stream, "{}", printable(line));
        }
    }
}

/// A failure to instantiate is the host's (pool exhausted) unless the
/// guest's own start-up hit a limit or trapped.
fn instantiate_failure(store: &Store<AttemptState>, error: wasmtime::Error) -> AttemptResult {
    if let Some(hit) = store.data().limits.hit {
        return AttemptResult::Trapped { reason: format!("instantiation failed: {hit}"), limit: Some(hit.into()) };
    }
    if error.downcast_ref::<Trap>().is_some() {
        return AttemptResult::Trapped { reason: format!("instantiation trapped: {}", first_line(&error)), limit: None };
    }
    AttemptResult::Infrastructure(format!("cannot instantiate: {error:#}"))
}

/// Names the limit or trap in words an operator can act on: the limit the
/// limiter recorded, the trap's kind, then what the guest wrote to stderr
/// (a panic message). With the limit that stopped the guest, if one did.
fn trap_reason(error: &wasmtime::Error, cpu_time: Duration, state: &AttemptState) -> (String, Option<StoppedBy>) {
    let (reason, limit) = match (state.limits.hit, error.downcast_ref::<Trap>()) {
        (Some(hit), _) => (hit.to_string(), Some(hit.into())),
        (None, Some(Trap::Interrupt)) => (format!("cpu time limit {} exceeded", humantime::format_duration(cpu_time)), Some(StoppedBy::CpuTime)),
        (None, Some(Trap::OutOfFuel)) => (format!("fuel limit {} exceeded", state.ctx.fuel.unwrap_or_default()), Some(StoppedBy::Fuel)),
        (None, Some(Trap::StackOverflow)) => ("stack overflow (wasm stack limit exceeded)".to_owned(), Some(StoppedBy::Stack)),
        (None, Some(trap)) => (format!("guest trapped: {trap}"), None),
        (None, None) => (format!("guest failed: {}", first_line(error)), None),
    };
    (with_stderr(reason, state), limit)
}

/// `reason`, followed by what the guest wrote to stderr (a panic message).
fn with_stderr(mut reason: String, state: &AttemptState) -> String {
    let stderr = state.stderr.contents();
    if !stderr.is_empty() {
        reason.push_str(": ");
        reason.push_str(String::from_utf8_lossy(&stderr).trim());
    }
    reason
}

/// An error's outermost message without its backtrace (the full chain goes
/// to the debug log).
fn first_line(error: &wasmtime::Error) -> String {
    tracing::debug!(error = %format!("{error:?}"), "guest error in full");
    error.to_string().lines().next().unwrap_or_default().to_owned()
}

#[cfg(feature = "bench")]
/// One instance kept alive across calls (benchmarks only). The service never
/// does this (a fresh instance per attempt is what isolates events); the
/// benchmark uses it as the floor that per-event isolation is measured against.
pub struct ReusedInstance {
    store: Store<AttemptState>,
    handler: super::bindings::Handler,
}

#[cfg(feature = "bench")]
impl ReusedInstance {
    /// Instantiates `component` once, for many calls.
    pub async fn new(engine: &Engine, component: &HandlerComponent, ctx: AttemptContext) -> anyhow::Result<Self> {
        let mut store = Store::new(engine, AttemptState::new(ctx));
        store.limiter(|state| &mut state.limits);
        store.set_epoch_deadline(u64::MAX / 2);
        let handler = component.pre.instantiate_async(&mut store).await.map_err(anyhow::Error::from)?;
        Ok(Self { store, handler })
    }

    /// Calls `handle` on the same instance again.
    pub async fn call(&mut self, event: &Event) -> anyhow::Result<Disposition> {
        self.store.set_epoch_deadline(u64::MAX / 2);
        self.handler.call_handle(&mut self.store, event).await.map_err(anyhow::Error::from)
    }
}

#[cfg(feature = "bench")]
/// Where a fresh-instance attempt spends its time, for the benchmark:
/// creating the store (with its WASI context), instantiating, the call, and
/// dropping the store (which returns the instance's slot to the pool).
pub async fn profile_attempt(engine: &Engine, component: &HandlerComponent, ctx: AttemptContext, event: &Event) -> [std::time::Duration; 4] {
    use std::time::Instant;
    let t0 = Instant::now();
    let mut store = Store::new(engine, AttemptState::new(ctx));
    store.limiter(|state| &mut state.limits);
    store.set_epoch_deadline(u64::MAX / 2);
    let t1 = Instant::now();
    let handler = component.pre.instantiate_async(&mut store).await.expect("instantiate");
    let t2 = Instant::now();
    let answer = handler.call_handle(&mut store, event).await.expect("call");
    let t3 = Instant::now();
    drop(store);
    let t4 = Instant::now();
    assert!(matches!(answer, Disposition::Success));
    [t1 - t0, t2 - t1, t3 - t2, t4 - t3]
}
