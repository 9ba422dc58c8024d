//! Dispatch: the WebAssembly runtime. The only module that touches wasmtime.
//!
//! - [`bindings`]: the host side of the WIT contract (the one `bindgen!`);
//! - [`engine`]: the shared engine, pooling allocator and epoch ticker;
//! - [`component`]: loading and checking a handler version;
//! - [`host_state`]: the per-attempt store data and the guest's imports;
//! - [`invoke`]: one attempt, from fresh instance to verdict;
//! - [`ready`]: instances made ahead of their attempts (each still serves one);
//! - [`limits`]: the limiter that records which limit stopped a guest;
//! - [`cache`]: compiled components on disk.

mod bindings;
mod cache;
mod component;
mod engine;
mod host_state;
pub(crate) mod invoke;
mod limits;
mod ready;

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::Poll;

use anyhow::Context;
use futures_util::FutureExt;
use wasmtime::Engine;
use wasmtime::component::{HasSelf, Linker};

pub use bindings::{Disposition, Event, GuestLogLevel, HANDLER_WORLD};
pub use component::{HandlerComponent, LoadError};
pub use engine::EngineConfig;
pub use host_state::{AttemptContext, GuestLine, GuestLog};
pub use invoke::{AttemptResult, StoppedBy};
#[cfg(feature = "bench")]
pub use invoke::ReusedInstance;

/// A finished attempt's store (benchmarks): dropping it returns the
/// instance to the pool, which the benchmark times apart.
#[cfg(feature = "bench")]
pub struct SpentStore(#[allow(dead_code)] wasmtime::Store<host_state::AttemptState>);
pub use limits::LimitHit;

/// An instance made ahead of its attempt (benchmarks).
#[cfg(feature = "bench")]
pub struct MadeAhead(invoke::Prepared);

use host_state::AttemptState;

/// The engine, the linker with the host's imports, and the epoch ticker.
/// The engine, the linker and the instance slots, shared by every handler.
#[derive(Clone)]
pub struct Runtime {
    engine: Engine,
    /// One permit per instance slot: attempts beyond the pool wait here
    /// instead of failing to instantiate.
    slots: Arc<tokio::sync::Semaphore>,
    slot_count: usize,
    linker: Arc<Linker<AttemptState>>,
    cache: Option<cache::CompileCache>,
    /// Instances made ahead for the handlers that ran last.
    ready: Arc<ready::ReadyInstances>,
    _ticker: Arc<engine::EpochTicker>,
}

/// One attempt's result, and how long making its instance took (`None`
/// if no instance was made).
#[derive(Debug)]
pub struct Dispatched {
    /// What the attempt came to.
    pub result: AttemptResult,
    /// Instantiation time, for the metrics.
    pub instantiation: Option<std::time::Duration>,
    /// The instance was made ahead of the attempt (`instantiation` is then `None`).
    pub made_ahead: bool,
}

impl Runtime {
    /// Builds the engine and links the host's imports.
    pub fn new(config: &EngineConfig) -> anyhow::Result<Self> {
        let engine = engine::build_engine(config)?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker).map_err(anyhow::Error::from).context("linking WASI")?;
        bindings::Handler::add_to_linker::<_, HasSelf<_>>(&mut linker, |state| state)
            .map_err(anyhow::Error::from)
            .context("linking the handler world's imports")?;
        let ticker = engine::EpochTicker::start(engine.clone())?;
        let slots = Arc::new(tokio::sync::Semaphore::new(config.instance_slots as usize));
        let cache = config.cache_dir.as_deref().map(|dir| cache::CompileCache::new(dir, &engine));
        let slot_count = config.instance_slots as usize;
        let ready = Arc::new(ready::ReadyInstances::new(config.ready_instances as usize));
        Ok(Self { engine, slots, slot_count, linker: Arc::new(linker), cache, ready, _ticker: Arc::new(ticker) })
    }

    /// Loads and checks a component file (compiles it: call off the event path).
    pub fn load(&self, path: &Path) -> Result<HandlerComponent, LoadError> {
        component::load(&self.engine, &self.linker, self.cache.as_ref(), path)
    }

    /// Loads and checks component bytes; `origin` names them in errors.
    pub fn load_bytes(&self, origin: &Path, bytes: &[u8]) -> Result<HandlerComponent, LoadError> {
        component::from_bytes(&self.engine, &self.linker, self.cache.as_ref(), origin, bytes)
    }

    /// Drops compiled components of every version not in `keep` from the
    /// on-disk cache, so it holds what the handlers can serve or roll back
    /// to and no more. Returns how many entries went.
    pub fn prune_cache(&self, keep: &std::collections::HashSet<String>) -> usize {
        self.cache.as_ref().map_or(0, |cache| cache.prune(keep))
    }

    /// Runs one attempt on a fresh instance, once an instance slot is free:
    /// one made ahead for this handler version if there is one (see
    /// [`ready`]), else one made now. Then the handler's next instances are
    /// made in the background.
    ///
    /// The attempt starts on the caller's task: most guests answer in
    /// microseconds, and handing each to a thread and back cost more than
    /// the call (futex wake-ups and context switches were the largest kernel
    /// share of the in-process profile). A guest still computing at an epoch
    /// tick (it has used a CPU slice, 10 ms at most) moves to a blocking
    /// thread for the rest of its attempt, so looping guests share the CPU
    /// through the OS scheduler and never hold the async workers that answer
    /// the sidecar, health checks and other tenants. A panic in an attempt
    /// is contained either way.
    pub async fn dispatch(&self, component: Arc<HandlerComponent>, ctx: AttemptContext, event: Event) -> Dispatched {
        let Ok(slot) = self.slots.clone().acquire_owned().await else {
            return Dispatched { result: AttemptResult::Infrastructure("instance pool closed".into()), instantiation: None, made_ahead: false };
        };
        let prepared = self.ready.take(&component, &ctx);
        let made_ahead = prepared.is_some();
        let next = (component.clone(), ctx.clone());
        let used_a_slice = Arc::new(AtomicBool::new(false));
        let attempt = {
            let (engine, component, flag) = (self.engine.clone(), component.clone(), used_a_slice.clone());
            async move { invoke::run_attempt(&engine, &component, ctx, &event, prepared, Some(flag)).await }
        };
        let finished = run_guest_code(attempt, &used_a_slice).await;
        let dispatched = match finished {
            Ok((result, store)) => {
                let instantiation = store.data().instantiated_in;
                // Returns the instance to the pool (resetting its memory)
                // before its slot is free.
                drop(store);
                Dispatched { result, instantiation, made_ahead }
            }
            Err(reason) => Dispatched { result: AttemptResult::Infrastructure(reason), instantiation: None, made_ahead },
        };
        drop(slot);
        // Not after a trap or a host failure: a guest whose start-up loops or
        // traps must not get more CPU time in the background than its attempts.
        if !matches!(dispatched.result, AttemptResult::Trapped { .. } | AttemptResult::Infrastructure(_)) {
            self.ready.refill(&self.engine, &next.0, &next.1);
        }
        dispatched
    }

    /// Runs one attempt on the calling task, with no slot gate (benchmarks,
    /// which measure the call without the thread hand-off): the result, and
    /// the store whose drop returns the instance to the pool.
    #[cfg(feature = "bench")]
    pub async fn attempt_inline(&self, component: &HandlerComponent, ctx: AttemptContext, event: &Event) -> (AttemptResult, SpentStore) {
        let (result, store) = invoke::run_attempt(&self.engine, component, ctx, event, None, None).await;
        (result, SpentStore(store))
    }

    /// An instance made ahead, as the service makes them (benchmarks).
    #[cfg(feature = "bench")]
    pub async fn make_ahead(&self, component: &HandlerComponent, ctx: AttemptContext) -> Option<MadeAhead> {
        invoke::prepare(&self.engine, component, ctx, None).await.map(MadeAhead)
    }

    /// Runs one attempt on the calling task on an instance made ahead
    /// (benchmarks): the result, and the store to drop.
    #[cfg(feature = "bench")]
    pub async fn attempt_made_ahead(&self, component: &HandlerComponent, ctx: AttemptContext, event: &Event, made: MadeAhead) -> (AttemptResult, SpentStore) {
        let (result, store) = invoke::run_attempt(&self.engine, component, ctx, event, Some(made.0), None).await;
        (result, SpentStore(store))
    }

    /// The phases of one fresh-instance attempt, for the benchmark.
    #[cfg(feature = "bench")]
    pub async fn profile_attempt(&self, component: &HandlerComponent, ctx: AttemptContext, event: &Event) -> [std::time::Duration; 4] {
        invoke::profile_attempt(&self.engine, component, ctx, event).await
    }

    /// An instance kept across calls, for the benchmark's baseline.
    #[cfg(feature = "bench")]
    pub async fn reused_instance(&self, component: &HandlerComponent, ctx: AttemptContext) -> anyhow::Result<ReusedInstance> {
        ReusedInstance::new(&self.engine, component, ctx).await
    }

    /// (instance slots running an attempt now, instance slots in all).
    pub fn instances_in_use(&self) -> (usize, usize) {
        (self.slot_count - self.slots.available_permits(), self.slot_count)
    }

    /// Instances made ahead and waiting for their attempt.
    pub fn instances_ready(&self) -> usize {
        self.ready.count()
    }

    /// The shared engine.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }
}

/// Runs guest code (an attempt, an instance's start-up): on the caller's
/// task while it only takes microseconds, then, if the guest is still
/// computing at an epoch tick (`used_a_slice` is set by the store's epoch
/// callback), on a blocking thread for the rest, so a looping guest holds
/// an async worker for one slice at most. A panic is an `Err`, either way.
async fn run_guest_code<T: Send + 'static>(code: impl Future<Output = T> + Send + 'static, used_a_slice: &AtomicBool) -> Result<T, String> {
    let mut code = Box::pin(code);
    let here = std::panic::AssertUnwindSafe(std::future::poll_fn(|cx| match code.as_mut().poll(cx) {
        Poll::Ready(done) => Poll::Ready(Some(done)),
        Poll::Pending if used_a_slice.load(Ordering::Relaxed) => Poll::Ready(None),
        Poll::Pending => Poll::Pending,
    }))
    .catch_unwind()
    .await;
    match here {
        Ok(Some(done)) => Ok(done),
        Ok(None) => {
            let runtime = tokio::runtime::Handle::current();
            tokio::task::spawn_blocking(move || runtime.block_on(code)).await.map_err(|error| format!("guest thread failed: {error}"))
        }
        Err(_) => Err("guest code panicked".to_owned()),
    }
}
