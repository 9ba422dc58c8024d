//! How each kind of sidecar call is merged into a batch, and what happens
//! when the merged request fails.
//!
//! The rule that keeps every caller's semantics: a merged request that
//! succeeds answers every call in it; one the sidecar refused is sent again
//! call by call (side by side), so each caller gets the answer its own
//! request gets; one that got no answer at all (the sidecar is down or
//! hung) fails every call in it with that error, as each alone would have. That is safe
//! because every caller already treats a failed write as "it may have
//! landed" and decides by reading the store back (claims, done records,
//! locks), and because a store that applied part of a failed merged
//! request (Redis runs saves and transactions operation by operation)
//! leaves the calls that landed to fail their ETag or first-write check
//! when sent again, which their callers classify the same way. Reads merge
//! freely: one bulk read of every key asked for.
//!
//! - reads: one bulk GET per state store (a lone key: a plain GET);
//! - saves: one save request with every call's items;
//! - transactions: one transaction with every call's operations (state
//!   writes on one key never overlap: they hold its commit lock; two done
//!   records for one event can meet only in a takeover race, where at most
//!   one ETag check passes and the re-sent calls sort out who won);
//! - publishes: one bulk publish per topic; entries Dapr reports as failed
//!   are published again one by one.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;

use serde_json::{Map, Value};

use super::api::{Api, Read};
use super::coalesce::{Coalescer, Dropped};
use super::{Operation, SidecarError, StateItem};

/// Batches in flight at once per kind. One: while a batch is out, the next
/// gathers every call that arrives meanwhile, so under load a request
/// carries whole bulk deliveries' worth of calls; a lone call goes out at
/// once when no batch of its kind is out.
const LANES: usize = 1;
/// How long a call that finds its lane free waits for company while calls
/// of its kind keep meeting each other (see `super::coalesce`): a bulk
/// delivery's events reach a stage a guest run apart, about 100-300 µs each
/// under load, so a millisecond gathers several of them into one request;
/// an event alone never waits.
const LINGER: Duration = Duration::from_millis(1);
/// Calls per merged request: bounds a request's size (a done record carries
/// the event's outbox) and a store's transaction size.
const MAX_CALLS: usize = 64;

struct GetCall {
    store: String,
    keys: Vec<String>,
}

struct SaveCall {
    store: String,
    items: Vec<StateItem>,
}

struct TransactionCall {
    store: String,
    operations: Vec<Operation>,
}

struct PublishCall {
    pubsub: String,
    topic: String,
    event: Arc<Map<String, Value>>,
}

type Done = Result<(), SidecarError>;

pub(super) struct Batches {
    gets: Coalescer<GetCall, Result<Vec<Read>, SidecarError>>,
    saves: Coalescer<SaveCall, Done>,
    transactions: Coalescer<TransactionCall, Done>,
    publishes: Coalescer<PublishCall, Done>,
}

impl Batches {
    pub(super) fn new(api: Api) -> Self {
        let (a, b, c, d) = (api.clone(), api.clone(), api.clone(), api);
        Self {
            gets: Coalescer::new("gets", LANES, MAX_CALLS, LINGER, move |calls| run_gets(a.clone(), calls)),
            saves: Coalescer::new("saves", LANES, MAX_CALLS, LINGER, move |calls| run_writes(b.clone(), calls)),
            transactions: Coalescer::new("transactions", LANES, MAX_CALLS, LINGER, move |calls| run_writes(c.clone(), calls)),
            publishes: Coalescer::new("publishes", LANES, MAX_CALLS, LINGER, move |calls| run_publishes(d.clone(), calls)),
        }
    }

    pub(super) async fn get(&self, store: &str, keys: Vec<String>) -> Result<Vec<Read>, SidecarError> {
        match self.gets.call(GetCall { store: store.to_owned(), keys }).await {
            Ok(answer) => answer,
            Err(Dropped) => Err(SidecarError::Interrupted { what: "state read" }),
        }
    }

    pub(super) async fn save(&self, store: &str, items: Vec<StateItem>) -> Done {
        match self.saves.call(SaveCall { store: store.to_owned(), items }).await {
            Ok(answer) => answer,
            Err(Dropped) => Err(SidecarError::Interrupted { what: "state save" }),
        }
    }

    /// Merged like the other kinds. (They were sent one per call for a
    /// while, when `restarting_daprd_with_events_in_flight_loses_none` lost
    /// writes with them merged; the cause was in the commit locks, not here:
    /// see `key_locks::lock_key`.)
    pub(super) async fn transaction(&self, store: &str, operations: Vec<Operation>) -> Done {
        match self.transactions.call(TransactionCall { store: store.to_owned(), operations }).await {
            Ok(answer) => answer,
            Err(Dropped) => Err(SidecarError::Interrupted { what: "state transaction" }),
        }
    }

    pub(super) async fn publish(&self, pubsub: &str, topic: &str, event: Arc<Map<String, Value>>) -> Done {
        let call = PublishCall { pubsub: pubsub.to_owned(), topic: topic.to_owned(), event };
        match self.publishes.call(call).await {
            Ok(answer) => answer,
            Err(Dropped) => Err(SidecarError::Interrupted { what: "publish" }),
        }
    }
}

/// Indices of `calls` grouped by `key`, groups in order of first appearance.
fn groups<T, K: Eq + std::hash::Hash>(calls: &[T], key: impl Fn(&T) -> K) -> Vec<Vec<usize>> {
    let mut index: HashMap<K, usize> = HashMap::new();
    let mut groups: Vec<Vec<usize>> = Vec::new();
    for (i, call) in calls.iter().enumerate() {
        let slot = *index.entry(key(call)).or_insert_with(|| {
            groups.push(Vec::new());
            groups.len() - 1
        });
        groups[slot].push(i);
    }
    groups
}

/// Answers laid out in call order, filled group by group.
fn answers<A>(len: usize) -> Vec<Option<A>> {
    std::iter::repeat_with(|| None).take(len).collect()
}

fn complete<A>(answers: Vec<Option<A>>) -> Vec<A> {
    answers.into_iter().map(|a| a.expect("every call of a batch is answered")).collect()
}

/// One call's read on its own: a plain GET for one key Dapr can route
/// (its path decodes `%2F`, so a key with `/` goes through the bulk API).
async fn get_alone(api: &Api, call: &GetCall) -> Result<Vec<Read>, SidecarError> {
    match call.keys.as_slice() {
        [key] if !key.contains('/') => Ok(vec![api.get_one(&call.store, key).await?]),
        keys => api.get_bulk(&call.store, keys).await,
    }
}

async fn run_gets(api: Api, calls: Vec<GetCall>) -> Vec<Result<Vec<Read>, SidecarError>> {
    let mut out = answers(calls.len());
    for group in groups(&calls, |c| c.store.clone()) {
        if let [only] = group[..] {
            out[only] = Some(get_alone(&api, &calls[only]).await);
            continue;
        }
        let mut keys: Vec<String> = group.iter().flat_map(|&i| calls[i].keys.iter().cloned()).collect();
        keys.sort_unstable();
        keys.dedup();
        match api.get_bulk(&calls[group[0]].store, &keys).await {
            Ok(reads) => {
                let by_key: HashMap<&str, &Read> = keys.iter().map(String::as_str).zip(&reads).collect();
                for &i in &group {
                    out[i] = Some(Ok(calls[i].keys.iter().map(|k| by_key[k.as_str()].clone()).collect()));
                }
            }
            Err(error) if unanswered(&error) => {
                let error = Arc::new(error);
                for &i in &group {
                    out[i] = Some(Err(SidecarError::Shared(error.clone())));
                }
            }
            Err(_) => {
                let again = join_all(group.iter().map(|&i| get_alone(&api, &calls[i]))).await;
                for (&i, answer) in group.iter().zip(again) {
                    out[i] = Some(answer);
                }
            }
        }
    }
    complete(out)
}

/// A write whose calls merge by concatenating their items: saves (state
/// items) and transactions (operations).
trait MergedWrite: Send + 'static {
    type Item: serde::Serialize + Send + Sync;
    fn store(&self) -> &str;
    fn items(&self) -> &[Self::Item];
    /// Sends `items` (borrowed: a merged request serialises every call's
    /// items in place, nothing is copied).
    fn send(api: &Api, store: &str, items: &[&Self::Item]) -> impl Future<Output = Done> + Send;
}

impl MergedWrite for SaveCall {
    type Item = StateItem;
    fn store(&self) -> &str {
        &self.store
    }
    fn items(&self) -> &[StateItem] {
        &self.items
    }
    fn send(api: &Api, store: &str, items: &[&StateItem]) -> impl Future<Output = Done> + Send {
        api.save(store, items)
    }
}

impl MergedWrite for TransactionCall {
    type Item = Operation;
    fn store(&self) -> &str {
        &self.store
    }
    fn items(&self) -> &[Operation] {
        &self.operations
    }
    fn send(api: &Api, store: &str, items: &[&Operation]) -> impl Future<Output = Done> + Send {
        api.transaction(store, items)
    }
}

/// One merged request per store; refused, its calls go again alone.
async fn run_writes<C: MergedWrite>(api: Api, calls: Vec<C>) -> Vec<Done> {
    let (api, calls) = (&api, &calls);
    let mut out = answers(calls.len());
    for group in groups(calls, |c| c.store().to_owned()) {
        let merged: Vec<&C::Item> = group.iter().flat_map(|&i| calls[i].items()).collect();
        let first = C::send(api, calls[group[0]].store(), &merged).await;
        merged_or_each(&group, first, &mut out, |i| async move {
            let alone: Vec<&C::Item> = calls[i].items().iter().collect();
            C::send(api, calls[i].store(), &alone).await
        })
        .await;
    }
    complete(out)
}

/// Whether a request failed without the sidecar answering it: sending its
/// calls again one by one would only wait for the same timeout again.
fn unanswered(error: &SidecarError) -> bool {
    matches!(error, SidecarError::Unreachable { .. } | SidecarError::Interrupted { .. } | SidecarError::Shared(_))
}

/// A group's merged request answered `first`: on success every call has
/// its answer; refused, each call is sent again alone, side by side (a
/// group of one keeps its own answer); unanswered, every call fails with it.
async fn merged_or_each<F, Fut>(group: &[usize], first: Done, out: &mut [Option<Done>], alone: F)
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = Done>,
{
    match first {
        Ok(()) => group.iter().for_each(|&i| out[i] = Some(Ok(()))),
        Err(error) if group.len() == 1 => out[group[0]] = Some(Err(error)),
        Err(error) if unanswered(&error) => {
            let error = Arc::new(error);
            group.iter().for_each(|&i| out[i] = Some(Err(SidecarError::Shared(error.clone()))));
        }
        Err(error) => {
            tracing::debug!(%error, calls = group.len(), "a merged sidecar request was refused; sending its calls one by one");
            let again = join_all(group.iter().map(|&i| alone(i))).await;
            for (&i, answer) in group.iter().zip(again) {
                out[i] = Some(answer);
            }
        }
    }
}

async fn run_publishes(api: Api, calls: Vec<PublishCall>) -> Vec<Done> {
    let mut out = answers(calls.len());
    for group in groups(&calls, |c| (c.pubsub.clone(), c.topic.clone())) {
        let (pubsub, topic) = (&calls[group[0]].pubsub, &calls[group[0]].topic);
        if let [only] = group[..] {
            out[only] = Some(api.publish(pubsub, topic, &calls[only].event).await);
            continue;
        }
        let events: Vec<&Map<String, Value>> = group.iter().map(|&i| &*calls[i].event).collect();
        // Entries Dapr did not publish (or all, when it did not say) go out
        // again one by one; an entry published twice keeps its CloudEvent
        // id, which consumers dedupe on, as after any lost answer.
        let again: Vec<usize> = match api.publish_bulk(pubsub, topic, &events).await {
            Ok(failed) => failed,
            Err(error) if unanswered(&error) => {
                let error = Arc::new(error);
                group.iter().for_each(|&i| out[i] = Some(Err(SidecarError::Shared(error.clone()))));
                continue;
            }
            Err(error) => {
                tracing::debug!(%error, events = group.len(), "a bulk publish was refused; publishing its events one by one");
                (0..group.len()).collect()
            }
        };
        for &i in &group {
            out[i] = Some(Ok(()));
        }
        let published = join_all(again.iter().map(|&entry| api.publish(pubsub, topic, &calls[group[entry]].event))).await;
        for (entry, answer) in again.into_iter().zip(published) {
            out[group[entry]] = Some(answer);
        }
    }
    complete(out)
}
