//! `wasmsub invoke` as a handler author runs it: one event through a built
//! guest on the real runtime, the report (text and JSON), and the exit code
//! of each disposition (0 success, 3 retry, 4 drop, 5 trap, 1 failure, 2
//! bad usage).

use std::io::Write;
use std::process::{Command, Stdio};

use serde_json::{Value, json};
use wasmsub_tests::{HandlerSpec, guests, manifest_text};

const WASMSUB: &str = env!("CARGO_BIN_EXE_wasmsub-under-test");

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}\n{}", self.stdout, self.stderr))
    }
}

/// `wasmsub invoke COMPONENT ARGS...`, with `stdin` as its standard input.
fn invoke(component: &str, args: &[&str], stdin: &str) -> Run {
    let mut child = Command::new(WASMSUB)
        .arg("invoke")
        .arg(component)
        .args(args)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running wasmsub");
    // A command that exits before it reads (bad usage) closes the pipe early.
    let _ = child.stdin.take().unwrap().write_all(stdin.as_bytes());
    let output = child.wait_with_output().unwrap();
    Run {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// Writes `text` to a file in `dir` and returns its path.
fn file(dir: &tempfile::TempDir, name: &str, text: &str) -> String {
    let path = dir.path().join(name);
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_owned()
}

#[test]
fn a_new_task_succeeds_with_its_write_and_its_publish() {
    let dir = tempfile::tempdir().unwrap();
    let task = file(&dir, "task.json", r#"{"id": 7, "title": "try wasmsub"}"#);
    let run = invoke(guests::TASK_CREATED, &["--event", &task], "");
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    let first = run.stdout.lines().next().unwrap();
    assert_eq!(first, "disposition: success", "{}", run.stdout);
    assert!(run.stdout.contains(r#"set task:7 = {"id":7,"title":"try wasmsub"}"#), "{}", run.stdout);
    assert!(run.stdout.contains("task-audit (application/json): {\"action\":\"created\""), "{}", run.stdout);
    assert!(run.stdout.contains("stored task:7"), "the guest's log line: {}", run.stdout);

    let run = invoke(guests::TASK_CREATED, &["--event", &task, "--output", "json"], "");
    assert_eq!(run.code, 0, "{}", run.stderr);
    let report = run.json();
    assert_eq!(report["disposition"], "success");
    assert_eq!(report["exit_code"], 0);
    assert_eq!(report["state_writes"], json!([{"key": "task:7", "json": {"id": 7, "title": "try wasmsub"}}]));
    let publish = &report["publishes"][0];
    assert_eq!((&publish["topic"], &publish["content_type"]), (&json!("task-audit"), &json!("application/json")));
    assert_eq!(publish["json"]["task_id"], "7");
    // The wrapped event's generated id is the one the guest saw.
    assert_eq!(publish["json"]["event_id"], report["event"]["id"]);
    assert_eq!(report["event"]["topic"], "invoke");
    assert_eq!(report["logs"], json!([{"level": "info", "source": "log", "message": "stored task:7"}]));
}

#[test]
fn an_invalid_task_is_dropped_with_its_reason() {
    let run = invoke(guests::TASK_CREATED, &["--event", "-"], r#"{"id": 8}"#);
    assert_eq!(run.code, 4, "{}{}", run.stdout, run.stderr);
    let first = run.stdout.lines().next().unwrap();
    assert!(first.starts_with("disposition: drop: invalid task: missing `title`"), "{}", run.stdout);
    assert!(run.stdout.contains("state writes: none") && run.stdout.contains("publishes: none"), "{}", run.stdout);
    assert!(run.stderr.is_empty(), "the report says it all: {}", run.stderr);
}

#[test]
fn poison_asks_for_a_retry() {
    let run = invoke(guests::POISON, &["--event", "-", "--output", "json"], "{}");
    assert_eq!(run.code, 3, "{}{}", run.stdout, run.stderr);
    let report = run.json();
    assert_eq!(report["disposition"], "retry");
    assert!(report["reason"].as_str().unwrap().starts_with("poison: event"), "{report}");
}

#[test]
fn an_endless_loop_is_stopped_by_the_cpu_time_limit() {
    let run = invoke(guests::INFINITE_LOOP, &["--event", "-"], "{}");
    assert_eq!(run.code, 5, "{}{}", run.stdout, run.stderr);
    let first = run.stdout.lines().next().unwrap();
    assert_eq!(first, "disposition: trap (limit cpu_time): cpu time limit 1s exceeded", "{}", run.stdout);
}

#[test]
fn a_trap_discards_the_write_it_made_first() {
    let run = invoke(guests::TRAP, &["--event", "-", "--output", "json"], "{}");
    assert_eq!(run.code, 5, "{}{}", run.stdout, run.stderr);
    let report = run.json();
    assert_eq!(report["disposition"], "trap");
    assert!(report.get("limit").is_none(), "a panic is no limit: {report}");
    assert_eq!(report["state_writes"], json!([]));
    assert!(report["logs"].as_array().unwrap().iter().any(|l| l["source"] == "stderr" && l["message"].as_str().unwrap().contains("panicked")), "{report}");
}

#[test]
fn seeded_state_is_what_the_handler_reads() {
    let run = invoke(guests::RECORDER, &["--event", "-", "--state", "count:k=41"], r#"{"key": "k"}"#);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    assert!(run.stdout.contains("set count:k = 42\n"), "{}", run.stdout);

    // A state file: any JSON value is stored as its JSON text; --state wins.
    let dir = tempfile::tempdir().unwrap();
    let state = file(&dir, "state.json", r#"{"count:a": 9, "count:b": "100"}"#);
    let run = invoke(guests::RECORDER, &["--event", "-", "--state-file", &state, "--state", "count:b=5", "-o", "json"], r#"{"key": "a"}"#);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(run.json()["state_writes"][0], json!({"key": "count:a", "json": 10}));
    let run = invoke(guests::RECORDER, &["--event", "-", "--state-file", &state, "--state", "count:b=5", "-o", "json"], r#"{"key": "b"}"#);
    assert_eq!(run.json()["state_writes"][0], json!({"key": "count:b", "json": 6}));
}

#[test]
fn a_cloudevent_keeps_its_id_and_topic_and_the_attempt_is_the_one_asked_for() {
    let event = json!({"specversion": "1.0", "id": "e-1", "source": "tests", "type": "test.event", "topic": "orders",
                       "datacontenttype": "application/json", "data": {"key": "k", "succeed_on_attempt": 2}});
    let run = invoke(guests::RECORDER, &["--event", "-", "--attempt", "3", "-o", "json"], &event.to_string());
    assert_eq!(run.code, 0, "{}", run.stderr);
    let report = run.json();
    assert_eq!(report["event"], json!({"id": "e-1", "topic": "orders", "attempt": 3}));
    let record = &report["state_writes"][1];
    assert_eq!(record["key"], "event:k");
    assert_eq!((&record["json"]["id"], &record["json"]["topic"], &record["json"]["attempt"]), (&json!("e-1"), &json!("orders"), &json!(3)));

    let run = invoke(guests::RECORDER, &["--event", "-", "--topic", "payments", "-o", "json"], &event.to_string());
    assert_eq!(run.json()["state_writes"][1]["json"]["topic"], "payments");

    // The flaky handler asks for a retry before its attempt, and succeeds on it.
    assert_eq!(invoke(guests::FLAKY, &["--event", "-", "--attempt", "1"], &event.to_string()).code, 3);
    assert_eq!(invoke(guests::FLAKY, &["--event", "-", "--attempt", "2"], &event.to_string()).code, 0);
}

#[test]
fn guest_text_is_escaped_in_the_report() {
    let run = invoke(guests::LOG_FORGER, &["--event", "-"], "{}");
    assert_eq!(run.code, 4, "{}{}", run.stdout, run.stderr);
    assert!(!run.stdout.contains('\u{1b}'), "a raw escape sequence reached the terminal: {:?}", run.stdout);
    assert!(run.stdout.contains(r"disposition: drop: \u{1b}[2J\u{1b}[Hscreen cleared"), "{}", run.stdout);
    assert!(run.stdout.contains(r"log    harmless\n2026-11-28T00:00:00.000000Z  INFO"), "{}", run.stdout);
    assert!(run.stdout.contains(r"stdout \u{1b}[31mred FORGED\u{1b}[0m"), "{}", run.stdout);
    // Every line the guest wrote is inside the report, under its source:
    // none passes for a line of the host's own.
    for line in run.stdout.lines().filter(|l| l.contains("FORGED")) {
        assert!(line.starts_with("  info  log ") || line.starts_with("  info  stdout "), "forged line: {line:?}");
    }
    // As JSON, the lines are data, as written.
    let report = invoke(guests::LOG_FORGER, &["--event", "-", "-o", "json"], "{}").json();
    assert!(report["logs"][0]["message"].as_str().unwrap().starts_with("harmless\n2026-11-28"), "{report}");
}

#[test]
fn a_manifest_tenant_brings_its_limits() {
    let dir = tempfile::tempdir().unwrap();
    let handlers = [HandlerSpec::new("task-created", guests::TASK_CREATED, "task-created")];
    let manifest = file(&dir, "wasmsub.toml", &manifest_text("publish_topics = [\"elsewhere\"]", &handlers));
    let event = r#"{"id": 9, "title": "no audit allowed"}"#;
    let run = invoke(guests::TASK_CREATED, &["--event", "-", "--manifest", &manifest, "--tenant", "acme"], event);
    assert_eq!(run.code, 3, "{}{}", run.stdout, run.stderr);
    assert!(run.stdout.lines().next().unwrap().contains("tenant `acme` may not publish to topic `task-audit`"), "{}", run.stdout);

    let run = invoke(guests::TASK_CREATED, &["--event", "-", "--manifest", &manifest, "--tenant", "nobody"], event);
    assert_eq!(run.code, 1);
    assert!(run.stderr.contains("no tenant `nobody`") && run.stderr.contains("acme"), "{}", run.stderr);
    // Without --manifest the default is any topic; --publish-topic narrows it.
    assert_eq!(invoke(guests::TASK_CREATED, &["--event", "-"], event).code, 0);
    assert_eq!(invoke(guests::TASK_CREATED, &["--event", "-", "--publish-topic", "elsewhere"], event).code, 3);
}

#[test]
fn what_cannot_run_fails_with_one_line_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let not_wasm = file(&dir, "handler.wasm", "#!/bin/sh\necho hello\n");
    let run = invoke(&not_wasm, &["--event", "-"], "{}");
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert_eq!(run.stderr.lines().count(), 1, "{}", run.stderr);
    assert!(run.stderr.starts_with("error: ") && run.stderr.contains(&not_wasm) && run.stderr.contains("not a valid WebAssembly component"), "{}", run.stderr);
    assert!(run.stdout.is_empty(), "{}", run.stdout);

    let run = invoke(guests::RECORDER, &["--event", "-"], "not json");
    assert_eq!(run.code, 1);
    assert!(run.stderr.contains("the event in stdin is not JSON"), "{}", run.stderr);
    let missing = dir.path().join("missing.json");
    let run = invoke(guests::RECORDER, &["--event", missing.to_str().unwrap()], "");
    assert_eq!(run.code, 1);
    assert!(run.stderr.contains("missing.json"), "{}", run.stderr);

    // Bad usage is clap's: exit 2.
    assert_eq!(invoke(guests::RECORDER, &["--event", "-", "--attempt", "0"], "{}").code, 2);
    assert_eq!(invoke(guests::RECORDER, &["--event", "-", "--state", "no-value"], "{}").code, 2);
    assert_eq!(invoke(guests::RECORDER, &["--event", "-", "--tenant", "acme"], "{}").code, 2);
}

#[test]
fn the_help_documents_the_exit_codes() {
    let output = Command::new(WASMSUB).args(["invoke", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&output.stdout);
    assert!(help.contains("0 success, 3 retry, 4 drop, 5 trap"), "{help}");
    assert!(help.contains("wasmsub invoke task_created.wasm --event task.json"), "{help}");
}
