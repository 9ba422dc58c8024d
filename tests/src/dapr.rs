//! Real Dapr for integration tests: a Redis server and daprd sidecars on
//! free loopback ports, and wasmsub hosts as child processes (so a test can
//! SIGKILL one). Every process is started by the test and stopped by it,
//! also on failure (on drop), by its own pid and nothing else.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use wasmsub::store::keys::dapr_state_key;

use crate::cloud_event;

pub use crate::process::{Process, START_TIMEOUT, free_port, repo_root, wait_for_http, wait_for_port};

/// The daprd binary: `$DAPRD` (scripts/test.sh sets it), else whatever
/// scripts/get-daprd.sh finds or builds.
pub fn daprd_binary() -> PathBuf {
    static DAPRD: OnceLock<PathBuf> = OnceLock::new();
    DAPRD.get_or_init(|| crate::process::script_output("DAPRD", "scripts/get-daprd.sh")).clone()
}

/// A Redis server for one test.
pub struct Redis {
    pub port: u16,
    _process: Process,
    _monitor: Option<Process>,
}

impl Redis {
    pub fn start(log_dir: &Path) -> Self {
        let port = free_port();
        let process = Process::spawn(
            "redis",
            Command::new("redis-server").args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]),
            log_dir,
        );
        wait_for_port(port, &process);
        // WASMSUB_REDIS_MONITOR=1 records every command Redis runs (who
        // acknowledged which stream entry, when) in redis-monitor.log.
        let monitor = std::env::var_os("WASMSUB_REDIS_MONITOR")
            .map(|_| Process::spawn("redis-monitor", Command::new("redis-cli").args(["-p", &port.to_string(), "monitor"]), log_dir));
        Self { port, _process: process, _monitor: monitor }
    }
}

impl Redis {
    /// Waits until every entry of the stream `topic` has been delivered to
    /// the consumer group `group` (Dapr names it after the app id) and
    /// acknowledged: from then on no (re)delivery can come, so a count read
    /// afterwards is final. Fails only if the backlog does not move for
    /// `stall` (a busy machine drains slowly, a stuck one not at all).
    pub fn wait_drained(&self, topic: &str, group: &str, stall: Duration) {
        let (mut last, mut since) = ((None, None), Instant::now());
        loop {
            let (pending, lag) = self.group_backlog(topic, group);
            if pending == Some(0) && lag == Some(0) {
                return;
            }
            if (pending, lag) != last {
                (last, since) = ((pending, lag), Instant::now());
            }
            assert!(since.elapsed() < stall, "stream {topic} not drained by group {group}: pending {pending:?}, lag {lag:?}, unchanged for {stall:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// (pending, lag) of `group` on `topic`, from `XINFO GROUPS`.
    fn group_backlog(&self, topic: &str, group: &str) -> (Option<u64>, Option<u64>) {
        let output = Command::new("redis-cli")
            .args(["-p", &self.port.to_string(), "--raw", "XINFO", "GROUPS", topic])
            .output()
            .expect("running redis-cli");
        let text = String::from_utf8_lossy(&output.stdout);
        let lines: Vec<&str> = text.lines().collect();
        // Groups come as flat name/value pairs, one group after another.
        for group_fields in lines.split(|l| *l == "name").skip(1) {
            if group_fields.first() != Some(&group) {
                continue;
            }
            let field = |name: &str| group_fields.iter().position(|l| *l == name).and_then(|i| group_fields.get(i + 1)?.parse().ok());
            return (field("pending"), field("lag"));
        }
        (None, None)
    }
}


/// Redis Streams settings for tests: redeliveries within seconds, not the
/// production minute, so crash tests stay short.
pub struct StreamTimings {
    pub processing_timeout: &'static str,
    pub redeliver_interval: &'static str,
}

/// In milliseconds, as the component reads them (see components/pubsub.yaml).
/// The resiliency retries (every 1 s) outlast the processing timeout, as in
/// components/resiliency.yaml.
pub const FAST_REDELIVERY: StreamTimings = StreamTimings { processing_timeout: "8000", redeliver_interval: "1000" };

/// The repository's component YAMLs, pointed at `redis_port`.
pub fn write_components(dir: &Path, redis_port: u16, timings: &StreamTimings) {
    std::fs::create_dir_all(dir).unwrap();
    for name in ["pubsub.yaml", "statestore.yaml", "resiliency.yaml"] {
        let text = std::fs::read_to_string(repo_root().join("components").join(name)).unwrap();
        let text = text
            .replace("localhost:6379", &format!("127.0.0.1:{redis_port}"))
            .replace("value: \"60000\"", &format!("value: \"{}\"", timings.processing_timeout))
            .replace("value: \"10000\"", &format!("value: \"{}\"", timings.redeliver_interval))
            .replace("maxRetries: 120", "maxRetries: 20");
        std::fs::write(dir.join(name), text).unwrap();
    }
}

/// One daprd sidecar.
pub struct Daprd {
    pub http_port: u16,
    pub grpc_port: u16,
    pub app_port: u16,
    /// Where daprd serves its Prometheus metrics.
    pub metrics_port: u16,
    process: Process,
}

impl Daprd {
    /// Starts daprd for `app_id` delivering to `app_port`, and waits until
    /// its components are up (the app itself may start later).
    pub fn start(name: &str, app_id: &str, app_port: u16, components: &Path, log_dir: &Path) -> Self {
        let (http_port, grpc_port) = (free_port(), free_port());
        Self::start_on(name, app_id, app_port, http_port, grpc_port, components, log_dir)
    }

    pub fn start_on(name: &str, app_id: &str, app_port: u16, http_port: u16, grpc_port: u16, components: &Path, log_dir: &Path) -> Self {
        let level = std::env::var("WASMSUB_DAPRD_LOG_LEVEL").unwrap_or_else(|_| "info".into());
        Self::start_logging(name, app_id, app_port, http_port, grpc_port, components, log_dir, &level)
    }

    /// As [`Daprd::start_on`], at `level` (`debug` logs each delivery's
    /// answer, which the Dapr chaos test reads).
    #[allow(clippy::too_many_arguments)]
    pub fn start_logging(name: &str, app_id: &str, app_port: u16, http_port: u16, grpc_port: u16, components: &Path, log_dir: &Path, level: &str) -> Self {
        let ports = [http_port, grpc_port, free_port(), free_port()].map(|p| p.to_string());
        let process = Process::spawn(
            name,
            Command::new(daprd_binary()).args([
                "--app-id", app_id,
                "--app-port", &app_port.to_string(),
                "--app-protocol", "http",
                "--dapr-http-port", &ports[0],
                "--dapr-grpc-port", &ports[1],
                "--dapr-internal-grpc-port", &ports[2],
                "--metrics-port", &ports[3],
                "--resources-path", components.to_str().unwrap(),
                "--log-level", level,
            ]),
            log_dir,
        );
        let metrics_port = ports[3].parse().unwrap();
        let daprd = Self { http_port, grpc_port, app_port, metrics_port, process };
        daprd.wait_healthy();
        daprd
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    fn wait_healthy(&self) {
        let deadline = Instant::now() + START_TIMEOUT;
        let url = format!("{}/v1.0/healthz/outbound", self.url());
        loop {
            if let Ok(response) = ureq_get(&url)
                && response == 204
            {
                return;
            }
            assert!(Instant::now() < deadline, "daprd never became healthy:\n{}", self.process.log_text());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// Requests daprd's HTTP API has served, by method and path (from its
    /// `dapr_http_server_request_count` metric), health checks left out.
    pub async fn api_calls(&self) -> std::collections::BTreeMap<String, u64> {
        let text = reqwest::get(format!("http://127.0.0.1:{}/metrics", self.metrics_port)).await.unwrap().text().await.unwrap();
        let mut calls = std::collections::BTreeMap::new();
        for line in text.lines().filter(|l| l.starts_with("dapr_http_server_request_count{")) {
            let label = |name: &str| line.split(&format!("{name}=\"")).nth(1).and_then(|rest| rest.split('"').next()).unwrap_or("");
            let path = label("path");
            if path.contains("healthz") {
                continue;
            }
            let count: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
            *calls.entry(format!("{} {path}", label("method"))).or_default() += count as u64;
        }
        calls
    }

    pub fn log_text(&self) -> String {
        self.process.log_text()
    }
}

/// A blocking GET's status (the harness runs outside any async runtime).
fn ureq_get(url: &str) -> Result<u16, String> {
    let output = Command::new("curl").args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "2", url]).output().map_err(|e| e.to_string())?;
    String::from_utf8_lossy(&output.stdout).trim().parse().map_err(|e| format!("{e}"))
}

/// A wasmsub host process behind `daprd`. `binary` is the test's
/// `env!("CARGO_BIN_EXE_wasmsub-under-test")` (cargo gives it only to tests).
pub fn start_host(binary: &str, name: &str, manifest: &Path, daprd: &Daprd, log_dir: &Path) -> Process {
    start_host_with(binary, name, manifest, daprd, log_dir, &[])
}

/// As [`start_host`], with extra environment variables.
pub fn start_host_with(binary: &str, name: &str, manifest: &Path, daprd: &Daprd, log_dir: &Path, env: &[(&str, &str)]) -> Process {
    let process = Process::spawn(
        name,
        Command::new(binary)
            // Compiled-component cache and embedded files stay in the test's scratch space.
            .env("WASMSUB_DATA_DIR", log_dir.join(format!("{name}-data")))
            .args(["run", "--manifest", manifest.to_str().unwrap()])
            .env("DAPR_HTTP_PORT", daprd.http_port.to_string())
            .env("DAPR_GRPC_PORT", daprd.grpc_port.to_string())
            .env("APP_PORT", daprd.app_port.to_string())
            .env("WASMSUB_LISTEN", format!("127.0.0.1:{}", daprd.app_port))
            .env("RUST_LOG", "info,wasmsub=debug")
            // The test's own settings win (a shared data directory, say).
            .envs(env.iter().copied()),
        log_dir,
    );
    wait_for_http(daprd.app_port, "/healthz", &process);
    process
}

/// Dapr's HTTP API, for the test's own publishes and state reads.
pub struct DaprClient {
    http: reqwest::Client,
    base: String,
}

impl DaprClient {
    pub fn new(daprd: &Daprd) -> Self {
        Self { http: reqwest::Client::new(), base: daprd.url() }
    }

    pub async fn publish(&self, topic: &str, event: &Value) {
        let response = self
            .http
            .post(format!("{}/v1.0/publish/pubsub/{topic}", self.base))
            .header("content-type", "application/cloudevents+json")
            .body(event.to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 204, "publish failed: {}", response.text().await.unwrap_or_default());
    }

    /// A tenant's state value, read through Dapr's state API the way any
    /// other Dapr app would (wasmsub stores text as a JSON string).
    pub async fn tenant_state(&self, tenant: &str, key: &str) -> Option<String> {
        let scoped = wasmsub::store::keys::dapr_state_key(tenant, key);
        let url = format!("{}/v1.0/state/statestore/{}", self.base, wasmsub::sidecar::path_segment(&scoped));
        let response = self.http.get(url).send().await.ok()?;
        if response.status() != 200 {
            return None;
        }
        match response.json::<Value>().await.ok()? {
            Value::String(text) => Some(text),
            other => Some(other.to_string()),
        }
    }

    /// Waits until `predicate` holds for `key`'s value, or fails after `limit`.
    pub async fn wait_for_state(&self, tenant: &str, key: &str, limit: Duration, predicate: impl Fn(Option<&str>) -> bool) -> Option<String> {
        let deadline = Instant::now() + limit;
        loop {
            let value = self.tenant_state(tenant, key).await;
            if predicate(value.as_deref()) {
                return value;
            }
            assert!(Instant::now() < deadline, "state {tenant}/{key} is {value:?} after {limit:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

// Shared by the Dapr test files.

/// A test's scratch space: logs, components, manifest.
pub struct Scratch {
    dir: tempfile::TempDir,
}

impl Default for Scratch {
    fn default() -> Self {
        Self { dir: tempfile::tempdir().unwrap() }
    }
}

impl Drop for Scratch {
    /// WASMSUB_KEEP_LOGS=1 keeps the processes' logs for a look afterwards.
    fn drop(&mut self) {
        if std::env::var_os("WASMSUB_KEEP_LOGS").is_some() {
            let kept = self.dir.path().with_extension("kept");
            let _ = std::fs::rename(self.dir.path(), &kept);
            eprintln!("logs kept in {}", kept.display());
        }
    }
}

impl Scratch {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
    pub fn components(&self, redis: &Redis) -> PathBuf {
        let dir = self.path().join("components");
        write_components(&dir, redis.port, &FAST_REDELIVERY);
        dir
    }
    pub fn manifest(&self, body: &str) -> PathBuf {
        self.manifest_named("wasmsub.toml", body)
    }
    pub fn manifest_named(&self, name: &str, body: &str) -> PathBuf {
        let path = self.path().join(name);
        std::fs::write(&path, body).unwrap();
        path
    }
}

/// Tenant `acme` with the given `[[tenant.handler]]` tables.
pub fn manifest(limits: &str, handlers: &[(&str, &str, &str, &str)]) -> String {
    let mut text = format!("[idempotency]\nlease_margin = \"1s\"\n\n[[tenant]]\nname = \"acme\"\nlimits = {{ {limits} }}\n");
    for (name, component, topic, extra) in handlers {
        text.push_str(&format!(
            "\n[[tenant.handler]]\nname = \"{name}\"\ncomponent = {component:?}\ntopic = \"{topic}\"\n\
             retry = {{ max_attempts = 3, multiplier = 0.05, min = \"50ms\", max = \"200ms\" }}\n{extra}\n"
        ));
    }
    text
}

/// Publishes warm-up events until the host handles one: Dapr reads the
/// subscriptions once the app port is open, and Redis Streams only delivers
/// what is published after the consumer group exists.
/// Returns how many warm-up events it published (each is an event for
/// every handler of `topic`).
pub async fn wait_until_subscribed(client: &DaprClient, topic: &str) -> usize {
    let deadline = Instant::now() + Duration::from_secs(60);
    for attempt in 0.. {
        client.publish(topic, &cloud_event(&format!("warm-up-{attempt}"), json!({"key": "warm-up"}))).await;
        for _ in 0..10 {
            if client.tenant_state("acme", "count:warm-up").await.is_some() {
                return attempt + 1;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(Instant::now() < deadline, "the host never received an event through daprd");
    }
    unreachable!("the loop returns or fails")
}

/// A handler's outcome counts, from the host's `/wasmsub/handlers`.
pub async fn handler_counts(app_port: u16, handler: &str) -> Value {
    let url = format!("http://127.0.0.1:{app_port}/wasmsub/handlers");
    let body: Value = reqwest::get(url).await.unwrap().json().await.unwrap();
    body["handlers"].as_array().unwrap().iter().find(|h| h["handler"] == handler).unwrap()["counts"].clone()
}

/// Reads many tenant keys at once through Dapr's bulk state API.
pub async fn bulk_counts(daprd: &Daprd, keys: &[String]) -> Vec<Option<String>> {
    let scoped: Vec<String> = keys.iter().map(|k| dapr_state_key("acme", k)).collect();
    let url = format!("{}/v1.0/state/statestore/bulk", daprd.url());
    let body = json!({"keys": scoped, "parallelism": 16});
    let items: Vec<Value> = reqwest::Client::new().post(url).json(&body).send().await.unwrap().json().await.unwrap();
    let mut by_key = std::collections::HashMap::new();
    for item in items {
        by_key.insert(item["key"].as_str().unwrap().to_owned(), item["data"].as_str().map(str::to_owned));
    }
    scoped.iter().map(|k| by_key.get(k).cloned().flatten()).collect()
}

/// Events a sidecar acknowledged after taking a killed app's broken answer
/// for an empty 2xx: daprd 1.18.2 sometimes does this for a delivery whose
/// host was SIGKILLed mid-request (tests/tests/dapr_chaos.rs's module
/// comment, docs/ARCHITECTURE.md). Read from the `daprd-*.log` files in
/// `dir`; the sidecars must log at `debug` for daprd to say so.
pub fn acked_by_dapr_without_an_answer(dir: &Path) -> std::collections::BTreeSet<String> {
    const MARK: &str = "skipping status check due to empty response body from pub/sub event ";
    let mut ids = std::collections::BTreeSet::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("daprd-") && name.ends_with(".log") {
            for line in std::fs::read_to_string(entry.path()).unwrap_or_default().lines() {
                if let Some(rest) = line.split(MARK).nth(1) {
                    ids.insert(rest.split('"').next().unwrap_or("").trim().to_owned());
                }
            }
        }
    }
    ids
}

/// Whether any host life (a `host-*.log` in `dir`) settled `event` for
/// `handler` (processed it, or skipped it as done).
pub fn settled_by_a_host(dir: &Path, event: &str, handler: &str) -> bool {
    let (id, by) = (format!("messaging.message.id={event} "), format!("handler={handler}}}"));
    std::fs::read_dir(dir).unwrap().flatten().any(|entry| {
        let name = entry.file_name().to_string_lossy().into_owned();
        name.starts_with("host-")
            && name.ends_with(".log")
            && std::fs::read_to_string(entry.path()).unwrap_or_default().lines().any(|l| {
                l.contains(&id) && l.contains(&by) && (l.contains("event processed") || l.contains("duplicate delivery skipped"))
            })
    })
}
