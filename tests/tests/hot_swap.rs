//! Hot swap: new handler versions go live without a restart, a lost event or
//! a double effect; invalid uploads change nothing; rollback; the compiled
//! component cache.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};
use wasmsub::Outcome;
use wasmsub::control::{DeployError, DeployEvent, NewHandler};
use wasmsub::runtime::{EngineConfig, Runtime};
use wasmsub_tests::{HandlerSpec, TestHost, cloud_event, component_variant, guests, manifest_text};

fn recorder_manifest() -> String {
    manifest_text("", &[HandlerSpec::new("recorder", guests::RECORDER, "orders")])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_swaps_under_a_steady_stream_lose_nothing_and_double_nothing() {
    let mut host = TestHost::start(&recorder_manifest()).await.unwrap();
    let original = host.host.current_version("acme", "recorder").unwrap();
    const PER_VERSION: usize = 20;
    let mut deployed = vec![original];
    // Which deploy each event was published after: it must run on that
    // version or a later one (attempts take the version when they start).
    let mut published_after: HashMap<String, usize> = HashMap::new();
    for n in 1..=20 {
        // Deploys land while the previous batch is still being handled.
        let change = host.host.deployer().deploy("acme", "recorder", Path::new("test"), component_variant(guests::RECORDER, n)).await.unwrap();
        assert_eq!(&change.from, deployed.last().unwrap());
        deployed.push(change.to);
        if n == 10 {
            // An invalid upload in the middle: refused, the serving version stays.
            let refused = host.host.deployer().deploy("acme", "recorder", Path::new("bad upload"), std::fs::read(guests::WRONG_WORLD).unwrap()).await;
            assert!(matches!(refused, Err(DeployError::Invalid(_))), "{refused:?}");
            assert_eq!(host.host.current_version("acme", "recorder").unwrap(), deployed[10]);
        }
        for j in 0..PER_VERSION {
            let id = format!("e-{n}-{j}");
            host.publish("orders", &cloud_event(&id, json!({"key": id}))).await.unwrap();
            published_after.insert(id, n);
        }
    }

    let reports = host.settled(published_after.len()).await;
    let mut by_event: HashMap<&str, Vec<&wasmsub::EventReport>> = HashMap::new();
    for report in &reports {
        by_event.entry(report.event_id.as_str()).or_default().push(report);
    }
    assert_eq!(by_event.len(), published_after.len(), "every event settled");
    for (id, reports) in &by_event {
        assert_eq!(reports.len(), 1, "{id} settled more than once");
        assert_eq!(reports[0].outcome, Outcome::Processed { attempts: 1 }, "{id}");
        let ran_on = deployed.iter().position(|v| *v == reports[0].handler_version).unwrap_or_else(|| panic!("{id} ran on an unknown version"));
        assert!(ran_on >= published_after[*id], "{id} ran on version {ran_on}, older than the one serving when it was published");
    }
    for id in published_after.keys() {
        assert_eq!(host.state(&format!("count:{id}")).await.as_deref(), Some("1"), "{id}");
    }

    // Rollback returns to the version before.
    let change = host.host.deployer().rollback("acme", "recorder").await.unwrap();
    assert_eq!((&change.from, &change.to), (&deployed[20], &deployed[19]));
    host.publish("orders", &cloud_event("after-rollback", json!({}))).await.unwrap();
    assert_eq!(host.next_settled().await.handler_version, deployed[19]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_deploys_and_rolls_back_with_a_token() {
    let data_dir = tempfile::tempdir().unwrap();
    let manifest = wasmsub::Manifest::parse(&recorder_manifest(), Path::new("/")).unwrap();
    let options = wasmsub::HostOptions { admin_token: Some("s3cret".into()), ..wasmsub::HostOptions::embedded(data_dir.path().to_owned()) };
    let host = wasmsub::Host::start(&manifest, &options).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let router = host.router();
    tokio::spawn(async move { wasmsub::serve(listener, router, std::future::pending()).await });
    let http = reqwest::Client::new();
    let component_url = format!("{base}/admin/tenants/acme/handlers/recorder/component");
    let rollback_url = format!("{base}/admin/tenants/acme/handlers/recorder/rollback");

    let no_token = http.put(&component_url).body(component_variant(guests::RECORDER, 1)).send().await.unwrap();
    assert_eq!(no_token.status(), 401);
    let deployed = http.put(&component_url).bearer_auth("s3cret").body(component_variant(guests::RECORDER, 1)).send().await.unwrap();
    assert_eq!(deployed.status(), 200);
    let change: Value = deployed.json().await.unwrap();
    let wrong = http.put(&component_url).bearer_auth("s3cret").body(std::fs::read(guests::WRONG_WORLD).unwrap()).send().await.unwrap();
    assert_eq!(wrong.status(), 422);
    let reason: Value = wrong.json().await.unwrap();
    assert!(reason["error"].as_str().unwrap().contains("does not target the world wasmsub:handler/handler@0.1.0"), "{reason}");
    let status: Value = http.get(format!("{base}/wasmsub/handlers")).send().await.unwrap().json().await.unwrap();
    assert_eq!(status["handlers"][0]["version"], change["to"], "the refused upload changed nothing");
    assert_eq!(status["handlers"][0]["previous_versions"], json!([change["from"]]));

    let unknown = http.put(format!("{base}/admin/tenants/acme/handlers/nope/component")).bearer_auth("s3cret").body("x").send().await.unwrap();
    assert_eq!(unknown.status(), 404);
    let back = http.post(&rollback_url).bearer_auth("s3cret").send().await.unwrap();
    assert_eq!(back.status(), 200);
    let nothing_left = http.post(&rollback_url).bearer_auth("s3cret").send().await.unwrap();
    assert_eq!(nothing_left.status(), 409);
    host.shutdown().await;
}

#[tokio::test]
async fn the_compiled_component_cache_is_used_and_never_trusted_blindly() {
    let dir = tempfile::tempdir().unwrap();
    let config = EngineConfig { cache_dir: Some(dir.path().to_owned()), ..EngineConfig::default() };
    let runtime = Runtime::new(&config).unwrap();
    let version = runtime.load(Path::new(guests::ECHO)).unwrap().version;
    let entries: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(entries.len(), 1, "one cache entry written");
    let entry = &entries[0];
    assert!(entry.file_name().unwrap().to_str().unwrap().starts_with(&version));

    // A second engine with the same settings loads it (same result).
    let again = Runtime::new(&config).unwrap().load(Path::new(guests::ECHO)).unwrap();
    assert_eq!(again.version, version);

    // A corrupted entry is detected, ignored and rebuilt.
    let good = std::fs::read(entry).unwrap();
    std::fs::write(entry, &good[..good.len() / 2]).unwrap();
    Runtime::new(&config).unwrap().load(Path::new(guests::ECHO)).unwrap();
    assert_eq!(std::fs::read(entry).unwrap(), good, "rebuilt and rewritten");

    // An entry whose checksum matches but whose artifact is not this
    // engine's (here: garbage) is refused by wasmtime, then rebuilt.
    let garbage = b"not a compiled component".to_vec();
    let mut foreign = sha2_digest(&garbage);
    foreign.extend_from_slice(&garbage);
    std::fs::write(entry, foreign).unwrap();
    Runtime::new(&config).unwrap().load(Path::new(guests::ECHO)).unwrap();
    assert_eq!(std::fs::read(entry).unwrap(), good);
}

fn sha2_digest(bytes: &[u8]) -> Vec<u8> {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).to_vec()
}

fn version_of(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex_string(&sha2::Sha256::digest(bytes))
}

fn hex_string(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The next deploy of `file` the host reports: the version it made, or why
/// it refused.
async fn next_deploy_of(events: &mut tokio::sync::broadcast::Receiver<DeployEvent>, file: &Path) -> Result<String, String> {
    loop {
        let event = tokio::time::timeout(Duration::from_secs(60), events.recv()).await.expect("the watcher never acted").unwrap();
        if event.origin == file.display().to_string() {
            return event.result.map(|change| change.to);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watched_component_file_goes_live_when_replaced_and_bad_writes_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("recorder.wasm");
    std::fs::copy(guests::RECORDER, &file).unwrap();
    let manifest = wasmsub::Manifest::parse(&manifest_text("", &[HandlerSpec::new("recorder", file.to_str().unwrap(), "orders")]), Path::new("/")).unwrap();
    let data = tempfile::tempdir().unwrap();
    let options = wasmsub::HostOptions { watch: true, ..wasmsub::HostOptions::embedded(data.path().to_owned()) };
    // The watches are in place once the host has started.
    let host = wasmsub::Host::start(&manifest, &options).await.unwrap();
    let mut deploys = host.deployer().subscribe();

    // The atomic way: write elsewhere, rename over the file.
    let v1 = component_variant(guests::RECORDER, 1);
    let staged = dir.path().join(".recorder.wasm.tmp");
    std::fs::write(&staged, &v1).unwrap();
    std::fs::rename(&staged, &file).unwrap();
    assert_eq!(next_deploy_of(&mut deploys, &file).await, Ok(version_of(&v1)));
    assert_eq!(host.current_version("acme", "recorder").unwrap(), version_of(&v1));

    // Garbage written in place is looked at and refused; v1 stays.
    std::fs::write(&file, b"definitely not a component").unwrap();
    let refused = next_deploy_of(&mut deploys, &file).await.unwrap_err();
    assert!(refused.contains("is not a valid WebAssembly component"), "{refused}");
    assert_eq!(host.current_version("acme", "recorder").unwrap(), version_of(&v1));

    // A slow, non-atomic writer: half now, the rest later. The half may be
    // looked at and refused; the completed file goes live.
    let v2 = component_variant(guests::RECORDER, 2);
    std::fs::write(&file, &v2[..v2.len() / 2]).unwrap();
    std::fs::write(&file, &v2).unwrap();
    loop {
        if next_deploy_of(&mut deploys, &file).await == Ok(version_of(&v2)) {
            break;
        }
    }
    assert_eq!(host.current_version("acme", "recorder").unwrap(), version_of(&v2));
    host.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_deployed_for_a_new_topic_receives_its_events_without_a_restart() {
    let mut host = TestHost::start(&recorder_manifest()).await.unwrap();
    let placement = NewHandler { pubsub: "pubsub".into(), topic: "late-topic".into() };
    let change = host
        .host
        .deployer()
        .deploy_new("acme", "late", placement.clone(), Path::new("upload"), std::fs::read(guests::RECORDER).unwrap())
        .await
        .unwrap();
    assert_eq!(change.from, "");
    host.publish("late-topic", &cloud_event("late-1", json!({}))).await.unwrap();
    let report = host.next_settled().await;
    assert_eq!((report.handler.as_str(), &report.outcome), ("late", &Outcome::Processed { attempts: 1 }));
    assert_eq!(host.state("count:late-1").await.as_deref(), Some("1"));

    let unknown = host.host.deployer().deploy_new("nobody", "x", placement, Path::new("upload"), std::fs::read(guests::RECORDER).unwrap()).await;
    assert!(matches!(unknown, Err(DeployError::UnknownTenant(_))), "{unknown:?}");
    // A new handler is held to the tenant's component size limit, like a new version.
    let tiny = "max_component_bytes = 1000";
    let strict = TestHost::start(&manifest_text(tiny, &[HandlerSpec::new("recorder", guests::RECORDER, "orders")])).await.unwrap();
    let placement = NewHandler { pubsub: "pubsub".into(), topic: "other".into() };
    let too_big = strict.host.deployer().deploy_new("acme", "big", placement, Path::new("upload"), std::fs::read(guests::RECORDER).unwrap()).await;
    assert!(matches!(too_big, Err(DeployError::TooLarge { limit: 1000, .. })), "{too_big:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_deploy_no_instance_made_ahead_of_the_old_version_runs() {
    let mut host = TestHost::start(&manifest_text("", &[HandlerSpec::new("probe", guests::MEMORY_PROBE, "probe")])).await.unwrap();
    host.publish("probe", &cloud_event("before", json!({}))).await.unwrap();
    assert_eq!(host.next_settled().await.outcome, Outcome::Processed { attempts: 1 });
    assert_eq!(host.state("seen:before").await.as_deref(), Some("0 0"));
    // Instances of the probe are made ahead; then echo (which writes no
    // state) replaces it.
    host.wait_for_an_instance_made_ahead().await;
    host.host.deployer().deploy("acme", "probe", Path::new("echo"), std::fs::read(guests::ECHO).unwrap()).await.unwrap();
    for i in 0..3 {
        let id = format!("after-{i}");
        host.publish("probe", &cloud_event(&id, json!({}))).await.unwrap();
        assert_eq!(host.next_settled().await.outcome, Outcome::Processed { attempts: 1 });
        assert_eq!(host.state(&format!("seen:{id}")).await, None, "{id} ran on an instance of the old version");
    }
}
