//! Deploying handler versions while events flow: compile off the event path,
//! check the component against the handler world and the tenant's size
//! limit, then switch atomically. A refused component changes nothing: the
//! serving version keeps serving. Attempts that have started finish on the
//! version they started with; every later attempt runs on the new one.
//!
//! Every way a version arrives (an upload, a new handler, a watched file)
//! goes through [`Deployer::compile_checked`], so every check applies to all.

use std::path::Path;
use std::sync::Arc;

use super::registry::{AddError, Handler, Registry, Tenant};
use crate::manifest::HandlerConfig;
use crate::metrics::Metrics;
use crate::runtime::{HandlerComponent, LoadError, Runtime};

/// Why a deploy or rollback was refused; the serving version is unchanged.
#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    /// The manifest names no such tenant.
    #[error("no tenant `{0}` (tenants come from the manifest)")]
    UnknownTenant(String),
    /// The tenant has no such handler (and no topic was given to create it).
    #[error("tenant `{tenant}` has no handler `{handler}` (deploy with a topic to create one)")]
    UnknownHandler {
        /// The tenant asked for.
        tenant: String,
        /// The handler asked for.
        handler: String,
    },
    /// The component is over the tenant's `max_component_bytes`.
    #[error("component of {size} bytes is over tenant `{tenant}`'s limit of {limit} bytes")]
    TooLarge {
        /// The tenant.
        tenant: String,
        /// The component's size.
        size: usize,
        /// The tenant's limit.
        limit: usize,
    },
    /// The bytes are not a handler component.
    #[error(transparent)]
    Invalid(#[from] LoadError),
    /// There is no earlier version to return to.
    #[error("handler `{tenant}/{handler}` has no earlier version to roll back to")]
    NothingToRollBack {
        /// The tenant.
        tenant: String,
        /// The handler.
        handler: String,
    },
    /// Compiling failed for a reason of the host's.
    #[error("compiling failed: {0}")]
    Internal(String),
    /// A new handler's settings are invalid.
    #[error("cannot create the handler: {0}")]
    NewHandler(String),
}

/// What a deploy or rollback did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct VersionChange {
    /// The tenant.
    pub tenant: String,
    /// The handler.
    pub handler: String,
    /// The version serving before (empty for a new handler).
    pub from: String,
    /// The version serving now.
    pub to: String,
}

/// A deploy or rollback as it happened, for whoever watches (tests, the
/// file watcher's users): what was asked, and what came of it.
#[derive(Debug, Clone)]
pub struct DeployEvent {
    /// The tenant.
    pub tenant: String,
    /// The handler.
    pub handler: String,
    /// Where the version came from (a file, an upload; empty for a rollback).
    pub origin: String,
    /// The change, or why it was refused.
    pub result: Result<VersionChange, String>,
}

/// Deploy events buffered for slow watchers.
const DEPLOY_EVENT_BUFFER: usize = 256;

/// Where a handler created at runtime takes its events from.
#[derive(Debug, Clone)]
pub struct NewHandler {
    /// The pub/sub component.
    pub pubsub: String,
    /// The topic.
    pub topic: String,
}

/// Called when a handler created at runtime needs a topic delivered (the
/// Dapr backend opens a streaming subscription; the embedded broker routes
/// by the registry and needs nothing).
pub type TopicHook = Arc<dyn Fn(&str, &str) + Send + Sync>;

/// Deploys and rolls back handler versions.
#[derive(Clone)]
pub struct Deployer {
    registry: Arc<Registry>,
    runtime: Runtime,
    on_new_topic: Option<TopicHook>,
    events: tokio::sync::broadcast::Sender<DeployEvent>,
    metrics: Arc<Metrics>,
}

impl Deployer {
    /// A deployer for `registry`'s handlers, compiling with `runtime`.
    pub(crate) fn new(registry: Arc<Registry>, runtime: Runtime, metrics: Arc<Metrics>) -> Self {
        let (events, _) = tokio::sync::broadcast::channel(DEPLOY_EVENT_BUFFER);
        Self { registry, runtime, on_new_topic: None, events, metrics }
    }

    /// Every later deploy and rollback, accepted or refused.
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<DeployEvent> {
        self.events.subscribe()
    }

    fn announce(&self, tenant: &str, handler: &str, origin: &Path, result: &Result<VersionChange, DeployError>) {
        if let Err(error) = result {
            tracing::warn!(tenant, handler, origin = %origin.display(), %error, "deploy refused; the serving version is unchanged");
        }
        // A rollback names no origin: it goes back to a version already held.
        // Names the host does not know are not counted (labels stay bounded).
        let action = match result {
            Err(DeployError::UnknownTenant(_) | DeployError::UnknownHandler { .. }) => None,
            Err(_) => Some("refused"),
            Ok(_) if origin.as_os_str().is_empty() => Some("rollback"),
            Ok(_) => Some("deploy"),
        };
        if let Some(action) = action {
            self.metrics.deploy(tenant, handler, action);
        }
        let _ = self.events.send(DeployEvent {
            tenant: tenant.to_owned(),
            handler: handler.to_owned(),
            origin: origin.display().to_string(),
            result: match result {
                Ok(change) => Ok(change.clone()),
                Err(error) => Err(error.to_string()),
            },
        });
    }

    /// Calls `hook` for each topic a new handler needs delivered.
    pub(crate) fn with_topic_hook(mut self, hook: TopicHook) -> Self {
        self.on_new_topic = Some(hook);
        self
    }

    /// The checks every new version passes, in one place: the tenant's size
    /// limit, then compilation (off the async threads) and the handler
    /// world. `origin` names the bytes in errors.
    async fn compile_checked(&self, tenant: &Tenant, origin: &Path, bytes: Vec<u8>) -> Result<Arc<HandlerComponent>, DeployError> {
        let limit = tenant.limits.max_component_bytes;
        if bytes.len() > limit {
            return Err(DeployError::TooLarge { tenant: tenant.name.to_string(), size: bytes.len(), limit });
        }
        let (runtime, origin) = (self.runtime.clone(), origin.to_owned());
        let component = tokio::task::spawn_blocking(move || runtime.load_bytes(&origin, &bytes))
            .await
            .map_err(|e| DeployError::Internal(e.to_string()))??;
        Ok(Arc::new(component))
    }

    /// Creates a handler that the manifest does not name, for a topic the
    /// host may not be subscribed to yet, with the tenant's limits and the
    /// default retry policy. Its events start arriving without a restart.
    /// An existing handler of that name gets the version, as [`Deployer::deploy`].
    pub async fn deploy_new(&self, tenant: &str, handler: &str, placement: NewHandler, origin: &Path, bytes: Vec<u8>) -> Result<VersionChange, DeployError> {
        if self.registry.find(tenant, handler).is_some() {
            return self.deploy(tenant, handler, origin, bytes).await;
        }
        let result = self.create(tenant, handler, placement, origin, bytes).await;
        self.announce(tenant, handler, origin, &result);
        result
    }

    async fn create(&self, tenant: &str, handler: &str, placement: NewHandler, origin: &Path, bytes: Vec<u8>) -> Result<VersionChange, DeployError> {
        let owner = self.registry.tenant(tenant).ok_or_else(|| DeployError::UnknownTenant(tenant.into()))?;
        let config = HandlerConfig::new(handler, origin.to_owned(), &placement.pubsub, &placement.topic);
        crate::manifest::validate_runtime_handler(&config).map_err(|e| DeployError::NewHandler(format!("{e:#}")))?;
        let component = self.compile_checked(&owner, origin, bytes).await?;
        let version = component.version.clone();
        self.registry.add(tenant, config, component).map_err(|e| match e {
            AddError::UnknownTenant(name) => DeployError::UnknownTenant(name),
            AddError::Invalid(why) => DeployError::NewHandler(why),
        })?;
        if let Some(hook) = &self.on_new_topic {
            hook(&placement.pubsub, &placement.topic);
        }
        tracing::info!(tenant, handler, handler.version = %&version[..12], topic = %placement.topic, "new handler deployed");
        Ok(VersionChange { tenant: tenant.into(), handler: handler.into(), from: String::new(), to: version })
    }

    fn handler(&self, tenant: &str, handler: &str) -> Result<Arc<Handler>, DeployError> {
        if self.registry.tenant(tenant).is_none() {
            return Err(DeployError::UnknownTenant(tenant.into()));
        }
        self.registry
            .find(tenant, handler)
            .ok_or_else(|| DeployError::UnknownHandler { tenant: tenant.into(), handler: handler.into() })
    }

    /// Deploys `bytes` as the handler's new version; `origin` names them in
    /// errors and logs (a file path, or where an upload came from).
    pub async fn deploy(&self, tenant: &str, handler: &str, origin: &Path, bytes: Vec<u8>) -> Result<VersionChange, DeployError> {
        let result = self.swap_in(tenant, handler, origin, bytes).await;
        self.announce(tenant, handler, origin, &result);
        result
    }

    async fn swap_in(&self, tenant: &str, handler: &str, origin: &Path, bytes: Vec<u8>) -> Result<VersionChange, DeployError> {
        let target = self.handler(tenant, handler)?;
        let component = self.compile_checked(&target.tenant, origin, bytes).await?;
        let old = target.swap(component);
        let change = VersionChange {
            tenant: tenant.into(),
            handler: handler.into(),
            from: old.version.clone(),
            to: target.current().version.clone(),
        };
        tracing::info!(tenant, handler, from = %&change.from[..12], to = %&change.to[..12], origin = %origin.display(),
            "handler version deployed; new attempts run on it");
        Ok(change)
    }

    /// Returns a handler to the version before its current one.
    pub fn rollback(&self, tenant: &str, handler: &str) -> Result<VersionChange, DeployError> {
        let result = self.handler(tenant, handler).and_then(|target| {
            let (from, to) = target
                .rollback()
                .ok_or_else(|| DeployError::NothingToRollBack { tenant: tenant.into(), handler: handler.into() })?;
            tracing::info!(tenant, handler, from = %&from.version[..12], to = %&to.version[..12], "handler rolled back");
            Ok(VersionChange { tenant: tenant.into(), handler: handler.into(), from: from.version.clone(), to: to.version.clone() })
        });
        self.announce(tenant, handler, Path::new(""), &result);
        result
    }
}
