//! The `wasmsub` command as a user runs it: exit codes (0 success, 1 failure
//! with a message saying what and where, 2 bad usage) and its messages.

use std::process::Command;

use wasmsub_tests::{HandlerSpec, guests, manifest_text};

const WASMSUB: &str = env!("CARGO_BIN_EXE_wasmsub-under-test");

fn run(args: &[&str]) -> (i32, String, String) {
    let output = Command::new(WASMSUB).args(args).env("RUST_LOG", "warn").output().expect("running wasmsub");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn check_accepts_a_good_manifest_and_names_what_is_wrong_in_a_bad_one() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let good = dir.path().join("good.toml");
    std::fs::write(&good, manifest_text("", &[HandlerSpec::new("recorder", guests::RECORDER, "orders")])).unwrap();
    let (code, stdout, _) = run(&["check", "-m", good.to_str().unwrap(), "--data-dir", data.to_str().unwrap()]);
    assert_eq!(code, 0);
    assert!(stdout.contains("manifest OK, 1 handler(s) loaded"), "{stdout}");

    let typo = dir.path().join("typo.toml");
    std::fs::write(&typo, manifest_text("", &[HandlerSpec::new("recorder", guests::RECORDER, "orders")]).replace("topic =", "topik =")).unwrap();
    let (code, _, stderr) = run(&["check", "-m", typo.to_str().unwrap(), "--data-dir", data.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(stderr.contains("typo.toml") && stderr.contains("unknown field `topik`"), "{stderr}");

    let wrong = dir.path().join("wrong.toml");
    std::fs::write(&wrong, manifest_text("", &[HandlerSpec::new("w", guests::WRONG_WORLD, "orders")])).unwrap();
    let (code, _, stderr) = run(&["check", "-m", wrong.to_str().unwrap(), "--data-dir", data.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(stderr.contains(guests::WRONG_WORLD) && stderr.contains("does not target the world"), "{stderr}");
}

#[test]
fn check_reports_every_problem_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let not_wasm = dir.path().join("not-wasm.wasm");
    std::fs::write(&not_wasm, "#!/bin/sh\necho hello\n").unwrap();
    let manifest = dir.path().join("two-bad.toml");
    let handlers = [
        HandlerSpec::new("w", guests::WRONG_WORLD, "orders"),
        HandlerSpec::new("script", not_wasm.to_str().unwrap(), "payments"),
        HandlerSpec::new("recorder", guests::RECORDER, "audit"),
    ];
    std::fs::write(&manifest, manifest_text("", &handlers)).unwrap();
    let output = Command::new(WASMSUB)
        .args(["check", "-m", manifest.to_str().unwrap()])
        .current_dir(dir.path())
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("2 problems"), "{stderr}");
    assert!(stderr.contains("handler `w`") && stderr.contains("does not target the world"), "{stderr}");
    assert!(stderr.contains("handler `script`") && stderr.contains("not-wasm.wasm"), "{stderr}");
    // Each problem is one line: no multi-line parser dumps.
    let problem_lines = stderr.lines().filter(|line| line.contains("handler `")).count();
    assert_eq!(problem_lines, 2, "{stderr}");
    // Nothing written next to the manifest: no data dir, no compile cache.
    let entries: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|entry| entry.unwrap().file_name()).collect();
    assert_eq!(entries.len(), 2, "check wrote files: {entries:?}");
}

#[test]
fn completions_print_a_script_for_the_shell() {
    let (code, stdout, stderr) = run(&["completions", "bash"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("complete -F") && stdout.contains("dead-letters"), "{stdout}");
    let (code, _, _) = run(&["completions", "no-such-shell"]);
    assert_eq!(code, 2);
}

#[test]
fn bad_usage_exits_2_and_failures_exit_1_with_a_reason() {
    let (code, _, stderr) = run(&["run", "--no-such-flag"]);
    assert_eq!(code, 2, "{stderr}");
    let (code, _, stderr) = run(&["publish", "orders", "{not json"]);
    assert_eq!(code, 1);
    assert!(stderr.contains("not valid JSON") && stderr.contains("--content-type text/plain"), "{stderr}");
    // Nothing listens on port 9 of loopback: the reason says where it tried.
    let (code, _, stderr) = run(&["status", "--url", "http://127.0.0.1:9"]);
    assert_eq!(code, 1);
    assert!(stderr.contains("http://127.0.0.1:9") && stderr.contains("is `wasmsub run` listening there?"), "{stderr}");
    // An address without its scheme is bad usage, with the fix in the message.
    let (code, _, stderr) = run(&["status", "--url", "localhost:3500"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("add the scheme, e.g. http://localhost:3500"), "{stderr}");
    let (code, stdout, _) = run(&["--help"]);
    assert_eq!(code, 0);
    assert!(stdout.contains("Exit codes") && stdout.contains("wasmsub deploy"), "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_status_state_and_dead_letters_against_a_running_host() {
    use wasmsub_tests::embedded::{ADMIN_TOKEN, EmbeddedHost};
    let scratch = tempfile::tempdir().unwrap();
    let manifest = scratch.path().join("wasmsub.toml");
    std::fs::write(&manifest, manifest_text("", &[
        HandlerSpec::new("recorder", guests::RECORDER, "orders"),
        HandlerSpec::new("poison", guests::POISON, "archive").with("retry = { max_attempts = 1 }"),
    ]))
    .unwrap();
    let host = EmbeddedHost::start(WASMSUB, &manifest, &scratch.path().join("data"), scratch.path(), &[]);
    host.wait_ready(std::time::Duration::from_secs(60)).await;
    let url = format!("http://127.0.0.1:{}", host.port);
    let cli = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend(["--url", url.as_str()]);
        run(&all)
    };

    // The id is printed; the same id twice is one event.
    let (code, stdout, stderr) = cli(&["publish", "orders", r#"{"key":"k1"}"#, "--id", "e-1"]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(stdout, "published event e-1 to pubsub/orders\n");
    let (code, stdout, _) = cli(&["publish", "orders", r#"{"key":"k1"}"#, "--id", "e-1", "--output", "json"]);
    assert_eq!(code, 0);
    assert_eq!(serde_json::from_str::<serde_json::Value>(&stdout).unwrap()["id"], "e-1");
    // Without --id, a fresh UUID.
    let (_, stdout, _) = cli(&["publish", "archive", "{}"]);
    let id = stdout.strip_prefix("published event ").and_then(|rest| rest.split(' ').next()).unwrap().to_owned();
    assert!(uuid::Uuid::parse_str(&id).is_ok(), "{stdout}");
    host.wait_drained(std::time::Duration::from_secs(30)).await;

    let status = loop {
        let (code, stdout, stderr) = cli(&["status", "--output", "json"]);
        assert_eq!(code, 0, "{stderr}");
        let status: serde_json::Value = serde_json::from_str(&stdout).unwrap();
        let recorder = status["handlers"].as_array().unwrap().iter().find(|h| h["handler"] == "recorder").unwrap().clone();
        // Reports lag the queue a little: wait for both deliveries to be counted.
        if recorder["counts"]["processed"].as_u64().unwrap() + recorder["counts"]["duplicates"].as_u64().unwrap() == 2 {
            break recorder;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!((status["counts"]["processed"].as_u64(), status["counts"]["duplicates"].as_u64()), (Some(1), Some(1)));

    let (code, stdout, stderr) = cli(&["state", "get", "--tenant", "acme", "--token", ADMIN_TOKEN, "count:k1"]);
    assert_eq!((code, stdout.as_str()), (0, "1"), "{stderr}");
    let (code, stdout, _) = cli(&["state", "get", "--tenant", "acme", "--token", ADMIN_TOKEN, "count:k1", "-o", "json"]);
    assert_eq!(code, 0);
    assert_eq!(serde_json::from_str::<serde_json::Value>(&stdout).unwrap(), serde_json::json!({"tenant": "acme", "key": "count:k1", "value": "1"}));
    let (code, _, stderr) = cli(&["state", "get", "--tenant", "nobody", "--token", ADMIN_TOKEN, "k"]);
    assert_eq!(code, 1);
    assert!(stderr.contains("no tenant `nobody`"), "{stderr}");

    let (code, stdout, _) = cli(&["dead-letters", "--output", "json"]);
    assert_eq!(code, 0);
    let letters: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(letters[0]["event_id"], id.as_str(), "{letters}");

    // A reader that stops early (`| head`, here one that reads nothing) ends
    // the command quietly: no panic, exit 0.
    let piped = Command::new("bash")
        .args(["-c", r#"set -o pipefail; "$0" status --url "$1" | true"#, WASMSUB, &url])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&piped.stderr);
    assert!(piped.status.success() && !stderr.contains("panicked"), "{stderr}");
}
