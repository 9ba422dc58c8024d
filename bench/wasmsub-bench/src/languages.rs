//! `wasmsub-bench languages`: what a handler's language costs, side by side
//! in one run, for the same logic (the todo app's `task-created`) built
//! from Rust, Python (componentize-py) and JavaScript (componentize-js):
//!
//! - the component's size;
//! - a cold compile (nothing cached), and a start from the compile cache;
//! - a fresh instance per event, to the handler's answer (p50, p99);
//! - end to end through the in-process pipeline (in-memory store): parse,
//!   claim, attempt, commit of the state write and the publish.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::json;

use wasmsub::runtime::{AttemptResult, EngineConfig, Event, Runtime};

use crate::echo::context;
use wasmsub::store::{DeliveryStore, MemoryStore};
use wasmsub::{DaprStatus, Delivery, Host, HostOptions, Manifest};

/// One language's figures.
struct Figures {
    label: String,
    bytes: u64,
    cold_compile: Duration,
    cached_start: Duration,
    fresh_p50: Duration,
    fresh_p99: Duration,
    end_to_end_p50: Duration,
    end_to_end_p99: Duration,
}

fn percentile(samples: &mut [Duration], pct: usize) -> Duration {
    samples.sort();
    samples[(samples.len() * pct / 100).min(samples.len() - 1)]
}

fn task_event(i: usize) -> Event {
    Event {
        id: format!("bench-{i}"),
        source: "bench".into(),
        type_: "task.created".into(),
        specversion: "1.0".into(),
        subject: None,
        time: None,
        datacontenttype: Some("application/json".into()),
        data: json!({"id": i, "title": "benchmark"}).to_string().into_bytes(),
        extensions: Vec::new(),
        topic: "task-created".into(),
        pubsubname: "pubsub".into(),
        attempt: 1,
    }
}

/// Compile and start figures, then fresh instances (on this blocking thread).
fn runtime_figures(label: &str, path: &Path, events: usize) -> anyhow::Result<Figures> {
    let bytes = std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?.len();
    let cache = tempfile::tempdir()?;
    let config = EngineConfig { cache_dir: Some(cache.path().to_owned()), ..EngineConfig::default() };
    let started = Instant::now();
    Runtime::new(&config)?.load(path)?;
    let cold_compile = started.elapsed();
    // A new runtime, as after a restart: the artifact comes from the cache.
    let runtime = Runtime::new(&config)?;
    let started = Instant::now();
    let component = Arc::new(runtime.load(path)?);
    let cached_start = started.elapsed();

    let handle = tokio::runtime::Handle::current();
    let store: Arc<dyn DeliveryStore> = Arc::new(MemoryStore::default());
    let mut samples = Vec::with_capacity(events);
    for i in 0..events + 20 {
        let event = task_event(i);
        let started = Instant::now();
        let (result, spent) = handle.block_on(runtime.attempt_inline(&component, context(store.clone()), &event));
        let took = started.elapsed();
        anyhow::ensure!(matches!(result, AttemptResult::Succeeded(_)), "{label}: the handler did not succeed: {result:?}");
        drop(spent);
        if i >= 20 {
            samples.push(took);
        }
    }
    let fresh_p50 = percentile(&mut samples, 50);
    let fresh_p99 = percentile(&mut samples, 99);
    Ok(Figures { label: label.to_owned(), bytes, cold_compile, cached_start, fresh_p50, fresh_p99, end_to_end_p50: Duration::ZERO, end_to_end_p99: Duration::ZERO })
}

/// One event at a time through the whole in-process pipeline.
async fn end_to_end(path: &Path, events: usize) -> anyhow::Result<(Duration, Duration)> {
    let text = format!(
        "[[tenant]]\nname = \"bench\"\nlimits = {{ publish_topics = [\"task-audit\"], max_state_keys = 10000000 }}\n\
         [[tenant.handler]]\nname = \"task-created\"\ncomponent = {:?}\ntopic = \"task-created\"\n",
        path.display().to_string()
    );
    let manifest = Manifest::parse(&text, Path::new("/"))?;
    let dir = tempfile::tempdir()?;
    let host = Host::start_with_store(&manifest, &HostOptions::embedded(dir.path().to_owned()), Arc::new(MemoryStore::default())).await?;
    let door = host.door().clone();
    let mut samples = Vec::with_capacity(events);
    for i in 0..events + 20 {
        let body = json!({"specversion": "1.0", "id": format!("event-{i}"), "source": "bench", "type": "task.created",
                          "datacontenttype": "application/json", "data": {"id": i, "title": "benchmark"}});
        let delivery = Delivery::to_topic("pubsub", "task-created", body.to_string().into(), Some("application/cloudevents+json".into()));
        let started = Instant::now();
        anyhow::ensure!(door.deliver(delivery).await == DaprStatus::Success, "event {i} was not processed");
        if i >= 20 {
            samples.push(started.elapsed());
        }
    }
    host.shutdown().await;
    Ok((percentile(&mut samples, 50), percentile(&mut samples, 99)))
}

/// Every language's row, side by side.
pub async fn run(components: &[(String, PathBuf)], events: usize, out: &mut impl Write) -> anyhow::Result<()> {
    let mut rows = Vec::new();
    for (label, path) in components {
        let path = path.canonicalize().with_context(|| format!("finding {}", path.display()))?;
        let (label_owned, path_owned) = (label.clone(), path.clone());
        let handle = tokio::runtime::Handle::current();
        let mut figures = tokio::task::spawn_blocking(move || {
            let _guard = handle.enter();
            runtime_figures(&label_owned, &path_owned, events)
        })
        .await??;
        (figures.end_to_end_p50, figures.end_to_end_p99) = end_to_end(&path, events).await?;
        rows.push(figures);
    }
    writeln!(out, "task-created in each language: {events} events per measurement (one at a time)\n")?;
    writeln!(out, "| {:<10} | {:>10} | {:>12} | {:>12} | {:>14} | {:>14} | {:>15} | {:>15} |",
        "language", "size", "cold compile", "cached start", "fresh inst p50", "fresh inst p99", "end to end p50", "end to end p99")?;
    writeln!(out, "|{:-<12}|{:->12}|{:->14}|{:->14}|{:->16}|{:->16}|{:->17}|{:->17}|", "", "", "", "", "", "", "", "")?;
    for row in &rows {
        writeln!(out, "| {:<10} | {:>7.1} MB | {:>9.0} ms | {:>9.1} ms | {:>11.0} us | {:>11.0} us | {:>12.0} us | {:>12.0} us |",
            row.label, row.bytes as f64 / 1e6, ms(row.cold_compile), ms(row.cached_start), us(row.fresh_p50), us(row.fresh_p99),
            us(row.end_to_end_p50), us(row.end_to_end_p99))?;
    }
    if let Some(first) = rows.first() {
        writeln!(out)?;
        for row in &rows[1..] {
            writeln!(out, "{} / {} (p50): fresh instance {:.1}x, end to end {:.1}x", row.label, first.label,
                row.fresh_p50.as_secs_f64() / first.fresh_p50.as_secs_f64(), row.end_to_end_p50.as_secs_f64() / first.end_to_end_p50.as_secs_f64())?;
        }
    }
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}
