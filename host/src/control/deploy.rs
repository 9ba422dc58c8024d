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

use anyhow::Context as _;

use super::journal::{DeployJournal, HandlerId, Restored};
use super::registry::{AddError, Handler, ROLLBACK_DEPTH, Registry, Tenant, VersionSet};
use crate::manifest::HandlerConfig;
use crate::metrics::Metrics;
use crate::runtime::{HandlerComponent, LoadError, Runtime};

/// How long start-up waits for the store to answer the deploy journal: a
/// sidecar reports healthy before its state API serves (daprd loads its
/// components once the app's port is open), and Redis may come up late.
const JOURNAL_WAIT: std::time::Duration = std::time::Duration::from_secs(300);

/// The journal's records, once the store answers (retried with backoff up
/// to [`JOURNAL_WAIT`]): serving before restoring would run events on
/// versions about to be replaced.
async fn read_journal(journal: &DeployJournal) -> anyhow::Result<Vec<Restored>> {
    let deadline = tokio::time::Instant::now() + JOURNAL_WAIT;
    let mut backoff = crate::pipeline::Backoff::new(std::time::Duration::from_millis(200), std::time::Duration::from_secs(5));
    loop {
        match journal.recorded().await {
            Ok(recorded) => return Ok(recorded),
            Err(error) if tokio::time::Instant::now() < deadline => {
                let wait = backoff.next_delay();
                tracing::warn!(%error, retry_in = %humantime::format_duration(wait), "cannot read the deploy journal yet; the host serves once it can");
                tokio::time::sleep(wait).await;
            }
            Err(error) => return Err(error).context(format!("reading the deploy journal from the store (tried for {JOURNAL_WAIT:?})")),
        }
    }
}

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
    /// The change could not be recorded in the store, so it would not
    /// survive a restart: it was not made.
    #[error("cannot record the deploy in the store (nothing changed; try again): {0}")]
    NotRecorded(String),
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
    /// Where changes are recorded so a restart keeps them (none in tests
    /// that do not care).
    journal: Option<Arc<DeployJournal>>,
    /// One change at a time: each is recorded, then installed.
    changes: Arc<tokio::sync::Mutex<()>>,
}

impl Deployer {
    /// A deployer for `registry`'s handlers, compiling with `runtime`.
    pub(crate) fn new(registry: Arc<Registry>, runtime: Runtime, metrics: Arc<Metrics>) -> Self {
        let (events, _) = tokio::sync::broadcast::channel(DEPLOY_EVENT_BUFFER);
        Self { registry, runtime, on_new_topic: None, events, metrics, journal: None, changes: Arc::default() }
    }

    /// Records every change in `journal` before making it.
    pub(crate) fn with_journal(mut self, journal: Arc<DeployJournal>) -> Self {
        self.journal = Some(journal);
        self
    }

    /// Records that a handler is about to serve `versions`.
    async fn record(&self, handler: &HandlerId<'_>, versions: &VersionSet, bytes: Option<&[u8]>) -> Result<(), DeployError> {
        match &self.journal {
            Some(journal) => journal.record(&self.registry, handler, versions, bytes).await.map_err(|e| DeployError::NotRecorded(e.to_string())),
            None => Ok(()),
        }
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
            Err(DeployError::UnknownTenant(_) | DeployError::UnknownHandler { .. } | DeployError::NotRecorded(_)) => None,
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

    /// Puts back what the journal recorded, before any event runs: the
    /// serving version and rollback history of each handler deployed to
    /// at runtime, and the handlers created at runtime. The manifest wins
    /// for a handler whose component it changed since the deploy (logged).
    pub(crate) async fn restore(&self) -> anyhow::Result<()> {
        let Some(journal) = &self.journal else { return Ok(()) };
        let recorded = read_journal(journal).await?;
        for Restored { tenant, handler, record, components } in recorded {
            if self.registry.tenant(&tenant).is_none() {
                tracing::warn!(%tenant, %handler, "deploys were recorded for a tenant the manifest no longer names; not restored");
                continue;
            }
            let (current, previous) = record.versions();
            let previous: Vec<_> = previous.iter().filter_map(|v| components.get(v).cloned()).collect();
            let recorded_current = components.get(current).cloned();
            let Some(target) = self.registry.find(&tenant, &handler) else {
                let (Some((pubsub, topic)), Some(current)) = (record.placement(), recorded_current) else {
                    tracing::warn!(%tenant, %handler, "deploys were recorded for a handler the manifest no longer names; not restored");
                    continue;
                };
                let config = crate::manifest::HandlerConfig::new(&handler, record.origin().to_owned(), pubsub, topic);
                match self.registry.add(&tenant, config, current.clone()) {
                    Ok(added) => {
                        let versions = VersionSet { current, previous };
                        tracing::info!(%tenant, %handler, topic, handler.version = %versions.current.short_version(), earlier = versions.previous.len(),
                            "restored a handler created at runtime");
                        added.install(versions);
                    }
                    Err(error) => tracing::warn!(%tenant, %handler, ?error, "a handler created at runtime cannot be restored"),
                }
                continue;
            };
            let manifest = target.current();
            let versions = match recorded_current {
                Some(current) if record.manifest_unchanged(&manifest.version) => {
                    tracing::info!(%tenant, %handler, handler.version = %current.short_version(), manifest_version = %manifest.short_version(),
                        earlier = previous.len(), "restored the version deployed at runtime (the manifest's component is unchanged since)");
                    VersionSet { current, previous }
                }
                Some(current) if current.version == manifest.version => {
                    // The manifest now names what was deployed (a watched file).
                    VersionSet { current: manifest, previous: previous.into_iter().filter(|c| c.version != current.version).collect() }
                }
                current => {
                    // The manifest's component changed since the deploy: it
                    // serves, and what was deployed stays for rollback.
                    let mut kept: Vec<_> = previous.into_iter().chain(current).filter(|c| c.version != manifest.version).collect();
                    kept.drain(..kept.len().saturating_sub(ROLLBACK_DEPTH));
                    tracing::warn!(%tenant, %handler, handler.version = %manifest.short_version(), earlier = kept.len(),
                        "the manifest's component changed since the last runtime deploy: the manifest's version serves; the deployed ones are kept for rollback");
                    VersionSet { current: manifest, previous: kept }
                }
            };
            if let Err(error) = self.record(&HandlerId::of(&target), &versions, None).await {
                tracing::warn!(%tenant, %handler, %error, "could not update the deploy journal after restoring");
            }
            target.install(versions);
        }
        let live = self.registry.handlers().iter().flat_map(|h| h.versions().all().map(|c| c.version.clone()).collect::<Vec<_>>()).collect();
        let pruned = self.runtime.prune_cache(&live);
        if pruned > 0 {
            tracing::info!(cache_entries = pruned, "compile cache: dropped versions no handler can serve or roll back to");
        }
        Ok(())
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
        let component = self.compile_checked(&owner, origin, bytes.clone()).await?;
        let version = component.version.clone();
        let _turn = self.changes.lock().await;
        let versions = VersionSet { current: component.clone(), previous: Vec::new() };
        self.record(&HandlerId { tenant, name: handler, config: &config }, &versions, Some(&bytes)).await?;
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
        let component = self.compile_checked(&target.tenant, origin, bytes.clone()).await?;
        let _turn = self.changes.lock().await;
        let before = target.versions();
        let from = before.current.version.clone();
        // Deploying the serving version again changes nothing.
        let Some(after) = before.deployed(component) else {
            return Ok(VersionChange { tenant: tenant.into(), handler: handler.into(), from: from.clone(), to: from });
        };
        self.record(&HandlerId::of(&target), &after, Some(&bytes)).await?;
        let to = after.current.version.clone();
        target.install(after);
        let change = VersionChange { tenant: tenant.into(), handler: handler.into(), from, to };
        tracing::info!(tenant, handler, from = %&change.from[..12], to = %&change.to[..12], origin = %origin.display(),
            "handler version deployed; new attempts run on it");
        Ok(change)
    }

    /// Returns a handler to the version before its current one.
    pub async fn rollback(&self, tenant: &str, handler: &str) -> Result<VersionChange, DeployError> {
        let result = self.roll_back(tenant, handler).await;
        self.announce(tenant, handler, Path::new(""), &result);
        result
    }

    async fn roll_back(&self, tenant: &str, handler: &str) -> Result<VersionChange, DeployError> {
        let target = self.handler(tenant, handler)?;
        let _turn = self.changes.lock().await;
        let before = target.versions();
        let after = before.rolled_back().ok_or_else(|| DeployError::NothingToRollBack { tenant: tenant.into(), handler: handler.into() })?;
        self.record(&HandlerId::of(&target), &after, None).await?;
        let (from, to) = (before.current.version.clone(), after.current.version.clone());
        target.install(after);
        tracing::info!(tenant, handler, from = %&from[..12], to = %&to[..12], "handler rolled back");
        Ok(VersionChange { tenant: tenant.into(), handler: handler.into(), from, to })
    }
}
