//! The limiter that holds a guest to its tenant's memory and table limits
//! and records which limit refused: the trap reason names the limit from
//! this record (a typed signal), never from an error's text.

use wasmtime::ResourceLimiter;

use super::engine::MAX_INSTANCES_PER_STORE;

/// A limit a guest ran into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitHit {
    /// Linear memory would have grown past the limit.
    Memory {
        /// The tenant's limit, in bytes.
        limit: usize,
        /// The size the guest asked for, in bytes.
        requested: usize,
    },
    /// A table would have grown past the limit.
    Table {
        /// The tenant's limit, in elements.
        limit: usize,
        /// The size the guest asked for, in elements.
        requested: usize,
    },
}

impl std::fmt::Display for LimitHit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LimitHit::Memory { limit, requested } => {
                write!(f, "memory limit {} MiB exceeded (the guest asked for {} MiB)", limit >> 20, requested.div_ceil(1 << 20))
            }
            LimitHit::Table { limit, requested } => write!(f, "table limit {limit} elements exceeded (the guest asked for {requested})"),
        }
    }
}

/// The error a refused growth traps with; its text is for logs only.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct LimitExceeded(pub LimitHit);

/// One attempt's limiter.
#[derive(Debug)]
pub struct GuestLimiter {
    memory_bytes: usize,
    table_elements: usize,
    /// The first limit the guest ran into, if any.
    pub hit: Option<LimitHit>,
}

impl GuestLimiter {
    /// Limits of `memory_bytes` per memory and `table_elements` per table.
    pub fn new(memory_bytes: usize, table_elements: usize) -> Self {
        Self { memory_bytes, table_elements, hit: None }
    }

    /// A refused growth is a trap (not a failed `memory.grow` the guest's
    /// allocator would turn into an abort), and is recorded.
    fn refuse(&mut self, hit: LimitHit) -> wasmtime::Result<bool> {
        self.hit.get_or_insert(hit);
        Err(LimitExceeded(hit).into())
    }
}

impl ResourceLimiter for GuestLimiter {
    fn memory_growing(&mut self, _current: usize, desired: usize, maximum: Option<usize>) -> wasmtime::Result<bool> {
        if desired > self.memory_bytes {
            return self.refuse(LimitHit::Memory { limit: self.memory_bytes, requested: desired });
        }
        Ok(maximum.is_none_or(|max| desired <= max))
    }

    fn table_growing(&mut self, _current: usize, desired: usize, maximum: Option<usize>) -> wasmtime::Result<bool> {
        if desired > self.table_elements {
            return self.refuse(LimitHit::Table { limit: self.table_elements, requested: desired });
        }
        Ok(maximum.is_none_or(|max| desired <= max))
    }

    fn instances(&self) -> usize {
        MAX_INSTANCES_PER_STORE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_refusal_is_recorded_and_named() {
        let mut limiter = GuestLimiter::new(2 << 20, 10);
        assert!(limiter.memory_growing(0, 1 << 20, None).unwrap());
        assert!(limiter.memory_growing(0, 3 << 20, None).is_err());
        assert!(limiter.table_growing(0, 11, None).is_err());
        let hit = limiter.hit.unwrap();
        assert_eq!(hit, LimitHit::Memory { limit: 2 << 20, requested: 3 << 20 });
        assert_eq!(hit.to_string(), "memory limit 2 MiB exceeded (the guest asked for 3 MiB)");
    }
}
