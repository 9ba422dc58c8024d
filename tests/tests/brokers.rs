//! The host's guarantees on each broker the background document names,
//! through a real daprd: Redis Streams, Apache Kafka (a real broker, KRaft)
//! and AWS SNS/SQS (moto), each with the repository's component YAMLs
//! (components/, components/kafka/, components/snssqs/). The test bodies are
//! shared; only the broker changes. Every published event is counted: each
//! has exactly one effect, none is lost, and the counts are read only once
//! the broker has nothing left to redeliver.
//!
//! - `guarantees_on_*`: the todo flow, a duplicate, retry then success, a
//!   poison event dead-lettered with its reason, the host SIGKILLed
//!   mid-handler (the restarted host answers RETRY while the dead run's
//!   claim holds, and the broker redelivers until it runs), 20 hot swaps
//!   under a steady stream.
//! - `replicas_*`: two replicas of one app id share the consumer group and
//!   one dies mid-stream; on Kafka the second replica first joins
//!   mid-stream (a partition rebalance while events flow).
//! - `sqs_visibility_timeout_shorter_than_a_slow_handler`: SQS hands out a
//!   second copy while the first is still running; the claim turns it away.
//!
//! One loss is Dapr's, not the host's, and is accounted for as in
//! dapr_chaos.rs: daprd 1.18.2 can acknowledge a delivery whose host was
//! SIGKILLed mid-request (it logs "skipping status check due to empty
//! response body"). An event missing at the end must be one of those, never
//! settled by a host.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use wasmsub::store::DedupeKey;
use wasmsub_tests::brokers::{Broker, BrokerKind};
use wasmsub_tests::dapr::{
    DaprClient, Daprd, Process, Scratch, acked_by_dapr_without_an_answer, bulk_counts, free_port, handler_counts, manifest, settled_by_a_host,
    start_host_with, wait_until_subscribed,
};
use wasmsub_tests::{cloud_event, guests};

/// The wasmsub binary under test (host/src/main.rs, built by this crate).
const HOST: &str = env!("CARGO_BIN_EXE_wasmsub-under-test");
const ADMIN_TOKEN: &str = "t0ken";
/// How long an event may take to show its effect before a test fails (not
/// a speed bound: a crashed delivery waits for a lease and a redelivery).
const LIMIT: Duration = Duration::from_secs(120);
/// How long a broker's backlog may stay unchanged before a test fails.
const STALL: Duration = Duration::from_secs(120);

// ---------------------------------------------------------------------------
// The guarantees, one stack per broker.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guarantees_on_redis_streams() {
    guarantees_on(BrokerKind::Redis).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guarantees_on_kafka() {
    guarantees_on(BrokerKind::Kafka).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guarantees_on_sns_sqs() {
    guarantees_on(BrokerKind::SnsSqs).await;
}

const APP: &str = "todo";
/// The lease of tenant `crashy`'s `slow` handler: wall_time x 1 attempt +
/// the 1 s lease_margin of [`manifest`].
const CRASHY_LEASE: Duration = Duration::from_secs(21);
/// Every topic the guarantees manifest reads.
const TOPICS: [&str; 7] = ["task-created", "task-audit", "orders", "reminders", "archive", "archive-dead-letter", "slow"];

/// Tenant `acme`: the todo app (task-created publishes to task-audit, read
/// by a recorder), `orders` (a recorder, hot-swapped), `flaky` (succeeds on
/// the attempt the event asks for), `poison` (dead-lettered) and a recorder
/// of its dead letters. Tenant `crashy`: `slow`, one attempt with a 21 s
/// lease (wall_time 20 s + 1 s margin), so a host restarted after a crash is
/// up long before the dead run's claim expires and answers RETRY meanwhile.
fn guarantees_manifest() -> String {
    let acme = manifest(r#"publish_topics = ["task-audit"]"#, &[
        ("task-created", guests::TASK_CREATED, "task-created", ""),
        ("audit", guests::RECORDER, "task-audit", ""),
        ("orders", guests::RECORDER, "orders", ""),
        ("flaky", guests::FLAKY, "reminders", ""),
        ("poison", guests::POISON, "archive", ""),
        ("dlq", guests::RECORDER, "archive-dead-letter", ""),
    ]);
    format!(
        "{acme}\n[[tenant]]\nname = \"crashy\"\nlimits = {{ cpu_time = \"1s\", wall_time = \"20s\" }}\n\
         [[tenant.handler]]\nname = \"slow\"\ncomponent = {:?}\ntopic = \"slow\"\nretry = {{ max_attempts = 1 }}\n",
        guests::RECORDER
    )
}

async fn guarantees_on(kind: BrokerKind) {
    let started = Instant::now();
    let scratch = Scratch::new();
    let dir = scratch.path();
    let broker = Broker::start(kind, dir);
    broker.create_topics(&TOPICS);
    let components = broker.components(dir);
    let app_port = free_port();
    // Debug: daprd names the deliveries it acknowledged without an answer.
    let daprd = Daprd::start_logging("daprd-1", APP, app_port, free_port(), free_port(), &components, dir, "debug");
    let manifest = scratch.manifest(&guarantees_manifest());
    // One data directory for both host lives: the restart reuses the
    // compiled components and is up within seconds.
    let data = dir.join("host-data");
    let env = [("WASMSUB_ADMIN_TOKEN", ADMIN_TOKEN), ("WASMSUB_DATA_DIR", data.to_str().unwrap())];
    let mut first = start_host_with(HOST, "host-1", &manifest, &daprd, dir, &env);
    let client = DaprClient::new(&daprd);
    wait_until_subscribed(&client, "orders").await;

    // The host SIGKILLed mid-handler, first: the dead run's lease runs out
    // while the rest of the scenario goes on.
    let published = Instant::now();
    client.publish("slow", &cloud_event("slow-1", json!({"spin_ms": 800}))).await;
    let claim = wasmsub::store::keys::dapr_claim_key(&DedupeKey { tenant: "crashy".into(), handler: "slow".into(), event_id: "slow-1".into() }.encoded());
    let claim_url = format!("{}/v1.0/state/statestore/{}", daprd.url(), wasmsub::sidecar::path_segment(&claim));
    let deadline = Instant::now() + LIMIT;
    while reqwest::get(&claim_url).await.unwrap().status() != 200 {
        assert!(Instant::now() < deadline, "slow-1 never reached its handler");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    first.kill();
    assert_eq!(client.tenant_state("crashy", "count:slow-1").await, None, "killed before it committed");
    let host = start_host_with(HOST, "host-2", &manifest, &daprd, dir, &env);
    // The dead run's claim holds until at least `published` + its lease;
    // every broker here redelivers within 5 s (SQS's test visibility
    // timeout), so a host up this early must see a copy while it holds.
    let restarted_within_lease = published.elapsed() + Duration::from_secs(8) < CRASHY_LEASE;

    // The todo flow: the handler's state, and its audit publish delivered
    // to the audit handler.
    client.publish("task-created", &cloud_event("task-7", json!({"id": 7, "title": "ship it"}))).await;
    let task = client.wait_for_state("acme", "task:7", LIMIT, |v| v.is_some()).await.unwrap();
    assert_eq!(serde_json::from_str::<Value>(&task).unwrap(), json!({"id": 7, "title": "ship it"}));
    let task_key = DedupeKey { tenant: "acme".into(), handler: "task-created".into(), event_id: "task-7".into() };
    let audit_id = wasmsub::pipeline::outgoing_id(&task_key.encoded(), 0);
    let audit = client.wait_for_state("acme", &format!("event:{audit_id}"), LIMIT, |v| v.is_some()).await.unwrap();
    let audit: Value = serde_json::from_str(&audit).unwrap();
    assert_eq!((audit["topic"].as_str(), audit["id"].as_str()), (Some("task-audit"), Some(audit_id.as_str())), "{audit}");

    // The same CloudEvent id twice: one effect.
    let order = cloud_event("order-1", json!({}));
    client.publish("orders", &order).await;
    client.publish("orders", &order).await;
    let deadline = Instant::now() + LIMIT;
    while handler_counts(app_port, "orders").await["duplicates"].as_u64() < Some(1) {
        assert!(Instant::now() < deadline, "the duplicate was never delivered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Retried in the host, then processed on its third attempt.
    client.publish("reminders", &cloud_event("reminder-1", json!({"succeed_on_attempt": 3}))).await;
    // Dead-lettered by the host; a subscriber of the dead-letter topic
    // receives it with its reason.
    client.publish("archive", &cloud_event("archive-1", json!({}))).await;

    // 20 hot swaps under a steady stream.
    let swaps = twenty_hot_swaps(&client, app_port).await;

    let flaky = client.wait_for_state("acme", "flaky:reminder-1", LIMIT, |v| v.is_some()).await;
    assert_eq!(flaky.as_deref(), Some("3"));
    let dead = client.wait_for_state("acme", "event:archive-1", LIMIT, |v| v.is_some()).await.unwrap();
    let dead: Value = serde_json::from_str(&dead).unwrap();
    assert_eq!(dead["topic"], "archive-dead-letter");
    assert_eq!(dead["extensions"]["wasmsubreason"], "poison: event archive-1 can never be handled");
    assert_eq!(dead["extensions"]["wasmsubattempts"], "3");

    // The killed run's event: redelivered after the restarted host's RETRY
    // answers, run once its claim expired.
    let slow_done = wait_for_effect_or_dapr_loss(&client, dir, "crashy", "count:slow-1", "slow-1", "slow").await;
    let turned_away = lines_about(&host, "slow-1").filter(|l| l.contains("another delivery holds this event")).count();
    if slow_done && restarted_within_lease {
        assert!(turned_away > 0, "host-2 never answered RETRY for slow-1 while the dead run's claim held");
    } else if slow_done {
        eprintln!("host-2 started too late to see slow-1 while its claim held (a busy machine): RETRY answers {turned_away}");
    }

    // Nothing left to redeliver; then every count is final.
    broker.wait_drained(&TOPICS, APP, STALL);
    let mut once: Vec<(String, String)> = vec![
        ("acme".into(), format!("count:{audit_id}")),
        ("acme".into(), "count:order-1".into()),
        ("acme".into(), "count:archive-1".into()),
    ];
    if slow_done {
        once.push(("crashy".into(), "count:slow-1".into()));
    }
    for (tenant, key) in &once {
        assert_eq!(client.tenant_state(tenant, key).await.as_deref(), Some("1"), "{tenant}/{key}");
    }
    assert_eq!(client.tenant_state("acme", "flaky:reminder-1").await.as_deref(), Some("3"));
    let keys: Vec<String> = swaps.published_after.iter().map(|(id, _)| format!("count:{id}")).collect();
    assert_each_counted_once(&daprd, &keys).await;
    assert_each_processed_once_by_one_version(&host, &swaps);
    eprintln!("{kind:?}: guarantees held in {:?}", started.elapsed());
}

/// Twenty hot swaps under a steady stream: deploys 20 versions of `orders`
/// through the admin API, 15 events published after each.
struct Swaps {
    /// Each deployed version (its first 12 characters), in deploy order.
    versions: Vec<String>,
    /// Each event's id, and the index in `versions` of the version serving
    /// when it was published.
    published_after: Vec<(String, usize)>,
}

async fn twenty_hot_swaps(client: &DaprClient, app_port: u16) -> Swaps {
    const PER_VERSION: usize = 15;
    let http = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{app_port}/admin/tenants/acme/handlers/orders/component");
    let (mut versions, mut published_after) = (Vec::new(), Vec::new());
    for n in 1..=20 {
        let response = http.put(&url).bearer_auth(ADMIN_TOKEN).body(wasmsub_tests::component_variant(guests::RECORDER, n)).send().await.unwrap();
        assert_eq!(response.status(), 200);
        versions.push(response.json::<Value>().await.unwrap()["to"].as_str().unwrap()[..12].to_owned());
        for j in 0..PER_VERSION {
            let id = format!("s-{n}-{j}");
            client.publish("orders", &cloud_event(&id, json!({"key": id}))).await;
            published_after.push((id, n - 1));
        }
    }
    Swaps { versions, published_after }
}

/// Each event was processed exactly once (the host's decision lines name
/// the version), on the version serving when it was published or a later
/// one: deploys land while earlier events are in flight.
fn assert_each_processed_once_by_one_version(host: &Process, swaps: &Swaps) {
    let log = host.log_text();
    for (id, serving) in &swaps.published_after {
        let marker = format!("messaging.message.id={id} ");
        let lines: Vec<&str> = log.lines().filter(|l| l.contains(&marker) && l.contains("event processed")).collect();
        assert_eq!(lines.len(), 1, "{id} processed {} times", lines.len());
        let version = lines[0].split("handler.version=").nth(1).unwrap().split(['}', ' ', '\u{1b}']).next().unwrap();
        let ran_on = swaps.versions.iter().position(|v| v == version).unwrap_or_else(|| panic!("{id} ran on unknown version {version}"));
        assert!(ran_on >= *serving, "{id} ran on version {ran_on}, older than the one serving when it was published ({serving})");
    }
}

// ---------------------------------------------------------------------------
// Two replicas sharing the consumer group, one killed mid-stream.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_on_kafka_rebalance_when_one_joins_and_when_one_dies_mid_stream() {
    replicas_on(BrokerKind::Kafka, Join::MidStream).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_on_sns_sqs_share_the_queue_and_one_dies_mid_stream() {
    replicas_on(BrokerKind::SnsSqs, Join::AtStart).await;
}

/// When the second replica starts.
#[derive(PartialEq)]
enum Join {
    AtStart,
    /// After a share of the events was processed by the first alone: on
    /// Kafka a rebalance hands it some of the partitions while events flow.
    MidStream,
}

/// A replica: a daprd and a host of the same app id.
struct Replica {
    host: Process,
    daprd: Daprd,
}

impl Replica {
    fn start(name: &str, app_id: &str, manifest: &Path, components: &Path, dir: &Path) -> Self {
        // Debug: daprd names the deliveries it acknowledged without an answer.
        let daprd = Daprd::start_logging(&format!("daprd-{name}"), app_id, free_port(), free_port(), free_port(), components, dir, "debug");
        let host = start_host_with(HOST, &format!("host-{name}"), manifest, &daprd, dir, &[]);
        Self { host, daprd }
    }

    fn processed(&self) -> usize {
        self.host.log_text().matches("event processed").count()
    }
}

async fn replicas_on(kind: BrokerKind, join: Join) {
    const APP_ID: &str = "scaled";
    const EVENTS: usize = 800;
    let started = Instant::now();
    let scratch = Scratch::new();
    let dir = scratch.path().to_owned();
    let broker = Broker::start(kind, &dir);
    broker.create_topics(&["orders"]);
    let components = broker.components(&dir);
    let manifest = scratch.manifest(&manifest("max_concurrency = 8", &[("orders", guests::RECORDER, "orders", "")]));
    let a = Replica::start("a", APP_ID, &manifest, &components, &dir);
    let mut b = (join == Join::AtStart).then(|| Replica::start("b", APP_ID, &manifest, &components, &dir));
    wait_until_subscribed(&DaprClient::new(&a.daprd), "orders").await;

    let keys: Vec<String> = (0..EVENTS).map(|i| format!("e-{i}")).collect();
    let count_keys: Vec<String> = keys.iter().map(|k| format!("count:{k}")).collect();
    // A steady stream (at most about 65 events a second, so it is still
    // flowing when B has joined and worked a while) through replica A's
    // sidecar, which stays up: every publish gets its answer.
    let publisher = {
        let (client, keys) = (DaprClient::new(&a.daprd), keys.clone());
        tokio::spawn(async move {
            for (i, key) in keys.iter().enumerate() {
                client.publish("orders", &cloud_event(key, json!({"key": key, "spin_ms": 5}))).await;
                if i % 10 == 9 {
                    tokio::time::sleep(Duration::from_millis(150)).await;
                }
            }
        })
    };
    if join == Join::MidStream {
        wait_until_done(&a.daprd, &count_keys, EVENTS / 5).await;
        b = Some(Replica::start("b", APP_ID, &manifest, &components, &dir));
    }
    let mut b = b.unwrap();
    // B takes a share of the stream before it dies, or the test proves
    // nothing (on Kafka: the rebalance gave it partitions).
    let deadline = Instant::now() + LIMIT;
    while b.processed() < 25 {
        assert!(Instant::now() < deadline, "replica B processed {} events: the group did not share the work", b.processed());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let done_at_kill = wait_until_done(&a.daprd, &count_keys, EVENTS / 4).await;
    // B's pod dies: the host and its sidecar, with no warning.
    b.host.kill();
    b.daprd.kill();
    assert!(done_at_kill < EVENTS, "every event was done before replica B died: the test proves nothing");
    publisher.await.unwrap();

    let lost = wait_until_each_counted(&a.daprd, &dir, &keys, "orders").await;
    broker.wait_drained(&["orders"], APP_ID, STALL);
    let counts = bulk_counts(&a.daprd, &count_keys).await;
    let wrong: Vec<String> = keys
        .iter()
        .zip(&counts)
        .filter(|(k, c)| c.as_deref() != Some("1") && !(c.is_none() && lost.contains(*k)))
        .map(|(k, c)| format!("{k}={c:?}"))
        .collect();
    assert!(wrong.is_empty(), "effects not exactly once: {wrong:?}");
    eprintln!(
        "{kind:?}: {EVENTS} events by two replicas in {:?}; processed by A {}, by B {} before it died at {done_at_kill} done; \
         acknowledged by daprd without an answer (lost by Dapr, not the host): {lost:?}",
        started.elapsed(),
        a.processed(),
        b.processed()
    );
}

// ---------------------------------------------------------------------------
// SQS: a visibility timeout shorter than a handler.

/// The visibility timeout is 1 s and each handler runs 3 s: SQS hands a
/// second copy out while the first is still running (possibly several).
/// The host's claim turns each copy away ("another delivery holds this
/// event", RETRY, so the copy stays in the queue), the first run commits,
/// and the next copy is skipped as a duplicate and deleted: one effect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqs_visibility_timeout_shorter_than_a_slow_handler() {
    const APP_ID: &str = "patient";
    let scratch = Scratch::new();
    let dir = scratch.path();
    let broker = Broker::start(BrokerKind::SnsSqs, dir);
    let components = broker.components_with(dir, &[("messageVisibilityTimeout", "1")]);
    let daprd = Daprd::start_logging("daprd-1", APP_ID, free_port(), free_port(), free_port(), &components, dir, "info");
    let manifest = scratch.manifest(&manifest(r#"cpu_time = "10s", wall_time = "10s""#, &[("orders", guests::RECORDER, "orders", "")]));
    let host = start_host_with(HOST, "host-1", &manifest, &daprd, dir, &[]);
    let client = DaprClient::new(&daprd);
    wait_until_subscribed(&client, "orders").await;

    let ids = ["slow-a", "slow-b"];
    for id in ids {
        client.publish("orders", &cloud_event(id, json!({"spin_ms": 3000}))).await;
    }
    for id in ids {
        client.wait_for_state("acme", &format!("count:{id}"), LIMIT, |v| v.is_some()).await;
    }
    broker.wait_drained(&["orders"], APP_ID, STALL);
    for id in ids {
        assert_eq!(client.tenant_state("acme", &format!("count:{id}")).await.as_deref(), Some("1"), "{id}");
        let lines: Vec<String> = lines_about(&host, id).collect();
        let processed = lines.iter().filter(|l| l.contains("event processed")).count();
        let turned_away = lines.iter().filter(|l| l.contains("another delivery holds this event")).count();
        assert_eq!(processed, 1, "{id}: {lines:#?}");
        assert!(turned_away > 0, "{id}: no copy arrived while it ran, so the test proves nothing: {lines:#?}");
        eprintln!("{id}: processed once, {turned_away} concurrent copies turned away");
    }
}

// ---------------------------------------------------------------------------
// Shared checks.

/// The host's log lines about event `id`.
fn lines_about(host: &Process, id: &str) -> impl Iterator<Item = String> {
    let marker = format!("messaging.message.id={id} ");
    host.log_text().lines().filter(|l| l.contains(&marker)).map(str::to_owned).collect::<Vec<_>>().into_iter()
}

/// Waits until at least `count` of `keys` have an effect; returns how many.
async fn wait_until_done(daprd: &Daprd, keys: &[String], count: usize) -> usize {
    let deadline = Instant::now() + LIMIT;
    loop {
        let done = bulk_counts(daprd, keys).await.iter().filter(|c| c.is_some()).count();
        if done >= count {
            return done;
        }
        assert!(Instant::now() < deadline, "only {done} of {} events took effect", keys.len());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until every one of `keys` has taken effect, except events that a
/// sidecar acknowledged without an answer from a killed host and that no
/// host settled (Dapr's loss); returns those. Fails when the set of events
/// without an effect stops shrinking for [`STALL`] and any of them is not
/// such a loss.
async fn wait_until_each_counted(daprd: &Daprd, dir: &Path, keys: &[String], handler: &str) -> Vec<String> {
    let count_keys: Vec<String> = keys.iter().map(|k| format!("count:{k}")).collect();
    let (mut last, mut since) = (usize::MAX, Instant::now());
    loop {
        let counts = bulk_counts(daprd, &count_keys).await;
        let missing: Vec<&String> = keys.iter().zip(&counts).filter(|(_, c)| c.is_none()).map(|(k, _)| k).collect();
        let acked = acked_by_dapr_without_an_answer(dir);
        let unexplained: Vec<&&String> = missing.iter().filter(|k| !acked.contains(k.as_str()) || settled_by_a_host(dir, k, handler)).collect();
        if unexplained.is_empty() {
            return missing.into_iter().cloned().collect();
        }
        if missing.len() != last {
            (last, since) = (missing.len(), Instant::now());
        }
        assert!(since.elapsed() < STALL, "{} events never took effect: {unexplained:?}", unexplained.len());
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// As [`wait_until_each_counted`] for one event of `tenant`: true once its
/// effect is there, false if Dapr lost it (acknowledged without an answer,
/// settled by no host).
async fn wait_for_effect_or_dapr_loss(client: &DaprClient, dir: &Path, tenant: &str, key: &str, id: &str, handler: &str) -> bool {
    let deadline = Instant::now() + LIMIT;
    loop {
        if client.tenant_state(tenant, key).await.is_some() {
            return true;
        }
        if Instant::now() >= deadline {
            let lost_by_dapr = acked_by_dapr_without_an_answer(dir).contains(id) && !settled_by_a_host(dir, id, handler);
            assert!(lost_by_dapr, "{id} never took effect, and no sidecar acknowledged it without an answer: the host lost it");
            eprintln!("{id} was acknowledged by daprd without an answer from the killed host (Dapr's loss, see dapr_chaos.rs)");
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every key's count is exactly 1 (read through Dapr's bulk state API).
async fn assert_each_counted_once(daprd: &Daprd, keys: &[String]) {
    let counts = bulk_counts(daprd, keys).await;
    let wrong: Vec<_> = keys.iter().zip(&counts).filter(|(_, c)| c.as_deref() != Some("1")).collect();
    assert!(wrong.is_empty(), "effects not exactly once: {wrong:?}");
}
