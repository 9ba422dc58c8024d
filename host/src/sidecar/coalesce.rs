//! Coalescing: calls of one kind that arrive while earlier ones are on the
//! wire wait, and leave together as one request.
//!
//! Why: daprd spends about as much CPU on a call as on the work inside it
//! (docs/BENCHMARKS.md), so under load fewer, larger calls are what makes
//! the Dapr path cheaper. A call that finds a free lane goes out at once,
//! from the caller's own task (no hop through another task, so a lone event
//! pays nothing for this); batches form while every lane is busy, which is
//! exactly when there is load to share. The lane's holder, when done, hands
//! the lane to whatever queued meanwhile (one task per batch). The caller's
//! code stays per event; how a batch is merged and what happens when it
//! fails is the `run` function's business (see `super::batches`).
//!
//! Lingering: while calls of a kind keep meeting each other (a bulk
//! delivery's events reach each stage one after another, as their guests
//! finish), a call that finds the lane free holds it for the linger before
//! going, so the calls right behind it share its request instead of each
//! waiting for the one before. Whether calls meet is measured, not
//! guessed ([`Traffic`]), so an event alone never waits: the linger is
//! paid only by events that have company.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::oneshot;

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;
type Run<R, A> = dyn Fn(Vec<R>) -> BoxFuture<Vec<A>> + Send + Sync;

/// Merges concurrent calls of one kind into batches run by `run`.
pub(crate) struct Coalescer<R, A> {
    inner: Arc<Inner<R, A>>,
}

struct Inner<R, A> {
    run: Box<Run<R, A>>,
    lanes: usize,
    max_batch: usize,
    /// How long a call that finds a free lane waits for company, while
    /// calls of its kind keep meeting each other (zero: never).
    linger: Duration,
    kind: &'static str,
    state: Mutex<Lanes<R, A>>,
}

struct Lanes<R, A> {
    busy: usize,
    queue: VecDeque<(R, oneshot::Sender<A>)>,
    traffic: Traffic,
}

/// Whether calls of one kind have company: a moving average of how many
/// recent calls found another call of their kind already waiting or on
/// the wire. One event's calls follow each other (the next is made once
/// the one before is answered), so an event alone never counts as
/// company, however fast its sidecar answers; a bulk delivery's events
/// overlap, and keep overlapping while their calls linger.
#[derive(Default)]
struct Traffic {
    overlapping: f64,
}

impl Traffic {
    /// Weight of the newest call in the average: after a burst, an event
    /// alone again waits once at most.
    const WEIGHT: f64 = 0.4;

    /// Counts a call that found `overlapped` (another call of its kind
    /// waiting or on the wire); whether calls have company now.
    fn has_company(&mut self, overlapped: bool) -> bool {
        self.overlapping += Self::WEIGHT * (f64::from(u8::from(overlapped)) - self.overlapping);
        self.overlapping >= 0.5
    }
}

/// The call was in a batch whose task stopped (the runtime is shutting
/// down): it may or may not have reached the sidecar.
#[derive(Debug)]
pub(crate) struct Dropped;

impl<R: Send + 'static, A: Send + 'static> Coalescer<R, A> {
    /// Up to `lanes` requests in flight at once, each of at most
    /// `max_batch` calls; a call finding a free lane lingers (see the
    /// module's text) for `linger` while calls keep meeting. `run` answers
    /// a batch's calls in order.
    pub(crate) fn new<F, Fut>(kind: &'static str, lanes: usize, max_batch: usize, linger: Duration, run: F) -> Self
    where
        F: Fn(Vec<R>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Vec<A>> + Send + 'static,
    {
        let run: Box<Run<R, A>> = Box::new(move |batch| Box::pin(run(batch)));
        let state = Mutex::new(Lanes { busy: 0, queue: VecDeque::new(), traffic: Traffic::default() });
        Self { inner: Arc::new(Inner { run, lanes: lanes.max(1), max_batch: max_batch.max(1), linger, kind, state }) }
    }

    /// Makes the call: at once if a lane is free and the call has no
    /// company, after the linger if it has, else with the next batch.
    pub(crate) async fn call(&self, request: R) -> Result<A, Dropped> {
        let way = {
            let mut lanes = self.inner.lock();
            let overlapped = lanes.busy > 0 || !lanes.queue.is_empty();
            let has_company = lanes.traffic.has_company(overlapped) && !self.inner.linger.is_zero();
            if lanes.busy < self.inner.lanes && lanes.queue.is_empty() {
                lanes.busy += 1;
                if has_company {
                    let (reply, answer) = oneshot::channel();
                    lanes.queue.push_back((request, reply));
                    Way::Linger(answer)
                } else {
                    Way::Now(request)
                }
            } else {
                let (reply, answer) = oneshot::channel();
                lanes.queue.push_back((request, reply));
                Way::Queued(answer)
            }
        };
        match way {
            Way::Now(request) => {
                // Given back on every exit, a cancelled call's too.
                let _lane = Lane(self.inner.clone());
                let mut answers = (self.inner.run)(vec![request]).await;
                Ok(answers.pop().expect("a batch answers every call"))
            }
            Way::Linger(answer) => {
                // Hold the lane for the linger, then hand it (and this call)
                // to the batch that gathered meanwhile. Spawned outside the
                // lock: a runtime that is stopping drops the task at once,
                // and the lane's drop takes the lock.
                let lane = Lane(self.inner.clone());
                tokio::spawn(async move {
                    tokio::time::sleep(lane.0.linger).await;
                    drop(lane);
                });
                answer.await.map_err(|_| Dropped)
            }
            Way::Queued(answer) => answer.await.map_err(|_| Dropped),
        }
    }
}

/// How a call leaves: alone at once, first of a batch after the linger, or
/// in the batch after the one on the wire.
enum Way<R, A> {
    Now(R),
    Linger(oneshot::Receiver<A>),
    Queued(oneshot::Receiver<A>),
}

impl<R, A> Inner<R, A> {
    fn lock(&self) -> std::sync::MutexGuard<'_, Lanes<R, A>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A held lane; dropping it hands the lane to the calls queued meanwhile.
struct Lane<R: Send + 'static, A: Send + 'static>(Arc<Inner<R, A>>);

impl<R: Send + 'static, A: Send + 'static> Drop for Lane<R, A> {
    fn drop(&mut self) {
        hand_over(self.0.clone());
    }
}

/// Runs the queued calls as one batch on a task of its own (keeping the
/// lane), or frees the lane if nobody waits.
fn hand_over<R: Send + 'static, A: Send + 'static>(inner: Arc<Inner<R, A>>) {
    let batch: Vec<_> = {
        let mut lanes = inner.lock();
        if lanes.queue.is_empty() {
            lanes.busy -= 1;
            return;
        }
        let take = lanes.queue.len().min(inner.max_batch);
        lanes.queue.drain(..take).collect()
    };
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        // No runtime (it is shutting down): the queued calls see `Dropped`.
        inner.lock().busy -= 1;
        return;
    };
    tracing::trace!(kind = inner.kind, calls = batch.len(), "sidecar batch");
    runtime.spawn(async move {
        let lane = Lane(inner.clone());
        let (requests, replies): (Vec<R>, Vec<oneshot::Sender<A>>) = batch.into_iter().unzip();
        let answers = (inner.run)(requests).await;
        debug_assert_eq!(answers.len(), replies.len(), "a batch answers every call");
        for (reply, answer) in replies.into_iter().zip(answers) {
            // The caller may have given up (its own timeout): fine.
            let _ = reply.send(answer);
        }
        drop(lane);
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;
    use tokio::time::Instant;

    #[tokio::test]
    async fn a_lone_call_goes_out_alone_and_concurrent_ones_share_batches() {
        let batches = Arc::new(Mutex::new(Vec::new()));
        let seen = batches.clone();
        let coalescer = Arc::new(Coalescer::new("test", 1, 64, Duration::ZERO, move |batch: Vec<u32>| {
            seen.lock().unwrap().push(batch.len());
            async move {
                tokio::time::sleep(Duration::from_millis(20)).await;
                batch.into_iter().map(|n| n * 2).collect()
            }
        }));
        assert_eq!(coalescer.call(21).await.ok(), Some(42));
        assert_eq!(*batches.lock().unwrap(), vec![1]);

        let calls: Vec<_> = (0..50u32).map(|n| { let c = coalescer.clone(); tokio::spawn(async move { c.call(n).await.ok() }) }).collect();
        for (n, call) in calls.into_iter().enumerate() {
            assert_eq!(call.await.unwrap(), Some(n as u32 * 2), "each caller gets its own answer");
        }
        let sizes = batches.lock().unwrap().clone();
        assert_eq!(sizes.iter().sum::<usize>(), 51);
        // The first of the 50 goes alone; the rest wait for it and share.
        assert!(sizes.len() <= 4, "50 concurrent calls took {} batches: {sizes:?}", sizes.len());
    }

    #[tokio::test]
    async fn batches_are_capped_and_lanes_run_side_by_side() {
        let running = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let (r, m) = (running.clone(), most.clone());
        let coalescer = Arc::new(Coalescer::new("test", 2, 3, Duration::ZERO, move |batch: Vec<u32>| {
            assert!(batch.len() <= 3);
            let (r, m) = (r.clone(), m.clone());
            async move {
                let now = r.fetch_add(1, Ordering::SeqCst) + 1;
                m.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(20)).await;
                r.fetch_sub(1, Ordering::SeqCst);
                batch
            }
        }));
        let calls: Vec<_> = (0..20u32).map(|n| { let c = coalescer.clone(); tokio::spawn(async move { c.call(n).await.ok() }) }).collect();
        for (n, call) in calls.into_iter().enumerate() {
            assert_eq!(call.await.unwrap(), Some(n as u32));
        }
        assert_eq!(most.load(Ordering::SeqCst), 2, "two lanes, both used, never more");
    }

    /// A coalescer whose requests take `request` (paused time), recording
    /// their sizes.
    fn timed_batches(linger: Duration, request: Duration) -> (Arc<Coalescer<u32, u32>>, Arc<Mutex<Vec<usize>>>) {
        let sizes = Arc::new(Mutex::new(Vec::new()));
        let seen = sizes.clone();
        let coalescer = Coalescer::new("test", 1, 64, linger, move |batch: Vec<u32>| {
            seen.lock().unwrap().push(batch.len());
            async move {
                tokio::time::sleep(request).await;
                batch
            }
        });
        (Arc::new(coalescer), sizes)
    }

    /// A burst of 10 calls at once, then `count` calls `gap` apart; waits
    /// for every answer.
    async fn burst_then_spaced(coalescer: &Arc<Coalescer<u32, u32>>, count: u32, gap: Duration) {
        let mut calls = Vec::new();
        for n in 0..10 + count {
            let c = coalescer.clone();
            calls.push(tokio::spawn(async move { c.call(n).await.ok() }));
            if n >= 10 {
                tokio::time::sleep(gap).await;
            }
        }
        for (n, call) in calls.into_iter().enumerate() {
            assert_eq!(call.await.unwrap(), Some(n as u32), "each caller gets its own answer");
        }
    }

    /// `groups` groups of 4 calls 1 ms apart, a group every 10 ms (a bulk
    /// delivery's events reaching a stage); waits for every answer.
    async fn groups_of_four(coalescer: &Arc<Coalescer<u32, u32>>, groups: u32) {
        let mut calls = Vec::new();
        for n in 0..groups * 4 {
            let c = coalescer.clone();
            calls.push(tokio::spawn(async move { c.call(n).await.ok() }));
            tokio::time::sleep(Duration::from_millis(if n % 4 == 3 { 7 } else { 1 })).await;
        }
        for (n, call) in calls.into_iter().enumerate() {
            assert_eq!(call.await.unwrap(), Some(n as u32), "each caller gets its own answer");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn calls_that_keep_meeting_linger_and_share_a_request() {
        // Requests take 3 ms: without a linger a group's first call goes
        // alone and the others follow in one or two more requests.
        let (without, unlingered) = timed_batches(Duration::ZERO, Duration::from_millis(3));
        groups_of_four(&without, 15).await;
        let unlingered = unlingered.lock().unwrap().len();
        assert!(unlingered >= 28, "without a linger: {unlingered} requests");
        // With one, a group's first call waits for the rest of its group.
        let (with, shared) = timed_batches(Duration::from_millis(5), Duration::from_millis(3));
        groups_of_four(&with, 15).await;
        let sizes = shared.lock().unwrap().clone();
        assert_eq!(sizes.iter().sum::<usize>(), 60);
        assert!(sizes.len() <= 20, "15 groups of 4 calls with a 5 ms linger took {} requests (without: {unlingered}): {sizes:?}", sizes.len());
    }

    #[tokio::test(start_paused = true)]
    async fn an_event_alone_never_waits() {
        let (coalescer, _) = timed_batches(Duration::from_millis(50), Duration::from_millis(1));
        // One event's calls follow each other, however fast the answers.
        for n in 0..20 {
            let started = Instant::now();
            assert_eq!(coalescer.call(n).await.ok(), Some(n));
            assert_eq!(started.elapsed(), Duration::from_millis(1), "call {n} waited");
        }
        // After a burst, an event alone again waits once at most.
        burst_then_spaced(&coalescer, 20, Duration::from_millis(1)).await;
        let mut waited = 0;
        for n in 0..5 {
            let started = Instant::now();
            coalescer.call(n).await.ok();
            waited += usize::from(started.elapsed() > Duration::from_millis(1));
        }
        assert!(waited <= 1, "{waited} of 5 lone calls after a burst waited");
    }

    #[tokio::test]
    async fn a_cancelled_call_gives_its_lane_back() {
        let coalescer = Arc::new(Coalescer::new("test", 1, 8, Duration::ZERO, |batch: Vec<u64>| async move {
            for &ms in &batch {
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
            batch
        }));
        // Holds the only lane, then is cancelled while on the wire.
        let slow = tokio::time::timeout(Duration::from_millis(10), coalescer.call(10_000)).await;
        assert!(slow.is_err());
        let answer = tokio::time::timeout(Duration::from_secs(5), coalescer.call(1)).await;
        assert_eq!(answer.ok().and_then(Result::ok), Some(1), "the lane was given back");
    }
}
