//! Exactly-once effects through the real pipeline and real guests: duplicate
//! deliveries, concurrent copies, content-derived ids and restarts.

use serde_json::json;
use wasmsub::Outcome;
use wasmsub::DuplicateOf;
use wasmsub_tests::{HandlerSpec, TestHost, cloud_event, guests, manifest_text};

fn recorder_manifest(extra: &str) -> String {
    manifest_text("", &[HandlerSpec::new("recorder", guests::RECORDER, "orders").with(extra)])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_delivery_has_one_effect() {
    let mut host = TestHost::start(&recorder_manifest("")).await.unwrap();
    let event = cloud_event("order-1", json!({"total": 3}));
    host.publish("orders", &event).await.unwrap();
    assert_eq!(host.next_settled().await.outcome, Outcome::Processed { attempts: 1 });
    host.publish("orders", &event).await.unwrap();
    assert_eq!(host.next_settled().await.outcome, Outcome::Duplicate { earlier: DuplicateOf::Processed });
    assert_eq!(host.state("count:order-1").await.as_deref(), Some("1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_concurrent_copies_have_one_effect() {
    let mut host = TestHost::start(&recorder_manifest("")).await.unwrap();
    let event = cloud_event("order-2", json!({"total": 5}));
    // Each publish is queued at once; the broker delivers all 100 copies
    // concurrently, and copies that find the claim held are redelivered.
    for _ in 0..100 {
        host.publish("orders", &event).await.unwrap();
    }
    let reports = host.settled(100).await;
    let processed = reports.iter().filter(|r| matches!(r.outcome, Outcome::Processed { .. })).count();
    let duplicates = reports.iter().filter(|r| matches!(r.outcome, Outcome::Duplicate { .. })).count();
    assert_eq!((processed, duplicates), (1, 99), "{reports:#?}");
    assert_eq!(host.state("count:order-2").await.as_deref(), Some("1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_ids_dedupe_events_a_producer_resent_with_new_ids() {
    let mut host = TestHost::start(&recorder_manifest(r#"id_mode = "content""#)).await.unwrap();
    let data = json!({"id": 42, "key": "task-42"});
    host.publish("orders", &cloud_event("first-send", data.clone())).await.unwrap();
    host.publish("orders", &cloud_event("second-send", data)).await.unwrap();
    let outcomes: Vec<_> = host.settled(2).await.into_iter().map(|r| r.outcome).collect();
    assert!(outcomes.contains(&Outcome::Processed { attempts: 1 }), "{outcomes:?}");
    assert!(outcomes.contains(&Outcome::Duplicate { earlier: DuplicateOf::Processed }), "{outcomes:?}");
    assert_eq!(host.state("count:task-42").await.as_deref(), Some("1"));

    // Without a `time`, the formula has no input: dead-lettered, not guessed.
    let mut timeless = cloud_event("third", json!({"id": 43}));
    timeless.as_object_mut().unwrap().remove("time");
    host.publish("orders", &timeless).await.unwrap();
    let report = host.next_settled().await;
    assert!(matches!(&report.outcome, Outcome::DeadLettered { reason, .. } if reason.contains("`time`")), "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processed_events_are_remembered_across_a_restart() {
    let manifest = recorder_manifest("");
    let mut host = TestHost::start(&manifest).await.unwrap();
    let event = cloud_event("order-3", json!({}));
    host.publish("orders", &event).await.unwrap();
    assert_eq!(host.next_settled().await.outcome, Outcome::Processed { attempts: 1 });
    let data_dir = host.stop().await;

    let mut restarted = TestHost::start_in(&manifest, data_dir).await.unwrap();
    assert_eq!(restarted.state("count:order-3").await.as_deref(), Some("1"));
    restarted.publish("orders", &event).await.unwrap();
    assert_eq!(restarted.next_settled().await.outcome, Outcome::Duplicate { earlier: DuplicateOf::Processed });
    assert_eq!(restarted.state("count:order-3").await.as_deref(), Some("1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_todo_handler_stores_the_task_and_publishes_an_audit_event() {
    let manifest = manifest_text(r#"publish_topics = ["task-audit"]"#, &[
        HandlerSpec::new("task-created", guests::TASK_CREATED, "task-created"),
        // The audit topic's subscriber shows that the publish was relayed.
        HandlerSpec::new("audit", guests::RECORDER, "task-audit"),
    ]);
    let mut host = TestHost::start(&manifest).await.unwrap();
    host.publish("task-created", &cloud_event("t-7", json!({"id": 7, "title": "test it"}))).await.unwrap();
    let report = host.next_settled().await;
    assert_eq!((report.handler.as_str(), &report.outcome), ("task-created", &Outcome::Processed { attempts: 1 }));
    let task: serde_json::Value = serde_json::from_str(&host.state("task:7").await.unwrap()).unwrap();
    assert_eq!(task, json!({"id": 7, "title": "test it"}));
    let audit = host.next_settled().await;
    assert_eq!((audit.handler.as_str(), audit.topic.as_str()), ("audit", "task-audit"));
    // The audit event's id is derived from the original event's key: stable.
    let key = wasmsub::store::DedupeKey { tenant: "acme".into(), handler: "task-created".into(), event_id: "t-7".into() };
    assert_eq!(audit.event_id, wasmsub::pipeline::outgoing_id(&key.encoded(), 0));
    assert_eq!(host.state(&format!("count:{}", audit.event_id)).await.as_deref(), Some("1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_read_modify_writes_lose_no_update() {
    let manifest = manifest_text("max_concurrency = 16", &[HandlerSpec::new("counter", guests::COUNTER, "orders")]);
    let host = TestHost::start(&manifest).await.unwrap();
    const EVENTS: usize = 2000;
    for i in 0..EVENTS {
        host.publish("orders", &cloud_event(&format!("c-{i}"), json!({}))).await.unwrap();
    }
    // Every message settled: all 2,000 events are done.
    host.wait_drained().await;
    assert_eq!(host.state("total").await.as_deref(), Some("2000"));
}
