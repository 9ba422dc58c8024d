//! `task-created`: the todo app's handler for new tasks.
//!
//! Validates the task JSON, stores it under `task:{id}` in the tenant's state
//! and publishes a `task-audit` event. It does no idempotency check of its
//! own: the host runs it at most once per event id and applies its effects
//! only when it answers `success`.
//!
//! Written against `wasmsub-guest`: the logic takes a `Host`, so its tests
//! below run natively (`cargo test`) against the in-memory double.

use serde_json::{Value, json};
use wasmsub_guest::{Disposition, Event, Host};

/// Handles one `task-created` event.
pub fn handle(event: &Event, host: &mut impl Host) -> Disposition {
    let task = match parse_task(&event.data) {
        Ok(task) => task,
        // Bad data never gets better by retrying.
        Err(why) => return Disposition::Drop(format!("invalid task: {why}")),
    };
    let key = format!("task:{}", task.id);
    if let Err(why) = host.set(&key, task.json.as_bytes()) {
        return Disposition::Retry(format!("state set {key}: {why}"));
    }
    let audit = json!({ "action": "created", "task_id": task.id, "event_id": event.id });
    if let Err(why) = host.publish_json("task-audit", &audit) {
        return Disposition::Retry(format!("publish task-audit: {why}"));
    }
    host.info(&format!("stored {key}"));
    Disposition::Success
}

wasmsub_guest::handler!(handle);

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

#[cfg(test)]
mod tests {
    use super::*;
    use wasmsub_guest::testing::{TestHost, event};

    #[test]
    fn a_task_is_stored_and_audited() {
        let mut host = TestHost::default();
        let disposition = host.run(&event("e-7", "task-created", json!({"id": 7, "title": "ship it"})), handle);
        assert!(matches!(disposition, Disposition::Success), "{disposition:?}");
        assert_eq!(host.json("task:7"), Some(json!({"id": 7, "title": "ship it"})));
        assert_eq!(host.published.len(), 1);
        assert_eq!(host.published[0].topic, "task-audit");
        assert_eq!(host.published[0].json(), json!({"action": "created", "task_id": "7", "event_id": "e-7"}));
    }

    #[test]
    fn an_invalid_task_is_dropped_and_changes_nothing() {
        let mut host = TestHost::default();
        let disposition = host.run(&event("e-8", "task-created", json!({"id": 8})), handle);
        assert!(matches!(&disposition, Disposition::Drop(why) if why.contains("title")), "{disposition:?}");
        assert!(host.state.is_empty() && host.published.is_empty());
    }

    #[test]
    fn a_refused_publish_asks_for_a_retry_and_writes_nothing() {
        let mut host = TestHost::refusing_topics(&["task-audit"]);
        let disposition = host.run(&event("e-9", "task-created", json!({"id": 9, "title": "t"})), handle);
        assert!(matches!(&disposition, Disposition::Retry(why) if why.contains("task-audit")), "{disposition:?}");
        assert!(host.state.is_empty(), "a retried attempt's writes are not applied");
    }
}
