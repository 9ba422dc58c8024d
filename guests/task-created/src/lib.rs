//! `task-created`: the todo app's handler for new tasks.
//!
//! Validates the task JSON, stores it under `task:{id}` in the tenant's state
//! and publishes a `task-audit` event. It does no idempotency check of its
//! own: the host runs it at most once per event id and applies its effects
//! only when it answers `success`.

wit_bindgen::generate!({ world: "handler", path: "../../wit" });

use serde_json::Value;
use wasmsub::handler::log::{Level, write as log};
use wasmsub::handler::{publisher, state};

struct TaskCreated;

impl Guest for TaskCreated {
    fn handle(event: Event) -> Disposition {
        let task = match parse_task(&event.data) {
            Ok(task) => task,
            // Bad data never gets better by retrying.
            Err(why) => return Disposition::Drop(format!("invalid task: {why}")),
        };
        let key = format!("task:{}", task.id);
        if let Err(why) = state::set(&key, task.json.as_bytes()) {
            return Disposition::Retry(format!("state set {key}: {why}"));
        }
        let audit = serde_json::json!({
            "action": "created",
            "task_id": task.id,
            "event_id": event.id,
        });
        if let Err(why) = publisher::publish("task-audit", audit.to_string().as_bytes(), "application/json") {
            return Disposition::Retry(format!("publish task-audit: {why}"));
        }
        log(Level::Info, &format!("stored {key}"));
        Disposition::Success
    }
}

struct Task {
    id: String,
    json: String,
}

/// A task needs an `id` (string or number) and a non-empty `title`.
fn parse_task(data: &[u8]) -> Result<Task, String> {
    let value: Value = serde_json::from_slice(data).map_err(|e| format!("not JSON: {e}"))?;
    let id = match value.get("id") {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        _ => return Err("missing `id` (a non-empty string or a number)".into()),
    };
    match value.get("title") {
        Some(Value::String(t)) if !t.trim().is_empty() => {}
        _ => return Err("missing `title` (a non-empty string)".into()),
    }
    Ok(Task { id, json: value.to_string() })
}

export!(TaskCreated);
