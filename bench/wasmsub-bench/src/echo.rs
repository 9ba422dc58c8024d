//! `wasmsub-bench echo`: per-event cost of the `echo` handler, side by side in one
//! run, so the figures compare on a shared, noisy machine:
//!
//! 1. the same logic as a native Rust function (the floor);
//! 2. the guest on one reused instance (the floor for WebAssembly);
//! 3. a fresh instance per event, as the service runs it, with the pooling
//!    allocator's resident memory on (the default) and off;
//! 4. the whole in-process pipeline (receive, claim, dispatch, commit) on
//!    the in-memory and the embedded (redb, fsync) store.
//!
//! Each row reports the median and p99 latency of single events and the
//! events per second one thread sustains.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::json;

use wasmsub::runtime::{AttemptContext, AttemptResult, EngineConfig, Event, Runtime};
use wasmsub::store::{DeliveryStore, EmbeddedStore, MemoryStore};
use wasmsub::{DaprStatus, Delivery, Host, HostOptions, Manifest};

/// Latency figures of one benchmark row.
pub struct Row {
    pub name: String,
    pub p50: Duration,
    pub p99: Duration,
    pub per_second: f64,
}

fn measure(name: &str, events: usize, mut one: impl FnMut(usize)) -> Row {
    measure_latency(name, events, |i| {
        let t = Instant::now();
        one(i);
        t.elapsed()
    })
}

/// As `measure`, where the closure reports the latency itself (the time to
/// its answer), while the row's events/s count all its work.
fn measure_latency(name: &str, events: usize, mut one: impl FnMut(usize) -> Duration) -> Row {
    for i in 0..events.min(200) {
        one(events + i); // warm-up (its own indices): caches, allocator, lazy set-up
    }
    let mut samples = Vec::with_capacity(events);
    let started = Instant::now();
    for i in 0..events {
        samples.push(one(i));
    }
    let total = started.elapsed();
    samples.sort();
    Row {
        name: name.to_owned(),
        p50: samples[samples.len() / 2],
        p99: samples[samples.len() * 99 / 100],
        per_second: events as f64 / total.as_secs_f64(),
    }
}

fn sample_event(attempt: u32) -> Event {
    let data = json!({"id": 42, "title": "benchmark", "tags": ["a", "b"], "done": false}).to_string();
    Event {
        id: "bench".into(),
        source: "bench".into(),
        type_: "task.created".into(),
        specversion: "1.0".into(),
        subject: None,
        time: None,
        datacontenttype: Some("application/json".into()),
        data: data.into_bytes(),
        extensions: Vec::new(),
        topic: "bench".into(),
        pubsubname: "pubsub".into(),
        attempt,
    }
}

/// The echo guest's logic, natively.
fn native_echo(event: &Event) -> bool {
    serde_json::from_slice::<serde_json::Value>(&event.data).is_ok()
}

/// A benchmark tenant's attempt context: generous limits, any topic.
pub(crate) fn context(store: Arc<dyn DeliveryStore>) -> AttemptContext {
    AttemptContext {
        tenant: "bench".into(),
        namespace: "bench".into(),
        handler: "echo".into(),
        version: "bench".into(),
        event_id: "bench".into(),
        store,
        // Any topic: a component that publishes is measured, not refused.
        publish_topics: vec!["*".to_owned()].into(),
        capabilities: Default::default(),
        memory_bytes: 64 * 1024 * 1024,
        table_elements: wasmsub::manifest::DEFAULT_TABLE_ELEMENTS as usize,
        max_log_bytes: wasmsub::manifest::DEFAULT_MAX_LOG_BYTES,
        fuel: None,
        cpu_time: Duration::from_secs(5),
        wall_time: Duration::from_secs(5),
        max_state_bytes: u64::MAX,
        max_state_keys: u64::MAX,
        guest_log: None,
    }
}

fn dispatch_rows(component_path: &Path, events: usize) -> anyhow::Result<Vec<Row>> {
    let store: Arc<dyn DeliveryStore> = Arc::new(MemoryStore::default());
    let event = sample_event(1);
    let mut rows = vec![measure("native Rust function (echo's logic)", events, |_| assert!(native_echo(&event)))];

    // The attempts are futures (async wasmtime); each is driven to its end
    // on this thread, as the service drives them on its blocking threads.
    let handle = tokio::runtime::Handle::current();
    let runtime = Runtime::new(&EngineConfig::default())?;
    let component = Arc::new(runtime.load(component_path)?);
    let mut reused = handle.block_on(runtime.reused_instance(&component, context(store.clone())))?;
    rows.push(measure("guest, reused instance", events, |_| {
        handle.block_on(reused.call(&event)).expect("echo call");
    }));
    drop(reused);

    let default = EngineConfig::default();
    let variants = [
        ("guest, fresh instance (full cost)", default.clone()),
        ("  same, without PAGEMAP_SCAN", EngineConfig { pagemap_scan: false, ..default.clone() }),
        ("  same, no memory kept resident", EngineConfig { pagemap_scan: false, keep_resident_bytes: 0, ..default.clone() }),
    ];
    for (name, config) in variants {
        let runtime = Runtime::new(&config)?;
        let component = Arc::new(runtime.load(component_path)?);
        rows.push(measure(name, events, |_| {
            let (result, spent) = handle.block_on(runtime.attempt_inline(&component, context(store.clone()), &event));
            assert!(matches!(result, AttemptResult::Succeeded(_)), "{result:?}");
            drop(spent);
        }));
    }
    // As the service runs it: the answer is passed on before the instance's
    // memory is reset, so the event's latency does not include that.
    let runtime = Runtime::new(&default)?;
    let component = Arc::new(runtime.load(component_path)?);
    rows.insert(2, measure_latency("guest, fresh instance (to answer)", events, |_| {
        let started = Instant::now();
        let (result, spent) = handle.block_on(runtime.attempt_inline(&component, context(store.clone()), &event));
        let latency = started.elapsed();
        assert!(matches!(result, AttemptResult::Succeeded(_)), "{result:?}");
        drop(spent);
        latency
    }));
    Ok(rows)
}

/// A reused instance against fresh instances made ahead (as the service
/// runs them), in alternating turns of `turn` events so both see the same
/// machine: (reused, made ahead, to the answer). The made-ahead row's
/// events/s includes making the instances.
fn made_ahead_rows(component_path: &Path, events: usize) -> anyhow::Result<(Row, Row)> {
    const TURN: usize = 100;
    let store: Arc<dyn DeliveryStore> = Arc::new(MemoryStore::default());
    let handle = tokio::runtime::Handle::current();
    let runtime = Runtime::new(&EngineConfig::default())?;
    let component = Arc::new(runtime.load(component_path)?);
    let event = sample_event(1);
    let mut reused = handle.block_on(runtime.reused_instance(&component, context(store.clone())))?;
    let (mut reused_samples, mut ahead_samples) = (Vec::new(), Vec::new());
    let (mut reused_time, mut ahead_time) = (Duration::ZERO, Duration::ZERO);
    for turn in 0..(events / TURN).max(1) + 2 {
        let warm_up = turn < 2;
        let started = Instant::now();
        for _ in 0..TURN {
            let t = Instant::now();
            handle.block_on(reused.call(&event)).expect("echo call");
            if !warm_up {
                reused_samples.push(t.elapsed());
            }
        }
        if !warm_up {
            reused_time += started.elapsed();
        }
        let started = Instant::now();
        for _ in 0..TURN {
            let made = handle.block_on(runtime.make_ahead(&component, context(store.clone()))).context("making an instance ahead")?;
            let t = Instant::now();
            let (result, spent) = handle.block_on(runtime.attempt_made_ahead(&component, context(store.clone()), &event, made));
            let latency = t.elapsed();
            assert!(matches!(result, AttemptResult::Succeeded(_)), "{result:?}");
            drop(spent);
            if !warm_up {
                ahead_samples.push(latency);
            }
        }
        if !warm_up {
            ahead_time += started.elapsed();
        }
    }
    let row = |name: &str, mut samples: Vec<Duration>, total: Duration| {
        samples.sort();
        Row { name: name.to_owned(), p50: samples[samples.len() / 2], p99: samples[samples.len() * 99 / 100], per_second: samples.len() as f64 / total.as_secs_f64() }
    };
    Ok((row("guest, reused (alternating turns)", reused_samples, reused_time), row("guest, fresh made ahead (to answer)", ahead_samples, ahead_time)))
}

/// Median of each phase of a fresh-instance attempt.
fn phase_medians(component_path: &Path, events: usize) -> anyhow::Result<[Duration; 4]> {
    let store: Arc<dyn DeliveryStore> = Arc::new(MemoryStore::default());
    let runtime = Runtime::new(&EngineConfig::default())?;
    let component = runtime.load(component_path)?;
    let event = sample_event(1);
    let mut phases: [Vec<Duration>; 4] = Default::default();
    for i in 0..events + 200 {
        let split = tokio::runtime::Handle::current().block_on(runtime.profile_attempt(&component, context(store.clone()), &event));
        if i >= 200 {
            for (samples, d) in phases.iter_mut().zip(split) {
                samples.push(d);
            }
        }
    }
    Ok(phases.map(|mut samples| {
        samples.sort();
        samples[samples.len() / 2]
    }))
}

async fn pipeline_row(name: &str, component_path: &Path, store: Arc<dyn DeliveryStore>, events: usize) -> anyhow::Result<Row> {
    let text = format!(
        "[[tenant]]\nname = \"bench\"\nlimits = {{ publish_topics = [\"*\"], max_state_keys = 10000000 }}\n[[tenant.handler]]\nname = \"echo\"\ncomponent = {:?}\ntopic = \"bench\"\n",
        component_path.display().to_string()
    );
    let manifest = Manifest::parse(&text, Path::new("/"))?;
    let dir = tempfile::tempdir()?;
    let host = Host::start_with_store(&manifest, &HostOptions::embedded(dir.path().to_owned()), store).await?;
    let runtime = tokio::runtime::Handle::current();
    let door = host.door().clone();
    let row = tokio::task::spawn_blocking({
        let name = name.to_owned();
        move || {
            measure(&name, events, |i| {
                // Delivered as a transport would: parsing is part of the cost.
                let body = json!({"specversion": "1.0", "id": format!("event-{i}"), "source": "bench", "type": "task.created",
                                  "datacontenttype": "application/json", "data": {"id": 42, "title": "benchmark"}});
                let delivery = Delivery::to_topic("pubsub", "bench", body.to_string().into(), Some("application/cloudevents+json".into()));
                assert_eq!(runtime.block_on(door.deliver(delivery)), DaprStatus::Success);
            })
        }
    })
    .await?;
    host.shutdown().await;
    Ok(row)
}

/// Every per-event row, side by side.
pub async fn run(component: &Path, events: usize, out: &mut impl Write) -> anyhow::Result<()> {
    let component = component.canonicalize().with_context(|| format!("finding {}", component.display()))?;
    let path = component.clone();
    let handle = tokio::runtime::Handle::current();
    let (mut rows, phases, (reused_alternating, made_ahead)) = tokio::task::spawn_blocking(move || {
        let _guard = handle.enter();
        anyhow::Ok((dispatch_rows(&path, events)?, phase_medians(&path, events)?, made_ahead_rows(&path, events)?))
    })
    .await??;
    rows.push(pipeline_row("pipeline, in-memory store", &component, Arc::new(MemoryStore::default()), events).await?);
    let dir = tempfile::tempdir()?;
    let embedded = Arc::new(EmbeddedStore::open(&dir.path().join("bench.redb"))?);
    rows.push(pipeline_row("pipeline, embedded store (fsync)", &component, embedded, events.min(2000)).await?);

    let handler = component.file_stem().map_or_else(|| "the".into(), |stem| stem.to_string_lossy().into_owned());
    writeln!(out, "{handler} handler ({}), {events} events per row (one thread, sequential)\n", component.display())?;
    writeln!(out, "| {:<34} | {:>10} | {:>10} | {:>12} |", "what runs per event", "p50", "p99", "events/s")?;
    writeln!(out, "|{:-<36}|{:->12}|{:->12}|{:->14}|", "", "", "", "")?;
    for row in &rows {
        writeln!(out, "| {:<34} | {:>10} | {:>10} | {:>12.0} |", row.name, fmt(row.p50), fmt(row.p99), row.per_second)?;
    }
    writeln!(out, "\nfresh instance, median per phase: store + WASI context {}, instantiate {}, call {}, drop {}",
        fmt(phases[0]), fmt(phases[1]), fmt(phases[2]), fmt(phases[3]))?;
    let reused = rows[1].p50.as_secs_f64();
    writeln!(out, "\nfresh instance, to answer / reused instance (p50): {:.2}x", rows[2].p50.as_secs_f64() / reused)?;
    writeln!(out, "fresh instance, full cost / reused (p50): {:.2}x", rows[3].p50.as_secs_f64() / reused)?;
    writeln!(out, "fresh instance made ahead (as the service runs it), to answer / reused, alternating turns (p50): {:.2}x  [{} vs {}; made-ahead events/s incl. making: {:.0}]",
        made_ahead.p50.as_secs_f64() / reused_alternating.p50.as_secs_f64(), fmt(made_ahead.p50), fmt(reused_alternating.p50), made_ahead.per_second)?;
    writeln!(out, "fresh instance without PAGEMAP_SCAN / reused (p50): {:.2}x", rows[4].p50.as_secs_f64() / reused)?;
    writeln!(out, "fresh instance, nothing kept resident / reused (p50): {:.2}x", rows[5].p50.as_secs_f64() / reused)?;
    Ok(())
}

pub(crate) fn fmt(d: Duration) -> String {
    format!("{:.1} us", d.as_secs_f64() * 1e6)
}
