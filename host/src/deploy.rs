//! Deploying handler versions while events flow: compile off the event path,
//! check the component against the handler world and the tenant's size
//! limit, then switch atomically. A refused component changes nothing: the
//! serving version keeps serving. Events in flight finish on the version
//! they started with (they hold it); new events get the new one.

use std::path::Path;
use std::sync::Arc;

use crate::manifest::HandlerConfig;
use crate::registry::{AddError, Handler, Registry};
use crate::runtime::{LoadError, Runtime};

/// Why a deploy or rollback was refused; the serving version is unchanged.
#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    #[error("no handler `{handler}` in tenant `{tenant}`")]
    UnknownHandler { tenant: String, handler: String },
    #[error("component of {size} bytes is over tenant `{tenant}`'s limit of {limit} bytes")]
    TooLarge { tenant: String, size: usize, limit: usize },
    #[error(transparent)]
    Invalid(#[from] LoadError),
    #[error("handler `{tenant}/{handler}` has no earlier version to roll back to")]
    NothingToRollBack { tenant: String, handler: String },
    #[error("compiling failed: {0}")]
    Internal(String),
    #[error("cannot create the handler: {0}")]
    NewHandler(String),
}

/// What a deploy or rollback did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct VersionChange {
    pub tenant: String,
    pub handler: String,
    pub from: String,
    pub to: String,
}

/// Where a handler created at runtime takes its events from.
#[derive(Debug, Clone)]
pub struct NewHandler {
    pub pubsub: String,
    pub topic: String,
}

/// Called when a handler created at runtime needs a topic delivered (the
/// Dapr backend opens a streaming subscription; the embedded broker routes
/// by the registry and needs nothing).
pub type TopicHook = Arc<dyn Fn(&str, &str) + Send + Sync>;

#[derive(Clone)]
pub struct Deployer {
    registry: Arc<Registry>,
    runtime: Runtime,
    on_new_topic: Option<TopicHook>,
}

impl Deployer {
    pub fn new(registry: Arc<Registry>, runtime: Runtime) -> Self {
        Self { registry, runtime, on_new_topic: None }
    }

    pub fn with_topic_hook(mut self, hook: TopicHook) -> Self {
        self.on_new_topic = Some(hook);
        self
    }

    /// Creates a handler that the manifest does not name, for a topic the
    /// host may not be subscribed to yet, with the tenant's limits and the
    /// default retry policy. Its events start arriving without a restart.
    pub async fn deploy_new(&self, tenant: &str, handler: &str, placement: NewHandler, origin: &Path, bytes: Vec<u8>) -> Result<VersionChange, DeployError> {
        if self.registry.find(tenant, handler).is_some() {
            return self.deploy(tenant, handler, origin, bytes).await;
        }
        let config = HandlerConfig::new(handler, origin.to_owned(), &placement.pubsub, &placement.topic);
        crate::manifest::validate_runtime_handler(&config).map_err(|e| DeployError::NewHandler(format!("{e:#}")))?;
        let (runtime, origin_owned) = (self.runtime.clone(), origin.to_owned());
        let component = tokio::task::spawn_blocking(move || runtime.load_bytes(&origin_owned, &bytes))
            .await
            .map_err(|e| DeployError::Internal(e.to_string()))??;
        let version = component.version.clone();
        self.registry.add(tenant, config, Arc::new(component)).map_err(|e| match e {
            AddError::UnknownTenant(_) => DeployError::UnknownHandler { tenant: tenant.into(), handler: handler.into() },
            AddError::Invalid(why) => DeployError::NewHandler(why),
        })?;
        if let Some(hook) = &self.on_new_topic {
            hook(&placement.pubsub, &placement.topic);
        }
        tracing::info!(tenant, handler, version = &version[..12], topic = %placement.topic, "new handler deployed");
        Ok(VersionChange { tenant: tenant.into(), handler: handler.into(), from: String::new(), to: version })
    }

    fn handler(&self, tenant: &str, handler: &str) -> Result<Arc<Handler>, DeployError> {
        self.registry
            .find(tenant, handler)
            .ok_or_else(|| DeployError::UnknownHandler { tenant: tenant.into(), handler: handler.into() })
    }

    /// Deploys `bytes` as the handler's new version; `origin` names them in
    /// errors and logs (a file path, or where an upload came from).
    pub async fn deploy(&self, tenant: &str, handler: &str, origin: &Path, bytes: Vec<u8>) -> Result<VersionChange, DeployError> {
        let target = self.handler(tenant, handler)?;
        let limit = target.tenant.limits.max_component_bytes;
        if bytes.len() > limit {
            return Err(DeployError::TooLarge { tenant: tenant.into(), size: bytes.len(), limit });
        }
        let (runtime, origin_owned) = (self.runtime.clone(), origin.to_owned());
        let component = tokio::task::spawn_blocking(move || runtime.load_bytes(&origin_owned, &bytes))
            .await
            .map_err(|e| DeployError::Internal(e.to_string()))??;
        let old = target.swap(Arc::new(component));
        let change = VersionChange {
            tenant: tenant.into(),
            handler: handler.into(),
            from: old.version.clone(),
            to: target.current().version.clone(),
        };
        tracing::info!(tenant, handler, from = &change.from[..12], to = &change.to[..12], origin = %origin.display(),
            "handler version deployed; new events run on it");
        Ok(change)
    }

    pub fn rollback(&self, tenant: &str, handler: &str) -> Result<VersionChange, DeployError> {
        let target = self.handler(tenant, handler)?;
        let (from, to) = target
            .rollback()
            .ok_or_else(|| DeployError::NothingToRollBack { tenant: tenant.into(), handler: handler.into() })?;
        tracing::info!(tenant, handler, from = &from.version[..12], to = &to.version[..12], "handler rolled back");
        Ok(VersionChange { tenant: tenant.into(), handler: handler.into(), from: from.version.clone(), to: to.version.clone() })
    }
}
