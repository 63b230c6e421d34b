//! Group commit for Raft round trips.
//!
//! Openraft 0.9 appends and fsyncs each client write on its own before taking
//! the next, and confirms leadership with a quorum round per linearizable read.
//! Under concurrency both become the bottleneck, so requests arriving while a
//! round is in flight wait and share the next one: many proposals in one log
//! entry, many reads behind one read-index check.

use std::future::Future;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};

type Job<Req, Resp> = (Req, oneshot::Sender<Resp>);

/// A round's place among the `inflight` rounds. A round that no longer needs
/// to hold back the next one (its entry is on disk and only waits for the
/// followers) drops it early; otherwise it is released when the round ends.
pub struct Slot(#[allow(dead_code)] OwnedSemaphorePermit);

pub struct Coalescer<Req, Resp> {
    tx: mpsc::UnboundedSender<Job<Req, Resp>>,
}

impl<Req: Send + 'static, Resp: Send + 'static> Coalescer<Req, Resp> {
    /// Runs `op` on batches of at most `max_batch` requests, with at most
    /// `inflight` batches holding their [`Slot`] at once. `op` answers each
    /// request, in order.
    /// Must be called inside a tokio runtime; the task ends with the coalescer.
    pub fn spawn<F, Fut>(inflight: usize, max_batch: usize, op: F) -> Self
    where
        F: Fn(Vec<Req>, Slot) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Vec<Resp>> + Send + 'static,
    {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(rx, inflight, max_batch.max(1), op));
        Coalescer { tx }
    }

    /// `None` if the coalescer stopped (its node is shutting down).
    pub async fn submit(&self, req: Req) -> Option<Resp> {
        let (tx, rx) = oneshot::channel();
        self.tx.send((req, tx)).ok()?;
        rx.await.ok()
    }
}

async fn run<Req, Resp, F, Fut>(
    mut rx: mpsc::UnboundedReceiver<Job<Req, Resp>>,
    inflight: usize,
    max_batch: usize,
    op: F,
) where
    Req: Send + 'static,
    Resp: Send + 'static,
    F: Fn(Vec<Req>, Slot) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Vec<Resp>> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(inflight.max(1)));
    loop {
        // Take a slot first: while all are busy, new requests pile up into the next batch.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let Some(first) = rx.recv().await else {
            return;
        };
        let mut jobs = vec![first];
        while jobs.len() < max_batch {
            match rx.try_recv() {
                Ok(j) => jobs.push(j),
                Err(_) => break,
            }
        }
        let (reqs, replies): (Vec<Req>, Vec<oneshot::Sender<Resp>>) = jobs.into_iter().unzip();
        let round = op(reqs, Slot(slot));
        tokio::spawn(async move {
            let answers = round.await;
            for (reply, answer) in replies.into_iter().zip(answers) {
                // The caller may have given up (timeout); nothing to do then.
                let _ = reply.send(answer);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn concurrent_requests_share_rounds_and_get_their_own_answers() {
        let rounds = Arc::new(AtomicUsize::new(0));
        let counted = rounds.clone();
        let c = Arc::new(Coalescer::spawn(1, 1000, move |reqs: Vec<u32>, slot| {
            counted.fetch_add(1, Ordering::SeqCst);
            async move {
                tokio::time::sleep(Duration::from_millis(20)).await;
                drop(slot);
                reqs.into_iter().map(|r| r * 2).collect()
            }
        }));
        let tasks: Vec<_> = (0..100u32)
            .map(|i| {
                let c = c.clone();
                tokio::spawn(async move { (i, c.submit(i).await) })
            })
            .collect();
        for t in tasks {
            let (i, answer) = t.await.expect("task");
            assert_eq!(answer, Some(i * 2));
        }
        let n = rounds.load(Ordering::SeqCst);
        assert!(
            (1..=10).contains(&n),
            "100 concurrent requests took {n} rounds"
        );
    }
}
