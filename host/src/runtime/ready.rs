//! Instances made ahead of the attempts that will use them.
//!
//! Making an instance (its store, WASI context, and instantiation) is most
//! of what a fresh instance per event costs before the guest answers. So
//! after a handler's attempt, the next instances of that handler's version
//! are made in the background, and the next attempt takes one instead of
//! making its own. Isolation is unchanged: each instance still serves
//! exactly one attempt and is dropped after it; no event sees memory,
//! globals or WASI resources another event touched. Only *when* the
//! instance is made moves, off the event's path.
//!
//! Bounds: [`PER_HANDLER`] per handler, `total` in all (each holds an
//! instance slot of the pool, which is sized for them on top of the
//! attempts' slots, and whatever memory the guest's start-up touched). A
//! handler that needs one when all are shelved takes the place of the one
//! used least recently.
//!
//! Staleness: an instance is used only by an attempt of the same version
//! with the same limits and WASI grants ([`Fit`]). A deploy or a manifest
//! change makes the shelved ones unfit; they are dropped when next looked at.

use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use wasmtime::Engine;

use super::component::HandlerComponent;
use super::host_state::AttemptContext;
use super::invoke::{self, Prepared};

/// Instances made ahead per handler: one for the next event, one for the
/// one after while the first is being replaced.
pub const PER_HANDLER: usize = 2;

/// What an instance was made for: the attempt taking it must match.
#[derive(Clone)]
struct Fit {
    component: Arc<HandlerComponent>,
    namespace: Arc<str>,
    capabilities: Arc<crate::manifest::Capabilities>,
    memory_bytes: usize,
    table_elements: usize,
}

impl Fit {
    fn of(component: &Arc<HandlerComponent>, ctx: &AttemptContext) -> Self {
        Self {
            component: component.clone(),
            namespace: ctx.namespace.clone(),
            capabilities: ctx.capabilities.clone(),
            memory_bytes: ctx.memory_bytes,
            table_elements: ctx.table_elements,
        }
    }

    fn matches(&self, other: &Fit) -> bool {
        Arc::ptr_eq(&self.component, &other.component)
            && self.namespace == other.namespace
            && Arc::ptr_eq(&self.capabilities, &other.capabilities)
            && self.memory_bytes == other.memory_bytes
            && self.table_elements == other.table_elements
    }
}

/// One instance on a shelf, with the pool place it holds.
struct Shelved {
    prepared: Prepared,
    _place: OwnedSemaphorePermit,
}

/// One handler's made-ahead instances.
struct Shelf {
    fit: Fit,
    made: Vec<Shelved>,
    /// Being made now (counted against [`PER_HANDLER`]).
    making: usize,
    last_taken: Instant,
}

/// A shelf's handler: its tenant and its name.
type ShelfKey = (Arc<str>, Arc<str>);

/// Every handler's shelf, and the places they share.
pub struct ReadyInstances {
    shelves: Mutex<HashMap<ShelfKey, Shelf>>,
    places: Arc<Semaphore>,
    total: usize,
}

impl ReadyInstances {
    /// At most `total` instances made ahead (0: none, every attempt makes its own).
    pub fn new(total: usize) -> Self {
        Self { shelves: Mutex::new(HashMap::new()), places: Arc::new(Semaphore::new(total)), total }
    }

    fn shelves(&self) -> std::sync::MutexGuard<'_, HashMap<ShelfKey, Shelf>> {
        self.shelves.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// An instance made for this attempt's handler version and limits, if
    /// one is ready. Unfit ones found on the way are dropped.
    pub(super) fn take(&self, component: &Arc<HandlerComponent>, ctx: &AttemptContext) -> Option<Prepared> {
        if self.total == 0 || ctx.guest_log.is_some() {
            return None;
        }
        let fit = Fit::of(component, ctx);
        let mut unfit = Vec::new();
        let taken = {
            let mut shelves = self.shelves();
            let shelf = shelves.get_mut(&(ctx.tenant.clone(), ctx.handler.clone()))?;
            shelf.last_taken = Instant::now();
            if !shelf.fit.matches(&fit) {
                unfit.append(&mut shelf.made);
                shelf.fit = fit;
            }
            shelf.made.pop()
        };
        // Dropping a store resets its memory: outside the lock.
        drop(unfit);
        taken.map(|shelved| shelved.prepared)
    }

    /// Makes instances for this handler version in the background until its
    /// shelf is full, if there is room (taking the place of the least
    /// recently used shelf's instance when there is not).
    pub(super) fn refill(self: &Arc<Self>, engine: &Engine, component: &Arc<HandlerComponent>, ctx: &AttemptContext) {
        if self.total == 0 || ctx.guest_log.is_some() {
            return;
        }
        let key = (ctx.tenant.clone(), ctx.handler.clone());
        let fit = Fit::of(component, ctx);
        loop {
            let (place, evicted) = {
                let mut shelves = self.shelves();
                let shelf = shelves.entry(key.clone()).or_insert_with(|| Shelf { fit: fit.clone(), made: Vec::new(), making: 0, last_taken: Instant::now() });
                if !shelf.fit.matches(&fit) || shelf.made.len() + shelf.making >= PER_HANDLER {
                    return;
                }
                match self.places.clone().try_acquire_owned() {
                    Ok(place) => {
                        shelf.making += 1;
                        (Some(place), None)
                    }
                    Err(_) => {
                        let last_taken = shelf.last_taken;
                        (None, least_recently_used(&mut shelves, &key, last_taken))
                    }
                }
            };
            match (place, evicted) {
                (Some(place), _) => self.make(engine.clone(), fit.clone(), key.clone(), template(ctx), place),
                // Its place is free once it is dropped (outside the lock): try again.
                (None, Some(evicted)) => drop(evicted),
                (None, None) => return,
            }
        }
    }

    /// Makes one instance in the background and shelves it if it still
    /// fits. Its start-up code is guest code: it runs like an attempt's
    /// (`super::run_guest_code`), on a task while it is short, on a blocking
    /// thread once it has used a CPU slice.
    fn make(self: &Arc<Self>, engine: Engine, fit: Fit, key: ShelfKey, ctx: AttemptContext, place: OwnedSemaphorePermit) {
        let ready = self.clone();
        tokio::spawn(async move {
            let used_a_slice = Arc::new(AtomicBool::new(false));
            let making = {
                let (engine, component, flag) = (engine.clone(), fit.component.clone(), used_a_slice.clone());
                async move { invoke::prepare(&engine, &component, ctx, Some(flag)).await }
            };
            let prepared = super::run_guest_code(making, &used_a_slice).await.ok().flatten();
            let stale = {
                let mut shelves = ready.shelves();
                let shelf = shelves.get_mut(&key).expect("a shelf is never removed");
                shelf.making -= 1;
                match prepared {
                    Some(prepared) if shelf.fit.matches(&fit) => {
                        shelf.made.push(Shelved { prepared, _place: place });
                        None
                    }
                    other => Some((other, place)),
                }
            };
            drop(stale);
        });
    }

    /// Instances shelved now, in all.
    pub fn count(&self) -> usize {
        self.shelves().values().map(|shelf| shelf.made.len()).sum()
    }
}

/// Takes one instance off the shelf used least recently before `before`
/// (other than `keep`'s), so its place can go to a busier handler.
fn least_recently_used(shelves: &mut HashMap<ShelfKey, Shelf>, keep: &ShelfKey, before: Instant) -> Option<Shelved> {
    let (_, shelf) = shelves
        .iter_mut()
        .filter(|(key, shelf)| *key != keep && !shelf.made.is_empty() && shelf.last_taken < before)
        .min_by_key(|(_, shelf)| shelf.last_taken)?;
    shelf.made.pop()
}

/// The context an instance is made with: the attempt's, without the event
/// (a log line written during start-up must not carry another event's id).
fn template(ctx: &AttemptContext) -> AttemptContext {
    AttemptContext { event_id: "(made ahead)".into(), guest_log: None, ..ctx.clone() }
}
