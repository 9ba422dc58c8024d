//! Deploys survive restarts: a host process is deployed to, rolled back and
//! given a new handler at runtime, stopped and started again; it comes back
//! serving what it served, with its rollback history, and the handler it
//! was given. The manifest stays the source of truth for what it names: a
//! changed manifest component wins over an earlier runtime deploy. The
//! compile cache keeps only versions a handler can serve or roll back to.

use std::time::Duration;

use serde_json::{Value, json};
use wasmsub_tests::embedded::{ADMIN_TOKEN, EmbeddedHost, Published};
use wasmsub_tests::{HandlerSpec, cloud_event, component_variant, guests, manifest_text};

const HOST: &str = env!("CARGO_BIN_EXE_wasmsub-under-test");

struct Admin {
    http: reqwest::Client,
    base: String,
}

impl Admin {
    fn of(host: &EmbeddedHost) -> Self {
        Self { http: reqwest::Client::new(), base: format!("http://127.0.0.1:{}", host.port) }
    }

    async fn deploy(&self, handler: &str, query: &str, bytes: Vec<u8>) -> Value {
        let url = format!("{}/admin/tenants/acme/handlers/{handler}/component{query}", self.base);
        let response = self.http.put(url).bearer_auth(ADMIN_TOKEN).body(bytes).send().await.unwrap();
        assert_eq!(response.status(), 200, "{}", response.text().await.unwrap_or_default());
        response.json().await.unwrap()
    }

    async fn rollback(&self, handler: &str) -> Value {
        let url = format!("{}/admin/tenants/acme/handlers/{handler}/rollback", self.base);
        let response = self.http.post(url).bearer_auth(ADMIN_TOKEN).send().await.unwrap();
        assert_eq!(response.status(), 200, "{}", response.text().await.unwrap_or_default());
        response.json().await.unwrap()
    }

    /// (serving version, rollback history) of `handler`, if it exists.
    async fn versions(&self, handler: &str) -> Option<(String, Vec<String>)> {
        let view: Value = self.http.get(format!("{}/wasmsub/handlers", self.base)).send().await.unwrap().json().await.unwrap();
        let entry = view["handlers"].as_array().unwrap().iter().find(|h| h["handler"] == handler)?.clone();
        let previous = entry["previous_versions"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_owned()).collect();
        Some((entry["version"].as_str().unwrap().to_owned(), previous))
    }
}

fn sha256(bytes: &[u8]) -> String {
    use sha2::Digest;
    format!("{:x}", sha2::Sha256::digest(bytes))
}

/// The compile cache's entries (one per compiled version).
fn cache_entries(data: &std::path::Path) -> usize {
    std::fs::read_dir(data.join("compiled")).map(|dir| dir.flatten().filter(|e| e.file_name().to_string_lossy().ends_with(".cwasm")).count()).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploys_rollbacks_and_runtime_handlers_survive_a_restart_and_the_manifest_wins_for_what_it_changed() {
    let scratch = tempfile::tempdir().unwrap();
    let data = scratch.path().join("data");
    let manifest = scratch.path().join("wasmsub.toml");
    let write_manifest = |component: &str| {
        std::fs::write(&manifest, manifest_text(r#"publish_topics = ["audit"]"#, &[HandlerSpec::new("recorder", component, "orders")])).unwrap();
    };
    write_manifest(guests::RECORDER);
    let mut host = EmbeddedHost::start(HOST, &manifest, &data, scratch.path(), &[]);
    host.wait_ready(Duration::from_secs(60)).await;
    let admin = Admin::of(&host);

    // Ten versions deployed (more than the rollback depth), one rolled back.
    let mut deployed = Vec::new();
    for n in 1..=10 {
        let bytes = component_variant(guests::RECORDER, n);
        deployed.push(sha256(&bytes));
        admin.deploy("recorder", "", bytes).await;
    }
    let rolled = admin.rollback("recorder").await;
    assert_eq!((rolled["from"].as_str().unwrap(), rolled["to"].as_str().unwrap()), (deployed[9].as_str(), deployed[8].as_str()));
    // A handler created at runtime, on a topic the manifest does not name.
    let audit_bytes = component_variant(guests::RECORDER, 100);
    admin.deploy("audit", "?topic=audit", audit_bytes.clone()).await;
    let before = (admin.versions("recorder").await.unwrap(), admin.versions("audit").await.unwrap());
    assert_eq!(before.0.0, deployed[8]);
    assert_eq!(before.0.1.len(), 7, "the depth left after a rollback: {:?}", before.0.1);
    // Bounded: the cache holds what can serve or be rolled back to.
    let live = 1 + before.0.1.len() + 1;
    assert!(cache_entries(&data) <= live, "{} cache entries for {live} live versions", cache_entries(&data));

    // A graceful stop, then a start: everything as it was.
    host.terminate();
    host.restart();
    host.wait_ready(Duration::from_secs(60)).await;
    let after = (admin.versions("recorder").await.unwrap(), admin.versions("audit").await.expect("the runtime handler is back"));
    assert_eq!(after, before);
    assert!(host.log_text().contains("restored the version deployed at runtime"), "{}", host.log_text());
    // The restored runtime handler receives its topic's events.
    let event = cloud_event("audit-1", json!({"key": "a1"}));
    assert_eq!(host.publish("audit", &event).await, Published::Accepted);
    host.wait_drained(Duration::from_secs(30)).await;
    assert_eq!(host.state("acme", "count:a1").await.as_deref(), Some("1"));
    // The history survived: rolling back works after the restart.
    let rolled = admin.rollback("recorder").await;
    assert_eq!(rolled["to"].as_str().unwrap(), deployed[7]);

    // A crash (SIGKILL) right after a deploy answered: it is on record.
    let last = component_variant(guests::RECORDER, 11);
    admin.deploy("recorder", "", last.clone()).await;
    host.kill();
    host.restart();
    host.wait_ready(Duration::from_secs(60)).await;
    assert_eq!(admin.versions("recorder").await.unwrap().0, sha256(&last));

    // The operator points the manifest at another component: it serves,
    // and what was deployed stays for rollback.
    host.terminate();
    write_manifest(guests::COUNTER);
    host.restart();
    host.wait_ready(Duration::from_secs(60)).await;
    let (serving, previous) = admin.versions("recorder").await.unwrap();
    assert_eq!(serving, sha256(&std::fs::read(guests::COUNTER).unwrap()));
    assert_eq!(previous.last(), Some(&sha256(&last)), "{previous:?}");
    assert!(host.log_text().contains("the manifest's component changed"), "{}", host.log_text());
    assert_eq!(admin.versions("audit").await.unwrap().0, sha256(&audit_bytes));
}
