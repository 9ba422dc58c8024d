//! The delivery store's contract, checked on both implementations, and the
//! pipeline's behaviour when the store fails (a full disk): the event is
//! deferred, never lost, and processed once when the store recovers.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use serde_json::json;
use wasmsub::clock::ManualClock;
use wasmsub::store::{
    Claim, ClaimToken, Commit, Completion, DedupeKey, DeliveryStore, DoneKind, EmbeddedOptions, EmbeddedStore, MemoryStore, MessageQueue,
    OutboundMessage, OutboxId, StateRead, StoreError,
};
use wasmsub::{Host, HostOptions, Manifest, Outcome};
use wasmsub_tests::{HandlerSpec, cloud_event, guests, manifest_text};

fn key(event_id: &str) -> DedupeKey {
    DedupeKey { tenant: "acme".into(), handler: "h".into(), event_id: event_id.into() }
}

fn acquired(claim: Claim) -> ClaimToken {
    match claim {
        Claim::Acquired(token) => token,
        other => panic!("expected to acquire, got {other:?}"),
    }
}

fn message(topic: &str) -> OutboundMessage {
    OutboundMessage { pubsub: "pubsub".into(), topic: topic.into(), event: json!({"id": topic}).as_object().unwrap().clone().into(), origin: None }
}

fn commit<'a>(claim: &'a ClaimToken, tenant: &'a str, writes: &'a [(String, Option<Vec<u8>>)], outbox: &'a [OutboundMessage]) -> Commit<'a> {
    Commit { claim, completion: Completion::Processed, tenant, state_writes: writes, outbox, dead_letter: None, reads: &[], ttl: Duration::from_secs(60) }
}

/// The store's contract; `clock` is the store's own, advanced instead of
/// sleeping past leases and expiries.
async fn check_contract(store: &dyn DeliveryStore, clock: &ManualClock) {
    let lease = Duration::from_secs(30);
    // A claim is exclusive until it is finished; then the event is done.
    let token = acquired(store.claim(&key("e1"), lease).await.unwrap());
    assert!(matches!(store.claim(&key("e1"), lease).await.unwrap(), Claim::HeldElsewhere { .. }));
    let writes = vec![("k".to_string(), Some(b"v".to_vec()))];
    let ids = store.finish(commit(&token, "acme", &writes, &[message("a"), message("b")])).await.unwrap();
    assert_eq!(store.claim(&key("e1"), lease).await.unwrap(), Claim::AlreadyDone(DoneKind::Processed));
    // State is per tenant: the same key in another tenant is another entry.
    assert_eq!(store.get_state("acme", "k").await.unwrap(), Some(b"v".to_vec()));
    assert_eq!(store.get_state("other", "k").await.unwrap(), None);
    // A released claim can be taken again at once.
    let token = acquired(store.claim(&key("e2"), lease).await.unwrap());
    store.release(&token).await.unwrap();
    let token = acquired(store.claim(&key("e2"), lease).await.unwrap());
    // A claim whose lease expired is taken over, and the old holder may no
    // longer commit.
    let short = acquired(store.claim(&key("e3"), Duration::from_millis(30)).await.unwrap());
    assert!(matches!(store.claim(&key("e3"), lease).await.unwrap(), Claim::HeldElsewhere { .. }), "live until its lease ends");
    clock.advance(Duration::from_millis(30));
    let taken = acquired(store.claim(&key("e3"), lease).await.unwrap());
    assert!(taken.took_over);
    let lost = store.finish(commit(&short, "acme", &[], &[])).await.unwrap_err();
    assert!(matches!(lost, StoreError::ClaimLost(_)), "{lost}");
    store.finish(commit(&taken, "acme", &[], &[])).await.unwrap();
    // Committed publishes are the caller's to publish (an outbox that keeps
    // commit order until entries are removed), or already queued (a store
    // that is also the broker's queue leaves nothing to publish).
    if ids.is_empty() {
        assert!(store.pending_outbox(10).await.unwrap().is_empty());
    } else {
        let pending: Vec<String> = store.pending_outbox(10).await.unwrap().into_iter().map(|(_, m)| m.topic).collect();
        assert_eq!(pending, vec!["a", "b"]);
        for (id, _) in store.pending_outbox(10).await.unwrap() {
            store.remove_outbox(id).await.unwrap();
        }
        assert!(store.pending_outbox(10).await.unwrap().is_empty());
    }
    store.release(&token).await.unwrap();
    // A commit whose reads changed meanwhile writes nothing.
    let reader = acquired(store.claim(&key("e5"), lease).await.unwrap());
    let seen = store.read_state("acme", "k").await.unwrap();
    assert_eq!(seen.value.as_deref(), Some(&b"v"[..]));
    let writer = acquired(store.claim(&key("e6"), lease).await.unwrap());
    let newer = vec![("k".to_string(), Some(b"w".to_vec()))];
    store.finish(commit(&writer, "acme", &newer, &[])).await.unwrap();
    let stale = vec![("k".to_string(), Some(b"stale".to_vec())), ("other".to_string(), Some(b"x".to_vec()))];
    let reads = vec![("k".to_string(), seen.version.clone())];
    let refused = store.finish(Commit { reads: &reads, ..commit(&reader, "acme", &stale, &[]) }).await.unwrap_err();
    assert!(matches!(refused, StoreError::Conflict(ref k) if k == "k"), "{refused}");
    assert_eq!(store.get_state("acme", "k").await.unwrap(), Some(b"w".to_vec()));
    assert_eq!(store.get_state("acme", "other").await.unwrap(), None, "nothing of a refused commit is written");
    // Run again on fresh reads, the commit holds; an absent key read as absent validates too.
    let fresh = vec![("k".to_string(), store.read_state("acme", "k").await.unwrap().version), ("never".to_string(), None)];
    store.finish(Commit { reads: &fresh, ..commit(&reader, "acme", &stale, &[]) }).await.unwrap();
    assert_eq!(store.get_state("acme", "k").await.unwrap(), Some(b"stale".to_vec()));
    // Done markers expire with their TTL.
    let token = acquired(store.claim(&key("e4"), lease).await.unwrap());
    store.finish(Commit { ttl: Duration::from_millis(20), ..commit(&token, "acme", &[], &[]) }).await.unwrap();
    assert_eq!(store.claim(&key("e4"), lease).await.unwrap(), Claim::AlreadyDone(DoneKind::Processed));
    clock.advance(Duration::from_millis(20));
    assert!(store.purge_expired().await.unwrap() >= 1);
    acquired(store.claim(&key("e4"), lease).await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_store_keeps_the_contract_and_survives_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nested/wasmsub.redb");
    {
        let clock = ManualClock::starting_now();
        let store = EmbeddedStore::open_with(&path, EmbeddedOptions { clock: clock.clone(), ..EmbeddedOptions::default() }).unwrap();
        check_contract(&store, &clock).await;
        // The commit's publishes went onto the queue, in commit order.
        let queued: Vec<String> = store.take(10, 0).await.unwrap().into_iter().map(|t| t.message.topic).collect();
        assert_eq!(queued, vec!["a", "b"]);
        // A claim the process holds when it stops (a crash mid-event)...
        acquired(store.claim(&key("mid-event"), Duration::from_secs(3600)).await.unwrap());
    }
    let reopened = EmbeddedStore::open(&path).unwrap();
    // ...does not hold the event's redelivery for its lease: the file is one
    // process's alone, so no run of it can still be going.
    acquired(reopened.claim(&key("mid-event"), Duration::from_secs(1)).await.unwrap());
    assert_eq!(reopened.get_state("acme", "k").await.unwrap(), Some(b"stale".to_vec()));
    assert_eq!(reopened.claim(&key("e1"), Duration::from_secs(1)).await.unwrap(), Claim::AlreadyDone(DoneKind::Processed));
    // Queued messages that were never settled survive the restart.
    let again: Vec<String> = reopened.take(10, 0).await.unwrap().into_iter().map(|t| t.message.topic).collect();
    assert_eq!(again, vec!["a", "b"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_memory_store_keeps_the_contract() {
    let clock = ManualClock::starting_now();
    check_contract(&MemoryStore::with_clock(clock.clone()), &clock).await;
}

#[tokio::test]
async fn an_unopenable_store_is_reported_with_its_path() {
    let dir = tempfile::tempdir().unwrap();
    let blocker = dir.path().join("file");
    std::fs::write(&blocker, b"").unwrap();
    let error = EmbeddedStore::open(&blocker.join("wasmsub.redb")).err().expect("a file is not a directory");
    assert!(format!("{error:#}").contains(&blocker.display().to_string()), "{error:#}");
}

/// A store whose commits fail like a full disk for the first `failures` tries.
struct FullDisk {
    inner: MemoryStore,
    failures: AtomicU32,
}

#[async_trait]
impl DeliveryStore for FullDisk {
    async fn claim(&self, key: &DedupeKey, lease: Duration) -> Result<Claim, StoreError> {
        self.inner.claim(key, lease).await
    }
    async fn release(&self, claim: &ClaimToken) -> Result<(), StoreError> {
        self.inner.release(claim).await
    }
    async fn finish(&self, commit: Commit<'_>) -> Result<Vec<OutboxId>, StoreError> {
        if self.failures.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok() {
            let enospc = std::io::Error::from_raw_os_error(28);
            return Err(StoreError::Unavailable(anyhow::Error::new(enospc).context("committing an event")));
        }
        self.inner.finish(commit).await
    }
    async fn read_state(&self, tenant: &str, key: &str) -> Result<StateRead, StoreError> {
        self.inner.read_state(tenant, key).await
    }
    async fn pending_outbox(&self, limit: usize) -> Result<Vec<(OutboxId, OutboundMessage)>, StoreError> {
        self.inner.pending_outbox(limit).await
    }
    async fn remove_outbox(&self, id: OutboxId) -> Result<(), StoreError> {
        self.inner.remove_outbox(id).await
    }
    async fn purge_expired(&self) -> Result<usize, StoreError> {
        self.inner.purge_expired().await
    }
}

/// A host on `store` with a report subscription, after publishing one
/// event with id `event_id` to `orders`.
async fn host_publishing(store: Arc<dyn DeliveryStore>, event_id: &str) -> (Host, tokio::sync::broadcast::Receiver<wasmsub::EventReport>) {
    let host = host_on(store).await;
    let reports = host.reports();
    let event = cloud_event(event_id, json!({})).to_string();
    host.publish("pubsub", "orders", event.into(), Some("application/cloudevents+json")).await.unwrap();
    (host, reports)
}

async fn host_on(store: Arc<dyn DeliveryStore>) -> Host {
    let text = manifest_text("", &[HandlerSpec::new("recorder", guests::RECORDER, "orders")]);
    let manifest = Manifest::parse(&text, std::path::Path::new("/")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    Host::start_with_store(&manifest, &HostOptions::embedded(dir.path().to_owned()), store)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_defers_the_event_and_it_is_processed_once_after() {
    let store = Arc::new(FullDisk { inner: MemoryStore::default(), failures: AtomicU32::new(2) });
    let (_host, mut reports) = host_publishing(store.clone(), "d-1").await;
    let mut outcomes = Vec::new();
    loop {
        let report = tokio::time::timeout(Duration::from_secs(30), reports.recv()).await.unwrap().unwrap();
        outcomes.push(report.outcome.clone());
        if matches!(report.outcome, Outcome::Processed { .. }) {
            break;
        }
    }
    assert_eq!(outcomes.len(), 3, "{outcomes:?}");
    for deferred in &outcomes[..2] {
        let Outcome::Deferred { reason } = deferred else { panic!("{outcomes:?}") };
        assert!(reason.contains("No space left on device"), "{reason}");
    }
    assert_eq!(store.get_state("acme", "count:d-1").await.unwrap(), Some(b"1".to_vec()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_left_by_a_crashed_run_expires_and_the_event_runs_once() {
    let clock = ManualClock::starting_now();
    let store: Arc<dyn DeliveryStore> = Arc::new(MemoryStore::with_clock(clock.clone()));
    // A run that claimed the event and died: its lease is all that is left.
    let crashed = DedupeKey { tenant: "acme".into(), handler: "recorder".into(), event_id: "c-1".into() };
    acquired(store.claim(&crashed, Duration::from_secs(60)).await.unwrap());
    let (_host, mut reports) = host_publishing(store.clone(), "c-1").await;
    // However long the host takes, the claim holds until its lease ends...
    let first = tokio::time::timeout(Duration::from_secs(30), reports.recv()).await.unwrap().unwrap();
    assert_eq!(first.outcome, Outcome::InFlightElsewhere);
    assert_eq!(store.get_state("acme", "count:c-1").await.unwrap(), None);
    // ...and once it has, the redelivery takes the event over and runs it.
    clock.advance(Duration::from_secs(60));
    loop {
        let report = tokio::time::timeout(Duration::from_secs(30), reports.recv()).await.unwrap().unwrap();
        if report.outcome == (Outcome::Processed { attempts: 1 }) {
            break;
        }
        assert_eq!(report.outcome, Outcome::InFlightElsewhere);
    }
    assert_eq!(store.get_state("acme", "count:c-1").await.unwrap(), Some(b"1".to_vec()));
}
