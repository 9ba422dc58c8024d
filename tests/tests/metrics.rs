//! `GET /metrics` after a scripted run: every count equals what happened.

use std::path::Path;

use serde_json::json;
use wasmsub::Outcome;
use wasmsub_tests::{HandlerSpec, TestHost, cloud_event, guests, manifest_text};

/// The sum of `metric`'s samples whose labels include every pair in `labels`.
fn sample(text: &str, metric: &str, labels: &[(&str, &str)]) -> f64 {
    let mut sum = 0.0;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(metric).and_then(|r| r.strip_prefix('{')) else { continue };
        let Some((label_text, value)) = rest.split_once("} ") else { continue };
        if labels.iter().all(|(key, value)| label_text.split(',').any(|pair| pair == format!("{key}=\"{value}\""))) {
            sum += value.trim().parse::<f64>().unwrap_or_else(|_| panic!("not a number in {line}"));
        }
    }
    sum
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_what_happened_in_a_scripted_run() {
    let manifest = manifest_text("cpu_time = \"100ms\"", &[
        HandlerSpec::new("recorder", guests::RECORDER, "orders"),
        HandlerSpec::new("flaky", guests::FLAKY, "reminders"),
        HandlerSpec::new("poison", guests::POISON, "archive"),
        HandlerSpec::new("spinner", guests::INFINITE_LOOP, "spin").with("retry = { max_attempts = 1 }"),
    ]);
    let mut host = TestHost::start(&manifest).await.unwrap();
    for i in 0..5 {
        host.publish("orders", &cloud_event(&format!("o-{i}"), json!({}))).await.unwrap();
        assert_eq!(host.next_settled().await.outcome, Outcome::Processed { attempts: 1 });
    }
    host.publish("orders", &cloud_event("o-0", json!({}))).await.unwrap();
    assert!(matches!(host.next_settled().await.outcome, Outcome::Duplicate { .. }));
    host.publish("reminders", &cloud_event("f-1", json!({"succeed_on_attempt": 2}))).await.unwrap();
    assert_eq!(host.next_settled().await.outcome, Outcome::Processed { attempts: 2 });
    host.publish("archive", &cloud_event("p-1", json!({}))).await.unwrap();
    assert!(matches!(host.next_settled().await.outcome, Outcome::DeadLettered { attempts: 3, .. }));
    host.publish("spin", &cloud_event("s-1", json!({}))).await.unwrap();
    assert!(matches!(host.next_settled().await.outcome, Outcome::DeadLettered { attempts: 1, .. }));
    let deployer = host.host.deployer();
    deployer.deploy("acme", "recorder", Path::new("v2"), std::fs::read(guests::ECHO).unwrap()).await.unwrap();
    deployer.rollback("acme", "recorder").await.unwrap();
    assert!(deployer.deploy("acme", "recorder", Path::new("junk"), b"not wasm".to_vec()).await.is_err());

    // Scraped over HTTP, as Prometheus would.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let router = host.host.router();
    tokio::spawn(async move { wasmsub::serve(listener, router, std::future::pending()).await });
    let response = reqwest::get(format!("http://{address}/metrics")).await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.headers()["content-type"].to_str().unwrap().starts_with("application/openmetrics-text"));
    let text = response.text().await.unwrap();

    let deliveries = |handler, outcome| sample(&text, "wasmsub_deliveries_total", &[("tenant", "acme"), ("handler", handler), ("outcome", outcome)]);
    assert_eq!(deliveries("recorder", "processed"), 5.0, "{text}");
    assert_eq!(deliveries("recorder", "duplicate-skipped"), 1.0, "{text}");
    assert_eq!(deliveries("flaky", "processed"), 1.0, "{text}");
    assert_eq!(deliveries("poison", "dead-lettered"), 1.0, "{text}");
    assert_eq!(deliveries("spinner", "dead-lettered"), 1.0, "{text}");
    // A delivery that ran carries the version that ran it; a duplicate none.
    let version = host.host.current_version("acme", "recorder").unwrap();
    let recorder_version = sample(&text, "wasmsub_deliveries_total", &[("handler", "recorder"), ("version", &version[..12]), ("outcome", "processed")]);
    assert_eq!(recorder_version, 5.0, "{text}");
    assert_eq!(sample(&text, "wasmsub_deliveries_total", &[("handler", "recorder"), ("version", ""), ("outcome", "duplicate-skipped")]), 1.0);

    let attempts = |handler, result| sample(&text, "wasmsub_attempts_total", &[("handler", handler), ("result", result)]);
    assert_eq!((attempts("flaky", "retry"), attempts("flaky", "success")), (1.0, 1.0), "{text}");
    assert_eq!(attempts("poison", "retry"), 3.0, "{text}");
    assert_eq!(attempts("spinner", "trap"), 1.0, "{text}");
    assert_eq!(sample(&text, "wasmsub_limit_hits_total", &[("tenant", "acme"), ("limit", "cpu_time")]), 1.0, "{text}");
    assert_eq!(sample(&text, "wasmsub_attempt_duration_seconds_count", &[("handler", "poison")]), 3.0, "{text}");
    // Every attempt had a fresh instance: made for it (timed) or made ahead of it.
    let made_now = sample(&text, "wasmsub_instantiation_duration_seconds_count", &[("handler", "poison")]);
    let made_ahead = sample(&text, "wasmsub_attempts_made_ahead_total", &[("handler", "poison")]);
    assert!(made_now >= 1.0, "the first attempt had nothing made ahead: {text}");
    assert_eq!(made_now + made_ahead, 3.0, "{text}");
    assert_eq!(sample(&text, "wasmsub_delivery_duration_seconds_count", &[("handler", "recorder")]), 6.0, "{text}");

    let deploys = |action| sample(&text, "wasmsub_deploys_total", &[("handler", "recorder"), ("action", action)]);
    assert_eq!((deploys("deploy"), deploys("rollback"), deploys("refused")), (1.0, 1.0, 1.0), "{text}");
    assert!(text.lines().any(|l| l.starts_with("wasmsub_instance_slots ") && !l.ends_with(" 0")), "{text}");
    assert!(text.lines().any(|l| l == "wasmsub_instances_in_use 0"), "nothing runs now: {text}");
    // No event ids or reasons in any label.
    assert!(!text.contains("o-1") && !text.contains("p-1") && !text.contains("poison:"), "{text}");
}
