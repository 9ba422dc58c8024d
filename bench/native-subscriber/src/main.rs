//! The end-to-end benchmark's native baseline: the todo app's `task-created`
//! handler as an ordinary Rust Dapr subscriber, with the background
//! document's idempotency check (a `processed:{sha256}` marker in Dapr
//! state, checked before and written with the effect). No WebAssembly, no
//! claims or leases: the cheapest correct-looking subscriber, to show what
//! wasmsub's sandbox and concurrency-safe claims cost on top.
//!
//! Usage: native-subscriber APP_PORT DAPR_HTTP_PORT

use std::sync::Arc;

use axum::extract::State;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

struct Dapr {
    http: reqwest::Client,
    base: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let app_port: u16 = args.next().expect("APP_PORT").parse()?;
    let dapr_port: u16 = args.next().expect("DAPR_HTTP_PORT").parse()?;
    let dapr = Arc::new(Dapr { http: reqwest::Client::new(), base: format!("http://127.0.0.1:{dapr_port}") });
    let app = Router::new()
        .route("/dapr/subscribe", get(|| async { Json(json!([{"pubsubname": "pubsub", "topic": "task-created", "route": "/task-created"}])) }))
        .route("/task-created", post(task_created))
        .with_state(dapr);
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", app_port)).await?;
    axum::serve(listener, app).await?;
    Ok(())
}

async fn task_created(State(dapr): State<Arc<Dapr>>, Json(event): Json<Value>) -> Json<Value> {
    match handle(&dapr, &event).await {
        Ok(()) => Json(json!({"status": "SUCCESS"})),
        Err(_) => Json(json!({"status": "RETRY"})),
    }
}

async fn handle(dapr: &Dapr, event: &Value) -> anyhow::Result<()> {
    let data = &event["data"];
    let id = match &data["id"] {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let key = hex::encode(Sha256::digest(format!("{}:{}:{}", event["type"].as_str().unwrap_or(""), id, event["time"].as_str().unwrap_or(""))));
    let marker = format!("processed:{key}");
    let state = format!("{}/v1.0/state/statestore", dapr.base);
    let seen = dapr.http.get(format!("{state}/{marker}")).send().await?.error_for_status()?;
    if seen.status() == 200 {
        return Ok(());
    }
    let operations = json!({"operations": [
        {"operation": "upsert", "request": {"key": format!("task:{id}"), "value": data}},
        {"operation": "upsert", "request": {"key": marker, "value": "1"}},
    ]});
    dapr.http.post(format!("{state}/transaction")).json(&operations).send().await?.error_for_status()?;
    let audit = json!({"action": "created", "task_id": id, "event_id": event["id"]});
    dapr.http.post(format!("{}/v1.0/publish/pubsub/task-audit", dapr.base)).json(&audit).send().await?.error_for_status()?;
    Ok(())
}
