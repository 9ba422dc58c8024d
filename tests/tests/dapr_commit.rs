//! The commit protocol on a real daprd and Redis: a run that outlived its
//! lease writes nothing anywhere, and concurrent read-modify-writes of one
//! key from two replicas lose no update.

use std::time::{Duration, Instant};

use serde_json::json;
use wasmsub_tests::dapr::{DaprClient, Daprd, Redis, Scratch, manifest, start_host, start_host_with, wait_until_subscribed};
use wasmsub_tests::{cloud_event, guests};

/// The wasmsub binary under test (host/src/main.rs, built by this crate).
const HOST: &str = env!("CARGO_BIN_EXE_wasmsub-under-test");

async fn wait_for_log(host: &wasmsub_tests::dapr::Process, limit: Duration, what: &str, found: impl Fn(&str) -> bool) {
    let deadline = Instant::now() + limit;
    while !host.log_text().lines().any(&found) {
        assert!(Instant::now() < deadline, "{what} never showed in {}'s log", host.name);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The issue's stall: host A validates its commit, then stalls (an injected
/// pause, as a frozen sidecar or a paused VM would) past its lease; host B
/// takes the event over and commits. When A wakes, its commit must fail:
/// none of its writes may land. A runs the counter (writes `total`), B the
/// recorder (writes `count:{key}`), so whose writes landed is plain to see.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_that_outlived_its_lease_writes_nothing() {
    let scratch = Scratch::new();
    let redis = Redis::start(scratch.path());
    let components = scratch.components(&redis);
    // Lease: wall_time 1 s + margin 1 s. Daprd hands a pending message to
    // another consumer after 8 s (tests' processing timeout): the pause
    // outlasts both, with room for host B to start.
    let limits = r#"wall_time = "1s""#;
    let manifest_a = scratch.manifest_named("a.toml", &manifest(limits, &[
        ("orders", guests::RECORDER, "orders", ""),
        ("tally", guests::COUNTER, "tally", ""),
    ]));
    let manifest_b = scratch.manifest_named("b.toml", &manifest(limits, &[
        ("orders", guests::RECORDER, "orders", ""),
        ("tally", guests::RECORDER, "tally", ""),
    ]));
    let (port_a, port_b) = (wasmsub_tests::dapr::free_port(), wasmsub_tests::dapr::free_port());
    let daprd_a = Daprd::start("daprd-a", "stale", port_a, &components, scratch.path());
    let host_a = start_host_with(HOST, "host-a", &manifest_a, &daprd_a, scratch.path(), &[("WASMSUB_FAULT_PAUSE", "before-commit:20000:stale-1")]);
    let client = DaprClient::new(&daprd_a);
    wait_until_subscribed(&client, "orders").await;

    client.publish("tally", &cloud_event("stale-1", json!({"key": "stale-1"}))).await;
    wait_for_log(&host_a, Duration::from_secs(60), "host A's injected pause", |l| l.contains("injected fault: pausing")).await;
    // Host B (and its sidecar) come up while A is stalled mid-commit.
    let daprd_b = Daprd::start("daprd-b", "stale", port_b, &components, scratch.path());
    let host_b = start_host(HOST, "host-b", &manifest_b, &daprd_b, scratch.path());
    let won = client.wait_for_state("acme", "count:stale-1", Duration::from_secs(90), |v| v.is_some()).await;
    assert_eq!(won.as_deref(), Some("1"), "host B never took the stalled event over");
    // A wakes up and tries to commit: it must learn it lost the event.
    wait_for_log(&host_a, Duration::from_secs(60), "host A's refused commit", |l| l.contains("in-flight-elsewhere") && l.contains("stale-1")).await;
    redis.wait_drained("tally", "stale", Duration::from_secs(60));
    assert_eq!(client.tenant_state("acme", "total").await, None, "the stalled run's write landed after it lost its claim");
    assert!(!host_a.log_text().lines().any(|l| l.contains("stale-1") && l.contains("event processed")), "host A reported the event processed");
    drop((host_a, host_b));
}

/// Two replicas, 16 attempts each at a time, 2,000 events, one hot key:
/// every increment survives (reads are validated at commit; a stale attempt
/// runs again on fresh reads).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_incrementing_one_key_lose_no_update() {
    let scratch = Scratch::new();
    let redis = Redis::start(scratch.path());
    let components = scratch.components(&redis);
    let manifest = scratch.manifest(&manifest("max_concurrency = 16", &[
        ("orders", guests::RECORDER, "orders", ""),
        ("tally", guests::COUNTER, "tally", ""),
    ]));
    let (port_a, port_b) = (wasmsub_tests::dapr::free_port(), wasmsub_tests::dapr::free_port());
    let daprd_a = Daprd::start("daprd-a", "tally", port_a, &components, scratch.path());
    let daprd_b = Daprd::start("daprd-b", "tally", port_b, &components, scratch.path());
    let host_a = start_host(HOST, "host-a", &manifest, &daprd_a, scratch.path());
    let host_b = start_host(HOST, "host-b", &manifest, &daprd_b, scratch.path());
    let client = DaprClient::new(&daprd_a);
    wait_until_subscribed(&client, "orders").await;

    const EVENTS: usize = 2000;
    for i in 0..EVENTS {
        client.publish("tally", &cloud_event(&format!("c-{i}"), json!({}))).await;
    }
    // Fails only if the counter stops moving (a busy machine is slow, not
    // stuck).
    let (mut last, mut since) = (None, Instant::now());
    loop {
        let total = client.tenant_state("acme", "total").await.and_then(|v| v.parse::<usize>().ok());
        if total >= Some(EVENTS) {
            break;
        }
        if total != last {
            (last, since) = (total, Instant::now());
        }
        assert!(since.elapsed() < Duration::from_secs(180), "the counter stopped at {total:?} of {EVENTS}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    redis.wait_drained("tally", "tally", Duration::from_secs(120));
    let total = client.tenant_state("acme", "total").await;
    assert_eq!(total.as_deref(), Some("2000"));
    let served = |host: &wasmsub_tests::dapr::Process| host.log_text().lines().filter(|l| l.contains("event processed") && l.contains("c-")).count();
    let (a, b) = (served(&host_a), served(&host_b));
    eprintln!("host A processed {a}, host B {b}");
    assert!(a > 0 && b > 0, "both replicas should share the work: A {a}, B {b}");
}
