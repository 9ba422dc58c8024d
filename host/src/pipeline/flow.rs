//! Flow quotas: how fast, and how far ahead of its subscribers, a tenant's
//! handlers may publish. A handler that publishes to its own topic would
//! otherwise feed itself without end and fill the queue for everyone.
//!
//! Checked twice: before an attempt (a tenant that has used up its publish
//! rate is not run now: its attempt's publishes would be refused anyway)
//! and before a commit (the attempt's publishes must fit the rate and the
//! backlog). Either way the event is deferred, not dropped: the broker
//! brings it back after a wait, and only this tenant slows down. A tenant
//! over its backlog quota still runs its events, since running them is what
//! drains the backlog; only their publishes wait. Dead letters are never
//! held back.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::time::Instant;

use crate::control::registry::Tenant;
use crate::store::SharedIndex;

/// Per-tenant publish rates, and the embedded queue's backlog per tenant.
pub struct FlowControl {
    /// The embedded queue's index (`None` behind Dapr: the broker's backlog
    /// is not the host's to see).
    queue: Option<SharedIndex>,
    tenants: Mutex<HashMap<Arc<str>, TenantFlow>>,
}

/// A tenant's publish rate, and when its publishes last did not fit.
struct TenantFlow {
    bucket: TokenBucket,
    /// The last time a commit was refused for the backlog quota.
    refused: Option<Instant>,
}

/// How long after a commit was refused for its backlog a tenant's attempts
/// run one at a time (see [`FlowControl::before_attempt`]).
const REFUSAL_MEMORY: std::time::Duration = std::time::Duration::from_secs(1);

/// The one attempt a tenant over its backlog quota may run; released on drop.
pub struct ProbeGuard(Arc<AtomicBool>);

impl Drop for ProbeGuard {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// Tokens refill at `rate` a second, up to one second's worth.
struct TokenBucket {
    tokens: f64,
    refilled: Instant,
}

impl TokenBucket {
    /// Adds what has accrued since the last refill; returns the tokens now.
    fn refill(&mut self, rate: u32) -> f64 {
        let now = Instant::now();
        let rate = f64::from(rate);
        self.tokens = (self.tokens + now.duration_since(self.refilled).as_secs_f64() * rate).min(rate);
        self.refilled = now;
        self.tokens
    }
}

fn rate_reason(tenant: &Tenant) -> String {
    format!("tenant `{}` publishes faster than its max_publish_rate of {}/s; the event comes again later", tenant.name, tenant.limits.max_publish_rate)
}

impl FlowControl {
    /// Quotas over `queue`'s backlog, if there is an embedded queue.
    pub fn new(queue: Option<SharedIndex>) -> Self {
        Self { queue, tenants: Mutex::new(HashMap::new()) }
    }

    /// Whether the tenant may run an attempt now. While its queued
    /// publishes are at their quota and its commits are being refused for
    /// it, one attempt at a time still runs (a probe): it drains the backlog
    /// if it publishes nothing, and wastes one attempt if it does; the
    /// others wait without running. Once commits fit again (a fixed handler
    /// publishes less), everything runs and the backlog drains at full
    /// speed. Hold the returned guard until the attempt's commit.
    pub fn before_attempt(&self, tenant: &Tenant) -> Result<Option<ProbeGuard>, String> {
        let recently_refused = {
            let mut tenants = self.tenants.lock().unwrap_or_else(|p| p.into_inner());
            let Some(flow) = tenants.get_mut(&tenant.name) else { return Ok(None) };
            if flow.bucket.refill(tenant.limits.max_publish_rate) < 1.0 {
                return Err(rate_reason(tenant));
            }
            flow.refused.is_some_and(|at| at.elapsed() < REFUSAL_MEMORY)
        };
        let queued = self.queued(tenant);
        if !recently_refused || queued < tenant.limits.max_queued_publishes {
            return Ok(None);
        }
        if tenant.probing.swap(true, Ordering::AcqRel) {
            return Err(self.backlog_reason(tenant, queued));
        }
        Ok(Some(ProbeGuard(tenant.probing.clone())))
    }

    /// Whether `messages` publishes of the tenant may be committed now; if
    /// so, they are counted against its rate.
    pub fn admit(&self, tenant: &Tenant, messages: usize) -> Result<(), String> {
        if messages == 0 {
            return Ok(());
        }
        let queued = self.queued(tenant);
        let rate = tenant.limits.max_publish_rate;
        let mut tenants = self.tenants.lock().unwrap_or_else(|p| p.into_inner());
        let flow = tenants.entry(tenant.name.clone()).or_insert(TenantFlow {
            bucket: TokenBucket { tokens: f64::from(rate), refilled: Instant::now() },
            refused: None,
        });
        if queued + messages > tenant.limits.max_queued_publishes {
            flow.refused = Some(Instant::now());
            return Err(self.backlog_reason(tenant, queued));
        }
        if flow.bucket.refill(rate) < messages as f64 {
            return Err(rate_reason(tenant));
        }
        flow.bucket.tokens -= messages as f64;
        Ok(())
    }

    fn queued(&self, tenant: &Tenant) -> usize {
        // (the tenant's own publishes waiting on the embedded queue)
        let origin = Some(tenant.name.clone());
        self.queue.as_ref().map_or(0, |queue| queue.with(|index| index.backlog(&origin).0))
    }

    fn backlog_reason(&self, tenant: &Tenant, queued: usize) -> String {
        format!(
            "tenant `{}` has {queued} publishes waiting on the queue (max_queued_publishes {}); the event comes again once they drain",
            tenant.name, tenant.limits.max_queued_publishes
        )
    }
}
