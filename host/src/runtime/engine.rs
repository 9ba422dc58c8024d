//! The wasmtime engine: one per host, shared by every tenant and version.
//!
//! Pooling allocator: instance slots (memories, tables, stacks) are reserved
//! once and reused, which makes a fresh instance per event cheap; linear
//! memory is initialised copy-on-write from the compiled image. Epoch
//! interruption bounds each attempt's time: a ticker thread advances the
//! epoch, and a store whose deadline passes traps.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use wasmtime::{Config, Enabled, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

/// How often the epoch advances: the resolution of the CPU-time limit. 10 ms
/// costs nothing measurable and keeps a limit's overshoot small.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);

/// Sizes of the instance pool. Every field bounds memory the host reserves.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Component instances alive at once: the upper bound on events handled
    /// concurrently across all tenants.
    pub instance_slots: u32,
    /// Instances made ahead of their attempts, in all (0: none; see
    /// `runtime/ready.rs`). The pool has this many slots on top of
    /// `instance_slots`.
    pub ready_instances: u32,
    /// The largest linear memory any tenant may have (pool slots are uniform;
    /// each store's own limit is its tenant's).
    pub max_memory_bytes: usize,
    /// Bytes of each memory slot kept resident (zeroed with memset instead of
    /// returned to the kernel) when an instance is freed. Keeping the first
    /// pages resident spares the next instance their page faults, which is
    /// most of a fresh instance's first-call cost; see docs/BENCHMARKS.md.
    pub keep_resident_bytes: usize,
    /// Reset only the pages an instance touched (Linux 6.7+ `PAGEMAP_SCAN`)
    /// instead of the whole resident prefix; off where unsupported. See
    /// docs/BENCHMARKS.md: resetting memory was most of a fresh instance's cost.
    pub pagemap_scan: bool,
    /// Where compiled components are cached across restarts (`None`: no
    /// cache). See `runtime/cache.rs`.
    pub cache_dir: Option<std::path::PathBuf>,
    /// Count fuel (set when some tenant has a fuel limit: metering costs a
    /// few percent of guest speed, so it is off otherwise).
    pub consume_fuel: bool,
}

/// Core instances one component may contain. A Rust guest has a few (its
/// module plus the shims wit-component adds), a JavaScript one
/// (componentize-js) 4, a Python one (componentize-py) 14: 32 leaves room.
/// It is a bound, not a reservation: the pool allocates an instance's
/// metadata when it is made (docs/SECURITY.md, "Pool limits").
const CORE_INSTANCES_PER_COMPONENT: u32 = 32;
/// Tables one component may have; these ratios size the pool's core-instance
/// and table counts from `instance_slots`.
const TABLES_PER_COMPONENT: u32 = 4;
/// Instances one store may create: the component and its core instances.
pub const MAX_INSTANCES_PER_STORE: usize = CORE_INSTANCES_PER_COMPONENT as usize + 2;

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            instance_slots: 128,
            ready_instances: 8,
            max_memory_bytes: crate::manifest::DEFAULT_MEMORY_MIB as usize * 1024 * 1024,
            // A Rust guest's stack, data and first allocator pages.
            keep_resident_bytes: 2 * 1024 * 1024,
            pagemap_scan: true,
            cache_dir: None,
            consume_fuel: false,
        }
    }
}

/// Builds the engine: component model, epoch interruption, pooling allocator.
pub fn build_engine(config: &EngineConfig) -> anyhow::Result<Engine> {
    // Attempts, plus the instances made ahead of them.
    let instances = config.instance_slots + config.ready_instances;
    let mut pool = PoolingAllocationConfig::new();
    pool.total_component_instances(instances)
        .total_core_instances(instances * CORE_INSTANCES_PER_COMPONENT)
        .max_core_instances_per_component(CORE_INSTANCES_PER_COMPONENT)
        .total_memories(instances)
        // Attempts run as futures on fiber stacks: one per slot.
        .total_stacks(instances)
        .max_memories_per_component(1)
        .total_tables(instances * TABLES_PER_COMPONENT)
        .max_tables_per_component(TABLES_PER_COMPONENT)
        .max_memory_size(config.max_memory_bytes)
        .linear_memory_keep_resident(config.keep_resident_bytes)
        .table_keep_resident(64 * 1024)
        .pagemap_scan(if config.pagemap_scan { Enabled::Auto } else { Enabled::No });
    let mut wasm = Config::new();
    wasm.wasm_component_model(true)
        .epoch_interruption(true)
        .memory_init_cow(true)
        .consume_fuel(config.consume_fuel)
        .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    Engine::new(&wasm).map_err(anyhow::Error::from).context("configuring the wasmtime engine")
}

/// Advances the engine's epoch every [`EPOCH_TICK`] until dropped.
pub struct EpochTicker {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl EpochTicker {
    pub fn start(engine: Engine) -> anyhow::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("wasmsub-epoch".into())
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    std::thread::sleep(EPOCH_TICK);
                    engine.increment_epoch();
                }
            })
            .context("starting the epoch ticker thread")?;
        Ok(Self { stop, thread: Some(thread) })
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Epoch ticks that make up `limit`, rounded up, at least one.
pub fn deadline_ticks(limit: Duration) -> u64 {
    let tick = EPOCH_TICK.as_nanos();
    (limit.as_nanos().div_ceil(tick)).max(1) as u64
}
