//! `wasmsub-bench tenants`: what one tenant costs another.
//!
//! 1. Tenant B's per-event latency (echo, through the whole in-process
//!    pipeline) alone, and again while tenant A floods the host with
//!    infinite loops and memory bombs: side by side in one run.
//! 2. The host's resident memory with N tenants loaded, each with its own
//!    compiled handler (distinct component bytes, so nothing is shared).

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use wasmsub::store::MemoryStore;
use wasmsub::{Delivery, Host, HostOptions, Manifest};

use wasmsub_tests::with_custom_section;

use crate::echo::fmt;

/// Hostile events kept in flight while the quiet tenant is measured: one
/// (the noisy tenant's max_concurrency = 1 leaves a core free on this
/// 2-core machine) and four (more spinning guests than cores).
const HOSTILE_IN_FLIGHT: [usize; 2] = [1, 4];

/// An event for `topic`, as a broker would deliver it.
fn delivery(topic: &str, id: &str) -> Delivery {
    let body = json!({"specversion": "1.0", "id": id, "source": "bench", "type": "t",
                      "datacontenttype": "application/json", "data": {"id": 1, "title": "x"}});
    Delivery::to_topic("pubsub", topic, body.to_string().into(), Some("application/cloudevents+json".into()))
}

async fn quiet_latencies(host: &Host, events: usize, label: &str) -> (Duration, Duration) {
    let mut samples = Vec::with_capacity(events);
    for i in 0..events {
        let started = Instant::now();
        host.deliver(delivery("t", &format!("{label}-{i}"))).await;
        samples.push(started.elapsed());
    }
    samples.sort();
    (samples[events / 2], samples[events * 99 / 100])
}

/// Tenant B's latency alone and beside a hostile tenant A.
pub async fn noisy_neighbour(guests: &Path, events: usize, out: &mut impl Write) -> anyhow::Result<()> {
    let guests = &guests.canonicalize().with_context(|| format!("finding the guests in {}", guests.display()))?;
    let retry = r#"retry = { max_attempts = 1 }"#;
    let text = format!(
        "[[tenant]]\nname = \"noisy\"\nlimits = {{ cpu_time = \"100ms\", memory_mib = 32, max_concurrency = {} }}\n\
         [[tenant.handler]]\nname = \"loop\"\ncomponent = {:?}\ntopic = \"loops\"\n{retry}\n\
         [[tenant.handler]]\nname = \"bomb\"\ncomponent = {:?}\ntopic = \"bombs\"\n{retry}\n\
         [[tenant]]\nname = \"quiet\"\n[[tenant.handler]]\nname = \"echo\"\ncomponent = {:?}\ntopic = \"t\"\n",
        HOSTILE_IN_FLIGHT[1],
        guests.join("infinite_loop.wasm"),
        guests.join("memory_bomb.wasm"),
        guests.join("echo.wasm"),
    );
    let manifest = Manifest::parse(&text, Path::new("/"))?;
    let dir = tempfile::tempdir()?;
    let host = Host::start_with_store(&manifest, &HostOptions::embedded(dir.path().to_owned()), Arc::new(MemoryStore::default())).await?;
    quiet_latencies(&host, 200, "warm").await;
    let alone = quiet_latencies(&host, events, "alone").await;

    let mut beside = Vec::new();
    for in_flight in HOSTILE_IN_FLIGHT {
        beside.push((in_flight, flooded(&host, in_flight, events).await?));
    }
    host.shutdown().await;

    writeln!(out, "tenant `quiet` (echo through the in-process pipeline), {events} sequential events\n")?;
    writeln!(out, "| {:<58} | {:>9} | {:>9} |", "", "p50", "p99")?;
    writeln!(out, "|{:-<60}|{:->11}|{:->11}|", "", "", "")?;
    writeln!(out, "| {:<58} | {:>9} | {:>9} |", "alone", fmt(alone.0), fmt(alone.1))?;
    for (in_flight, (p50, p99, _)) in &beside {
        let label = format!("beside `noisy`: {in_flight} loop/bomb attempt(s) always in flight");
        writeln!(out, "| {:<58} | {:>9} | {:>9} |", label, fmt(*p50), fmt(*p99))?;
    }
    writeln!(out)?;
    for (in_flight, (p50, p99, hostile)) in &beside {
        writeln!(out, "{in_flight} in flight: {hostile} hostile attempts ran meanwhile, each stopped at 100 ms CPU or 32 MiB; \
            quiet p50 {:.2}x, p99 {:.2}x of alone", ratio(*p50, alone.0), ratio(*p99, alone.1))?;
    }
    Ok(())
}

/// The quiet tenant's latencies while `in_flight` hostile attempts run.
async fn flooded(host: &Host, in_flight: usize, events: usize) -> anyhow::Result<(Duration, Duration, u64)> {
    let stop = CancellationToken::new();
    let mut flood = Vec::new();
    for worker in 0..in_flight {
        let topic = if worker % 2 == 0 { "loops" } else { "bombs" };
        let (door, stop) = (host.door().clone(), stop.clone());
        flood.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.is_cancelled() {
                door.deliver(delivery(topic, &format!("hostile-{in_flight}-{worker}-{n}"))).await;
                n += 1;
            }
            n
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (p50, p99) = quiet_latencies(host, events, &format!("beside-{in_flight}")).await;
    stop.cancel();
    let mut hostile = 0;
    for worker in flood {
        hostile += worker.await?;
    }
    Ok((p50, p99, hostile))
}

/// Loads `tenants` tenants, each with its own copy of the echo component
/// (a custom section makes the bytes, and so the compiled code, distinct).
/// Host memory and load time with `tenants` tenants.
pub async fn many_tenants(guests: &Path, tenants: usize, out: &mut impl Write) -> anyhow::Result<()> {
    let guests = &guests.canonicalize().with_context(|| format!("finding the guests in {}", guests.display()))?;
    let dir = tempfile::tempdir()?;
    let echo = std::fs::read(guests.join("echo.wasm"))?;
    let manifest = Manifest::parse(&write_variants(&echo, dir.path(), tenants)?, Path::new("/"))?;
    let before = resident_bytes();
    let started = Instant::now();
    let host = Host::start_with_store(&manifest, &HostOptions::embedded(dir.path().to_owned()), Arc::new(MemoryStore::default())).await?;
    let load_time = started.elapsed();
    let after = resident_bytes();
    host.shutdown().await;
    writeln!(out, "\n{tenants} tenants, each with its own compiled handler (echo, {} KB component)\n", echo.len() / 1024)?;
    writeln!(out, "- compile and load: {:.1} s ({:.1} ms per handler, 2 cores)", load_time.as_secs_f64(), load_time.as_secs_f64() * 1000.0 / tenants as f64)?;
    writeln!(out, "- host resident memory: {} MiB before, {} MiB after ({} KiB per tenant)",
        before / (1 << 20), after / (1 << 20), after.saturating_sub(before) / 1024 / tenants as u64)?;
    Ok(())
}

/// Writes `count` distinct variants of `component` into `dir`; returns a
/// manifest with one tenant per variant.
pub(crate) fn write_variants(component: &[u8], dir: &Path, count: usize) -> anyhow::Result<String> {
    let mut text = String::new();
    for n in 0..count {
        let path = dir.join(format!("variant-{n}.wasm"));
        std::fs::write(&path, with_custom_section(component, &format!("tenant-{n}")))?;
        text.push_str(&format!(
            "[[tenant]]\nname = \"t{n}\"\n[[tenant.handler]]\nname = \"echo\"\ncomponent = {:?}\ntopic = \"t{n}\"\n",
            path.display().to_string()
        ));
    }
    Ok(text)
}

/// VmRSS of this process, from /proc (Linux).
fn resident_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

fn ratio(a: Duration, b: Duration) -> f64 {
    a.as_secs_f64() / b.as_secs_f64()
}

/// Tenant `acme`'s latency (publish to settled, through the embedded broker
/// and its durable store) alone, and beside a tenant whose handler publishes
/// 64 messages to its own topic for every event it gets: a loop that never
/// ends on its own, held only by its flow quotas. Each side runs for
/// `seconds`; the bench process's resident memory is taken as the loop runs.
pub async fn self_publishing_neighbour(guests: &Path, seconds: u64, out: &mut impl Write) -> anyhow::Result<()> {
    let guests = &guests.canonicalize().with_context(|| format!("finding the guests in {}", guests.display()))?;
    let text = format!(
        "[[tenant]]\nname = \"flood\"\nlimits = {{ publish_topics = [\"loop\"], max_queued_publishes = 256, max_publish_rate = 2000 }}\n\
         [[tenant.handler]]\nname = \"looper\"\ncomponent = {:?}\ntopic = \"loop\"\n\n\
         [[tenant]]\nname = \"acme\"\n[[tenant.handler]]\nname = \"quiet\"\ncomponent = {:?}\ntopic = \"orders\"\n",
        guests.join("self_publisher.wasm"),
        guests.join("echo.wasm"),
    );
    let mut host = wasmsub_tests::TestHost::start(&text).await?;
    let phase = Duration::from_secs(seconds);
    settled_latencies(&mut host, Duration::from_secs(1), "warm").await?;
    let alone = settled_latencies(&mut host, phase, "alone").await?;
    let rss_before = resident_bytes();
    host.publish("loop", &json!({"specversion": "1.0", "id": "spark", "source": "bench", "type": "t", "data": {}})).await?;
    let beside = settled_latencies(&mut host, phase, "beside").await?;
    let (rss_after, queued) = (resident_bytes(), host.host.queued_publishes_of("flood"));
    let bound = host.host.memory_bound().total;
    host.host.shutdown().await;

    writeln!(out, "\ntenant `acme` (echo, published to the embedded broker, durable store), sequential events for {seconds} s each\n")?;
    writeln!(out, "| {:<58} | {:>7} | {:>9} | {:>9} |", "", "events", "p50", "p99")?;
    writeln!(out, "|{:-<60}|{:->9}|{:->11}|{:->11}|", "", "", "", "")?;
    for (label, run) in [("alone", &alone), ("beside a self-publishing loop (64 x 1 KiB per event)", &beside)] {
        writeln!(out, "| {:<58} | {:>7} | {:>9} | {:>9} |", label, run.samples, fmt(run.p50), fmt(run.p99))?;
    }
    writeln!(out, "\nacme p50 {:.2}x, p99 {:.2}x of alone; the loop settled {} events meanwhile and had {queued} publishes queued \
        at the end (quota 256); resident memory (the bench process) {} MiB when the loop started, {} MiB after {seconds} s, \
        the host's configured bound {} MiB",
        ratio(beside.p50, alone.p50), ratio(beside.p99, alone.p99), beside.others, rss_before >> 20, rss_after >> 20, bound >> 20)?;
    Ok(())
}

/// Latencies of one phase, and how many other events settled meanwhile.
struct Phase {
    samples: usize,
    p50: Duration,
    p99: Duration,
    others: usize,
}

/// Publishes events to `orders` one after another for `length`, timing
/// each from its publish to its settled report.
async fn settled_latencies(host: &mut wasmsub_tests::TestHost, length: Duration, label: &str) -> anyhow::Result<Phase> {
    let mut samples = Vec::new();
    let mut others = 0;
    let started = Instant::now();
    while started.elapsed() < length {
        let id = format!("{label}-{}", samples.len());
        let sent = Instant::now();
        host.publish("orders", &json!({"specversion": "1.0", "id": id, "source": "bench", "type": "t", "data": {}})).await?;
        while host.next_settled().await.event_id != id {
            others += 1;
        }
        samples.push(sent.elapsed());
    }
    samples.sort();
    let n = samples.len();
    Ok(Phase { samples: n, p50: samples[n / 2], p99: samples[n * 99 / 100], others })
}
