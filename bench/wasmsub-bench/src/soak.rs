//! `wasmsub-bench soak`: a mixed load against a running host for a given
//! time, one line per minute, so drift (memory creeping up, latency or
//! errors growing) shows. Not a test: `scripts/soak.sh` starts the host
//! (the todo example) and runs it; docs/BENCHMARKS.md has a 30-minute run.
//!
//! The mix, per 100 events: 80 new tasks, 8 redeliveries of a recent task
//! (same CloudEvent id: skipped as duplicates), 5 tasks without a title
//! (dropped: dead-lettered at once), 4 reminders to the flaky handler
//! (retried, then processed), 3 archive requests to the poison handler
//! (retried, then dead-lettered).

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::sync::Mutex;

/// What one minute (or the whole run) came to.
#[derive(Default)]
struct Tally {
    sent: u64,
    accepted: u64,
    /// 429: the queue was full; the event is sent again later.
    refused: u64,
    /// Any other status, or no answer.
    errors: u64,
    latencies: Vec<Duration>,
}

/// What the soak is told.
pub struct Soak {
    /// The host's base URL.
    pub url: String,
    /// The host's pid, for its resident memory.
    pub pid: u32,
    /// How long to run.
    pub duration: Duration,
    /// Events per second to offer.
    pub rate: u32,
}

/// Tasks the load cycles through: every event has its own CloudEvent id,
/// but the state keys (`task:{id}`) are reused, so a long soak stays under
/// the tenant's `max_state_keys` quota (100,000 by default) instead of
/// measuring it.
const TASK_IDS: u64 = 50_000;

fn event(n: u64, rng: u64) -> (&'static str, Value) {
    let time = humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
    let ce = |id: String, ty: &str, data: Value| {
        json!({"specversion": "1.0", "id": id, "source": "soak", "type": ty, "time": time, "datacontenttype": "application/json", "data": data})
    };
    match rng % 100 {
        0..80 => ("task-created", ce(format!("task-{n}"), "task.created", json!({"id": n % TASK_IDS, "title": format!("task {n}")}))),
        // A recent task again: the same CloudEvent id, so a duplicate.
        80..88 => {
            let earlier = n.saturating_sub(1 + rng % 50);
            ("task-created", ce(format!("task-{earlier}"), "task.created", json!({"id": earlier % TASK_IDS, "title": format!("task {earlier}")})))
        }
        88..93 => ("task-created", ce(format!("untitled-{n}"), "task.created", json!({"id": n}))),
        93..97 => ("task-reminder", ce(format!("reminder-{n}"), "task.reminder", json!({"task_id": n, "succeed_on_attempt": 2}))),
        _ => ("task-archived", ce(format!("archive-{n}"), "task.archived", json!({"task_id": n}))),
    }
}

/// Runs the soak and writes one line per minute, then a summary.
pub async fn run(soak: Soak, out: &mut impl Write) -> anyhow::Result<()> {
    let http = reqwest::Client::builder().timeout(Duration::from_secs(30)).pool_max_idle_per_host(64).build()?;
    let minute = Arc::new(Mutex::new(Tally::default()));
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    writeln!(out, "soak: {} events/s offered for {} min against {} (pid {})", soak.rate, soak.duration.as_secs() / 60, soak.url, soak.pid)?;
    writeln!(out, "| min | sent | accepted | 429 | errors | publish p50 ms | publish p99 ms | host RSS MiB | queued | processed | dead-lettered |")?;
    writeln!(out, "|----:|-----:|---------:|----:|-------:|---------------:|---------------:|-------------:|-------:|----------:|--------------:|")?;
    // Offer `rate` events a second in ticks of 10 ms, each sent by its own task.
    let per_tick = (soak.rate as f64 / 100.0).max(0.01);
    let mut owed = 0.0;
    let mut ticker = tokio::time::interval(Duration::from_millis(10));
    let mut next_report = started + Duration::from_secs(60);
    let mut rss_first = None;
    let mut rss_last = 0;
    let mut minutes = 0;
    while started.elapsed() < soak.duration {
        ticker.tick().await;
        owed += per_tick;
        while owed >= 1.0 {
            owed -= 1.0;
            let n = next.fetch_add(1, Ordering::Relaxed);
            let (topic, body) = event(n, rand::random::<u64>());
            let (http, url, minute) = (http.clone(), format!("{}/v1.0/publish/pubsub/{topic}", soak.url), minute.clone());
            tokio::spawn(async move {
                let sent = Instant::now();
                let answer = http.post(url).header("content-type", "application/cloudevents+json").body(body.to_string()).send().await;
                let took = sent.elapsed();
                let mut tally = minute.lock().await;
                tally.sent += 1;
                match answer {
                    Ok(r) if r.status().is_success() => {
                        tally.accepted += 1;
                        tally.latencies.push(took);
                    }
                    Ok(r) if r.status() == 429 => tally.refused += 1,
                    _ => tally.errors += 1,
                }
            });
        }
        if Instant::now() >= next_report {
            next_report += Duration::from_secs(60);
            minutes += 1;
            let mut tally = std::mem::take(&mut *minute.lock().await);
            tally.latencies.sort();
            let pct = |p: usize| tally.latencies.get(tally.latencies.len() * p / 100).map_or(0.0, |d| d.as_secs_f64() * 1e3);
            let rss = resident_mib(soak.pid);
            rss_first.get_or_insert(rss);
            rss_last = rss;
            let view: Value = http.get(format!("{}/wasmsub/host", soak.url)).send().await?.json().await?;
            let handlers: Value = http.get(format!("{}/wasmsub/handlers", soak.url)).send().await?.json().await?;
            let sum = |field: &str| handlers["handlers"].as_array().into_iter().flatten().map(|h| h["counts"][field].as_u64().unwrap_or(0)).sum::<u64>();
            writeln!(
                out,
                "| {minutes:>3} | {:>4} | {:>8} | {:>3} | {:>6} | {:>14.2} | {:>14.2} | {rss:>12} | {:>6} | {:>9} | {:>13} |",
                tally.sent, tally.accepted, tally.refused, tally.errors, pct(50), pct(99),
                view["queue"]["messages"], sum("processed"), sum("dead_lettered"),
            )?;
            out.flush()?;
        }
    }
    writeln!(out, "\nhost RSS: {} MiB after the first minute, {rss_last} MiB at the end", rss_first.unwrap_or(0))?;
    Ok(())
}

fn resident_mib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb / 1024)
}
