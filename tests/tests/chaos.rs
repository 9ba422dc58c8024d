//! The embedded host as an operator meets it: killed mid-stream, stopped
//! with a backlog, flooded with publishes. Every event a publish got a 2xx
//! for is counted: its effect, and its handler's follow-up publish, happen
//! exactly once.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use wasmsub_tests::embedded::{EmbeddedHost, Published, assert_each_once};
use wasmsub_tests::{cloud_event, guests};

const HOST: &str = env!("CARGO_BIN_EXE_wasmsub-under-test");

/// Tenant `acme`: `orders` records each event and forwards a follow-up to
/// `followups`, whose handler records that too. With `tally`, `totals`
/// (tenant `tally`, 4 at a time) takes every order as well and adds one to
/// a shared counter.
fn manifest(dir: &std::path::Path, limits: &str, tally: bool) -> PathBuf {
    let (r, c) = (guests::RECORDER, guests::COUNTER);
    let tally_tenant = if tally {
        format!("[[tenant]]\nname = \"tally\"\nlimits = {{ max_concurrency = 4 }}\n[[tenant.handler]]\nname = \"totals\"\ncomponent = {c:?}\ntopic = \"orders\"\n")
    } else {
        String::new()
    };
    let text = format!(
        "[idempotency]\nlease_margin = \"5s\"\n[[tenant]]\nname = \"acme\"\nlimits = {{ publish_topics = [\"followups\"], max_state_keys = 1000000, max_queued_publishes = 100000, max_publish_rate = 100000{limits} }}\n\
         [[tenant.handler]]\nname = \"orders\"\ncomponent = {r:?}\ntopic = \"orders\"\n\
         retry = {{ max_attempts = 3, multiplier = 0.05, min = \"50ms\", max = \"200ms\" }}\n\
         [[tenant.handler]]\nname = \"followups\"\ncomponent = {r:?}\ntopic = \"followups\"\n\
         retry = {{ max_attempts = 3, multiplier = 0.05, min = \"50ms\", max = \"200ms\" }}\n\
         {tally_tenant}"
    );
    let path = dir.join("wasmsub.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn order(i: usize, extra: Value) -> Value {
    let mut data = json!({"key": format!("e-{i}"), "forward_to": "followups"});
    data.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    cloud_event(&format!("e-{i}"), data)
}

/// Keys whose counts prove the effect and the follow-up of each event.
fn effect_keys(events: impl Iterator<Item = usize>) -> (Vec<String>, Vec<String>) {
    events.map(|i| (format!("e-{i}"), format!("fwd-e-{i}"))).unzip()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_killed_every_few_hundred_ms_loses_and_doubles_nothing() {
    let scratch = tempfile::tempdir().unwrap();
    let manifest = manifest(scratch.path(), "", true);
    let data = scratch.path().join("data");
    let host = Arc::new(tokio::sync::RwLock::new(EmbeddedHost::start(HOST, &manifest, &data, scratch.path(), &[])));
    const EVENTS: usize = 5000;
    const PUBLISHERS: usize = 8;

    // Publishers send every event until it is accepted (a publish that got
    // no answer may or may not have landed: it is sent again, same id).
    let next = Arc::new(AtomicUsize::new(0));
    let publishers: Vec<_> = (0..PUBLISHERS)
        .map(|_| {
            let (host, next) = (host.clone(), next.clone());
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= EVENTS {
                        return;
                    }
                    let event = order(i, json!({}));
                    loop {
                        if host.read().await.publish("orders", &event).await == Published::Accepted {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            })
        })
        .collect();

    // The killer: each life of the host is ready, serves for 50-250 ms,
    // and is SIGKILLed. It stops once every event is accepted.
    let publishing = Arc::new(AtomicBool::new(true));
    let killer = {
        let (host, publishing) = (host.clone(), publishing.clone());
        tokio::spawn(async move {
            let mut kills = 0;
            while publishing.load(Ordering::Relaxed) {
                host.read().await.wait_ready(Duration::from_secs(60)).await;
                tokio::time::sleep(Duration::from_millis(50 + rand::random::<u64>() % 200)).await;
                let mut host = host.write().await;
                host.kill();
                kills += 1;
                host.restart();
            }
            kills
        })
    };
    for publisher in publishers {
        publisher.await.unwrap();
    }
    publishing.store(false, Ordering::Relaxed);
    let kills = killer.await.unwrap();
    assert!(kills >= 5, "only {kills} kills while publishing: the test proves little");

    let host = host.read().await;
    host.wait_ready(Duration::from_secs(60)).await;
    host.wait_drained(Duration::from_secs(300)).await;
    let (effects, follow_ups) = effect_keys(0..EVENTS);
    assert_each_once(&effects, &host.counts(&effects).await);
    assert_each_once(&follow_ups, &host.counts(&follow_ups).await);
    // The shared counter saw every event once, however the kills fell.
    assert_eq!(host.state("tally", "total").await.as_deref(), Some(EVENTS.to_string().as_str()));
    eprintln!("{EVENTS} events, {kills} kills: every effect, follow-up and counter increment exactly once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_with_a_backlog_leaves_it_on_disk_for_the_next_start() {
    let scratch = tempfile::tempdir().unwrap();
    let manifest = manifest(scratch.path(), "", false);
    let data = scratch.path().join("data");
    const EVENTS: usize = 30_000;
    let mut host = EmbeddedHost::start(HOST, &manifest, &data, scratch.path(), &["--queue-max-messages", "100000"]);
    host.wait_ready(Duration::from_secs(60)).await;
    for chunk in (0..EVENTS).collect::<Vec<_>>().chunks(64) {
        let events: Vec<Value> = chunk.iter().map(|i| order(*i, json!({}))).collect();
        let sends = events.iter().map(|event| host.publish("orders", event));
        for (i, published) in chunk.iter().zip(futures_util::future::join_all(sends).await) {
            assert_eq!(published, Published::Accepted, "event {i}");
        }
    }
    // A backlog is there when the stop comes (publishing outruns handling).
    let backlog = host.host_view().await.unwrap()["queue"]["messages"].as_u64().unwrap();
    assert!(backlog > 0, "no backlog to stop with");
    let log = host.terminate();
    assert!(log.contains("queued messages stay on disk"), "the stop did not say what it left:\n{log}");

    host.restart();
    host.wait_ready(Duration::from_secs(60)).await;
    host.wait_drained(Duration::from_secs(600)).await;
    let (effects, follow_ups) = effect_keys(0..EVENTS);
    assert_each_once(&effects, &host.counts(&effects).await);
    assert_each_once(&follow_ups, &host.counts(&follow_ups).await);
    eprintln!("stopped with {backlog} of {EVENTS} events queued; after the restart every one took effect once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_publishes_is_refused_with_429_and_memory_stays_under_the_bound() {
    let scratch = tempfile::tempdir().unwrap();
    // A small host: 8 slots of 16 MiB, a queue of 2,000 messages, a 16 MiB
    // cache: its computed bound is a few hundred MiB.
    let manifest = manifest(scratch.path(), ", memory_mib = 16, max_concurrency = 8", false);
    let data = scratch.path().join("data");
    let args = ["--instance-slots", "8", "--queue-max-messages", "2000", "--queue-max-mib", "8", "--store-cache-mib", "16"];
    let host = Arc::new(EmbeddedHost::start(HOST, &manifest, &data, scratch.path(), &args));
    host.wait_ready(Duration::from_secs(60)).await;
    let bound = host.host_view().await.unwrap()["memory_budget"]["total"].as_u64().unwrap();

    // Sixteen publishers as fast as they can for 60 s; each event is slow
    // to handle (5 ms of CPU), so the host falls behind at once.
    const FLOOD: Duration = Duration::from_secs(60);
    let started = Instant::now();
    let next = Arc::new(AtomicUsize::new(0));
    let publishers: Vec<_> = (0..16)
        .map(|_| {
            let (host, next) = (host.clone(), next.clone());
            tokio::spawn(async move {
                let (mut accepted, mut refused) = (Vec::new(), 0usize);
                while started.elapsed() < FLOOD {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    match host.publish("orders", &order(i, json!({"spin_ms": 5}))).await {
                        Published::Accepted => accepted.push(i),
                        Published::Refused(429) => refused += 1,
                        other => panic!("event {i}: {other:?}"),
                    }
                }
                (accepted, refused)
            })
        })
        .collect();
    let mut peak = 0;
    while started.elapsed() < FLOOD {
        peak = peak.max(host.resident_bytes());
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let (mut accepted, mut refused) = (Vec::new(), 0);
    for publisher in publishers {
        let (a, r) = publisher.await.unwrap();
        accepted.extend(a);
        refused += r;
    }
    let sent = next.load(Ordering::Relaxed);
    assert!(refused > 0, "no publish was refused: the flood did not outrun the host");
    assert!(peak < bound, "host memory peaked at {} MiB, over its computed bound of {} MiB", peak >> 20, bound >> 20);

    host.wait_drained(Duration::from_secs(600)).await;
    accepted.sort_unstable();
    let (effects, follow_ups) = effect_keys(accepted.iter().copied());
    assert_each_once(&effects, &host.counts(&effects).await);
    assert_each_once(&follow_ups, &host.counts(&follow_ups).await);
    // A refused publish was not taken: none of them had an effect.
    let refused_keys: Vec<String> = (0..sent).filter(|i| accepted.binary_search(i).is_err()).take(500).map(|i| format!("e-{i}")).collect();
    assert!(host.counts(&refused_keys).await.iter().all(Option::is_none), "a publish answered 429 took effect");
    eprintln!("flood: {} accepted, {refused} refused with 429; peak RSS {} MiB under the bound of {} MiB", accepted.len(), peak >> 20, bound >> 20);
}

/// A size-capped tmpfs mounted for one test, unmounted when dropped.
struct SmallDisk {
    mount: tempfile::TempDir,
}

impl SmallDisk {
    /// `None` where this process may not mount (not root, no CAP_SYS_ADMIN).
    fn mount(size: &str) -> Option<Self> {
        let mount = tempfile::tempdir().unwrap();
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs", mount.path().to_str().unwrap()])
            .stderr(std::process::Stdio::null())
            .status()
            .ok()?;
        status.success().then_some(Self { mount })
    }

    fn path(&self) -> &std::path::Path {
        self.mount.path()
    }

    /// Writes a file until the file system is full; returns its path.
    fn fill(&self) -> PathBuf {
        use std::io::Write;
        let path = self.path().join("filler");
        let mut file = std::fs::File::create(&path).unwrap();
        let block = vec![0u8; 64 * 1024];
        while file.write_all(&block).is_ok() {}
        let _ = file.sync_all();
        path
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").args(["-l", self.mount.path().to_str().unwrap()]).status();
    }
}

/// A stop while an event is still running: `/readyz` says the host is
/// stopping for as long as it drains (what a readiness probe or Dapr's app
/// health check sees), and an attempt that outlives the drain is cut off
/// cleanly (no panic from a guest left running into the runtime's
/// teardown); the event is not lost: the next start runs it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_says_stopping_while_it_drains_and_cuts_off_an_attempt_that_outlives_it() {
    let scratch = tempfile::tempdir().unwrap();
    let mut host = napping_host(scratch.path()).await;
    host.begin_stop();
    let stopping = wait_until_stopping(&host).await;
    assert!(stopping.contains("the host is stopping"), "{stopping}");

    let (status, log) = host.wait_stopped(Duration::from_secs(90));
    let status = status.unwrap_or_else(|| panic!("the host did not stop within 90 s:\n{log}"));
    assert!(status.success(), "the stop exited {status}:\n{log}");
    assert!(log.contains("were cut off"), "the stop did not say it cut the attempt off:\n{log}");
    assert!(!log.contains("panicked"), "a panic during the stop:\n{log}");

    // The event was not committed: the next start runs it again.
    host.restart();
    wait_running_one(&host, "the cut-off event did not come again").await;
    host.kill();
}

/// A second stop signal does not wait for the drain: the process exits at
/// once with 130, and what was running is delivered again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_stop_signal_exits_at_once_and_loses_nothing() {
    let scratch = tempfile::tempdir().unwrap();
    let mut host = napping_host(scratch.path()).await;
    host.begin_stop();
    wait_until_stopping(&host).await;
    host.begin_stop();
    // Well under the 30 s drain the first signal alone would wait.
    let (status, log) = host.wait_stopped(Duration::from_secs(15));
    let status = status.unwrap_or_else(|| panic!("a second signal did not end the process:\n{log}"));
    assert_eq!(status.code(), Some(130), "{log}");
    assert!(log.contains("second stop signal"), "{log}");

    host.restart();
    wait_running_one(&host, "the event in progress did not come again").await;
    host.kill();
}

/// A host whose one handler is running an event that sleeps 100 s (longer
/// than the host's 30 s drain), under a 120 s wall-clock limit.
async fn napping_host(dir: &std::path::Path) -> EmbeddedHost {
    let manifest = dir.join("wasmsub.toml");
    let sleeper = guests::SLEEPER;
    let text = format!("[[tenant]]\nname = \"slow\"\nlimits = {{ wall_time = \"120s\" }}\n[[tenant.handler]]\nname = \"sleeper\"\ncomponent = {sleeper:?}\ntopic = \"slow\"\n");
    std::fs::write(&manifest, text).unwrap();
    let host = EmbeddedHost::start(HOST, &manifest, &dir.join("data"), dir, &[]);
    host.wait_ready(Duration::from_secs(60)).await;
    host.publish_until_accepted("slow", &cloud_event("nap", json!({"sleep_ms": 100_000})), Duration::from_secs(60)).await;
    wait_running_one(&host, "the sleeper never started").await;
    host
}

/// Waits (up to a minute) until exactly one delivery is inside the host.
async fn wait_running_one(host: &EmbeddedHost, otherwise: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while host.host_view().await.and_then(|view| view["deliveries_in_flight"].as_u64()) != Some(1) {
        assert!(Instant::now() < deadline, "{otherwise}:\n{}", host.log_text());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits (up to 20 s) until `/readyz` says the host is stopping; its body.
async fn wait_until_stopping(host: &EmbeddedHost) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some((503, body)) = host.readiness().await
            && body.contains("stopping")
        {
            return body;
        }
        assert!(Instant::now() < deadline, "/readyz never said the host is stopping");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The host may be idle when space returns, or its traffic may wait for
/// `/readyz` (a readiness probe, Dapr's app health check): the store must
/// find out by itself, with no write of anyone's to try.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_filled_the_disk_is_ready_again_once_space_returns_with_nothing_written() {
    use wasmsub::store::{EmbeddedStore, MessageQueue, QueuedMessage};
    let Some(disk) = SmallDisk::mount("16M") else {
        panic!("this test mounts a 16 MiB tmpfs to fill a real file system; run it as root (CI does)");
    };
    let store = EmbeddedStore::open(&disk.path().join("store.redb")).unwrap();
    let filler = disk.fill();
    let message = |size: usize| QueuedMessage {
        pubsub: "pubsub".into(),
        topic: "orders".into(),
        body: vec![b'x'; size].into(),
        content_type: None,
        origin: None,
    };
    let mut refused = false;
    for _ in 0..200 {
        if store.push(vec![message(200_000)], false).await.is_err() {
            refused = true;
            break;
        }
    }
    assert!(refused, "the full disk never refused a write");
    let why = store.trouble().expect("a refused write leaves the store not ready");
    assert!(why.contains("No space left on device"), "{why}");

    std::fs::remove_file(filler).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while store.trouble().is_some() {
        assert!(Instant::now() < deadline, "space came back a minute ago and the store still says: {:?}", store.trouble());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    store.push(vec![message(1000)], false).await.expect("a write once the store says it is well");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_publishes_and_defers_events_then_recovers_without_a_restart() {
    let Some(disk) = SmallDisk::mount("16M") else {
        panic!("this test mounts a 16 MiB tmpfs to fill a real file system; run it as root (CI does)");
    };
    let scratch = tempfile::tempdir().unwrap();
    let manifest = manifest(scratch.path(), "", false);
    let data = disk.path().join("data");
    let host = EmbeddedHost::start(HOST, &manifest, &data, scratch.path(), &[]);
    host.wait_ready(Duration::from_secs(60)).await;
    for i in 0..50 {
        host.publish_until_accepted("orders", &order(i, json!({})), Duration::from_secs(60)).await;
    }

    // The disk fills up. Publishes of some size soon need new pages: the
    // store fails its write, is closed and answers 503 while it stays full.
    let filler = disk.fill();
    let blob = "x".repeat(100_000);
    let mut refused_at = None;
    for i in 50..250 {
        match host.publish("orders", &order(i, json!({"blob": blob}))).await {
            Published::Accepted => {}
            Published::Refused(503) => {
                refused_at = Some(i);
                break;
            }
            other => panic!("event {i}: {other:?}"),
        }
    }
    let refused_at = refused_at.expect("the full disk never refused a publish");
    let reasons = host.host_view().await.unwrap()["not_ready_because"].to_string();
    assert!(reasons.contains("No space left on device"), "readiness does not say why: {reasons}");

    // Space comes back: within seconds the store is written again, with no
    // restart, and every publish answered 2xx takes effect once.
    std::fs::remove_file(filler).unwrap();
    host.publish_until_accepted("orders", &order(refused_at, json!({})), Duration::from_secs(60)).await;
    for i in refused_at + 1..refused_at + 50 {
        host.publish_until_accepted("orders", &order(i, json!({})), Duration::from_secs(60)).await;
    }
    host.wait_ready(Duration::from_secs(60)).await;
    host.wait_drained(Duration::from_secs(120)).await;
    assert_eq!(host.starts(), 1, "the host was restarted");
    let (effects, follow_ups) = effect_keys(0..refused_at + 50);
    assert_each_once(&effects, &host.counts(&effects).await);
    assert_each_once(&follow_ups, &host.counts(&follow_ups).await);
    let log = host.log_text();
    assert!(log.contains("embedded store written again"), "no recovery line in the log");
}
