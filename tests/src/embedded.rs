//! An embedded host as a process (no Dapr), for tests that kill it, stop it,
//! overload it or fill its disk: it keeps its data directory across
//! restarts, and the test talks to it over HTTP as a user would.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::process::{Process, START_TIMEOUT, free_port};

/// The admin token the test hosts run with (for the state view).
pub const ADMIN_TOKEN: &str = "test-admin-token";

/// A host process and what it needs to be started again.
pub struct EmbeddedHost {
    binary: PathBuf,
    manifest: PathBuf,
    data_dir: PathBuf,
    log_dir: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    pub port: u16,
    process: Option<Process>,
    starts: usize,
    http: reqwest::Client,
}

/// What a publish came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Published {
    /// 2xx: the host has it.
    Accepted,
    /// An HTTP error status (429, 503, ...).
    Refused(u16),
    /// No answer (the host is down, or died mid-request): it may or may not
    /// have it, so the publisher sends it again.
    NoAnswer,
}

impl EmbeddedHost {
    /// Starts `binary run` on `manifest` with its data in `data_dir` (and
    /// `args` added), and waits until it answers.
    pub fn start(binary: &str, manifest: &Path, data_dir: &Path, log_dir: &Path, args: &[&str]) -> Self {
        Self::start_with_env(binary, manifest, data_dir, log_dir, args, &[])
    }

    /// [`Self::start`], with environment variables set for the process.
    pub fn start_with_env(binary: &str, manifest: &Path, data_dir: &Path, log_dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut host = Self {
            binary: binary.into(),
            manifest: manifest.into(),
            data_dir: data_dir.into(),
            log_dir: log_dir.into(),
            args: args.iter().map(|a| a.to_string()).collect(),
            env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            port: free_port(),
            process: None,
            starts: 0,
            http: reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap(),
        };
        host.restart();
        host
    }

    /// Starts the process (again), on the same port and data, and waits
    /// until it serves HTTP.
    pub fn restart(&mut self) {
        assert!(self.process.is_none(), "the host is running");
        self.starts += 1;
        let name = format!("host-{}", self.starts);
        let mut command = Command::new(&self.binary);
        command
            .args(["run", "--manifest", self.manifest.to_str().unwrap(), "--data-dir", self.data_dir.to_str().unwrap()])
            .args(["--listen", &format!("127.0.0.1:{}", self.port)])
            .args(&self.args)
            .env("WASMSUB_ADMIN_TOKEN", ADMIN_TOKEN)
            .env("RUST_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        let process = Process::spawn(&name, &mut command, &self.log_dir);
        let deadline = Instant::now() + START_TIMEOUT;
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "{name} did not listen:\n{}", process.log_text());
            std::thread::sleep(Duration::from_millis(20));
        }
        self.process = Some(process);
    }

    /// How many times the host was started.
    pub fn starts(&self) -> usize {
        self.starts
    }

    /// SIGKILL: a crash.
    pub fn kill(&mut self) {
        if let Some(mut process) = self.process.take() {
            process.kill();
        }
    }

    /// SIGTERM and wait for the exit: a graceful stop. Returns its log.
    pub fn terminate(&mut self) -> String {
        let mut process = self.process.take().expect("the host is running");
        process.terminate();
        process.log_text()
    }

    /// SIGTERM without waiting: the host starts its stop.
    pub fn begin_stop(&self) {
        self.process.as_ref().expect("the host is running").signal_terminate();
    }

    /// Waits up to `limit` for a stop begun with [`Self::begin_stop`]; the
    /// exit status (`None`: still running after `limit`) and the log.
    pub fn wait_stopped(&mut self, limit: Duration) -> (Option<std::process::ExitStatus>, String) {
        let mut process = self.process.take().expect("the host is running");
        let status = process.wait_exit(limit);
        let log = process.log_text();
        if status.is_none() {
            self.process = Some(process);
        }
        (status, log)
    }

    /// `GET /readyz`: the status and body (`None`: no answer).
    pub async fn readiness(&self) -> Option<(u16, String)> {
        let response = self.http.get(self.url("/readyz")).send().await.ok()?;
        let status = response.status().as_u16();
        Some((status, response.text().await.unwrap_or_default()))
    }

    /// The running process's log.
    pub fn log_text(&self) -> String {
        self.process.as_ref().map(Process::log_text).unwrap_or_default()
    }

    /// The host's pid.
    pub fn pid(&self) -> u32 {
        self.process.as_ref().expect("the host is running").pid()
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// Publishes `event` (a CloudEvent) to `topic` through the publish API.
    pub async fn publish(&self, topic: &str, event: &Value) -> Published {
        let request = self
            .http
            .post(self.url(&format!("/v1.0/publish/pubsub/{topic}")))
            .header("content-type", "application/cloudevents+json")
            .body(event.to_string());
        match request.send().await {
            Ok(response) if response.status().is_success() => Published::Accepted,
            Ok(response) => Published::Refused(response.status().as_u16()),
            Err(_) => Published::NoAnswer,
        }
    }

    /// Publishes until the host accepts (it may be down or full meanwhile).
    pub async fn publish_until_accepted(&self, topic: &str, event: &Value, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            if self.publish(topic, event).await == Published::Accepted {
                return;
            }
            assert!(Instant::now() < deadline, "the host never accepted {event}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Whether `/readyz` answers 204.
    pub async fn ready(&self) -> bool {
        matches!(self.http.get(self.url("/readyz")).send().await, Ok(r) if r.status() == 204)
    }

    /// Waits until the host is ready.
    pub async fn wait_ready(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        while !self.ready().await {
            assert!(Instant::now() < deadline, "the host was not ready within {limit:?}:\n{}", self.log_text());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `GET /wasmsub/host`.
    pub async fn host_view(&self) -> Option<Value> {
        self.http.get(self.url("/wasmsub/host")).send().await.ok()?.json().await.ok()
    }

    /// Waits until the queue is empty: every accepted message delivered and
    /// settled. Fails only if the queue makes no progress for `stall` (a
    /// slow machine drains slowly, a stuck host not at all).
    pub async fn wait_drained(&self, stall: Duration) {
        let mut last = None;
        let mut since = Instant::now();
        loop {
            let view = self.host_view().await;
            if let Some(view) = &view
                && view["queue"]["messages"] == 0
                && view["deliveries_in_flight"] == 0
            {
                return;
            }
            let depth = view.as_ref().map(|v| v["queue"]["messages"].clone());
            if depth != last {
                (last, since) = (depth, Instant::now());
            }
            assert!(since.elapsed() < stall, "the queue made no progress for {stall:?}: {view:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Tenant `tenant`'s committed value of `key`, through the admin API.
    pub async fn state(&self, tenant: &str, key: &str) -> Option<String> {
        let url = self.url(&format!("/admin/tenants/{tenant}/state/{}", wasmsub::sidecar::path_segment(key)));
        let response = self.http.get(url).bearer_auth(ADMIN_TOKEN).send().await.expect("reading state");
        match response.status().as_u16() {
            200 => Some(response.text().await.unwrap()),
            404 => None,
            other => panic!("reading state {key}: HTTP {other}: {}", response.text().await.unwrap_or_default()),
        }
    }

    /// Every key's count (`count:{key}` of tenant `acme`), read 16 at a time.
    pub async fn counts(&self, keys: &[String]) -> Vec<Option<String>> {
        let mut counts = Vec::with_capacity(keys.len());
        for chunk in keys.chunks(16) {
            let count_keys: Vec<String> = chunk.iter().map(|key| format!("count:{key}")).collect();
            let reads = count_keys.iter().map(|key| self.state("acme", key));
            counts.extend(futures_util::future::join_all(reads).await);
        }
        counts
    }

    /// The resident memory of the host process, from /proc.
    pub fn resident_bytes(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    }
}

/// Asserts that every key was counted exactly once, naming the first few
/// that were not.
pub fn assert_each_once(keys: &[String], counts: &[Option<String>]) {
    let wrong: Vec<_> = keys.iter().zip(counts).filter(|(_, c)| c.as_deref() != Some("1")).take(10).collect();
    let missing = counts.iter().filter(|c| c.is_none()).count();
    let doubled = counts.iter().filter(|c| c.as_deref().is_some_and(|c| c != "1")).count();
    assert!(wrong.is_empty(), "{missing} of {} never took effect, {doubled} more than once; first few: {wrong:?}", keys.len());
}
