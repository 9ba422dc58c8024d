//! OpenTelemetry traces, received the way a collector receives them: the
//! test runs an OTLP/HTTP receiver, starts a host process with the standard
//! `OTEL_*` variables pointing at it, and follows the parent-child chain
//! from a producer's `traceparent` through a handler, across the event that
//! handler publishes, into the next handler; and from a poison event into
//! its dead letter.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::routing::post;
use serde_json::{Value, json};
use wasmsub_tests::embedded::EmbeddedHost;
use wasmsub_tests::{HandlerSpec, cloud_event, guests, manifest_text};

const HOST: &str = env!("CARGO_BIN_EXE_wasmsub-under-test");

/// One exported span: the fields the chain is made of.
#[derive(Debug, Clone)]
struct Span {
    trace_id: String,
    span_id: String,
    parent_span_id: String,
    name: String,
    kind: Value,
    service: Option<String>,
}

/// Every OTLP/JSON export request the receiver got, as spans.
#[derive(Default, Clone)]
struct Received(Arc<Mutex<Vec<Span>>>);

impl Received {
    fn spans(&self) -> Vec<Span> {
        self.0.lock().unwrap().clone()
    }

    fn take(&self, body: &Value) {
        let mut spans = self.0.lock().unwrap();
        for resource in body["resourceSpans"].as_array().into_iter().flatten() {
            let service = resource["resource"]["attributes"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|attribute| attribute["key"] == "service.name")
                .and_then(|attribute| attribute["value"]["stringValue"].as_str())
                .map(str::to_owned);
            for scope in resource["scopeSpans"].as_array().into_iter().flatten() {
                for span in scope["spans"].as_array().into_iter().flatten() {
                    let text = |field: &str| span[field].as_str().unwrap_or_default().to_ascii_lowercase();
                    spans.push(Span {
                        trace_id: text("traceId"),
                        span_id: text("spanId"),
                        parent_span_id: text("parentSpanId"),
                        name: text("name"),
                        kind: span["kind"].clone(),
                        service: service.clone(),
                    });
                }
            }
        }
    }
}

/// An OTLP/HTTP trace receiver (JSON encoding) on a free port.
async fn start_receiver() -> (String, Received) {
    let received = Received::default();
    let sink = received.clone();
    let app = Router::new().route(
        "/v1/traces",
        post(move |body: axum::body::Bytes| {
            let sink = sink.clone();
            async move {
                let body: Value = serde_json::from_slice(&body).expect("an OTLP/JSON export request");
                sink.take(&body);
                ([("content-type", "application/json")], "{}")
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{address}"), received)
}

/// Waits until `found` finds what it looks for among the spans received;
/// fails only if nothing new arrives for a long while (a stall, not a
/// deadline).
async fn wait_for<T>(received: &Received, host: &EmbeddedHost, what: &str, found: impl Fn(&[Span]) -> Option<T>) -> T {
    let mut seen = 0;
    let mut last_progress = Instant::now();
    loop {
        let spans = received.spans();
        if let Some(result) = found(&spans) {
            return result;
        }
        if spans.len() != seen {
            seen = spans.len();
            last_progress = Instant::now();
        }
        assert!(last_progress.elapsed() < Duration::from_secs(90), "{what} never arrived; received {spans:#?}\nhost log:\n{}", host.log_text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn wait_for_span(received: &Received, trace_id: &str, name: &str, host: &EmbeddedHost) -> Span {
    let what = format!("a span `{name}` in trace {trace_id}");
    wait_for(received, host, &what, |spans| spans.iter().find(|s| s.trace_id == trace_id && s.name == name).cloned()).await
}

fn child_of<'a>(spans: &'a [Span], parent: &Span, name: &str) -> &'a Span {
    spans
        .iter()
        .find(|s| s.parent_span_id == parent.span_id && s.name == name)
        .unwrap_or_else(|| panic!("no `{name}` span under `{}` ({}): {spans:#?}", parent.name, parent.span_id))
}

fn is_consumer(kind: &Value) -> bool {
    // OTLP/JSON encodes enums as numbers; SPAN_KIND_CONSUMER is 5.
    kind == &json!(5) || kind == &json!("SPAN_KIND_CONSUMER")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trace_crosses_a_publish_to_the_next_handler_and_into_a_dead_letter() {
    let (endpoint, received) = start_receiver().await;
    let scratch = tempfile::tempdir().unwrap();
    let manifest = scratch.path().join("wasmsub.toml");
    let handlers = [
        HandlerSpec::new("orders", guests::RECORDER, "orders"),
        HandlerSpec::new("audit", guests::RECORDER, "audit"),
        HandlerSpec::new("archive", guests::POISON, "archive").with("retry = { max_attempts = 1 }"),
        HandlerSpec::new("archive-dead", guests::RECORDER, "archive-dead-letter"),
    ];
    std::fs::write(&manifest, manifest_text(r#"publish_topics = ["audit"]"#, &handlers)).unwrap();
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        // Traces do not depend on the log level.
        ("RUST_LOG", "warn"),
    ];
    let host = EmbeddedHost::start_with_env(HOST, &manifest, &scratch.path().join("data"), scratch.path(), &[], &env);
    host.wait_ready(Duration::from_secs(60)).await;

    // A producer's context: trace T1, its span P1 (sampled).
    let (t1, p1) = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7");
    let mut order = cloud_event("order-1", json!({"key": "k1", "forward_to": "audit"}));
    order["traceparent"] = format!("00-{t1}-{p1}-01").into();
    order["tracestate"] = "vendor=opaque".into();
    assert_eq!(host.publish("orders", &order).await, wasmsub_tests::embedded::Published::Accepted);
    let (t2, p2) = ("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331");
    let mut poison = cloud_event("archive-1", json!({"key": "a1"}));
    poison["traceparent"] = format!("00-{t2}-{p2}-01").into();
    assert_eq!(host.publish("archive", &poison).await, wasmsub_tests::embedded::Published::Accepted);

    // orders (continues P1) → its attempt; audit (the published event) is a
    // child of the orders delivery, in the same trace.
    let orders = wait_for_span(&received, t1, "process orders", &host).await;
    let audit = wait_for_span(&received, t1, "process audit", &host).await;
    let archive = wait_for_span(&received, t2, "process archive", &host).await;
    let dead = wait_for_span(&received, t2, "process archive-dead-letter", &host).await;
    // Attempt spans end before their delivery's: wait for the last one.
    let spans = wait_for(&received, &host, "four attempt spans", |spans| {
        (spans.iter().filter(|s| s.name == "attempt").count() >= 4).then(|| spans.to_vec())
    })
    .await;

    assert_eq!(orders.parent_span_id, p1, "the first delivery continues the producer's span");
    assert!(is_consumer(&orders.kind), "{orders:?}");
    assert_eq!(orders.service.as_deref(), Some("wasmsub"));
    child_of(&spans, &orders, "attempt");
    assert_eq!(audit.parent_span_id, orders.span_id, "the published event continues the delivery that published it");
    child_of(&spans, &audit, "attempt");

    assert_eq!(archive.parent_span_id, p2);
    child_of(&spans, &archive, "attempt");
    assert_eq!(dead.parent_span_id, archive.span_id, "the dead letter continues the failed delivery");

    // The handler of the published event saw the context it continues, with
    // the producer's tracestate passed on.
    let record: Value = serde_json::from_str(&host.state("acme", "event:fwd-k1").await.expect("audit ran")).unwrap();
    assert_eq!(record["extensions"]["traceparent"], format!("00-{t1}-{}-01", orders.span_id));
    assert_eq!(record["extensions"]["tracestate"], "vendor=opaque");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_otel_variables_the_arriving_context_is_passed_on_unchanged_and_headers_set_it() {
    let scratch = tempfile::tempdir().unwrap();
    let manifest = scratch.path().join("wasmsub.toml");
    let handlers = [HandlerSpec::new("orders", guests::RECORDER, "orders"), HandlerSpec::new("audit", guests::RECORDER, "audit")];
    std::fs::write(&manifest, manifest_text(r#"publish_topics = ["audit"]"#, &handlers)).unwrap();
    let host = EmbeddedHost::start(HOST, &manifest, &scratch.path().join("data"), scratch.path(), &[]);
    host.wait_ready(Duration::from_secs(60)).await;
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let mut order = cloud_event("order-1", json!({"key": "k1", "forward_to": "audit"}));
    order["traceparent"] = traceparent.into();
    assert_eq!(host.publish("orders", &order).await, wasmsub_tests::embedded::Published::Accepted);
    // A plain JSON publish takes its context from the headers, as Dapr's
    // publish API does.
    let header_parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let response = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{}/v1.0/publish/pubsub/orders", host.port))
        .header("content-type", "application/json")
        .header("traceparent", header_parent)
        .body(r#"{"key": "k2"}"#)
        .send()
        .await
        .unwrap();
    assert!(response.status().is_success(), "{response:?}");
    host.wait_drained(Duration::from_secs(30)).await;
    let plain: Value = serde_json::from_str(&host.state("acme", "event:k2").await.expect("k2 ran")).unwrap();
    assert_eq!(plain["extensions"]["traceparent"], header_parent);
    // Drained: the audit event, published in the orders commit, has run.
    let record: Value = serde_json::from_str(&host.state("acme", "event:fwd-k1").await.expect("audit ran")).unwrap();
    assert_eq!(record["extensions"]["traceparent"], traceparent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_daprd_the_trace_crosses_a_publish() {
    use wasmsub_tests::dapr::{DaprClient, Daprd, Redis, Scratch, free_port, manifest, start_host_with, wait_until_subscribed};
    let (endpoint, received) = start_receiver().await;
    let scratch = Scratch::new();
    let redis = Redis::start(scratch.path());
    let app_port = free_port();
    let daprd = Daprd::start("daprd", "traces", app_port, &scratch.components(&redis), scratch.path());
    let manifest = scratch.manifest(&manifest(r#"publish_topics = ["audit"]"#, &[
        ("orders", guests::RECORDER, "orders", ""),
        ("audit", guests::RECORDER, "audit", ""),
    ]));
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
    ];
    let host = start_host_with(HOST, "host", &manifest, &daprd, scratch.path(), &env);
    let client = DaprClient::new(&daprd);
    wait_until_subscribed(&client, "orders").await;

    // A producer publishes through Dapr with its context in the header, as
    // the Dapr SDKs do.
    let (t1, p1) = ("5bf92f3577b34da6a3ce929d0e0e4737", "10f067aa0ba902b8");
    let response = reqwest::Client::new()
        .post(format!("{}/v1.0/publish/pubsub/orders", daprd.url()))
        .header("content-type", "application/json")
        .header("traceparent", format!("00-{t1}-{p1}-01"))
        .body(r#"{"key": "traced", "forward_to": "audit"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 204);

    let log = || format!("host:\n{}\ndaprd:\n{}", host.log_text(), daprd.log_text());
    let mut seen = 0;
    let mut last_progress = Instant::now();
    let (orders, audit) = loop {
        let spans = received.spans();
        let find = |name: &str| spans.iter().find(|s| s.trace_id == t1 && s.name == name).cloned();
        if let (Some(orders), Some(audit)) = (find("process orders"), find("process audit")) {
            break (orders, audit);
        }
        if spans.len() != seen {
            (seen, last_progress) = (spans.len(), Instant::now());
        }
        assert!(last_progress.elapsed() < Duration::from_secs(90), "spans of trace {t1} never arrived: {spans:#?}\n{}", log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // Both deliveries are in the producer's trace. This daprd has Dapr's
    // tracing off, so it passes the context through unchanged and the chain
    // is direct (with it on, daprd's own spans would sit in between).
    assert_eq!(orders.parent_span_id, p1, "{}", log());
    assert_eq!(audit.parent_span_id, orders.span_id, "{}", log());
    assert!(is_consumer(&audit.kind));
    let record = client.wait_for_state("acme", "event:fwd-traced", Duration::from_secs(30), |v| v.is_some()).await.unwrap();
    let record: Value = serde_json::from_str(&record).unwrap();
    let traceparent = record["extensions"]["traceparent"].as_str().unwrap_or_default().to_owned();
    assert!(traceparent.contains(t1), "the audit handler saw {traceparent}\n{}", log());
}
