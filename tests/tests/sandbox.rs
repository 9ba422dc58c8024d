//! Hostile guests (guests/*, docs/SECURITY.md): each is stopped at its
//! limit with a reason that names the limit, the host keeps serving, no
//! tenant reaches another's state, and a noisy tenant does not stop a quiet
//! one.

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use serde_json::json;
use wasmsub::Outcome;
use wasmsub::store::{Claim, Commit, Completion, DedupeKey};
use wasmsub_tests::{HandlerSpec, TestHost, cloud_event, guests, manifest_text};

/// Captured log output of this test binary (tracing, all levels).
fn captured_logs() -> Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buffer = Arc::new(Mutex::new(Vec::new()));
        let writer = buffer.clone();
        tracing_subscriber::fmt()
            .with_env_filter("wasmsub=info")
            .with_ansi(false)
            .with_writer(move || CaptureWriter(writer.clone()))
            .init();
        buffer
    })
    .clone()
}

struct CaptureWriter(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for CaptureWriter {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

async fn dead_letter_reason(limits: &str, component: &str) -> (String, u32) {
    let manifest = manifest_text(limits, &[
        HandlerSpec::new("hostile", component, "orders").with(r#"retry = { max_attempts = 2, min = "10ms", max = "10ms" }"#),
        HandlerSpec::new("healthy", guests::RECORDER, "healthy"),
    ]);
    let mut host = TestHost::start(&manifest).await.unwrap();
    host.publish("orders", &cloud_event("hostile-1", json!({}))).await.unwrap();
    let report = host.next_settled().await;
    // Whatever the guest did, the host still serves the next event.
    host.publish("healthy", &cloud_event("after-1", json!({}))).await.unwrap();
    assert_eq!(host.next_settled().await.outcome, Outcome::Processed { attempts: 1 });
    match report.outcome {
        Outcome::DeadLettered { reason, attempts } => (reason, attempts),
        other => panic!("expected a dead letter, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_bomb_stops_at_the_memory_limit() {
    let (reason, attempts) = dead_letter_reason("memory_mib = 16", guests::MEMORY_BOMB).await;
    assert!(reason.starts_with("memory limit 16 MiB exceeded"), "{reason}");
    assert_eq!(attempts, 2, "a limit hit is retried within the budget");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deep_recursion_stops_at_the_stack_limit() {
    let (reason, _) = dead_letter_reason("", guests::DEEP_RECURSION).await;
    assert!(reason.starts_with("stack overflow"), "{reason}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_infinite_loop_stops_at_the_fuel_limit_when_one_is_set() {
    let (reason, _) = dead_letter_reason("fuel = 5000000", guests::INFINITE_LOOP).await;
    assert_eq!(reason, "fuel limit 5000000 exceeded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_reason_is_cut() {
    let (reason, attempts) = dead_letter_reason("", guests::HUGE_RETURN).await;
    assert_eq!(attempts, 1, "a drop is not retried");
    assert!(reason.len() < 1200, "reason kept {} bytes", reason.len());
    assert!(reason.starts_with("dropped by handler: xxxx"), "{}", &reason[..40]);
    assert!(reason.ends_with("xxx... [cut from 16777216 bytes]"), "{}", &reason[reason.len() - 60..]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forbidden_publish_is_refused_with_a_reason_the_guest_sees() {
    let (reason, _) = dead_letter_reason(r#"publish_topics = ["task-audit"]"#, guests::FORBIDDEN_PUBLISHER).await;
    assert_eq!(
        reason,
        r#"dropped by handler: publish refused: tenant `acme` may not publish to topic `payments` (allowed: ["task-audit"])"#
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wasi_capabilities_are_denied_unless_granted_and_stdio_is_captured() {
    let logs = captured_logs();
    let (reason, _) = dead_letter_reason("", guests::STDIO_WRITER).await;
    // No files (nothing preopened), no environment, no network.
    assert!(reason.starts_with("dropped by handler: file=Err("), "{reason}");
    assert!(reason.contains("dir=Err(") && reason.contains("env=[]") && reason.contains("net=Err("), "{reason}");
    let text = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
    let line = text.lines().find(|l| l.contains("stdout says hello")).expect("guest stdout in the host's logs");
    assert!(line.contains("tenant=acme") && line.contains("handler=hostile") && line.contains("stream=\"stdout\""), "{line}");

    // Granted, an environment variable is visible.
    let manifest = manifest_text("", &[HandlerSpec::new("hostile", guests::STDIO_WRITER, "orders")])
        .replace("[[tenant.handler]]", "[tenant.capabilities]\nenv = { GREETING = \"hi\" }\n\n[[tenant.handler]]");
    let mut host = TestHost::start(&manifest).await.unwrap();
    host.publish("orders", &cloud_event("granted", json!({}))).await.unwrap();
    let Outcome::DeadLettered { reason, .. } = host.next_settled().await.outcome else { panic!() };
    assert!(reason.contains(r#"env=["GREETING"]"#), "{reason}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_spam_is_cut_at_the_log_budget() {
    let logs = captured_logs();
    let manifest = manifest_text("max_log_bytes = 8192", &[HandlerSpec::new("spammer", guests::LOG_SPAM, "orders")]);
    let mut host = TestHost::start(&manifest).await.unwrap();
    host.publish("orders", &cloud_event("spam-1", json!({}))).await.unwrap();
    assert_eq!(host.next_settled().await.outcome, Outcome::Processed { attempts: 1 });
    let text = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
    let spam_lines = text.lines().filter(|l| l.contains("spam spam") && l.contains("messaging.message.id=spam-1")).count();
    // 8 KiB of 1,025-byte lines: 7 fit, the other 99,993 are counted.
    assert_eq!(spam_lines, 7);
    let warning = text.lines().find(|l| l.contains("were dropped") && l.contains("spam-1")).expect("a dropped-lines warning");
    assert!(warning.contains("dropped=99993"), "{warning}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_key_a_guest_passes_reaches_another_tenants_state() {
    let manifest = "[[tenant]]\nname = \"victim\"\n\n[[tenant.handler]]\nname = \"recorder\"\ncomponent = VICTIM\ntopic = \"victim-orders\"\n\n\
                    [[tenant]]\nname = \"acme\"\n\n[[tenant.handler]]\nname = \"prober\"\ncomponent = PROBER\ntopic = \"orders\"\n"
        .replace("VICTIM", &format!("{:?}", guests::RECORDER))
        .replace("PROBER", &format!("{:?}", guests::KEY_PROBER));
    let mut host = TestHost::start(&manifest).await.unwrap();
    // The victim's secret, committed as a handler's effect would be.
    let store = host.host.store().clone();
    let key = DedupeKey { tenant: "victim".into(), handler: "seed".into(), event_id: "seed".into() };
    let Claim::Acquired(token) = store.claim(&key, Duration::from_secs(10)).await.unwrap() else { panic!() };
    let writes = vec![("secret".to_string(), Some(b"victim-data".to_vec()))];
    store
        .finish(Commit { claim: &token, completion: Completion::Processed, tenant: "victim", state_writes: &writes, outbox: &[], dead_letter: None, reads: &[], ttl: Duration::from_secs(60) })
        .await
        .unwrap();

    host.publish("orders", &cloud_event("probe-1", json!({}))).await.unwrap();
    assert_eq!(host.next_settled().await.outcome, Outcome::Processed { attempts: 1 });
    for n in 0..12 {
        let record = host.state(&format!("probe:{n}")).await.unwrap_or_else(|| panic!("probe {n} not recorded"));
        assert!(!record.contains("victim-data"), "probe {n} read the victim's data: {record}");
        assert!(record.starts_with("absent|") || record.starts_with("refused:"), "probe {n}: {record}");
    }
    // Writes through crafted keys landed in the prober's own namespace...
    assert_eq!(host.state("../victim/secret").await.as_deref(), Some("written by the prober"));
    assert_eq!(host.state("victim|secret").await.as_deref(), Some("written by the prober"));
    // ...and the victim's data is untouched.
    assert_eq!(store.get_state("victim", "secret").await.unwrap(), Some(b"victim-data".to_vec()));
    assert_eq!(store.get_state("victim", "../victim/secret").await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_noisy_tenant_does_not_stop_a_quiet_one() {
    let retry = r#"retry = { max_attempts = 2, min = "10ms", max = "10ms" }"#;
    let manifest = format!(
        "[[tenant]]\nname = \"noisy\"\nlimits = {{ cpu_time = \"200ms\", memory_mib = 16, max_concurrency = 2 }}\n\
         [[tenant.handler]]\nname = \"loop\"\ncomponent = {:?}\ntopic = \"loops\"\n{retry}\n\
         [[tenant.handler]]\nname = \"bomb\"\ncomponent = {:?}\ntopic = \"bombs\"\n{retry}\n\n\
         [[tenant]]\nname = \"acme\"\n[[tenant.handler]]\nname = \"quiet\"\ncomponent = {:?}\ntopic = \"orders\"\n",
        guests::INFINITE_LOOP, guests::MEMORY_BOMB, guests::RECORDER
    );
    let mut host = TestHost::start(&manifest).await.unwrap();
    for i in 0..10 {
        host.publish("loops", &cloud_event(&format!("loop-{i}"), json!({}))).await.unwrap();
        host.publish("bombs", &cloud_event(&format!("bomb-{i}"), json!({}))).await.unwrap();
    }
    for i in 0..40 {
        host.publish("orders", &cloud_event(&format!("quiet-{i}"), json!({}))).await.unwrap();
    }
    let reports = host.settled(60).await;
    let quiet: Vec<_> = reports.iter().filter(|r| r.tenant == "acme").collect();
    assert_eq!(quiet.len(), 40);
    assert!(quiet.iter().all(|r| r.outcome == Outcome::Processed { attempts: 1 }), "{quiet:?}");
    let noisy = reports.iter().filter(|r| r.tenant == "noisy");
    assert!(noisy.clone().all(|r| matches!(r.outcome, Outcome::DeadLettered { .. })));
    for i in 0..40 {
        assert_eq!(host.state(&format!("count:quiet-{i}")).await.as_deref(), Some("1"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sleepers_are_stopped_at_the_wall_clock_limit_and_a_quiet_tenant_is_not_held_up() {
    let manifest = format!(
        "[[tenant]]\nname = \"sleepy\"\nlimits = {{ cpu_time = \"1s\", wall_time = \"10s\", max_concurrency = 16 }}\n\
         [[tenant.handler]]\nname = \"sleeper\"\ncomponent = {:?}\ntopic = \"naps\"\nretry = {{ max_attempts = 1 }}\n\n\
         [[tenant]]\nname = \"acme\"\n[[tenant.handler]]\nname = \"quiet\"\ncomponent = {:?}\ntopic = \"orders\"\n",
        guests::SLEEPER, guests::RECORDER
    );
    let mut host = TestHost::start(&manifest).await.unwrap();
    // Sixteen guests asleep for a minute each, holding their slots.
    for i in 0..16 {
        host.publish("naps", &cloud_event(&format!("nap-{i}"), json!({"sleep_ms": 60_000}))).await.unwrap();
    }
    for i in 0..20 {
        host.publish("orders", &cloud_event(&format!("quiet-{i}"), json!({}))).await.unwrap();
    }
    let reports = host.settled(36).await;
    // The quiet tenant's events all settled before the first sleeper was
    // stopped (10 s): nothing of the quiet tenant waited on the sleepers.
    let first_sleeper = reports.iter().position(|r| r.tenant == "sleepy").unwrap();
    assert_eq!(first_sleeper, 20, "quiet events waited behind sleepers: {reports:#?}");
    for report in &reports[20..] {
        assert_eq!(report.outcome, Outcome::DeadLettered { reason: "wall-clock limit 10s exceeded".into(), attempts: 1 }, "{report:?}");
    }
    // A short nap within the limit is fine.
    host.publish("naps", &cloud_event("short-nap", json!({"sleep_ms": 50}))).await.unwrap();
    assert_eq!(host.next_settled().await.outcome, Outcome::Processed { attempts: 1 });
}

/// Publish → settled latencies of `count` quiet events, one at a time.
async fn quiet_latencies(host: &mut TestHost, label: &str, count: usize) -> Vec<std::time::Duration> {
    let mut latencies = Vec::with_capacity(count);
    for i in 0..count {
        let id = format!("{label}-{i}");
        let started = std::time::Instant::now();
        host.publish("orders", &cloud_event(&id, json!({}))).await.unwrap();
        loop {
            let report = host.next_settled().await;
            if report.event_id == id {
                assert_eq!(report.outcome, Outcome::Processed { attempts: 1 });
                break;
            }
        }
        latencies.push(started.elapsed());
    }
    latencies.sort();
    latencies
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_self_publishing_handler_is_held_to_its_quotas_and_a_deploy_stops_it() {
    let manifest = format!(
        "[[tenant]]\nname = \"flood\"\nlimits = {{ publish_topics = [\"loop\"], max_queued_publishes = 256, max_publish_rate = 2000 }}\n\
         [[tenant.handler]]\nname = \"looper\"\ncomponent = {:?}\ntopic = \"loop\"\n\n\
         [[tenant]]\nname = \"acme\"\n[[tenant.handler]]\nname = \"quiet\"\ncomponent = {:?}\ntopic = \"orders\"\n",
        guests::SELF_PUBLISHER, guests::RECORDER
    );
    let mut host = TestHost::start(&manifest).await.unwrap();
    let alone = quiet_latencies(&mut host, "alone", 40).await;

    // One event starts the loop: each makes 64 more, for ever.
    host.publish("loop", &cloud_event("spark", json!({}))).await.unwrap();
    let beside = quiet_latencies(&mut host, "beside", 40).await;
    // The flood is held to its backlog quota (plus what attempts admitted
    // just before it was reached: at most one attempt's 64 per slot).
    let queued = host.host.queued_publishes_of("flood");
    assert!(queued >= 64, "the loop did not run: {queued} queued");
    assert!(queued <= 256 + 16 * 64, "the flood's backlog grew past its quota: {queued}");
    let (p99_alone, p99_beside) = (alone[alone.len() * 99 / 100], beside[beside.len() * 99 / 100]);
    eprintln!("quiet tenant p50 {:?} p99 {p99_alone:?} alone; p50 {:?} p99 {p99_beside:?} beside the loop", alone[alone.len() / 2], beside[beside.len() / 2]);

    // A harmless version stops the loop: attempts from now on run it, the
    // backlog drains and nothing refills it.
    host.host.deployer().deploy("flood", "looper", std::path::Path::new("fix"), std::fs::read(guests::RECORDER).unwrap()).await.unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while host.host.queue_depth() != Some((0, 0)) {
        assert!(std::time::Instant::now() < deadline, "the loop kept going after the deploy: {:?}", host.host.queue_depth());
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_filling_handler_is_refused_at_its_quota_and_others_keep_writing() {
    // The recorder writes two keys per event (`count:` and `event:`); a
    // tenant held to 10 keys can take 5 distinct events.
    let manifest = format!(
        "[[tenant]]\nname = \"hoarder\"\nlimits = {{ max_state_keys = 10 }}\n\
         [[tenant.handler]]\nname = \"filler\"\ncomponent = {:?}\ntopic = \"fill\"\nretry = {{ max_attempts = 1 }}\n\n\
         [[tenant]]\nname = \"acme\"\n[[tenant.handler]]\nname = \"quiet\"\ncomponent = {:?}\ntopic = \"orders\"\n",
        guests::RECORDER, guests::RECORDER
    );
    let mut host = TestHost::start(&manifest).await.unwrap();
    for i in 0..5 {
        host.publish("fill", &cloud_event(&format!("fill-{i}"), json!({}))).await.unwrap();
        assert_eq!(host.next_settled().await.outcome, Outcome::Processed { attempts: 1 });
    }
    host.publish("fill", &cloud_event("one-too-many", json!({}))).await.unwrap();
    let report = host.next_settled().await;
    let Outcome::DeadLettered { reason, .. } = &report.outcome else { panic!("{report:?}") };
    assert!(reason.contains("state quota: tenant `hoarder` would hold 11 state keys, over its max_state_keys of 10"), "{reason}");
    // Rewriting what it holds is still allowed (no new key).
    host.publish("fill", &cloud_event("again", json!({"key": "fill-0"}))).await.unwrap();
    assert_eq!(host.next_settled().await.outcome, Outcome::Processed { attempts: 1 });
    // Another tenant is not held to the hoarder's quota.
    for i in 0..20 {
        host.publish("orders", &cloud_event(&format!("o-{i}"), json!({}))).await.unwrap();
        assert_eq!(host.next_settled().await.outcome, Outcome::Processed { attempts: 1 });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_text_is_escaped_before_it_reaches_logs_and_dead_letters() {
    let logs = captured_logs();
    let manifest = manifest_text("", &[HandlerSpec::new("forger", guests::LOG_FORGER, "orders").with("retry = { max_attempts = 1 }")]);
    let mut host = TestHost::start(&manifest).await.unwrap();
    host.publish("orders", &cloud_event("evil\nid", json!({}))).await.unwrap();
    let report = host.next_settled().await;
    let Outcome::DeadLettered { reason, .. } = &report.outcome else { panic!("{report:?}") };
    assert!(!reason.contains('\u{1b}') && reason.contains("\\u{1b}[2J"), "the reason keeps its escape sequence raw: {reason:?}");
    let listed = host.host.dead_letters().await;
    assert!(!listed[0].reason.contains('\u{1b}'));
    let text = String::from_utf8(logs.lock().unwrap().clone()).unwrap();
    for line in text.lines().filter(|l| l.contains("FORGED")) {
        assert!(line.contains("handler=forger"), "a guest forged a log line of its own: {line}");
        assert!(line.contains("\\n"), "{line}");
    }
    assert!(text.contains("FORGED"), "the guest's line never reached the log");
    assert!(!text.lines().any(|l| l.contains("messaging.message.id=evil") && !l.contains("evil\\nid")), "an event id was logged raw");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_made_ahead_still_serves_one_event_and_sees_nothing_of_another() {
    let mut host = TestHost::start(&manifest_text("", &[HandlerSpec::new("probe", guests::MEMORY_PROBE, "probe")])).await.unwrap();
    const EVENTS: usize = 12;
    for i in 0..EVENTS {
        if i > 0 {
            // From the second event on, each runs on an instance made ahead.
            host.wait_for_an_instance_made_ahead().await;
        }
        host.publish("probe", &cloud_event(&format!("p-{i}"), json!({}))).await.unwrap();
        assert_eq!(host.next_settled().await.outcome, Outcome::Processed { attempts: 1 });
    }
    for i in 0..EVENTS {
        // No event before it on its instance, nothing left in its memory.
        assert_eq!(host.state(&format!("seen:p-{i}")).await.as_deref(), Some("0 0"), "event p-{i}");
    }
    let text = host.host.metrics_text();
    let made_ahead: f64 = text
        .lines()
        .filter(|line| line.starts_with("wasmsub_attempts_made_ahead_total{") && line.contains("handler=\"probe\""))
        .map(|line| line.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum();
    assert_eq!(made_ahead, (EVENTS - 1) as f64, "attempts on instances made ahead:\n{text}");
}
