//! `wasmsub-bench throughput`: the in-process pipeline with many events in
//! flight, on the in-memory and the embedded (redb, fsync) store, side by
//! side in one run; then rounds of duplicate deliveries of the same ids on
//! the embedded store, to show what a duplicate costs round after round.
//!
//! Each row: events/s, the median and p99 of one delivery (door in, answer
//! out), and the process's CPU time per event (from /proc/self/stat, so it
//! counts every thread: the runtime's, the store writer's, the log writer's).

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::json;
use tokio::sync::Semaphore;

use wasmsub::store::{DeliveryStore, EmbeddedStore, MemoryStore};
use wasmsub::{DaprStatus, Delivery, Door, Host, HostOptions, Manifest};

use crate::echo::fmt;

struct Row {
    name: String,
    per_second: f64,
    p50: Duration,
    p99: Duration,
    cpu_per_event: Duration,
}

/// This process's CPU time so far (user + system, all threads).
fn process_cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at ')'.
    let fields: Vec<&str> = stat.rsplit_once(')').map(|(_, rest)| rest.split_whitespace().collect()).unwrap_or_default();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
    // utime and stime are fields 14 and 15 of the line, 12 and 13 here.
    let clock_ticks = 100; // USER_HZ on Linux
    Duration::from_millis((ticks(11) + ticks(12)) * 1000 / clock_ticks)
}

fn delivery(id: &str) -> Delivery {
    let body = json!({"specversion": "1.0", "id": id, "source": "bench", "type": "task.created",
                      "datacontenttype": "application/json", "data": {"id": 42, "title": "benchmark"}});
    Delivery::to_topic("pubsub", "bench", body.to_string().into(), Some("application/cloudevents+json".into()))
}

/// Delivers `ids` through `door` with `in_flight` deliveries at a time.
async fn deliver_all(name: String, door: &Arc<Door>, ids: &[String], in_flight: usize) -> anyhow::Result<Row> {
    let gate = Arc::new(Semaphore::new(in_flight));
    let cpu_before = process_cpu();
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(ids.len());
    for id in ids {
        let permit = gate.clone().acquire_owned().await?;
        let (door, delivery) = (door.clone(), delivery(id));
        tasks.push(tokio::spawn(async move {
            let start = Instant::now();
            let status = door.deliver(delivery).await;
            drop(permit);
            (status, start.elapsed())
        }));
    }
    let mut latencies = Vec::with_capacity(ids.len());
    for task in tasks {
        let (status, latency) = task.await?;
        anyhow::ensure!(status == DaprStatus::Success, "a delivery was answered {status:?}");
        latencies.push(latency);
    }
    let elapsed = started.elapsed();
    let cpu = process_cpu().saturating_sub(cpu_before);
    latencies.sort();
    Ok(Row {
        name,
        per_second: ids.len() as f64 / elapsed.as_secs_f64(),
        p50: latencies[latencies.len() / 2],
        p99: latencies[latencies.len() * 99 / 100],
        cpu_per_event: cpu / ids.len() as u32,
    })
}

async fn start_host(component: &Path, store: Arc<dyn DeliveryStore>, dir: &Path) -> anyhow::Result<Host> {
    let text = format!(
        "[[tenant]]\nname = \"bench\"\nlimits = {{ max_concurrency = 128, max_state_keys = 10000000 }}\n[[tenant.handler]]\nname = \"echo\"\ncomponent = {:?}\ntopic = \"bench\"\n",
        component.display().to_string()
    );
    let manifest = Manifest::parse(&text, Path::new("/"))?;
    Host::start_with_store(&manifest, &HostOptions::embedded(dir.to_owned()), store).await
}

fn ids(prefix: &str, events: usize) -> Vec<String> {
    (0..events).map(|i| format!("{prefix}-{i}")).collect()
}

pub async fn run(component: &Path, events: usize, in_flight: &[usize], duplicate_rounds: usize, out: &mut impl Write) -> anyhow::Result<()> {
    let component = component.canonicalize().with_context(|| format!("finding {}", component.display()))?;
    let mut rows = Vec::new();
    for &n in in_flight {
        let dir = tempfile::tempdir()?;
        let host = start_host(&component, Arc::new(MemoryStore::default()), dir.path()).await?;
        deliver_all("warm-up".into(), host.door(), &ids("warm", 500), n).await?;
        rows.push(deliver_all(format!("in-memory store, {n} in flight"), host.door(), &ids("m", events), n).await?);
        host.shutdown().await;
    }
    for &n in in_flight {
        let dir = tempfile::tempdir()?;
        let store = Arc::new(EmbeddedStore::open(&dir.path().join("bench.redb"))?);
        let host = start_host(&component, store, dir.path()).await?;
        deliver_all("warm-up".into(), host.door(), &ids("warm", 200), n).await?;
        rows.push(deliver_all(format!("embedded store (fsync), {n} in flight"), host.door(), &ids("e", events), n).await?);
        host.shutdown().await;
    }
    // The same ids again and again: every round after the first is all duplicates.
    let most = in_flight.iter().copied().max().unwrap_or(32);
    let dir = tempfile::tempdir()?;
    let store = Arc::new(EmbeddedStore::open(&dir.path().join("bench.redb"))?);
    let host = start_host(&component, store, dir.path()).await?;
    let same = ids("d", events);
    for round in 0..=duplicate_rounds {
        let what = if round == 0 { "first deliveries".to_owned() } else { format!("duplicates, round {round}") };
        rows.push(deliver_all(format!("embedded, {what}, {most} in flight"), host.door(), &same, most).await?);
    }
    host.shutdown().await;

    writeln!(out, "echo pipeline in process, {events} events per row\n")?;
    writeln!(out, "| {:<46} | {:>10} | {:>10} | {:>10} | {:>12} |", "store, deliveries in flight", "events/s", "p50", "p99", "CPU/event")?;
    writeln!(out, "|{:-<48}|{:->12}|{:->12}|{:->12}|{:->14}|", "", "", "", "", "")?;
    for row in &rows {
        writeln!(out, "| {:<46} | {:>10.0} | {:>10} | {:>10} | {:>12} |", row.name, row.per_second, fmt(row.p50), fmt(row.p99), fmt(row.cpu_per_event))?;
    }
    Ok(())
}
