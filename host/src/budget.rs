//! The memory the configuration lets the host use: a bound computed from
//! the manifest and the options, logged at start and shown at
//! `GET /wasmsub/host`, so an operator can size a container from it and a
//! test can hold the host to it.
//!
//! Every term is a worst case: each instance slot filled to its tenant's
//! memory limit, every attempt buffering its most, every delivery in flight
//! at the largest payload. A host under load stays well below it; a host
//! above it has a leak.

use serde::Serialize;

use crate::control::registry::Registry;
use crate::manifest::Manifest;
use crate::pipeline::effects::MAX_BUFFERED_BYTES_PER_ATTEMPT;
use crate::runtime::EngineConfig;

/// The process before any handler runs: code, the async runtime, the
/// engine, allocator slack (measured idle at about 40 MiB; rounded up).
pub const RUNTIME_BASE_BYTES: u64 = 64 << 20;
/// A parsed event holds its body about three times over (the bytes, the
/// JSON value, the original object kept for dead-lettering).
const PARSED_EVENT_FACTOR: u64 = 3;
/// The fiber stack an attempt runs on (wasmtime's default async stack).
const FIBER_STACK_BYTES: u64 = 2 << 20;
/// What the queue's index keeps per message (ids, sizes, due times).
const INDEX_BYTES_PER_MESSAGE: u64 = 96;

/// Each term of the bound, in bytes.
#[derive(Debug, Clone, Serialize)]
pub struct MemoryBudget {
    /// The process itself.
    pub runtime: u64,
    /// Compiled code of the serving versions (each later deploy adds its
    /// own, until it leaves the rollback window).
    pub compiled_code: u64,
    /// Instance slots and instances made ahead, each at the largest tenant
    /// memory limit, with its fiber stack.
    pub instances: u64,
    /// Effects an attempt may buffer, for every slot.
    pub buffered_effects: u64,
    /// Deliveries in flight, each at the largest payload, parsed.
    pub deliveries: u64,
    /// The embedded broker's queue: its index, and its bodies when it is in memory.
    pub queue: u64,
    /// The embedded store's page cache, or what the Dapr store remembers.
    pub store_cache: u64,
    /// The sum.
    pub total: u64,
}

/// The inputs of the bound that are not in the manifest.
pub struct BudgetInputs<'a> {
    /// Instance slots and memory sizes.
    pub engine: &'a EngineConfig,
    /// Deliveries admitted through the door at once.
    pub max_in_flight: usize,
    /// Queue bounds and whether its bodies are in memory, if there is a queue.
    pub queue: Option<(crate::store::QueueLimits, bool)>,
    /// The store's page cache (embedded) or memory (Dapr).
    pub store_cache_bytes: usize,
}

impl MemoryBudget {
    /// The bound for `manifest` with `registry`'s loaded versions.
    pub fn compute(manifest: &Manifest, registry: &Registry, inputs: &BudgetInputs<'_>) -> Self {
        let largest_memory = manifest.tenants.iter().map(|t| u64::from(t.limits.memory_mib) << 20).max().unwrap_or(0);
        let largest_payload = manifest.tenants.iter().map(|t| t.limits.max_payload_bytes as u64).max().unwrap_or(0);
        // Attempts' slots and the instances made ahead of them.
        let slots = u64::from(inputs.engine.instance_slots) + u64::from(inputs.engine.ready_instances);
        let mut seen = std::collections::HashSet::new();
        let compiled_code = registry
            .handlers()
            .iter()
            .map(|h| h.current())
            .filter(|c| seen.insert(c.version.clone()))
            .map(|c| c.code_bytes as u64)
            .sum();
        let queue = inputs.queue.map_or(0, |(limits, in_memory)| {
            limits.max_messages as u64 * INDEX_BYTES_PER_MESSAGE + if in_memory { limits.max_bytes as u64 } else { 0 }
        });
        let mut budget = Self {
            runtime: RUNTIME_BASE_BYTES,
            compiled_code,
            instances: slots * (largest_memory.max(inputs.engine.keep_resident_bytes as u64) + FIBER_STACK_BYTES),
            buffered_effects: slots * MAX_BUFFERED_BYTES_PER_ATTEMPT as u64,
            deliveries: inputs.max_in_flight as u64 * largest_payload * PARSED_EVENT_FACTOR,
            queue,
            store_cache: inputs.store_cache_bytes as u64,
            total: 0,
        };
        budget.total = budget.runtime + budget.compiled_code + budget.instances + budget.buffered_effects + budget.deliveries + budget.queue + budget.store_cache;
        budget
    }
}

impl std::fmt::Display for MemoryBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mib = |bytes: u64| bytes.div_ceil(1 << 20);
        write!(
            f,
            "{} MiB = runtime {} + compiled code {} + instances {} + buffered effects {} + deliveries in flight {} + queue {} + store cache {}",
            mib(self.total), mib(self.runtime), mib(self.compiled_code), mib(self.instances), mib(self.buffered_effects),
            mib(self.deliveries), mib(self.queue), mib(self.store_cache)
        )
    }
}
