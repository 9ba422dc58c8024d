//! Failing handlers through the real pipeline: retries with the policy's
//! delays, dead letters with reasons, traps and limits contained, and no
//! partial effect from an attempt that did not succeed.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use wasmsub::Outcome;
use wasmsub_tests::{HandlerSpec, TestHost, cloud_event, guests, manifest_text};

/// `handler` on `orders`, with a recorder on its dead-letter topic.
fn with_dead_letter_recorder(limits: &str, handler: HandlerSpec<'_>) -> String {
    manifest_text(limits, &[handler, HandlerSpec::new("dlq", guests::RECORDER, "orders-dead-letter")])
}

/// The dead-letter message the recorder saw for `event_id`.
async fn dead_letter_seen(host: &TestHost, event_id: &str) -> Value {
    let record = host.wait_for_state(&format!("event:{event_id}")).await;
    serde_json::from_str(&record).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flaky_succeeds_on_the_attempt_it_needs_after_the_policys_delays() {
    let retry = r#"retry = { max_attempts = 4, multiplier = 0.1, min = "150ms", max = "1s" }"#;
    let manifest = manifest_text("", &[HandlerSpec::new("flaky", guests::FLAKY, "orders").with(retry)]);
    let mut host = TestHost::start(&manifest).await.unwrap();
    let started = Instant::now();
    host.publish("orders", &cloud_event("f-1", json!({"succeed_on_attempt": 3}))).await.unwrap();
    assert_eq!(host.next_settled().await.outcome, Outcome::Processed { attempts: 3 });
    // Waits after attempts 1 and 2: 0.1 s and 0.2 s, clamped to [150 ms, 1 s].
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(150 + 200), "retries came too soon: {waited:?}");
    // Every attempt wrote its number; only the successful attempt's write stays.
    assert_eq!(host.state("flaky:f-1").await.as_deref(), Some("3"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_is_dead_lettered_with_its_reason_after_max_attempts() {
    let manifest = with_dead_letter_recorder("", HandlerSpec::new("poison", guests::POISON, "orders"));
    let mut host = TestHost::start(&manifest).await.unwrap();
    host.publish("orders", &cloud_event("p-1", json!({}))).await.unwrap();
    let report = host.next_settled().await;
    let Outcome::DeadLettered { reason, attempts } = &report.outcome else { panic!("{report:?}") };
    assert_eq!(*attempts, 3);
    assert_eq!(reason, "poison: event p-1 can never be handled");

    let seen = dead_letter_seen(&host, "p-1").await;
    assert_eq!(seen["topic"], "orders-dead-letter");
    let extensions = &seen["extensions"];
    assert_eq!(extensions["wasmsubreason"], "poison: event p-1 can never be handled");
    assert_eq!(extensions["wasmsubattempts"], "3");
    assert_eq!(extensions["wasmsubhandler"], "poison");
    assert_eq!(extensions["wasmsubversion"], report.handler_version.as_str());
    let listed = host.host.dead_letters().await;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].event_id, "p-1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trap_is_contained_retried_and_dead_lettered_without_its_writes() {
    let manifest = manifest_text("", &[
        HandlerSpec::new("trap", guests::TRAP, "orders"),
        HandlerSpec::new("recorder", guests::RECORDER, "healthy"),
    ]);
    let mut host = TestHost::start(&manifest).await.unwrap();
    host.publish("orders", &cloud_event("t-1", json!({}))).await.unwrap();
    let report = host.next_settled().await;
    let Outcome::DeadLettered { reason, attempts: 3 } = &report.outcome else { panic!("{report:?}") };
    assert!(reason.starts_with("guest trapped: wasm trap"), "{reason}");
    assert!(reason.contains("giving up half-way through event t-1"), "the panic message is kept: {reason}");
    // The trap came after a state write: none of the three attempts left it.
    assert_eq!(host.state("trap:t-1").await, None);
    // The host keeps serving.
    host.publish("healthy", &cloud_event("h-1", json!({}))).await.unwrap();
    assert_eq!(host.next_settled().await.outcome, Outcome::Processed { attempts: 1 });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_infinite_loop_is_stopped_at_the_cpu_time_limit() {
    let manifest = manifest_text(r#"cpu_time = "100ms""#, &[
        HandlerSpec::new("loop", guests::INFINITE_LOOP, "orders").with(r#"retry = { max_attempts = 2, min = "10ms", max = "10ms" }"#),
        HandlerSpec::new("recorder", guests::RECORDER, "healthy"),
    ]);
    let mut host = TestHost::start(&manifest).await.unwrap();
    host.publish("orders", &cloud_event("l-1", json!({}))).await.unwrap();
    let report = host.next_settled().await;
    assert_eq!(report.outcome, Outcome::DeadLettered { reason: "cpu time limit 100ms exceeded".into(), attempts: 2 });
    host.publish("healthy", &cloud_event("h-2", json!({}))).await.unwrap();
    assert_eq!(host.next_settled().await.outcome, Outcome::Processed { attempts: 1 });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drop_is_dead_lettered_at_once_without_retries() {
    let manifest = with_dead_letter_recorder("", HandlerSpec::new("task-created", guests::TASK_CREATED, "orders"));
    let mut host = TestHost::start(&manifest).await.unwrap();
    host.publish("orders", &cloud_event("bad-task", json!({"id": 9}))).await.unwrap();
    let report = host.next_settled().await;
    assert_eq!(report.outcome, Outcome::DeadLettered {
        reason: "dropped by handler: invalid task: missing `title` (a non-empty string)".into(),
        attempts: 1,
    });
    assert_eq!(host.state("task:9").await, None);
    let seen = dead_letter_seen(&host, "bad-task").await;
    assert_eq!(seen["extensions"]["wasmsubattempts"], "1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_listed_after_a_restart() {
    let manifest = with_dead_letter_recorder("", HandlerSpec::new("poison", guests::POISON, "orders"));
    let mut host = TestHost::start(&manifest).await.unwrap();
    host.publish("orders", &cloud_event("p-2", json!({}))).await.unwrap();
    assert!(matches!(host.next_settled().await.outcome, Outcome::DeadLettered { .. }));
    let data_dir = host.stop().await;

    let restarted = TestHost::start_in(&manifest, data_dir).await.unwrap();
    let listed = restarted.host.dead_letters().await;
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!((listed[0].event_id.as_str(), listed[0].attempts), ("p-2", 3));
    assert_eq!(listed[0].reason, "poison: event p-2 can never be handled");
}
