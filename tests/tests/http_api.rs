//! The embedded host's HTTP surface, served on a real socket: Dapr's publish
//! API shape, malformed events answered 400 and dead-lettered, health and
//! the dead-letter listing.

use serde_json::{Value, json};
use wasmsub::Outcome;
use wasmsub_tests::{HandlerSpec, TestHost, cloud_event, guests, manifest_text};

async fn serve(host: &TestHost) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let router = host.host.router();
    tokio::spawn(async move { axum_serve(listener, router).await });
    format!("http://{address}")
}

async fn axum_serve(listener: tokio::net::TcpListener, router: axum::Router) {
    wasmsub::serve(listener, router, std::future::pending()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_publish_api_accepts_refuses_and_keeps_serving() {
    let manifest = manifest_text("", &[
        HandlerSpec::new("recorder", guests::RECORDER, "orders"),
        HandlerSpec::new("dlq", guests::RECORDER, "orders-dead-letter"),
    ]);
    let mut host = TestHost::start(&manifest).await.unwrap();
    let base = serve(&host).await;
    let http = reqwest::Client::new();
    let publish = |topic: &str, content_type: &str, body: String| {
        http.post(format!("{base}/v1.0/publish/pubsub/{topic}")).header("content-type", content_type).body(body).send()
    };

    // A malformed CloudEvent: refused with a client error, as Dapr's publish
    // API does; nothing is queued (the publisher still has it).
    let malformed = r#"{"specversion":"1.0","type":"x"}"#;
    let response = publish("orders", "application/cloudevents+json", malformed.into()).await.unwrap();
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.unwrap();
    assert!(body["message"].as_str().unwrap().contains("required attribute `id` is missing"), "{body}");
    assert!(body["message"].as_str().unwrap().contains("nothing was published"), "{body}");
    // A bad topic name is refused too.
    let response = publish("bad%23topic", "application/json", "{}".into()).await.unwrap();
    assert_eq!(response.status(), 400);

    // The same bytes delivered by a broker (Dapr posting to the handler's
    // route) are dead-lettered, with the reason, and answered DROP.
    let delivered: Value = http
        .post(format!("{base}/events/acme/recorder"))
        .header("content-type", "application/cloudevents+json")
        .body(malformed)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(delivered, json!({"status": "DROP"}));
    let report = host.next_settled().await;
    assert!(matches!(&report.outcome, Outcome::DeadLettered { attempts: 0, .. }), "{report:?}");
    let malformed_id = report.event_id.clone();
    let seen: Value = serde_json::from_str(&host.wait_for_state(&format!("event:{malformed_id}")).await).unwrap();
    assert!(seen["extensions"]["wasmsubreason"].as_str().unwrap().starts_with("malformed CloudEvent"), "{seen}");
    host.next_settled().await; // the dead-letter recorder's own delivery

    // The host keeps serving: a plain JSON payload is wrapped like Dapr does.
    let response = publish("orders", "application/json", json!({"key": "plain"}).to_string()).await.unwrap();
    assert_eq!(response.status(), 204);
    assert_eq!(host.next_settled().await.outcome, Outcome::Processed { attempts: 1 });
    let seen: Value = serde_json::from_str(&host.state("event:plain").await.unwrap()).unwrap();
    assert_eq!(seen["topic"], "orders");

    // A CloudEvent is sent as is.
    let response = publish("orders", "application/cloudevents+json", cloud_event("ce-1", json!({})).to_string()).await.unwrap();
    assert_eq!(response.status(), 204);
    assert_eq!(host.next_settled().await.event_id, "ce-1");

    // An unknown pub/sub is Dapr's 404 with its error code.
    let response = http.post(format!("{base}/v1.0/publish/nope/orders")).body("{}").send().await.unwrap();
    assert_eq!(response.status(), 404);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["errorCode"], "ERR_PUBSUB_NOT_FOUND");

    assert_eq!(http.get(format!("{base}/healthz")).send().await.unwrap().status(), 204);
    let dead: Vec<Value> = http.get(format!("{base}/wasmsub/dead-letters")).send().await.unwrap().json().await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0]["event_id"], malformed_id.as_str());
    let handlers: Value = http.get(format!("{base}/wasmsub/handlers")).send().await.unwrap().json().await.unwrap();
    assert_eq!(handlers["handlers"][0]["route"], "/events/acme/recorder");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_over_the_tenants_size_limit_is_dead_lettered() {
    let manifest = manifest_text("max_payload_bytes = 200", &[HandlerSpec::new("recorder", guests::RECORDER, "orders")]);
    let mut host = TestHost::start(&manifest).await.unwrap();
    host.publish("orders", &cloud_event("big", json!({"blob": "x".repeat(500)}))).await.unwrap();
    let report = host.next_settled().await;
    let Outcome::DeadLettered { reason, attempts: 0 } = &report.outcome else { panic!("{report:?}") };
    assert!(reason.contains("over the tenant's limit of 200 bytes"), "{reason}");
}
