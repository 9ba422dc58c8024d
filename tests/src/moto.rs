//! AWS SNS and SQS for one test: a moto server (scripts/get-moto.sh) on a
//! free loopback port. Dapr's `pubsub.aws.snssqs` is pointed at it with its
//! `endpoint` metadata and makes real SNS/SQS API calls against it.
//!
//! The component gives each app id one SQS queue (named after the app id,
//! its consumer id) subscribed to every SNS topic the app reads, so
//! "drained" means that queue is empty: no message waiting, none received
//! and not yet deleted, none delayed. From then on nothing can be
//! redelivered and a count read afterwards is final.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::process::{Process, free_port, wait_for_http};

/// The `moto_server` executable: `$MOTO_SERVER` (scripts/test.sh sets it),
/// else whatever scripts/get-moto.sh finds or installs.
pub fn moto_server() -> PathBuf {
    static MOTO: OnceLock<PathBuf> = OnceLock::new();
    MOTO.get_or_init(|| crate::process::script_output("MOTO_SERVER", "scripts/get-moto.sh")).clone()
}

/// The region the components and these checks use (moto keeps one set of
/// queues per region).
pub const REGION: &str = "us-east-1";

/// A moto server.
pub struct Moto {
    pub port: u16,
    process: Process,
}

impl Moto {
    pub fn start(dir: &Path) -> Self {
        let port = free_port();
        let process = Process::spawn("moto", Command::new(moto_server()).args(["-H", "127.0.0.1", "-p", &port.to_string()]), dir);
        wait_for_http(port, "/moto-api/", &process);
        Self { port, process }
    }

    /// What the component's `endpoint` metadata is set to.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Waits until `queue` (an app id's queue) exists and is empty. Fails
    /// only if its backlog does not move for `stall`.
    pub fn wait_drained(&self, queue: &str, stall: Duration) {
        let (mut last, mut since) = (None, Instant::now());
        loop {
            let backlog = self.queue_backlog(queue);
            if backlog == Some([0, 0, 0]) {
                return;
            }
            if backlog != last {
                (last, since) = (backlog, Instant::now());
            }
            assert!(
                since.elapsed() < stall,
                "queue {queue} not drained: [waiting, received and not deleted, delayed] = {backlog:?}, unchanged for {stall:?}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// `[visible, not visible, delayed]` message counts of `queue`, or
    /// `None` while it does not exist.
    pub fn queue_backlog(&self, queue: &str) -> Option<[u64; 3]> {
        let url = self.sqs("GetQueueUrl", json!({"QueueName": queue}))["QueueUrl"].as_str()?.to_owned();
        let attributes = self.sqs("GetQueueAttributes", json!({"QueueUrl": url, "AttributeNames": ["All"]}));
        let count = |name: &str| attributes["Attributes"][name].as_str()?.parse().ok();
        Some([
            count("ApproximateNumberOfMessages")?,
            count("ApproximateNumberOfMessagesNotVisible")?,
            count("ApproximateNumberOfMessagesDelayed")?,
        ])
    }

    /// One SQS call in the JSON protocol. moto checks no signature, but
    /// tells the service and region from the credential scope.
    fn sqs(&self, action: &str, body: Value) -> Value {
        let output = Command::new("curl")
            .args(["-s", "--max-time", "10", "-X", "POST", &format!("{}/", self.endpoint())])
            .args(["-H", &format!("Authorization: AWS4-HMAC-SHA256 Credential=test/20260101/{REGION}/sqs/aws4_request, SignedHeaders=host, Signature=0")])
            .args(["-H", "Content-Type: application/x-amz-json-1.0", "-H", &format!("X-Amz-Target: AmazonSQS.{action}")])
            .args(["-d", &body.to_string()])
            .output()
            .expect("running curl");
        serde_json::from_slice(&output.stdout).unwrap_or(Value::Null)
    }

    pub fn log_text(&self) -> String {
        self.process.log_text()
    }
}
