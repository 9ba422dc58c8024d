//! Assembling a host: store, runtime, handlers, pipeline, the delivery door,
//! the transports and the background tasks, started together and stopped
//! together.
//!
//! Two backends: the embedded one (in-process broker and store; no Dapr
//! needed) and Dapr (a sidecar delivers events to the app routes; the store
//! and publishes go through the sidecar). The parts only ever point down
//! the pipeline: transports hold the door, the door holds the pipeline, the
//! pipeline holds the store and a publisher; nothing points back.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use tokio::net::TcpListener;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::budget::{BudgetInputs, MemoryBudget};
use crate::clock::{self, SharedClock};
use crate::control::Deployer;
use crate::control::journal::DeployJournal;
use crate::control::registry::Registry;
use crate::control::watch;
use crate::delivery::{Delivery, Door};
use crate::manifest::Manifest;
use crate::metrics::Metrics;
use crate::outbox::Publisher;
use crate::outbox::relay::{self, RelayTrigger};
use crate::pipeline::dead_letter::DeadLetter;
use crate::pipeline::outcome::DaprStatus;
use crate::pipeline::flow::FlowControl;
use crate::pipeline::{EventReport, Pipeline, PipelineParts};
use crate::runtime::{EngineConfig, Runtime};
use crate::server::{self, admin::AdminState, health::HealthState, metrics::MetricsState};
use crate::sidecar::Sidecar;
use crate::store::{DaprStore, DeliveryStore, EmbeddedOptions, EmbeddedStore, MemoryQueue, MessageQueue, QueueLimits};
use crate::transport::dapr_streaming::StreamingSubscriptions;
use crate::transport::embedded::{self, EmbeddedBroker, PublishError};
use crate::transport::{dapr_app, publish_api};

/// How often expired idempotency records are purged.
const PURGE_INTERVAL: Duration = Duration::from_secs(600);
/// How long a stopping host waits for events in progress.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// After the drain timeout, how long abandoned attempts get to unwind
/// (their instances dropped, their claims given back) before the stop.
const ABANDON_GRACE: Duration = Duration::from_secs(5);
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
        /// The sidecar's HTTP address.
        sidecar_url: String,
        /// The Dapr state store component for the host's records.
        state_store: String,
        /// The sidecar's gRPC address, for streaming subscriptions to topics
        /// handlers added at runtime need; without it such topics are not
        /// delivered until a restart.
        grpc_url: Option<String>,
    },
}

/// How the host runs.
#[derive(Clone)]
pub struct HostOptions {
    /// The directory of the embedded store (`wasmsub.redb`) and the
    /// compiled-component cache.
    pub data_dir: PathBuf,
    /// The instance pool and engine settings.
    pub engine: EngineConfig,
    /// Where events come from.
    pub backend: Backend,
    /// The admin API's bearer token; `None` disables deploys over HTTP.
    pub admin_token: Option<String>,
    /// Deploy a handler's component file when it changes on disk.
    pub watch: bool,
    /// What the embedded broker's queue may hold before publishers get 429.
    pub queue_limits: QueueLimits,
    /// The embedded store's page cache, in bytes.
    pub store_cache_bytes: usize,
    /// Deliveries admitted through the door at once (`None`: twice the
    /// instance slots); beyond it the broker is answered RETRY.
    pub max_in_flight: Option<usize>,
    /// The clock leases and expiries are read from (tests use a manual one).
    pub clock: SharedClock,
}

impl HostOptions {
    /// The embedded backend with default settings.
    pub fn embedded(data_dir: PathBuf) -> Self {
        Self {
            data_dir,
            engine: EngineConfig::default(),
            backend: Backend::Embedded,
            admin_token: None,
            watch: false,
            queue_limits: QueueLimits::default(),
            store_cache_bytes: EmbeddedOptions::default().cache_bytes,
            max_in_flight: None,
            clock: clock::system(),
        }
    }

    /// Where the embedded store's file is.
    pub fn store_path(&self) -> PathBuf {
        self.data_dir.join("wasmsub.redb")
    }
}

/// Where committed messages go and where the embedded broker queues.
enum Wiring {
    /// Behind Dapr: publishes go to the sidecar.
    Sidecar(Sidecar),
    /// Embedded: a queue the broker accepts onto and the pipeline publishes
    /// into (the store itself, when it is one: then `durable`).
    Queue { queue: Arc<dyn MessageQueue>, durable: bool },
}

/// A running host.
pub struct Host {
    registry: Arc<Registry>,
    pipeline: Arc<Pipeline>,
    door: Arc<Door>,
    /// The in-process broker (embedded backend only).
    broker: Option<EmbeddedBroker>,
    deployer: Deployer,
    admin_token: Option<Arc<str>>,
    health: HealthState,
    metrics: Arc<Metrics>,
    runtime: Runtime,
    tasks: TaskTracker,
    /// Cancelled when the host stops: the door refuses, the dispatcher
    /// stops taking, retries waiting give their events back, background
    /// tasks end.
    stopping: CancellationToken,
    /// Cancelled when the drain times out: attempts still running are cut
    /// off while the runtime is still whole (their events come again).
    abandon: CancellationToken,
}

impl Host {
    /// Loads every handler (a bad component stops start-up with its path)
    /// and starts the backend's background tasks.
    pub async fn start(manifest: &Manifest, options: &HostOptions) -> anyhow::Result<Self> {
        match &options.backend {
            Backend::Embedded => {
                let store_options = EmbeddedOptions {
                    cache_bytes: options.store_cache_bytes,
                    queue_limits: options.queue_limits,
                    clock: options.clock.clone(),
                };
                let store = Arc::new(EmbeddedStore::open_with(&options.store_path(), store_options)?);
                // The store is also the broker's queue: accepted publishes and
                // committed ones are on disk, in one file.
                Self::assemble(manifest, options, store.clone(), Wiring::Queue { queue: store, durable: true }).await
            }
            Backend::Dapr { sidecar_url, state_store, grpc_url } => {
                let sidecar = Sidecar::new(sidecar_url)?;
                wait_for_sidecar(&sidecar).await?;
                let store = Arc::new(DaprStore::new(sidecar.clone(), state_store, options.clock.clone()));
                let host = Self::assemble(manifest, options, store, Wiring::Sidecar(sidecar)).await?;
                Ok(match grpc_url {
                    Some(grpc_url) => host.with_streaming(grpc_url.clone()),
                    None => host,
                })
            }
        }
    }

    /// The embedded backend on a given store with a queue in memory
    /// (benchmarks, tests): nothing queued survives the process.
    pub async fn start_with_store(manifest: &Manifest, options: &HostOptions, store: Arc<dyn DeliveryStore>) -> anyhow::Result<Self> {
        let queue = Arc::new(MemoryQueue::new(options.queue_limits));
        Self::assemble(manifest, options, store, Wiring::Queue { queue, durable: false }).await
    }

    async fn assemble(manifest: &Manifest, options: &HostOptions, store: Arc<dyn DeliveryStore>, wiring: Wiring) -> anyhow::Result<Self> {
        let engine_config = engine_config_for(manifest, options)?;
        let runtime = Runtime::new(&engine_config)?;
        // Compiling components is CPU work: keep it off the async threads.
        let registry = {
            let (manifest, runtime) = (manifest.clone(), runtime.clone());
            Arc::new(tokio::task::spawn_blocking(move || Registry::load(&manifest, &runtime)).await??)
        };
        let metrics = Arc::new(Metrics::new());
        // Runtime deploys recorded by an earlier run serve again before any
        // event runs.
        let journal = Arc::new(DeployJournal::new(store.clone(), runtime.clone(), &registry));
        let deployer = Deployer::new(registry.clone(), runtime.clone(), metrics.clone()).with_journal(journal);
        deployer.restore().await?;
        let tasks = TaskTracker::new();
        let stopping = CancellationToken::new();
        let abandon = CancellationToken::new();
        let max_in_flight = options.max_in_flight.unwrap_or(2 * engine_config.instance_slots as usize);
        let (publisher, sidecar, embedded): (Arc<dyn Publisher>, _, _) = match wiring {
            Wiring::Sidecar(sidecar) => (Arc::new(sidecar.clone()), Some(sidecar), None),
            Wiring::Queue { queue, durable } => {
                let broker = EmbeddedBroker::new(queue.clone(), registry.clone(), options.clock.clone());
                (Arc::new(broker.clone()), None, Some((broker, queue, durable)))
            }
        };
        let relay_trigger = RelayTrigger::default();
        let pipeline = Arc::new(Pipeline::new(PipelineParts {
            store: store.clone(),
            runtime: runtime.clone(),
            publisher: publisher.clone(),
            relay: relay_trigger.clone(),
            idempotency: manifest.idempotency.clone(),
            clock: options.clock.clone(),
            stopping: stopping.clone(),
            abandon: abandon.clone(),
            flow: FlowControl::new(embedded.as_ref().map(|(_, queue, _)| queue.index().clone())),
            metrics: metrics.clone(),
        }));
        let door = Arc::new(Door::new(registry.clone(), pipeline.clone(), max_in_flight, stopping.clone()));
        let budget = Arc::new(MemoryBudget::compute(manifest, &registry, &BudgetInputs {
            engine: &engine_config,
            max_in_flight,
            queue: embedded.as_ref().map(|(_, _, durable)| (options.queue_limits, !durable)),
            store_cache_bytes: match (&embedded, &sidecar) {
                (Some((_, _, true)), _) => options.store_cache_bytes,
                (_, Some(_)) => DaprStore::MEMORY_BYTES,
                _ => 0,
            },
        }));
        tracing::info!(bound = %budget, "memory bound from the configuration");
        let health = HealthState {
            store: store.clone(),
            queue: embedded.as_ref().map(|(_, queue, durable)| (queue.clone(), options.queue_limits, *durable)),
            sidecar,
            door: door.clone(),
            stopping: stopping.clone(),
            budget,
        };
        let broker = embedded.map(|(broker, queue, _)| {
            // The dispatcher takes no more than the door admits.
            let in_flight = max_in_flight.min(engine_config.instance_slots as usize);
            tasks.spawn(embedded::run_dispatcher(queue, door.clone(), in_flight, options.clock.clone(), tasks.clone(), stopping.clone()));
            broker
        });
        tasks.spawn(relay::run(store.clone(), publisher, relay_trigger.clone(), stopping.clone()));
        tasks.spawn(purge_expired(store, stopping.clone()));
        if options.watch {
            tasks.spawn(watch::start(registry.clone(), deployer.clone(), stopping.clone())?);
        }
        // Entries a previous run committed but did not publish go out now.
        relay_trigger.poke();
        let admin_token = options.admin_token.as_deref().map(Arc::from);
        Ok(Self { registry, pipeline, door, broker, deployer, admin_token, health, metrics, runtime, tasks, stopping, abandon })
    }

    /// Behind Dapr: topics that handlers deployed at runtime need are
    /// delivered through streaming subscriptions on `grpc_url`.
    fn with_streaming(mut self, grpc_url: String) -> Self {
        let streams = StreamingSubscriptions::new(grpc_url, &self.registry, self.door.clone(), self.tasks.clone(), self.stopping.clone());
        self.deployer = self.deployer.with_topic_hook(Arc::new(move |pubsub: &str, topic: &str| streams.ensure(pubsub, topic)));
        self
    }

    /// Every HTTP route: the host's own and its transports'.
    pub fn router(&self) -> axum::Router {
        let admin = AdminState {
            registry: self.registry.clone(),
            pipeline: self.pipeline.clone(),
            deployer: self.deployer.clone(),
            admin_token: self.admin_token.clone(),
            store: self.pipeline.store().clone(),
        };
        // The app routes serve both backends, so the embedded host also
        // answers deliveries in Dapr's shape; Dapr's publish API is the
        // embedded broker's (with a sidecar, publish to the sidecar).
        let mut transports = dapr_app::routes(self.registry.clone(), self.door.clone());
        if let Some(broker) = &self.broker {
            transports = transports.merge(publish_api::routes(broker.clone()));
        }
        let metrics = MetricsState { metrics: self.metrics.clone(), health: self.health.clone(), runtime: self.runtime.clone() };
        server::router(admin, self.health.clone(), metrics, transports)
    }

    /// Publishes through the embedded broker's publish API (as
    /// `POST /v1.0/publish/{pubsub}/{topic}` does).
    pub async fn publish(&self, pubsub: &str, topic: &str, body: Bytes, content_type: Option<&str>) -> Result<(), PublishError> {
        let broker = self.broker.as_ref().expect("publish is the embedded backend's API; behind Dapr, publish to the sidecar");
        broker.publish_api(pubsub, topic, body, content_type, false, &Default::default()).await
    }

    /// Hands a delivery to the door, as a transport would.
    pub async fn deliver(&self, delivery: Delivery) -> DaprStatus {
        self.door.deliver(delivery).await
    }

    /// The door deliveries come through (for callers that spawn their own
    /// deliveries, like the benchmarks).
    pub fn door(&self) -> &Arc<Door> {
        &self.door
    }

    /// Every later outcome, as it happens.
    pub fn reports(&self) -> broadcast::Receiver<EventReport> {
        self.pipeline.subscribe_reports()
    }

    /// The host's store.
    pub fn store(&self) -> &Arc<dyn DeliveryStore> {
        self.pipeline.store()
    }

    /// Recent dead letters, newest last.
    pub async fn dead_letters(&self) -> Vec<DeadLetter> {
        self.pipeline.dead_letters().await
    }

    /// Deploys and rollbacks.
    pub fn deployer(&self) -> &Deployer {
        &self.deployer
    }

    /// The version serving a handler now.
    pub fn current_version(&self, tenant: &str, handler: &str) -> Option<String> {
        self.registry.find(tenant, handler).map(|h| h.current().version.clone())
    }

    /// (messages, bytes) on the embedded broker's queue; `None` behind Dapr.
    pub fn queue_depth(&self) -> Option<(usize, usize)> {
        self.health.queue.as_ref().map(|(queue, _, _)| queue.index().depth())
    }

    /// Messages a tenant's handlers have waiting on the embedded queue.
    pub fn queued_publishes_of(&self, tenant: &str) -> usize {
        let origin = Some(std::sync::Arc::from(tenant));
        self.health.queue.as_ref().map_or(0, |(queue, _, _)| queue.index().with(|index| index.backlog(&origin).0))
    }

    /// The host's Prometheus metrics, as `GET /metrics` serves them.
    pub fn metrics_text(&self) -> String {
        self.metrics.encode()
    }

    /// Fresh instances made ahead and waiting for their attempts
    /// (`runtime/ready.rs`).
    pub fn instances_ready(&self) -> usize {
        self.runtime.instances_ready()
    }

    /// The memory the configuration lets the host use (`budget.rs`).
    pub fn memory_bound(&self) -> &MemoryBudget {
        &self.health.budget
    }

    /// Why the host cannot take events now (empty: it can).
    pub async fn not_ready_because(&self) -> Vec<String> {
        self.health.not_ready_because().await
    }

    /// The token whose cancellation starts the stop (the door refuses new
    /// deliveries at once); [`Host::shutdown`] cancels it too.
    pub fn stopping(&self) -> CancellationToken {
        self.stopping.clone()
    }

    /// Stops taking events, lets attempts in progress finish (bounded by
    /// [`DRAIN_TIMEOUT`]), and says what it left: queued messages stay in
    /// the queue (on disk, for the next start, with the embedded store).
    pub async fn shutdown(self) {
        self.stopping.cancel();
        self.tasks.close();
        // Background tasks, the embedded dispatcher's deliveries, and the
        // deliveries Dapr posted that are still inside the door.
        let drained = || async {
            self.tasks.wait().await;
            while self.door.in_flight() > 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        let finished = tokio::time::timeout(DRAIN_TIMEOUT, drained()).await.is_ok();
        if !finished {
            // Cut the attempts off now, while the runtime can still drop
            // their instances cleanly (a guest left running into the
            // runtime's teardown would find its timers gone).
            self.abandon.cancel();
            let _ = tokio::time::timeout(ABANDON_GRACE, drained()).await;
        }
        let still_running = self.door.in_flight();
        match &self.health.queue {
            Some((queue, _, durable)) => {
                let (messages, bytes) = queue.index().depth();
                if *durable {
                    tracing::info!(queued = messages, bytes, still_running, "host stopped; queued messages stay on disk and are delivered after a restart");
                } else if messages > 0 {
                    tracing::warn!(lost = messages, bytes, still_running, "host stopped; its queue was in memory and its messages are lost");
                }
            }
            None => tracing::info!(still_running, "host stopped; the broker redelivers what was not answered"),
        }
        if !finished {
            tracing::warn!(still_running, "deliveries still running after {DRAIN_TIMEOUT:?} were cut off; stopping anyway (their events come again: nothing of them was committed)");
        }
    }
}

/// The engine settings the manifest needs: memory slots as large as the
/// largest tenant's, fuel metering if any tenant has a fuel limit, the
/// compile cache under the data directory.
fn engine_config_for(manifest: &Manifest, options: &HostOptions) -> anyhow::Result<EngineConfig> {
    let mut config = options.engine.clone();
    let largest_memory = manifest.tenants.iter().map(|t| t.limits.memory_mib as usize * 1024 * 1024).max().unwrap_or(0);
    config.max_memory_bytes = config.max_memory_bytes.max(largest_memory);
    config.consume_fuel |= manifest.tenants.iter().any(|t| t.limits.fuel.is_some());
    if config.cache_dir.is_none() {
        config.cache_dir = Some(options.data_dir.join("compiled"));
    }
    check_concurrency_fits(manifest, &config)?;
    Ok(config)
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

/// Loads every component the manifest names, as start-up would, and
/// reports every one that cannot serve (not just the first). Writes
/// nothing: no compile cache, no store. Returns how many handlers loaded.
pub fn check(manifest: &Manifest, options: &HostOptions) -> anyhow::Result<usize> {
    let engine = EngineConfig { cache_dir: None, ..options.engine.clone() };
    let mut problems = Vec::new();
    if let Err(error) = check_concurrency_fits(manifest, &engine) {
        problems.push(format!("{error:#}"));
    }
    let runtime = Runtime::new(&engine)?;
    let mut loaded = 0;
    for tenant in &manifest.tenants {
        for handler in &tenant.handlers {
            match runtime.load(&handler.component) {
                Ok(component) => {
                    loaded += 1;
                    tracing::info!(tenant = %tenant.name, handler = %handler.name, handler.version = %component.short_version(), "ok");
                }
                Err(error) => problems.push(format!("tenant `{}` handler `{}`: {:#}", tenant.name, handler.name, anyhow::Error::from(error))),
            }
        }
    }
    match problems.len() {
        0 => Ok(loaded),
        1 => anyhow::bail!("{}", problems[0]),
        n => anyhow::bail!("{n} problems:\n  {}", problems.join("\n  ")),
    }
}

/// Runs the host, serving HTTP on `listener`, until `shutdown`.
pub async fn run(listener: TcpListener, manifest: Manifest, options: HostOptions, shutdown: impl Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
    let host = Host::start(&manifest, &options).await.context("starting the host")?;
    // The server keeps listening while the host drains: deliveries that
    // come meanwhile find the door closed (RETRY), and `/readyz` says the
    // host is stopping. It stops once the drain is over.
    let (drained, server_stops) = tokio::sync::oneshot::channel::<()>();
    let mut server = tokio::spawn(server::serve(listener, host.router(), async move {
        let _ = server_stops.await;
    }));
    let failed_early = tokio::select! {
        () = shutdown => None,
        // The server ended on its own (an error): stop the host too.
        served = &mut server => Some(served),
    };
    host.shutdown().await;
    let _ = drained.send(());
    let served = match failed_early {
        Some(served) => served,
        None => server.await,
    };
    served.context("the HTTP server task failed")?
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
