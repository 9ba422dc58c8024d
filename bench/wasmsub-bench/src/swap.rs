//! `wasmsub-bench swap`: what hot swapping costs.
//!
//! 1. Cold start of N handlers, compiling every one, against a restart that
//!    finds them in the compiled-component cache.
//! 2. Time from a deploy call to the first event handled by the new version.
//! 3. Pipeline throughput with a deploy every 50 ms, against none, side by
//!    side.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::json;

use wasmsub::store::MemoryStore;
use wasmsub::{Delivery, Host, HostOptions, Manifest};

use wasmsub_tests::with_custom_section;

use crate::tenants::write_variants;

/// Events processed concurrently in the throughput rows.
const CONCURRENCY: usize = 8;

/// An event for the one handler (tenant t0's, on topic t0).
fn delivery(id: &str) -> Delivery {
    let body = json!({"specversion": "1.0", "id": id, "source": "bench", "type": "t",
                      "datacontenttype": "application/json", "data": {"id": 1}});
    Delivery::to_topic("pubsub", "t0", body.to_string().into(), Some("application/cloudevents+json".into()))
}

async fn start(manifest: &Manifest, data_dir: &Path) -> anyhow::Result<Host> {
    Host::start_with_store(manifest, &HostOptions::embedded(data_dir.to_owned()), Arc::new(MemoryStore::default())).await
}

/// Every hot-swap row, side by side.
pub async fn run(guests: &Path, handlers: usize, out: &mut impl Write) -> anyhow::Result<()> {
    let guests = guests.canonicalize().with_context(|| format!("finding the guests in {}", guests.display()))?;
    let echo = std::fs::read(guests.join("echo.wasm"))?;

    // 1. Cold start, without and with the cache.
    let files = tempfile::tempdir()?;
    let manifest = Manifest::parse(&write_variants(&echo, files.path(), handlers)?, Path::new("/"))?;
    let data = tempfile::tempdir()?;
    let started = Instant::now();
    start(&manifest, data.path()).await?.shutdown().await;
    let cold = started.elapsed();
    let started = Instant::now();
    start(&manifest, data.path()).await?.shutdown().await;
    let cached = started.elapsed();

    // 2. Deploy to first event on the new version.
    let manifest = Manifest::parse(&write_variants(&echo, files.path(), 1)?, Path::new("/"))?;
    let host = start(&manifest, data.path()).await?;
    let mut to_live = Vec::new();
    for n in 0..20 {
        let bytes = with_custom_section(&echo, &format!("deploy-{n}"));
        let started = Instant::now();
        let change = host.deployer().deploy("t0", "echo", Path::new("bench"), bytes).await?;
        host.deliver(delivery(&format!("first-{n}"))).await;
        to_live.push(started.elapsed());
        anyhow::ensure!(host.current_version("t0", "echo") == Some(change.to), "the deployed version is not serving");
    }
    to_live.sort();

    // 3. Throughput with and without swaps.
    let steady = throughput(&host, 4000, None).await;
    let swapping = throughput(&host, 4000, Some(&echo)).await;
    host.shutdown().await;

    writeln!(out, "echo handlers, 2 cores\n")?;
    writeln!(out, "| {:<52} | {:>12} |", "", "")?;
    writeln!(out, "|{:-<54}|{:->14}|", "", "")?;
    writeln!(out, "| {:<52} | {:>10.2} s |", format!("cold start, {handlers} handlers, compiling each"), cold.as_secs_f64())?;
    writeln!(out, "| {:<52} | {:>10.2} s |", format!("restart, {handlers} handlers, from the compile cache"), cached.as_secs_f64())?;
    writeln!(out, "| {:<52} | {:>9.1} ms |", "deploy to first event on the new version (p50 of 20)", to_live[10].as_secs_f64() * 1e3)?;
    writeln!(out, "| {:<52} | {:>9.1} ms |", "deploy to first event on the new version (max of 20)", to_live[19].as_secs_f64() * 1e3)?;
    writeln!(out, "| {:<52} | {:>8.0}/s |", format!("pipeline throughput, {CONCURRENCY} in flight, no swaps"), steady)?;
    writeln!(out, "| {:<52} | {:>8.0}/s |", format!("pipeline throughput, {CONCURRENCY} in flight, a deploy every 50 ms"), swapping)?;
    writeln!(out, "\nrestart from cache / cold start: {:.2}x; throughput while swapping / steady: {:.2}x",
        cached.as_secs_f64() / cold.as_secs_f64(), swapping / steady)?;
    Ok(())
}

/// Events per second through the pipeline, `CONCURRENCY` at a time; with
/// `swap_from`, a new version of it is deployed every 50 ms meanwhile.
async fn throughput(host: &Host, events: usize, swap_from: Option<&[u8]>) -> f64 {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let label = if swap_from.is_some() { "swap" } else { "steady" };
    let started = Instant::now();
    let workers: Vec<_> = (0..CONCURRENCY)
        .map(|_| {
            let (door, next) = (host.door().clone(), next.clone());
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i >= events {
                        return;
                    }
                    door.deliver(delivery(&format!("{label}-{i}"))).await;
                }
            })
        })
        .collect();
    if let Some(component) = swap_from {
        let mut n = 0;
        while next.load(std::sync::atomic::Ordering::Relaxed) < events {
            let bytes = with_custom_section(component, &format!("swap-{n}"));
            let _ = host.deployer().deploy("t0", "echo", Path::new("bench"), bytes).await;
            n += 1;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    for worker in workers {
        let _ = worker.await;
    }
    events as f64 / started.elapsed().as_secs_f64()
}
