//! `wasmsub demo`: the todo app's events through the real pipeline, in
//! process, on the embedded broker and a throw-away store. It shows each of
//! the host's decisions once: processed, duplicate skipped, retried then
//! succeeded, dropped and dead-lettered, poison dead-lettered after its
//! retries; a malformed CloudEvent refused at the publish API, and the same
//! bytes dead-lettered when a broker delivers them.

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::json;

use crate::cloudevent::CLOUDEVENTS_JSON;
use crate::pipeline::outcome::{DaprStatus, Outcome};
use crate::{Delivery, Host, HostOptions, Manifest};

/// Long enough for the poison handler's retries with the demo's policy.
const DEMO_TIMEOUT: Duration = Duration::from_secs(60);

struct Sample {
    what: &'static str,
    topic: &'static str,
    body: String,
    /// Delivered as a broker would (no publish API in front to refuse it).
    from_broker: bool,
}

fn event(id: &str, ty: &str, data: serde_json::Value) -> String {
    json!({"specversion": "1.0", "id": id, "source": "todo-api", "type": ty,
           "time": "2026-11-26T12:00:00Z", "datacontenttype": "application/json", "data": data})
    .to_string()
}

/// A CloudEvent without an `id`.
const MALFORMED: &str = r#"{"specversion":"1.0","type":"task.created"}"#;

fn samples() -> Vec<Sample> {
    let task = event("task-1", "task.created", json!({"id": 1, "title": "Write the README"}));
    vec![
        Sample { what: "a new task", topic: "task-created", body: task.clone(), from_broker: false },
        Sample { what: "the same task again (redelivery)", topic: "task-created", body: task, from_broker: false },
        Sample { what: "a task without a title", topic: "task-created", body: event("task-2", "task.created", json!({"id": 2})), from_broker: false },
        Sample { what: "a reminder (flaky handler)", topic: "task-reminder", body: event("reminder-1", "task.reminder", json!({"task_id": 1, "succeed_on_attempt": 3})), from_broker: false },
        Sample { what: "an archive request (poison handler)", topic: "task-archived", body: event("archive-1", "task.archived", json!({"task_id": 1})), from_broker: false },
        Sample { what: "a malformed CloudEvent, published", topic: "task-created", body: MALFORMED.into(), from_broker: false },
        Sample { what: "the same, delivered by a broker", topic: "task-created", body: MALFORMED.into(), from_broker: true },
    ]
}

/// Runs the demo on the manifest at `manifest_path`, writing to `out`.
pub async fn run(manifest_path: &Path, out: &mut impl Write) -> anyhow::Result<()> {
    let manifest = Manifest::load(manifest_path)?;
    for handler in manifest.tenants.iter().flat_map(|t| &t.handlers) {
        if !handler.component.exists() {
            bail!("{} is missing: build the guests first (scripts/build-guests.sh, or scripts/demo.sh does all)", handler.component.display());
        }
    }
    let data_dir = tempfile::tempdir().context("creating the demo's store directory")?;
    let options = HostOptions::embedded(data_dir.path().to_owned());
    let host = Host::start(&manifest, &options).await?;
    let mut reports = host.reports();

    writeln!(out, "Publishing the todo demo's events:")?;
    let samples = samples();
    // Deliveries the host will report on (a refused publish never arrives).
    let mut expected = 0;
    for sample in &samples {
        let body = bytes::Bytes::from(sample.body.clone());
        let answer = if sample.from_broker {
            // A broker hands the host whatever a producer put on the topic;
            // the publish API would have refused this one up front.
            let delivery = Delivery::to_topic("pubsub", sample.topic, body, Some(CLOUDEVENTS_JSON.to_owned()));
            expected += 1;
            match host.deliver(delivery).await {
                DaprStatus::Drop => "delivered; answered DROP (dead-lettered)".to_owned(),
                other => format!("delivered; answered {other:?}"),
            }
        } else {
            match host.publish("pubsub", sample.topic, body, Some(CLOUDEVENTS_JSON)).await {
                Ok(()) => {
                    expected += 1;
                    "accepted".to_owned()
                }
                Err(error) => format!("refused: {error}"),
            }
        };
        writeln!(out, "  {:<40} -> {:<14} {answer}", sample.what, sample.topic)?;
    }

    writeln!(out, "\nWhat the host did with each delivery:")?;
    let mut settled = 0;
    let deadline = tokio::time::Instant::now() + DEMO_TIMEOUT;
    while settled < expected {
        let report = tokio::time::timeout_at(deadline, reports.recv())
            .await
            .context("the demo's events did not all settle in time")??;
        if report.outcome.dapr_status() == DaprStatus::Retry {
            continue; // a copy that will be redelivered; its final answer follows
        }
        settled += 1;
        writeln!(out, "  {:<12} {:<13} {}", report.event_id.chars().take(12).collect::<String>(), report.handler, describe(&report.outcome))?;
    }

    let stored = host.store().get_state("todo", "task:1").await?;
    writeln!(out, "\nState of tenant `todo`, key `task:1`: {}", stored.map_or("(none)".into(), |v| String::from_utf8_lossy(&v).into_owned()))?;
    writeln!(out, "\nDead-letter topics received:")?;
    for entry in host.dead_letters().await {
        writeln!(out, "  {} <- {} ({} attempt(s)): {}", entry.dead_letter_topic, entry.event_id.chars().take(24).collect::<String>(), entry.attempts, entry.reason)?;
    }
    host.shutdown().await;
    Ok(())
}

fn describe(outcome: &Outcome) -> String {
    match outcome {
        Outcome::Processed { attempts: 1 } => "processed once, on the first attempt".into(),
        Outcome::Processed { attempts } => format!("retried, then processed on attempt {attempts}"),
        Outcome::Duplicate { earlier } => format!("duplicate skipped (already {earlier:?})").to_lowercase(),
        Outcome::DeadLettered { reason, attempts: 0 } => format!("dead-lettered before dispatch: {reason}"),
        Outcome::DeadLettered { reason, attempts } => format!("dead-lettered after {attempts} attempt(s): {reason}"),
        other => other.label().to_owned(),
    }
}
