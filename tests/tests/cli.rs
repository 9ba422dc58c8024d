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
    let (code, stdout, _) = run(&["--help"]);
    assert_eq!(code, 0);
    assert!(stdout.contains("Exit codes") && stdout.contains("wasmsub deploy"), "{stdout}");
}
