//! Coalescing: calls of one kind that arrive while earlier ones are on the
//! wire wait, and leave together as one request.
//!
//! Why: daprd spends about as much CPU on a call as on the work inside it
//! (docs/BENCHMARKS.md), so under load fewer, larger calls are what makes
//! the Dapr path cheaper. Nothing waits for a batch to fill: a call that
//! finds a free lane goes out at once, from the caller's own task (no hop
//! through another task, so a lone event pays nothing for this); batches
//! form only while every lane is busy, which is exactly when there is load
//! to share. The lane's holder, when done, hands the lane to whatever
//! queued meanwhile (one task per batch). The caller's code stays per
//! event; how a batch is merged and what happens when it fails is the `run`
//! function's business (see `super::batches`).

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

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
    kind: &'static str,
    state: Mutex<Lanes<R, A>>,
}

struct Lanes<R, A> {
    busy: usize,
    queue: VecDeque<(R, oneshot::Sender<A>)>,
}

/// The call was in a batch whose task stopped (the runtime is shutting
/// down): it may or may not have reached the sidecar.
#[derive(Debug)]
pub(crate) struct Dropped;

impl<R: Send + 'static, A: Send + 'static> Coalescer<R, A> {
    /// Up to `lanes` requests in flight at once, each of at most
    /// `max_batch` calls. `run` answers a batch's calls in order.
    pub(crate) fn new<F, Fut>(kind: &'static str, lanes: usize, max_batch: usize, run: F) -> Self
    where
        F: Fn(Vec<R>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Vec<A>> + Send + 'static,
    {
        let run: Box<Run<R, A>> = Box::new(move |batch| Box::pin(run(batch)));
        let state = Mutex::new(Lanes { busy: 0, queue: VecDeque::new() });
        Self { inner: Arc::new(Inner { run, lanes: lanes.max(1), max_batch: max_batch.max(1), kind, state }) }
    }

    /// Makes the call: at once if a lane is free, else with the next batch.
    pub(crate) async fn call(&self, request: R) -> Result<A, Dropped> {
        let queued = {
            let mut lanes = self.inner.lock();
            if lanes.busy < self.inner.lanes && lanes.queue.is_empty() {
                lanes.busy += 1;
                Err(request)
            } else {
                let (reply, answer) = oneshot::channel();
                lanes.queue.push_back((request, reply));
                Ok(answer)
            }
        };
        match queued {
            Ok(answer) => answer.await.map_err(|_| Dropped),
            Err(request) => {
                // Given back on every exit, a cancelled call's too.
                let _lane = Lane(self.inner.clone());
                let mut answers = (self.inner.run)(vec![request]).await;
                Ok(answers.pop().expect("a batch answers every call"))
            }
        }
    }
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

    #[tokio::test]
    async fn a_lone_call_goes_out_alone_and_concurrent_ones_share_batches() {
        let batches = Arc::new(Mutex::new(Vec::new()));
        let seen = batches.clone();
        let coalescer = Arc::new(Coalescer::new("test", 1, 64, move |batch: Vec<u32>| {
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
        let coalescer = Arc::new(Coalescer::new("test", 2, 3, move |batch: Vec<u32>| {
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

    #[tokio::test]
    async fn a_cancelled_call_gives_its_lane_back() {
        let coalescer = Arc::new(Coalescer::new("test", 1, 8, |batch: Vec<u64>| async move {
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
