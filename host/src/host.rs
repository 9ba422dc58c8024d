//! Assembling a host: store, runtime, handlers, pipeline, broker side and
//! background tasks, started together and stopped together.
//!
//! Two backends: the embedded one (in-process broker, redb store; no Dapr
//! needed) and Dapr (a sidecar delivers events to the app routes; the store
//! and publishes go through the sidecar).

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::broker::Publisher;
use crate::broker::embedded::{self, EmbeddedBroker};
use crate::dapr::streaming::StreamingSubscriptions;
use crate::dapr::{DaprStore, Sidecar};
use crate::deploy::Deployer;
use crate::watch;
use crate::manifest::Manifest;
use crate::pipeline::Pipeline;
use crate::registry::Registry;
use crate::relay::{self, RelayTrigger};
use crate::runtime::{EngineConfig, Runtime};
use crate::server::{self, AppState};
use crate::store::{DeliveryStore, EmbeddedStore};

/// How often expired idempotency records are purged.
const PURGE_INTERVAL: Duration = Duration::from_secs(600);
/// How long a stopping host waits for events in progress.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// How long start-up waits for a Dapr sidecar to come up.
const SIDECAR_WAIT: Duration = Duration::from_secs(60);

/// Where events come from and where the host keeps its records.
#[derive(Debug, Clone)]
pub enum Backend {
    /// In-process broker and the embedded store under `data_dir`.
    Embedded,
    /// A Dapr sidecar: events arrive on the app routes; records live in
    /// the Dapr state store `state_store`.
    Dapr {
        sidecar_url: String,
        state_store: String,
        /// The sidecar's gRPC address, for streaming subscriptions to topics
        /// handlers added at runtime need; without it such topics are not
        /// delivered until a restart.
        grpc_url: Option<String>,
    },
}

/// How the host runs.
#[derive(Debug, Clone)]
pub struct HostOptions {
    /// The directory of the embedded store (`wasmsub.redb`).
    pub data_dir: PathBuf,
    pub engine: EngineConfig,
    pub backend: Backend,
    /// The admin API's bearer token; `None` disables deploys over HTTP.
    pub admin_token: Option<String>,
    /// Deploy a handler's component file when it changes on disk.
    pub watch: bool,
}

impl HostOptions {
    /// The embedded backend with default engine settings.
    pub fn embedded(data_dir: PathBuf) -> Self {
        Self { data_dir, engine: EngineConfig::default(), backend: Backend::Embedded, admin_token: None, watch: false }
    }

    pub fn store_path(&self) -> PathBuf {
        self.data_dir.join("wasmsub.redb")
    }
}

/// A running host.
pub struct Host {
    pub registry: Arc<Registry>,
    pub pipeline: Arc<Pipeline>,
    /// The in-process broker (embedded backend only).
    pub broker: Option<EmbeddedBroker>,
    pub deployer: Deployer,
    admin_token: Option<Arc<str>>,
    tasks: TaskTracker,
    shutdown: CancellationToken,
}

impl Host {
    /// Loads every handler (a bad component stops start-up with its path)
    /// and starts the backend's background tasks.
    pub async fn start(manifest: &Manifest, options: &HostOptions) -> anyhow::Result<Self> {
        match &options.backend {
            Backend::Embedded => {
                let store = Arc::new(EmbeddedStore::open(&options.store_path())?);
                Self::start_with_store(manifest, options, store).await
            }
            Backend::Dapr { sidecar_url, state_store, grpc_url } => {
                let sidecar = Sidecar::new(sidecar_url)?;
                wait_for_sidecar(&sidecar).await?;
                let store = Arc::new(DaprStore::new(sidecar.clone(), state_store));
                let mut host = Self::assemble(manifest, options, store, Some(Arc::new(sidecar))).await?;
                if let Some(grpc_url) = grpc_url {
                    let streams = StreamingSubscriptions::new(
                        grpc_url.clone(),
                        host.registry.clone(),
                        host.pipeline.clone(),
                        host.tasks.clone(),
                        host.shutdown.clone(),
                    );
                    host.deployer = host.deployer.with_topic_hook(Arc::new(move |pubsub: &str, topic: &str| streams.ensure(pubsub, topic)));
                }
                Ok(host)
            }
        }
    }

    /// The embedded backend on a given store (benchmarks, tests).
    pub async fn start_with_store(manifest: &Manifest, options: &HostOptions, store: Arc<dyn DeliveryStore>) -> anyhow::Result<Self> {
        Self::assemble(manifest, options, store, None).await
    }

    /// `publisher` is the sidecar, or `None` for the embedded broker.
    async fn assemble(manifest: &Manifest, options: &HostOptions, store: Arc<dyn DeliveryStore>, publisher: Option<Arc<dyn Publisher>>) -> anyhow::Result<Self> {
        let mut engine_config = options.engine.clone();
        let largest_memory = manifest.tenants.iter().map(|t| t.limits.memory_mib as usize * 1024 * 1024).max().unwrap_or(0);
        engine_config.max_memory_bytes = engine_config.max_memory_bytes.max(largest_memory);
        engine_config.consume_fuel |= manifest.tenants.iter().any(|t| t.limits.fuel.is_some());
        if engine_config.cache_dir.is_none() {
            engine_config.cache_dir = Some(options.data_dir.join("compiled"));
        }
        check_concurrency_fits(manifest, &engine_config)?;
        let runtime = Runtime::new(&engine_config)?;
        // Compiling components is CPU work: keep it off the async threads.
        let registry = {
            let (manifest, runtime) = (manifest.clone(), runtime.clone());
            Arc::new(tokio::task::spawn_blocking(move || Registry::load(&manifest, &runtime)).await??)
        };
        let trigger = RelayTrigger::default();
        let deployer = Deployer::new(registry.clone(), runtime.clone());
        let pipeline = Arc::new(Pipeline::new(store.clone(), runtime, trigger.clone(), manifest.idempotency.clone()));
        let tasks = TaskTracker::new();
        let shutdown = CancellationToken::new();
        let (publisher, broker) = match publisher {
            Some(publisher) => (publisher, None),
            None => {
                let (broker, queue) = EmbeddedBroker::new(registry.clone(), pipeline.clone());
                tasks.spawn(embedded::run_dispatcher(queue, registry.clone(), pipeline.clone(), tasks.clone(), shutdown.clone()));
                (Arc::new(broker.clone()) as Arc<dyn Publisher>, Some(broker))
            }
        };
        pipeline.set_publisher(publisher.clone());
        tasks.spawn(relay::run(store.clone(), publisher, trigger.clone(), shutdown.clone()));
        tasks.spawn(purge_expired(store, shutdown.clone()));
        if options.watch {
            let (registry, deployer, shutdown) = (registry.clone(), deployer.clone(), shutdown.clone());
            tasks.spawn(async move {
                if let Err(error) = watch::run(registry, deployer, shutdown).await {
                    tracing::error!(error = %format!("{error:#}"), "component file watcher stopped; deploy through the admin API");
                }
            });
        }
        // Entries a previous run committed but did not publish go out now.
        trigger.poke();
        let admin_token = options.admin_token.as_deref().map(Arc::from);
        Ok(Self { registry, pipeline, broker, deployer, admin_token, tasks, shutdown })
    }

    pub fn router(&self) -> axum::Router {
        server::router(AppState {
            registry: self.registry.clone(),
            pipeline: self.pipeline.clone(),
            broker: self.broker.clone(),
            deployer: self.deployer.clone(),
            admin_token: self.admin_token.clone(),
        })
    }

    /// Stops background work and waits (bounded) for deliveries in progress.
    pub async fn shutdown(self) {
        self.shutdown.cancel();
        self.tasks.close();
        if tokio::time::timeout(DRAIN_TIMEOUT, self.tasks.wait()).await.is_err() {
            tracing::warn!("deliveries still running after {DRAIN_TIMEOUT:?}; stopping anyway");
        }
    }
}

/// Each tenant's concurrency must fit the instance pool: a tenant allowed
/// more events at once than there are instance slots would see its excess
/// attempts fail to instantiate.
fn check_concurrency_fits(manifest: &Manifest, engine: &EngineConfig) -> anyhow::Result<()> {
    for tenant in &manifest.tenants {
        if tenant.limits.max_concurrency > engine.instance_slots {
            anyhow::bail!(
                "tenant `{}` has max_concurrency {} but the instance pool has {} slots: lower it or raise --instance-slots",
                tenant.name, tenant.limits.max_concurrency, engine.instance_slots
            );
        }
    }
    Ok(())
}

async fn wait_for_sidecar(sidecar: &Sidecar) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + SIDECAR_WAIT;
    let mut logged = false;
    while !sidecar.healthy().await {
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!("the Dapr sidecar at {} did not become healthy within {SIDECAR_WAIT:?}", sidecar.base());
        }
        if !logged {
            tracing::info!(sidecar = sidecar.base(), "waiting for the Dapr sidecar");
            logged = true;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    Ok(())
}

/// Loads every component the manifest names, as start-up would, and reports
/// the first that cannot serve.
/// Returns how many handlers loaded.
pub fn check(manifest: &Manifest, options: &HostOptions) -> anyhow::Result<usize> {
    let runtime = Runtime::new(&options.engine)?;
    let registry = Registry::load(manifest, &runtime)?;
    let handlers = registry.handlers();
    for handler in &handlers {
        tracing::info!(tenant = %handler.tenant.name, handler = %handler.name, version = %handler.current().version, "ok");
    }
    Ok(handlers.len())
}

/// Runs the host, serving HTTP on `listener`, until `shutdown`.
pub async fn run(listener: TcpListener, manifest: Manifest, options: HostOptions, shutdown: impl Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
    let host = Host::start(&manifest, &options).await.context("starting the host")?;
    let served = server::serve(listener, host.router(), shutdown).await;
    host.shutdown().await;
    served
}

async fn purge_expired(store: Arc<dyn DeliveryStore>, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(PURGE_INTERVAL) => {}
        }
        match store.purge_expired().await {
            Ok(0) => {}
            Ok(purged) => tracing::info!(purged, "expired idempotency records purged"),
            Err(error) => tracing::warn!(%error, "purging expired idempotency records failed; will try again"),
        }
    }
}
