//! Coalescing: calls of one kind that arrive while earlier ones are on the
//! wire wait, and leave together as one request.
//!
//! Why: daprd spends about as much CPU on a call as on the work inside it
//! (docs/BENCHMARKS.md), so under load fewer, larger calls are what makes
//! the Dapr path cheaper. Nothing waits for a batch to fill: a call that
//! finds a free lane goes out at once, so a lone event pays no extra
//! latency; batches form only while every lane is busy, which is exactly
//! when there is load to share. The caller's code stays per event; how a
//! batch is merged and what happens when it fails is the `run` function's
//! business (see `super::batches`).

use std::future::Future;
use std::sync::{Arc, Mutex};

use tokio::sync::{Semaphore, mpsc, oneshot};

/// A queued call and where its answer goes.
type Queued<R, A> = (R, oneshot::Sender<A>);

/// Merges concurrent calls of one kind into batches run by `run`.
pub(crate) struct Coalescer<R, A> {
    queue: mpsc::UnboundedSender<Queued<R, A>>,
    /// The worker is started by the first call, so a `Coalescer` can be
    /// built outside a Tokio runtime.
    idle: Mutex<Option<Worker<R, A>>>,
}

struct Worker<R, A> {
    incoming: mpsc::UnboundedReceiver<Queued<R, A>>,
    run: Arc<dyn Fn(Vec<R>) -> BoxFuture<Vec<A>> + Send + Sync>,
    lanes: usize,
    max_batch: usize,
    kind: &'static str,
}

type BoxFuture<T> = std::pin::Pin<Box<dyn Future<Output = T> + Send>>;

impl<R: Send + 'static, A: Send + 'static> Coalescer<R, A> {
    /// Up to `lanes` batches in flight at once, each of at most `max_batch`
    /// calls. `run` answers a batch's calls in order, one answer each.
    pub(crate) fn new<F, Fut>(kind: &'static str, lanes: usize, max_batch: usize, run: F) -> Self
    where
        F: Fn(Vec<R>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Vec<A>> + Send + 'static,
    {
        let (queue, incoming) = mpsc::unbounded_channel();
        let run = Arc::new(move |batch: Vec<R>| -> BoxFuture<Vec<A>> { Box::pin(run(batch)) });
        let worker = Worker { incoming, run, lanes: lanes.max(1), max_batch: max_batch.max(1), kind };
        Self { queue, idle: Mutex::new(Some(worker)) }
    }

    /// Queues `request` and waits for its answer.
    pub(crate) async fn call(&self, request: R) -> Result<A, Unanswered<R>> {
        if let Some(worker) = self.idle.lock().unwrap_or_else(|p| p.into_inner()).take() {
            tokio::spawn(worker.serve());
        }
        let (reply, answer) = oneshot::channel();
        if let Err(mpsc::error::SendError((request, _))) = self.queue.send((request, reply)) {
            return Err(Unanswered::NotQueued(request));
        }
        answer.await.map_err(|_| Unanswered::Dropped)
    }
}

/// Why a call got no answer from its batch.
#[derive(Debug)]
pub(crate) enum Unanswered<R> {
    /// The worker is gone (its runtime shut down) before the call was
    /// queued: nothing was sent, the caller may make the call itself.
    NotQueued(R),
    /// The worker stopped with the call in a batch: it may or may not have
    /// reached the sidecar, like a call whose answer was lost.
    Dropped,
}

impl<R: Send + 'static, A: Send + 'static> Worker<R, A> {
    async fn serve(mut self) {
        let lanes = Arc::new(Semaphore::new(self.lanes));
        loop {
            // Take a lane first: while every lane is busy, calls pile up in
            // the queue and the next batch takes them all.
            let Ok(lane) = lanes.clone().acquire_owned().await else { return };
            let Some(first) = self.incoming.recv().await else { return };
            let mut batch = vec![first];
            while batch.len() < self.max_batch {
                match self.incoming.try_recv() {
                    Ok(next) => batch.push(next),
                    Err(_) => break,
                }
            }
            tracing::trace!(kind = self.kind, calls = batch.len(), "sidecar batch");
            let run = self.run.clone();
            tokio::spawn(async move {
                let (requests, replies): (Vec<R>, Vec<oneshot::Sender<A>>) = batch.into_iter().unzip();
                let answers = run(requests).await;
                debug_assert_eq!(answers.len(), replies.len(), "a batch answers every call");
                for (reply, answer) in replies.into_iter().zip(answers) {
                    // The caller may have given up (its own timeout): fine.
                    let _ = reply.send(answer);
                }
                drop(lane);
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn a_lone_call_goes_out_alone_and_concurrent_ones_share_batches() {
        let batches = Arc::new(Mutex::new(Vec::new()));
        let seen = batches.clone();
        let coalescer = Arc::new(Coalescer::new("test", 1, 64, move |batch: Vec<u32>| {
            seen.lock().unwrap().push(batch.len());
            async move {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
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
        // The first of the 50 may go alone; the rest wait for it and share.
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
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
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
}
