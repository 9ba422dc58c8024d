//! The registry: tenants and their handlers as loaded from the manifest, each
//! handler with the component version currently serving it.
//!
//! A handler's current version sits behind a lock that is held only to clone
//! an `Arc`: an event takes the version it starts with and finishes on it,
//! whatever is swapped in meanwhile.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use anyhow::Context;
use tokio::sync::Semaphore;

use crate::manifest::{Capabilities, HandlerConfig, Manifest, TenantLimits};
use crate::runtime::{HandlerComponent, Runtime};

/// A tenant as the host runs it.
pub struct Tenant {
    /// Its name in the manifest.
    pub name: Arc<str>,
    /// Where its state lives in the store.
    pub namespace: Arc<str>,
    /// What its handlers may consume.
    pub limits: TenantLimits,
    /// Topics its handlers may publish to (`*` for any).
    pub publish_topics: Arc<[String]>,
    /// What its handlers may reach beyond the handler world.
    pub capabilities: Arc<Capabilities>,
    /// Bounds the tenant's attempts running at once.
    pub concurrency: Arc<Semaphore>,
    /// Deliveries waiting for one of those slots. Bounded too (by
    /// `max_concurrency` again): a busy tenant's excess goes back to the
    /// broker instead of holding places the other tenants need.
    pub waiting: Arc<std::sync::atomic::AtomicUsize>,
    /// Set while the one attempt a tenant over its publish backlog quota
    /// may run is running (see `pipeline/flow.rs`).
    pub probing: Arc<std::sync::atomic::AtomicBool>,
    /// Taken by an attempt that runs again after a read-validation
    /// conflict: reruns of one tenant go one at a time, so on a hot key a
    /// rerun reads and commits without racing the other reruns (no thrash).
    pub rerun_lane: Arc<tokio::sync::Mutex<()>>,
}

/// What a handler's deliveries came to, since the host started.
#[derive(Debug, Default, serde::Serialize)]
pub struct HandlerCounts {
    /// Events processed.
    pub processed: AtomicU64,
    /// Duplicate deliveries skipped.
    pub duplicates: AtomicU64,
    /// Attempts that failed and were retried.
    pub retries: AtomicU64,
    /// Events dead-lettered.
    pub dead_lettered: AtomicU64,
    /// Deliveries handed back to the broker (held elsewhere, store down).
    pub deferred: AtomicU64,
    /// Attempts run again because a state key they read changed before
    /// their commit (optimistic concurrency; not counted as retries).
    pub reruns: AtomicU64,
}

impl Tenant {
    /// Whether a new delivery should wait for a slot, or go back to the
    /// broker because as many already wait as the tenant may run at once.
    pub fn saturated(&self) -> bool {
        self.concurrency.available_permits() == 0
            && self.waiting.load(std::sync::atomic::Ordering::Relaxed) >= self.limits.max_concurrency as usize
    }
}

impl HandlerCounts {
    /// Adds one to `counter`.
    pub fn add(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// A handler as the host runs it.
pub struct Handler {
    /// The tenant it belongs to.
    pub tenant: Arc<Tenant>,
    /// Its name within the tenant.
    pub name: Arc<str>,
    /// Its settings from the manifest (or from the deploy that created it).
    pub config: HandlerConfig,
    /// The app route Dapr delivers its events to.
    pub route: String,
    /// Where its failed events go.
    pub dead_letter_topic: String,
    /// What its deliveries came to.
    pub counts: HandlerCounts,
    versions: RwLock<VersionSet>,
}

/// Versions kept for rollback, besides the current one.
pub const ROLLBACK_DEPTH: usize = 8;

/// A handler's serving version and the ones a rollback returns to (newest
/// last). Changes are computed as new sets, so a deploy can be recorded
/// before it is installed.
#[derive(Clone)]
pub struct VersionSet {
    /// The version new attempts run on.
    pub current: Arc<HandlerComponent>,
    /// Earlier versions, newest last, at most [`ROLLBACK_DEPTH`].
    pub previous: Vec<Arc<HandlerComponent>>,
}

impl VersionSet {
    /// The set with `component` serving and the current one kept for
    /// rollback; `None` if `component` serves already.
    pub fn deployed(&self, component: Arc<HandlerComponent>) -> Option<Self> {
        if self.current.version == component.version {
            return None;
        }
        let mut previous = self.previous.clone();
        previous.push(self.current.clone());
        if previous.len() > ROLLBACK_DEPTH {
            previous.remove(0);
        }
        Some(Self { current: component, previous })
    }

    /// The set returned to the version before the current one; `None` if
    /// there is none.
    pub fn rolled_back(&self) -> Option<Self> {
        let mut previous = self.previous.clone();
        let current = previous.pop()?;
        Some(Self { current, previous })
    }

    /// Every version in the set, current last.
    pub fn all(&self) -> impl Iterator<Item = &Arc<HandlerComponent>> {
        self.previous.iter().chain(std::iter::once(&self.current))
    }
}

impl Handler {
    /// The version new events run on. Events hold the `Arc` they start with,
    /// so a swap never changes the version under an event in flight.
    pub fn current(&self) -> Arc<HandlerComponent> {
        self.versions.read().unwrap_or_else(|p| p.into_inner()).current.clone()
    }

    /// The serving version and the earlier ones.
    pub fn versions(&self) -> VersionSet {
        self.versions.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Makes `versions` the handler's, atomically: new attempts run on its
    /// current version. The caller ([`crate::control::deploy::Deployer`])
    /// serialises changes.
    pub fn install(&self, versions: VersionSet) {
        *self.versions.write().unwrap_or_else(|p| p.into_inner()) = versions;
    }

    /// Versions that a rollback could return to, newest last.
    pub fn previous_versions(&self) -> Vec<String> {
        self.versions.read().unwrap_or_else(|p| p.into_inner()).previous.iter().map(|c| c.version.clone()).collect()
    }
}

/// Where a delivery to one HTTP route goes.
#[derive(Clone)]
pub enum RouteTarget {
    /// One handler's own route.
    Handler(Arc<Handler>),
    /// A topic's default route when several handlers (of any tenants) take
    /// its events: each gets every delivery, and dedupes it on its own.
    FanOut(Vec<Arc<Handler>>),
}

/// Every handler, indexed the ways deliveries arrive. Handlers can be added
/// while the host runs (a deploy for a new handler); the indexes are
/// rebuilt then, behind a lock held only to clone what a delivery needs.
pub struct Registry {
    tenants: HashMap<String, Arc<Tenant>>,
    indexes: RwLock<Indexes>,
}

#[derive(Default)]
struct Indexes {
    handlers: Vec<Arc<Handler>>,
    by_topic: HashMap<(String, String), Vec<Arc<Handler>>>,
    by_route: HashMap<String, RouteTarget>,
}

impl Indexes {
    fn build(handlers: Vec<Arc<Handler>>) -> Self {
        let mut by_topic: HashMap<_, Vec<_>> = HashMap::new();
        let mut by_route = HashMap::new();
        for handler in &handlers {
            by_topic
                .entry((handler.config.pubsub.clone(), handler.config.topic.clone()))
                .or_default()
                .push(handler.clone());
            by_route.insert(handler.route.clone(), RouteTarget::Handler(handler.clone()));
        }
        for ((pubsub, topic), group) in &by_topic {
            let defaults: Vec<_> = group.iter().filter(|h| h.config.match_type.is_none()).cloned().collect();
            if defaults.len() > 1 {
                by_route.insert(fan_out_route(pubsub, topic), RouteTarget::FanOut(defaults));
            }
        }
        Self { handlers, by_topic, by_route }
    }
}

/// A topic of a pub/sub component: `(pubsub, topic)`.
pub type TopicKey = (String, String);

/// Why a handler could not be added at runtime.
#[derive(Debug, thiserror::Error)]
pub enum AddError {
    /// The manifest names no such tenant.
    #[error("no tenant `{0}` (tenants come from the manifest)")]
    UnknownTenant(String),
    /// The handler clashes with one that exists.
    #[error("invalid handler: {0}")]
    Invalid(String),
}

/// The route Dapr delivers a topic's unmatched events to when more than one
/// handler takes them.
pub fn fan_out_route(pubsub: &str, topic: &str) -> String {
    format!("/topics/{pubsub}/{topic}")
}

fn new_handler(tenant: &Arc<Tenant>, config: &HandlerConfig, component: Arc<HandlerComponent>) -> Arc<Handler> {
    Arc::new(Handler {
        tenant: tenant.clone(),
        name: config.name.as_str().into(),
        route: config.route(&tenant.name),
        dead_letter_topic: config.dead_letter_topic(),
        config: config.clone(),
        counts: HandlerCounts::default(),
        versions: RwLock::new(VersionSet { current: component, previous: Vec::new() }),
    })
}

impl Registry {
    /// Loads every handler's component; the first that fails stops start-up
    /// with an error naming the tenant, handler and file.
    pub fn load(manifest: &Manifest, runtime: &Runtime) -> anyhow::Result<Self> {
        let mut handlers = Vec::new();
        let mut tenants = HashMap::new();
        let mut compiled: HashMap<std::path::PathBuf, Arc<HandlerComponent>> = HashMap::new();
        for tenant_config in &manifest.tenants {
            let tenant = Arc::new(Tenant {
                name: tenant_config.name.as_str().into(),
                namespace: tenant_config.state_namespace().into(),
                limits: tenant_config.limits.clone(),
                publish_topics: tenant_config.limits.publish_topics.clone().into(),
                capabilities: Arc::new(tenant_config.capabilities.clone()),
                concurrency: Arc::new(Semaphore::new(tenant_config.limits.max_concurrency as usize)),
                waiting: Arc::default(),
                probing: Arc::default(),
                rerun_lane: Arc::default(),
            });
            tenants.insert(tenant_config.name.clone(), tenant.clone());
            for config in &tenant_config.handlers {
                // Handlers naming the same file share one compiled version.
                let component = match compiled.get(&config.component) {
                    Some(component) => Arc::clone(component),
                    None => {
                        let component = runtime
                            .load(&config.component)
                            .with_context(|| format!("loading tenant `{}` handler `{}`", tenant.name, config.name))?;
                        let component = Arc::new(component);
                        compiled.insert(config.component.clone(), Arc::clone(&component));
                        component
                    }
                };
                tracing::info!(tenant = %tenant.name, handler = %config.name, handler.version = component.short_version(),
                    topic = %config.topic, "handler loaded");
                handlers.push(new_handler(&tenant, config, component));
            }
        }
        Ok(Self { tenants, indexes: RwLock::new(Indexes::build(handlers)) })
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Indexes> {
        self.indexes.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds a handler while the host runs; deliveries to its topic reach it
    /// from now on. The caller has compiled and checked `component`.
    pub fn add(&self, tenant: &str, config: HandlerConfig, component: Arc<HandlerComponent>) -> Result<Arc<Handler>, AddError> {
        let owner = self.tenants.get(tenant).ok_or_else(|| AddError::UnknownTenant(tenant.to_owned()))?;
        let mut indexes = self.indexes.write().unwrap_or_else(|p| p.into_inner());
        let route = config.route(tenant);
        if indexes.handlers.iter().any(|h| &*h.tenant.name == tenant && *h.name == *config.name) {
            return Err(AddError::Invalid(format!("handler `{tenant}/{}` exists already", config.name)));
        }
        if indexes.by_route.contains_key(&route) {
            return Err(AddError::Invalid(format!("route `{route}` is taken")));
        }
        let handler = new_handler(owner, &config, component);
        let mut handlers = std::mem::take(&mut indexes.handlers);
        handlers.push(handler.clone());
        *indexes = Indexes::build(handlers);
        tracing::info!(tenant, handler = %config.name, topic = %config.topic, "handler added at runtime");
        Ok(handler)
    }

    /// Every handler.
    pub fn handlers(&self) -> Vec<Arc<Handler>> {
        self.read().handlers.clone()
    }

    /// The handlers subscribed to `topic` of `pubsub`.
    pub fn subscribers(&self, pubsub: &str, topic: &str) -> Vec<Arc<Handler>> {
        self.read().by_topic.get(&(pubsub.to_owned(), topic.to_owned())).cloned().unwrap_or_default()
    }

    /// What a Dapr app route delivers to.
    pub fn by_route(&self, route: &str) -> Option<RouteTarget> {
        self.read().by_route.get(route).cloned()
    }

    /// The (pubsub, topic) groups of handlers, for building subscriptions.
    pub fn topics(&self) -> Vec<(TopicKey, Vec<Arc<Handler>>)> {
        self.read().by_topic.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    /// The pub/sub component names the manifest uses.
    pub fn pubsub_names(&self) -> Vec<String> {
        let mut names: Vec<_> = self.read().handlers.iter().map(|h| h.config.pubsub.clone()).collect();
        names.sort();
        names.dedup();
        names
    }

    /// A tenant, by name.
    pub fn tenant(&self, name: &str) -> Option<Arc<Tenant>> {
        self.tenants.get(name).cloned()
    }

    /// A handler, by tenant and name.
    pub fn find(&self, tenant: &str, handler: &str) -> Option<Arc<Handler>> {
        self.read().handlers.iter().find(|h| &*h.tenant.name == tenant && &*h.name == handler).cloned()
    }
}
