//! Several handlers on one topic: routing rules by event type, fan-out to
//! every default handler (several tenants on one topic), and the single
//! Dapr subscription per topic that describes it.

use serde_json::{Value, json};
use wasmsub::Outcome;
use wasmsub_tests::{TestHost, guests};

fn manifest() -> String {
    format!(
        "[[tenant]]\nname = \"acme\"\n\
         [[tenant.handler]]\nname = \"orders\"\ncomponent = {r:?}\ntopic = \"orders\"\n\
         [[tenant.handler]]\nname = \"cancellations\"\ncomponent = {r:?}\ntopic = \"orders\"\nmatch_type = \"order.cancelled\"\n\
         [[tenant.handler]]\nname = \"audit\"\ncomponent = {r:?}\ntopic = \"audit\"\n\
         [[tenant]]\nname = \"globex\"\n\
         [[tenant.handler]]\nname = \"orders\"\ncomponent = {r:?}\ntopic = \"orders\"\n",
        r = guests::RECORDER
    )
}

fn event(id: &str, ty: &str) -> Value {
    json!({"specversion": "1.0", "id": id, "source": "tests", "type": ty, "datacontenttype": "application/json", "data": {"key": id}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_topic_fans_out_to_every_tenant_and_rules_pick_by_type() {
    let mut host = TestHost::start(&manifest()).await.unwrap();
    host.publish("orders", &event("o-1", "order.placed")).await.unwrap();
    let mut reached: Vec<String> = host.settled(2).await.into_iter().map(|r| format!("{}/{}", r.tenant, r.handler)).collect();
    reached.sort();
    assert_eq!(reached, vec!["acme/orders", "globex/orders"]);

    host.publish("orders", &event("c-1", "order.cancelled")).await.unwrap();
    let report = host.next_settled().await;
    assert_eq!((report.tenant.as_str(), report.handler.as_str()), ("acme", "cancellations"));
    assert_eq!(report.outcome, Outcome::Processed { attempts: 1 });
    let store = host.host.store().clone();
    assert_eq!(store.get_state("globex", "count:o-1").await.unwrap(), Some(b"1".to_vec()));
    assert_eq!(store.get_state("globex", "count:c-1").await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dapr_gets_one_subscription_per_topic_with_rules_and_a_fan_out_default() {
    let host = TestHost::start(&manifest()).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let router = host.host.router();
    tokio::spawn(async move { wasmsub::serve(listener, router, std::future::pending()).await });
    let subscriptions: Value = reqwest::get(format!("http://{address}/dapr/subscribe")).await.unwrap().json().await.unwrap();
    assert_eq!(
        subscriptions,
        json!([
            {"pubsubname": "pubsub", "topic": "audit", "routes": {"default": "/events/acme/audit"}},
            {"pubsubname": "pubsub", "topic": "orders", "routes": {
                "rules": [{"match": "event.type == \"order.cancelled\"", "path": "/events/acme/cancellations"}],
                "default": "/topics/pubsub/orders"
            }},
        ])
    );
}

#[tokio::test]
async fn handlers_sharing_a_topic_must_agree_on_its_subscription() {
    let text = manifest().replace("match_type = \"order.cancelled\"\n", "bulk = { max_messages = 5 }\n");
    let error = format!("{:#}", wasmsub::Manifest::parse(&text, std::path::Path::new("/")).unwrap_err());
    assert!(error.contains("disagree on raw_payload or bulk"), "{error}");
}
