//! A real Apache Kafka broker for one test: one JVM in KRaft mode (broker and
//! controller together, no ZooKeeper), on free loopback ports, its log
//! directory in the test's scratch space. Jars from scripts/get-kafka.sh.
//!
//! "Drained" on Kafka means the consumer group has committed, on every
//! partition of the topics it reads, the partition's end offset: a
//! rebalance or a restart resumes from the committed offset, so from then on
//! nothing can be redelivered and a count read afterwards is final.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::process::{Process, START_TIMEOUT, free_port, repo_root};

/// Partitions of each topic ([`Kafka::create_topics`], and any the broker
/// creates on first use). Several, so that two replicas of one consumer
/// group each own some and a rebalance has something to move.
pub const PARTITIONS: u32 = 4;

/// The directory of Kafka's jars: `$KAFKA_LIB` (scripts/test.sh sets it),
/// else whatever scripts/get-kafka.sh finds or installs.
pub fn kafka_lib() -> PathBuf {
    static LIB: OnceLock<PathBuf> = OnceLock::new();
    LIB.get_or_init(|| crate::process::script_output("KAFKA_LIB", "scripts/get-kafka.sh")).clone()
}

/// A single-node Kafka broker.
pub struct Kafka {
    /// The PLAINTEXT listener clients (daprd) connect to.
    pub port: u16,
    process: Process,
}

impl Kafka {
    /// Formats a fresh log directory under `dir` and starts the broker;
    /// returns once it logs that it has started.
    pub fn start(dir: &Path) -> Self {
        let (port, controller_port) = (free_port(), free_port());
        let data = dir.join("kafka-data");
        let config = dir.join("kafka-server.properties");
        std::fs::write(&config, server_properties(port, controller_port, &data)).unwrap();
        let cluster_id = java_tool(&["kafka.tools.StorageTool", "random-uuid"]);
        // --standalone: this node is the one voter of the controller quorum.
        java_tool(&["kafka.tools.StorageTool", "format", "-t", cluster_id.trim(), "-c", config.to_str().unwrap(), "--standalone"]);
        let process = Process::spawn(
            "kafka",
            Command::new("java").args(["-Xmx512m", "-cp", &classpath(), "kafka.Kafka", config.to_str().unwrap()]),
            dir,
        );
        let kafka = Self { port, process };
        kafka.wait_started();
        kafka
    }

    /// `host:port` for a client's bootstrap list.
    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Creates `topics` ([`PARTITIONS`] partitions each) and waits until
    /// every partition has a leader, as a deployment would before anyone
    /// publishes. Relying on auto-creation instead races the first publish
    /// against the new partitions' leader election: on a busy machine the
    /// producer's retries run out and daprd answers the publish with 500
    /// ("not the leader for some partition").
    pub fn create_topics(&self, topics: &[&str]) {
        let partitions = PARTITIONS.to_string();
        // One JVM per topic, all at once (the tool creates one topic a run).
        let children: Vec<_> = topics
            .iter()
            .map(|topic| {
                let args = ["org.apache.kafka.tools.TopicCommand", "--bootstrap-server", &self.bootstrap(), "--create", "--if-not-exists"];
                tool_command(&[&args[..], &["--topic", topic, "--partitions", &partitions, "--replication-factor", "1"]].concat())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .expect("running java")
            })
            .collect();
        for (topic, child) in topics.iter().zip(children) {
            let output = child.wait_with_output().unwrap();
            assert!(output.status.success(), "creating topic {topic}:\n{}", String::from_utf8_lossy(&output.stderr));
        }
        // Listing a partition's offsets needs its leader.
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let ends = self.end_offsets();
            let led = |topic: &&str| ends.keys().filter(|p| p.rsplit_once(':').is_some_and(|(t, _)| t == *topic)).count() == PARTITIONS as usize;
            if topics.iter().all(led) {
                return;
            }
            assert!(Instant::now() < deadline, "topics {topics:?} have partitions without a leader: {ends:?}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Waits for "Kafka Server started" in the broker's log; fails with the
    /// log once it has written nothing new for [`START_TIMEOUT`].
    fn wait_started(&self) {
        let (mut last_len, mut since) = (0, Instant::now());
        loop {
            let log = self.process.log_text();
            if log.contains("Kafka Server started") {
                return;
            }
            if log.len() != last_len {
                (last_len, since) = (log.len(), Instant::now());
            }
            assert!(since.elapsed() < START_TIMEOUT, "Kafka did not start:\n{log}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Waits until consumer group `group` has committed the end offset of
    /// every partition of each of `topics`. Fails only if the backlog does
    /// not move for `stall`.
    pub fn wait_drained(&self, topics: &[&str], group: &str, stall: Duration) {
        let (mut last, mut since) = (None, Instant::now());
        loop {
            let behind = self.partitions_behind(topics, group);
            if behind.is_empty() {
                return;
            }
            if last.as_ref() != Some(&behind) {
                (last, since) = (Some(behind.clone()), Instant::now());
            }
            assert!(since.elapsed() < stall, "group {group} has not caught up on {behind:?} (committed, end), unchanged for {stall:?}");
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// Every partition of `topics` whose end offset `group` has not
    /// committed, with (committed, end). A partition never written to is
    /// caught up with nothing committed; a topic that does not exist yet
    /// (its first publish has not landed) is not.
    fn partitions_behind(&self, topics: &[&str], group: &str) -> BTreeMap<String, (Option<u64>, u64)> {
        let ends = self.end_offsets();
        let committed = self.committed_offsets(group);
        let topic_of = |partition: &str| partition.rsplit_once(':').map_or("", |(t, _)| t).to_owned();
        let mut behind = BTreeMap::new();
        for (partition, end) in &ends {
            let done = committed.get(partition).copied();
            if topics.contains(&topic_of(partition).as_str()) && *end > 0 && done != Some(*end) {
                behind.insert(partition.clone(), (done, *end));
            }
        }
        for topic in topics {
            if !ends.keys().any(|p| topic_of(p) == *topic) {
                behind.insert(format!("{topic}:?"), (None, 0));
            }
        }
        behind
    }

    /// `topic:partition` → the offset the next record will get.
    fn end_offsets(&self) -> BTreeMap<String, u64> {
        let out = java_tool(&["org.apache.kafka.tools.GetOffsetShell", "--bootstrap-server", &self.bootstrap(), "--exclude-internal-topics"]);
        out.lines()
            .filter_map(|line| {
                let (partition, offset) = line.trim().rsplit_once(':')?;
                Some((partition.to_owned(), offset.parse().ok()?))
            })
            .collect()
    }

    /// `topic:partition` → the offset `group` has committed (absent when
    /// it has committed none there, or the group does not exist yet).
    fn committed_offsets(&self, group: &str) -> BTreeMap<String, u64> {
        let out = java_tool_lenient(&[
            "org.apache.kafka.tools.consumer.group.ConsumerGroupCommand",
            "--bootstrap-server",
            &self.bootstrap(),
            "--describe",
            "--offsets",
            "--group",
            group,
        ]);
        // GROUP TOPIC PARTITION CURRENT-OFFSET LOG-END-OFFSET LAG CONSUMER-ID HOST CLIENT-ID
        out.lines()
            .filter_map(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                if fields.len() < 5 || fields[0] != group {
                    return None;
                }
                Some((format!("{}:{}", fields[1], fields[2]), fields[3].parse().ok()?))
            })
            .collect()
    }

    pub fn log_text(&self) -> String {
        self.process.log_text()
    }
}

/// KRaft single node: broker and controller in one process, a PLAINTEXT
/// listener for clients and a CONTROLLER listener for the quorum of one.
/// Replication factors of 1 for the internal topics (there is one broker),
/// and no delay before a consumer group's first rebalance, so a subscriber
/// gets its partitions at once.
fn server_properties(port: u16, controller_port: u16, data: &Path) -> String {
    format!(
        "process.roles=broker,controller\n\
         node.id=1\n\
         listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}\n\
         advertised.listeners=PLAINTEXT://127.0.0.1:{port}\n\
         controller.listener.names=CONTROLLER\n\
         listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT\n\
         inter.broker.listener.name=PLAINTEXT\n\
         controller.quorum.bootstrap.servers=127.0.0.1:{controller_port}\n\
         log.dirs={}\n\
         num.partitions={PARTITIONS}\n\
         auto.create.topics.enable=true\n\
         offsets.topic.replication.factor=1\n\
         offsets.topic.num.partitions=1\n\
         transaction.state.log.replication.factor=1\n\
         transaction.state.log.min.isr=1\n\
         share.coordinator.state.topic.replication.factor=1\n\
         share.coordinator.state.topic.min.isr=1\n\
         group.initial.rebalance.delay.ms=0\n",
        data.display()
    )
}

fn classpath() -> String {
    format!("{}/*", kafka_lib().display())
}

/// Runs one of Kafka's command-line tools to completion and returns its
/// stdout; fails the test with its output if it fails.
fn java_tool(args: &[&str]) -> String {
    let output = tool_command(args).output().expect("running java");
    assert!(output.status.success(), "{args:?} failed:\n{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout).unwrap()
}

/// As [`java_tool`], but a failure is an empty answer (a consumer group
/// that does not exist yet makes ConsumerGroupCommand fail).
fn java_tool_lenient(args: &[&str]) -> String {
    let output = tool_command(args).output().expect("running java");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn tool_command(args: &[&str]) -> Command {
    let mut command = Command::new("java");
    // Small heap, fast start: these tools run for a second.
    command
        .args(["-Xmx128m", "-XX:TieredStopAtLevel=1", "-Xshare:auto", "-Dorg.slf4j.simpleLogger.defaultLogLevel=warn", "-cp", &classpath()])
        .args(args)
        .current_dir(repo_root())
        .stdin(Stdio::null());
    command
}
