//! `wasmsub new` as a plugin author uses it: the project it writes passes
//! its own tests, builds into a component, and that component runs an
//! event through the real sandbox with `wasmsub invoke`.

use std::path::{Path, PathBuf};
use std::process::Command;

const WASMSUB: &str = env!("CARGO_BIN_EXE_wasmsub-under-test");

/// A command with the settings of the cargo running this test removed: the
/// project is built as its author would build it.
fn clean(program: &str) -> Command {
    let mut command = Command::new(program);
    for (key, _) in std::env::vars() {
        if key.starts_with("CARGO_") || key.starts_with("RUST") && key != "RUSTUP_HOME" {
            command.env_remove(&key);
        }
    }
    // Dependencies are compiled once per machine, not per test run.
    command.env("CARGO_TARGET_DIR", cache_dir().join("scaffold-target"));
    command
}

fn cache_dir() -> PathBuf {
    std::env::var_os("WASMSUB_CACHE").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/wasmsub"))
}

fn run(command: &mut Command, what: &str) -> String {
    let output = command.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "{what} failed ({}):\n{text}", output.status);
    text
}

fn scaffold(dir: &Path, name: &str, lang: &str) -> PathBuf {
    let project = dir.join(name);
    let out = run(Command::new(WASMSUB).args(["new", name, "--lang", lang, "--dir"]).arg(&project), "wasmsub new");
    assert!(out.contains("next:"), "{out}");
    project
}

#[test]
fn a_new_rust_project_passes_its_tests_builds_and_runs_an_event() {
    let dir = tempfile::tempdir().unwrap();
    let project = scaffold(dir.path(), "task-done", "rust");
    let tests = run(clean("cargo").arg("test").current_dir(&project), "cargo test in the new project");
    assert!(tests.contains("test result: ok. 2 passed"), "{tests}");
    run(clean("cargo").args(["build", "--release", "--target", "wasm32-wasip2"]).current_dir(&project), "building the component");
    let component = cache_dir().join("scaffold-target/wasm32-wasip2/release/task_done.wasm");
    let report = run(
        Command::new(WASMSUB).arg("invoke").arg(&component).args(["--event", "event.json", "--state", "seen:7=4"]).current_dir(&project),
        "wasmsub invoke on the built component",
    );
    assert!(report.starts_with("disposition: success"), "{report}");
    assert!(report.contains("seen:7") && report.contains('5'), "{report}");
    assert!(report.contains("task-done-seen"), "{report}");
    // The manifest it wrote loads the component it built.
    let manifest = std::fs::read_to_string(project.join("wasmsub.toml")).unwrap().replace(
        "target/wasm32-wasip2/release/task_done.wasm",
        component.to_str().unwrap(),
    );
    std::fs::write(project.join("check.toml"), manifest).unwrap();
    run(Command::new(WASMSUB).args(["check", "-m", "check.toml"]).current_dir(&project), "wasmsub check on the new project's manifest");
}

#[test]
fn a_name_that_cannot_be_a_topic_is_refused_and_nothing_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let output = Command::new(WASMSUB).args(["new", "Task_Done"]).current_dir(dir.path()).output().unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("not a handler name"));
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

/// The pinned toolchain `scripts/build-polyglot-guests.sh` installed, if it
/// did: the project's build.sh uses it rather than installing its own.
fn polyglot_tool(relative: &str) -> Option<PathBuf> {
    let path = cache_dir().join("polyglot/toolchains").join(relative);
    path.exists().then_some(path)
}

/// `wasmsub new --lang LANG`, then the project's own test.sh: its native
/// tests, its build, and `wasmsub invoke` of the component on its sample
/// event (which exits 0 only on success).
fn scaffold_passes_its_test_script(lang: &str, tool_env: (&str, Option<PathBuf>)) {
    let dir = tempfile::tempdir().unwrap();
    let project = scaffold(dir.path(), "task-done", lang);
    let mut test = clean("bash");
    test.arg("test.sh").current_dir(&project).env("WASMSUB", WASMSUB);
    if let (name, Some(path)) = tool_env {
        test.env(name, path);
    }
    let report = run(&mut test, &format!("test.sh of the new {lang} project"));
    assert!(report.contains("disposition: success"), "{report}");
    assert!(report.contains("set seen:7 = 5") && report.contains("task-done-seen"), "{report}");
}

#[test]
fn a_new_python_project_passes_its_tests_builds_and_runs_an_event() {
    scaffold_passes_its_test_script("python", ("WASMSUB_COMPONENTIZE_PY", polyglot_tool("python-componentize-py-0.25.1/bin/componentize-py")));
}

#[test]
fn a_new_javascript_project_passes_its_tests_builds_and_runs_an_event() {
    scaffold_passes_its_test_script("js", ("WASMSUB_COMPONENTIZE_JS", polyglot_tool("node-jco-1.35.0-componentize-js-0.23.0/node_modules")));
}
