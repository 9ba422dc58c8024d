//! The todo app's `task-created` handler written in Rust, Python
//! (componentize-py) and JavaScript (componentize-js), run side by side by
//! one host behind a real daprd and Redis, through the same checks: a task
//! is stored and its audit event published; an invalid task is dropped to
//! the dead-letter topic with its reason; and (Python, JavaScript) an
//! uncaught exception is a trap whose reason carries the guest's traceback,
//! retried, then dead-lettered, its half-done write discarded.

use std::time::Duration;

use serde_json::{Value, json};
use wasmsub::store::DedupeKey;
use wasmsub_tests::dapr::{DaprClient, Daprd, Redis, Scratch, free_port, manifest, start_host_with, wait_until_subscribed};
use wasmsub_tests::{cloud_event, guests};

const HOST: &str = env!("CARGO_BIN_EXE_wasmsub-under-test");

/// Long enough for a slow box: each wait ends as soon as its value appears.
const SETTLE: Duration = Duration::from_secs(120);

struct Language {
    prefix: &'static str,
    component: &'static str,
    /// What an uncaught exception's trap reason carries (`None`: Rust, whose
    /// handler has no such path).
    traceback: Option<&'static [&'static str]>,
}

const LANGUAGES: [Language; 3] = [
    Language { prefix: "rust", component: guests::TASK_CREATED, traceback: None },
    Language { prefix: "py", component: guests::PY_TASK_CREATED, traceback: Some(&["Traceback (most recent call last)", "app.py", "RuntimeError: task-created: title 'raise' asked for a crash"]) },
    Language { prefix: "js", component: guests::JS_TASK_CREATED, traceback: Some(&["task-created: title 'raise' asked for a crash", "Stack:", "handler.js"]) },
];

async fn recorded(client: &DaprClient, key: &str) -> Value {
    let text = client.wait_for_state("acme", key, SETTLE, |v| v.is_some()).await.unwrap_or_else(|| panic!("`{key}` never recorded"));
    serde_json::from_str(&text).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_created_in_rust_python_and_javascript_passes_the_same_checks_through_daprd() {
    let scratch = Scratch::new();
    let redis = Redis::start(scratch.path());
    let app_port = free_port();
    let daprd = Daprd::start("daprd", "languages", app_port, &scratch.components(&redis), scratch.path());
    let mut handlers: Vec<(String, &str, String, &str)> = vec![
        ("orders".into(), guests::RECORDER, "orders".into(), ""),
        ("audit".into(), guests::RECORDER, "task-audit".into(), ""),
    ];
    for language in &LANGUAGES {
        handlers.push((format!("{}-created", language.prefix), language.component, format!("{}-task-created", language.prefix), ""));
        handlers.push((format!("{}-dead", language.prefix), guests::RECORDER, format!("{}-task-created-dead-letter", language.prefix), ""));
    }
    let handlers: Vec<(&str, &str, &str, &str)> = handlers.iter().map(|(n, c, t, e)| (n.as_str(), *c, t.as_str(), *e)).collect();
    let manifest = scratch.manifest(&manifest(r#"publish_topics = ["task-audit"]"#, &handlers));
    let _host = start_host_with(HOST, "host", &manifest, &daprd, scratch.path(), &[]);
    let client = DaprClient::new(&daprd);
    wait_until_subscribed(&client, "orders").await;

    // A state key with a `/` (which Dapr's state GET cannot route) is read
    // and written like any other: the second event sees the first's count.
    for n in 1..=2 {
        client.publish("orders", &cloud_event(&format!("slash-{n}"), json!({"key": "user/1"}))).await;
    }
    let deadline = std::time::Instant::now() + SETTLE;
    while wasmsub_tests::dapr::bulk_counts(&daprd, &["count:user/1".to_owned()]).await[0].as_deref() != Some("2") {
        let counts = wasmsub_tests::dapr::handler_counts(app_port, "orders").await;
        assert!(std::time::Instant::now() < deadline, "events with a `/` in their key were not both counted: {counts}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    for language in &LANGUAGES {
        let (p, topic) = (language.prefix, format!("{}-task-created", language.prefix));
        // Success: the task is stored, and its audit event reaches the
        // audit handler (a recorder keyed by the audit event's own id).
        client.publish(&topic, &cloud_event(&format!("{p}-event-1"), json!({"id": format!("{p}-1"), "title": "ship it"}))).await;
        let task = recorded(&client, &format!("task:{p}-1")).await;
        assert_eq!(task, json!({"id": format!("{p}-1"), "title": "ship it"}), "{p}");
        let claim = DedupeKey { tenant: "acme".into(), handler: format!("{p}-created"), event_id: format!("{p}-event-1") };
        let audit_id = wasmsub::pipeline::outgoing_id(&claim.encoded(), 0);
        let audit = recorded(&client, &format!("event:{audit_id}")).await;
        assert_eq!(audit["topic"], "task-audit", "{p}: {audit}");

        // Invalid data: dropped at once, dead-lettered with the reason.
        client.publish(&topic, &cloud_event(&format!("{p}-event-2"), json!({"id": format!("{p}-2")}))).await;
        let dead = recorded(&client, &format!("event:{p}-event-2")).await;
        assert_eq!(dead["topic"], format!("{p}-task-created-dead-letter"), "{p}: {dead}");
        let reason = dead["extensions"]["wasmsubreason"].as_str().unwrap();
        assert!(reason.contains("invalid task: missing `title`"), "{p}: {reason}");
        assert_eq!(dead["extensions"]["wasmsubattempts"], "1", "{p}");
    }

    for language in LANGUAGES.iter().filter(|l| l.traceback.is_some()) {
        let (p, topic) = (language.prefix, format!("{}-task-created", language.prefix));
        // An uncaught exception after a state write: a trap, retried to the
        // end of the budget, dead-lettered with the traceback; no write.
        client.publish(&topic, &cloud_event(&format!("{p}-event-3"), json!({"id": format!("{p}-3"), "title": "raise"}))).await;
        let dead = recorded(&client, &format!("event:{p}-event-3")).await;
        let reason = dead["extensions"]["wasmsubreason"].as_str().unwrap();
        for needle in language.traceback.unwrap() {
            assert!(reason.contains(needle), "{p}: `{needle}` not in the reason: {reason}");
        }
        assert_eq!(dead["extensions"]["wasmsubattempts"], "3", "{p}");
        assert_eq!(client.tenant_state("acme", &format!("task:{p}-3")).await, None, "{p}: the trapped attempt's write leaked");
    }
}
