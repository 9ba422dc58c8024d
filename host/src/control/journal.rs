//! The deploy journal: what deploys changed, kept in the store so a restart
//! comes back on it. For each handler that was deployed to (or created) at
//! runtime it records the serving version and the ones a rollback returns
//! to, and the component bytes of each; at start, [`DeployJournal::restore`]
//! puts them back before any event runs.
//!
//! The manifest stays the source of truth for what it names: a recorded
//! deploy is restored only while the manifest still points at the component
//! it pointed at when the deploy was made. If the manifest's component has
//! changed since, the manifest's version serves and the deployed versions
//! are kept for rollback (logged as a warning either way).
//!
//! Records live apart from tenant state (`DeliveryStore::put_record`):
//! - `deploys|index`: the handlers with records, and the stored components;
//! - `deploys|handler|{len}:{tenant}|{handler}`: a [`HandlerRecord`];
//! - `deploys|component|{sha256}`: a component's bytes, written once.
//!
//! Components no handler can serve or roll back to any more are deleted
//! from the journal and from the compile cache, so both stay bounded
//! (`ROLLBACK_DEPTH` + 1 versions per handler).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::registry::{Handler, Registry, VersionSet};
use crate::runtime::{HandlerComponent, Runtime};
use crate::store::{DeliveryStore, StoreError};

// No `/` in keys: Dapr's HTTP router decodes `%2F` in a state key's path
// segment and then finds no route.
const INDEX_KEY: &str = "deploys|index";

fn handler_key(tenant: &str, handler: &str) -> String {
    // The tenant's length first: no pair of names can make the same key.
    format!("deploys|handler|{}:{tenant}|{handler}", tenant.len())
}

fn component_key(version: &str) -> String {
    format!("deploys|component|{version}")
}

/// Which handlers have records, and which components are stored.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Index {
    handlers: BTreeSet<(String, String)>,
    components: BTreeSet<String>,
}

/// One handler's versions as a deploy left them.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct HandlerRecord {
    /// For a handler created at runtime: where its events come from.
    placement: Option<Placement>,
    /// For a handler the manifest names: the version of the manifest's
    /// component when this was recorded.
    manifest_version: Option<String>,
    /// Where the serving version came from (a file, an upload), for logs.
    origin: String,
    /// The serving version.
    current: String,
    /// Versions a rollback returns to, newest last.
    previous: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Placement {
    pubsub: String,
    topic: String,
}

/// The handler a record is about (it may not be in the registry yet).
pub struct HandlerId<'a> {
    /// Its tenant.
    pub tenant: &'a str,
    /// Its name.
    pub name: &'a str,
    /// Its settings (the placement of a handler created at runtime).
    pub config: &'a crate::manifest::HandlerConfig,
}

impl<'a> HandlerId<'a> {
    /// The id of a handler in the registry.
    pub fn of(handler: &'a Handler) -> Self {
        Self { tenant: &handler.tenant.name, name: &handler.name, config: &handler.config }
    }
}

/// Reads and writes the journal. One per host; the deployer serialises
/// the changes it records.
pub struct DeployJournal {
    store: Arc<dyn DeliveryStore>,
    runtime: Runtime,
    /// The version of each manifest-named handler's component at start.
    manifest_versions: HashMap<(String, String), String>,
}

/// A handler's versions, compiled, as the journal gives them back.
pub(crate) struct Restored {
    pub tenant: String,
    pub handler: String,
    pub record: HandlerRecord,
    pub components: HashMap<String, Arc<HandlerComponent>>,
}

impl DeployJournal {
    /// A journal over `store`; `registry` is as the manifest made it.
    pub fn new(store: Arc<dyn DeliveryStore>, runtime: Runtime, registry: &Registry) -> Self {
        let manifest_versions = registry
            .handlers()
            .iter()
            .map(|h| ((h.tenant.name.to_string(), h.name.to_string()), h.current().version.clone()))
            .collect();
        Self { store, runtime, manifest_versions }
    }

    async fn index(&self) -> Result<Index, StoreError> {
        match self.store.get_record(INDEX_KEY).await? {
            Some(bytes) => serde_json::from_slice(&bytes).map_err(|e| corrupt(INDEX_KEY, e)),
            None => Ok(Index::default()),
        }
    }

    /// Records that `handler` is about to serve `versions` (`bytes` are the
    /// new version's, if it is new). Called before the change is
    /// installed: a deploy that was answered is on record.
    pub async fn record(&self, registry: &Registry, handler: &HandlerId<'_>, versions: &VersionSet, bytes: Option<&[u8]>) -> Result<(), StoreError> {
        let mut index = self.index().await?;
        for component in versions.all() {
            if index.components.contains(&component.version) {
                continue;
            }
            let stored = match bytes.filter(|b| hex::encode(Sha256::digest(b)) == component.version) {
                Some(bytes) => Some(bytes.to_vec()),
                None => bytes_from_origin(component),
            };
            match stored {
                Some(stored) => {
                    self.store.put_record(&component_key(&component.version), Some(&stored)).await?;
                    index.components.insert(component.version.clone());
                }
                // The file changed or went: a rollback to it cannot survive a
                // restart, which the restore will say.
                None => tracing::debug!(version = %component.short_version(), path = %component.path.display(), "component bytes not available to record"),
            }
        }
        let key = (handler.tenant.to_owned(), handler.name.to_owned());
        let record = HandlerRecord {
            placement: (!self.manifest_versions.contains_key(&key))
                .then(|| Placement { pubsub: handler.config.pubsub.clone(), topic: handler.config.topic.clone() }),
            manifest_version: self.manifest_versions.get(&key).cloned(),
            origin: versions.current.path.display().to_string(),
            current: versions.current.version.clone(),
            previous: versions.previous.iter().map(|c| c.version.clone()).collect(),
        };
        let record_bytes = serde_json::to_vec(&record).expect("a record serialises");
        self.store.put_record(&handler_key(&key.0, &key.1), Some(&record_bytes)).await?;
        index.handlers.insert(key);
        // What any handler can still serve or roll back to stays; the rest goes.
        let others = registry.handlers().into_iter().filter(|h| !(*h.tenant.name == *handler.tenant && *h.name == *handler.name));
        let mut live: HashSet<String> = others.flat_map(|h| h.versions().all().map(|c| c.version.clone()).collect::<Vec<_>>()).collect();
        live.extend(versions.all().map(|c| c.version.clone()));
        let unused: Vec<String> = index.components.iter().filter(|v| !live.contains(*v)).cloned().collect();
        self.write_index(&index.handlers, index.components.iter().filter(|v| live.contains(*v)).cloned().collect()).await?;
        for version in &unused {
            // After the index: a crash in between leaves an unlisted record,
            // never a listed one without bytes.
            self.store.put_record(&component_key(version), None).await?;
        }
        let pruned = self.runtime.prune_cache(&live);
        if !unused.is_empty() || pruned > 0 {
            tracing::info!(components = unused.len(), cache_entries = pruned, "dropped versions no handler can serve or roll back to");
        }
        Ok(())
    }

    async fn write_index(&self, handlers: &BTreeSet<(String, String)>, components: BTreeSet<String>) -> Result<(), StoreError> {
        let index = Index { handlers: handlers.clone(), components };
        self.store.put_record(INDEX_KEY, Some(&serde_json::to_vec(&index).expect("an index serialises"))).await
    }

    /// Every recorded handler with its versions compiled. A version whose
    /// bytes are missing or no longer load is left out, with a warning.
    pub(crate) async fn recorded(&self) -> Result<Vec<Restored>, StoreError> {
        let index = self.index().await?;
        let mut restored = Vec::new();
        for (tenant, handler) in &index.handlers {
            let Some(bytes) = self.store.get_record(&handler_key(tenant, handler)).await? else { continue };
            let record: HandlerRecord = serde_json::from_slice(&bytes).map_err(|e| corrupt(&handler_key(tenant, handler), e))?;
            let mut components = HashMap::new();
            for version in record.previous.iter().chain(std::iter::once(&record.current)) {
                match self.load(version).await {
                    Ok(component) => {
                        components.insert(version.clone(), component);
                    }
                    Err(why) => tracing::warn!(tenant, handler, version = %&version[..version.len().min(12)], %why, "a recorded version cannot be restored"),
                }
            }
            restored.push(Restored { tenant: tenant.clone(), handler: handler.clone(), record, components });
        }
        Ok(restored)
    }

    async fn load(&self, version: &str) -> Result<Arc<HandlerComponent>, String> {
        let bytes = self.store.get_record(&component_key(version)).await.map_err(|e| e.to_string())?.ok_or("its bytes are not in the journal")?;
        let (runtime, origin) = (self.runtime.clone(), PathBuf::from(format!("journal:{}", &version[..version.len().min(12)])));
        let component = tokio::task::spawn_blocking(move || runtime.load_bytes(&origin, &bytes)).await.map_err(|e| e.to_string())?;
        component.map(Arc::new).map_err(|e| e.to_string())
    }
}

impl HandlerRecord {
    /// Whether the manifest still points where it did when this was
    /// recorded (`None` for a handler the manifest does not name).
    pub fn manifest_unchanged(&self, manifest_version: &str) -> bool {
        self.placement.is_none() && self.manifest_version.as_deref() == Some(manifest_version)
    }

    /// Where a handler created at runtime takes its events from.
    pub fn placement(&self) -> Option<(&str, &str)> {
        self.placement.as_ref().map(|p| (p.pubsub.as_str(), p.topic.as_str()))
    }

    /// The serving version, and the earlier ones (newest last).
    pub fn versions(&self) -> (&str, &[String]) {
        (&self.current, &self.previous)
    }

    /// Where the serving version came from.
    pub fn origin(&self) -> &Path {
        Path::new(&self.origin)
    }
}

/// The bytes of `component` from the file it was loaded from, if the file
/// still holds exactly them.
fn bytes_from_origin(component: &HandlerComponent) -> Option<Vec<u8>> {
    let bytes = std::fs::read(&component.path).ok()?;
    (hex::encode(Sha256::digest(&bytes)) == component.version).then_some(bytes)
}

fn corrupt(key: &str, error: serde_json::Error) -> StoreError {
    StoreError::Unavailable(anyhow::anyhow!("deploy journal record `{key}` is unreadable: {error}"))
}
