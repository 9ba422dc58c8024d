//! Components that cannot serve are refused at start-up with an error that
//! names the file and says why.

use wasmsub_tests::{HandlerSpec, TestHost, guests, manifest_text};

async fn start_error(component: &str) -> String {
    let manifest = manifest_text("", &[HandlerSpec::new("bad", component, "orders")]);
    match TestHost::start(&manifest).await {
        Ok(_) => panic!("{component} was accepted"),
        Err(error) => format!("{error:#}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_component_of_another_world_is_refused_naming_the_file() {
    let error = start_error(guests::WRONG_WORLD).await;
    assert!(error.contains("loading tenant `acme` handler `bad`"), "{error}");
    assert!(error.contains(&format!("component {} does not target the world wasmsub:handler/handler@0.1.0", guests::WRONG_WORLD)), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_that_are_not_a_component_are_refused_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let fake = dir.path().join("fake.wasm");
    std::fs::write(&fake, b"\0asm but not really").unwrap();
    let error = start_error(fake.to_str().unwrap()).await;
    assert!(error.contains(&format!("component {} is not a valid WebAssembly component", fake.display())), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_component_is_refused_naming_the_file() {
    let error = start_error("/nonexistent/handler.wasm").await;
    assert!(error.contains("cannot read component /nonexistent/handler.wasm"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_example_guest_loads() {
    for component in [guests::TASK_CREATED, guests::ECHO, guests::FLAKY, guests::POISON] {
        let manifest = manifest_text("", &[HandlerSpec::new("ok", component, "orders")]);
        TestHost::start(&manifest).await.unwrap_or_else(|e| panic!("{component}: {e:#}"));
    }
}
