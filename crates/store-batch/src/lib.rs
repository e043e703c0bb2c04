//! Calls from concurrent requests sharing round trips, for the shared stores (Redis,
//! PostgreSQL).
//!
//! A call submitted while fewer than `max_in_flight` calls are in flight is sent at
//! once, alone, by the submitter: no added latency when load is light. One submitted
//! while they are waits in a queue; when a call in flight ends, what is queued (up to
//! `max_batch` calls, oldest first) goes together through [`Batch::send`], on a task of
//! its own, so the caller whose call ended is answered now. Under load the number of
//! round trips (and the store's per-call work) falls with the number of calls waiting.
//!
//! A batch is handed to [`Batch::send`] once: the store decides whether anything may be
//! sent again, and answers every call of it. A call whose caller gave up (a timeout)
//! while queued is still sent with its batch, as a call that timed out may still have
//! run on the server.

use std::future::Future;
use std::sync::{Arc, Mutex};

use sluice_engine::StoreError;
use tokio::sync::oneshot;

/// How a store sends several queued calls together.
pub trait Batch: Send + Sync + 'static {
    /// One call's arguments.
    type Call: Send + 'static;
    /// One call's answer.
    type Reply: Send + 'static;

    /// Sends `calls` together; one answer per call, in their order (a missing answer
    /// is the [`Batch::dropped`] error).
    fn send(
        &self,
        calls: Vec<Self::Call>,
    ) -> impl Future<Output = Vec<Result<Self::Reply, StoreError>>> + Send;

    /// The answer of a call whose batch went without answering it (or never went: the
    /// runtime was shutting down).
    fn dropped(&self) -> StoreError;
}

/// Every call's answer from the store's one reply to a whole batch of `calls`: each
/// call's own part, read in turn by `next_answer`, or the reply's error for every call.
/// How [`Batch::send`] keeps its promise of one answer per call, in their order.
pub fn answer_each<V, R>(
    calls: usize,
    reply: Result<Vec<V>, StoreError>,
    mut next_answer: impl FnMut(&mut std::vec::IntoIter<V>) -> Result<R, StoreError>,
) -> Vec<Result<R, StoreError>> {
    match reply {
        Ok(values) => {
            let mut values = values.into_iter();
            (0..calls).map(|_| next_answer(&mut values)).collect()
        }
        Err(error) => (0..calls).map(|_| Err(error.clone())).collect(),
    }
}

/// How many calls may be in flight, and how many calls one batch holds at most.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Calls in flight (alone or batches) before calls queue; at least 1.
    pub max_in_flight: usize,
    /// The most calls one batch holds; the rest wait for the next call to end.
    pub max_batch: usize,
}

/// A queued call and where its answer goes.
struct Queued<C, R> {
    call: C,
    answer: oneshot::Sender<Result<R, StoreError>>,
}

struct State<C, R> {
    in_flight: usize,
    queue: Vec<Queued<C, R>>,
}

/// Queues calls behind the calls in flight and sends them together.
pub struct Batcher<B: Batch> {
    state: Mutex<State<B::Call, B::Reply>>,
    batch: B,
    limits: Limits,
}

impl<B: Batch> Batcher<B> {
    /// A batcher sending batches through `batch`.
    pub fn new(batch: B, limits: Limits) -> Self {
        Batcher {
            state: Mutex::new(State {
                in_flight: 0,
                queue: Vec::new(),
            }),
            batch,
            limits: Limits {
                max_in_flight: limits.max_in_flight.max(1),
                max_batch: limits.max_batch.max(1),
            },
        }
    }

    /// What sends the batches.
    pub fn batch(&self) -> &B {
        &self.batch
    }

    /// Answers `call`: by `alone(call)` at once when few calls are in flight, else with
    /// the others waiting, in one batch.
    pub async fn submit<F, Fut>(
        self: &Arc<Self>,
        call: B::Call,
        alone: F,
    ) -> Result<B::Reply, StoreError>
    where
        F: FnOnce(B::Call) -> Fut,
        Fut: Future<Output = Result<B::Reply, StoreError>>,
    {
        let waiting = {
            let mut state = self.lock();
            if state.in_flight < self.limits.max_in_flight {
                state.in_flight += 1;
                Err(call)
            } else {
                let (answer, waiting) = oneshot::channel();
                state.queue.push(Queued { call, answer });
                Ok(waiting)
            }
        };
        match waiting {
            Ok(waiting) => waiting.await.unwrap_or_else(|_| Err(self.batch.dropped())),
            Err(call) => {
                // Ends this call's turn even if the caller drops the future (a timeout).
                let _turn = Turn(Arc::clone(self));
                alone(call).await
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State<B::Call, B::Reply>> {
        // No code panics while holding it; a poisoned lock still holds a valid state.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// After a call in flight ends: the next batch goes (on a task of its own, so the
    /// caller that made the call is answered now), or one fewer call is in flight.
    fn call_ended(self: &Arc<Self>) {
        let batch = {
            let mut state = self.lock();
            if state.queue.is_empty() {
                state.in_flight -= 1;
                return;
            }
            let take = state.queue.len().min(self.limits.max_batch);
            // The newest stay queued, for the next call that ends.
            let rest = state.queue.split_off(take);
            std::mem::replace(&mut state.queue, rest)
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            // No runtime (it is shutting down): the queued calls are answered by the
            // dropped senders, and no call is in flight any more.
            self.lock().in_flight -= 1;
            return;
        };
        // Made before the task, so the turn ends even if the task is dropped unrun.
        let turn = Turn(Arc::clone(self));
        runtime.spawn(async move {
            turn.0.run(batch).await;
            drop(turn);
        });
    }

    async fn run(&self, batch: Vec<Queued<B::Call, B::Reply>>) {
        let (calls, answers): (Vec<_>, Vec<_>) =
            batch.into_iter().map(|q| (q.call, q.answer)).unzip();
        let mut replies = self.batch.send(calls).await.into_iter();
        for answer in answers {
            let reply = replies.next().unwrap_or_else(|| Err(self.batch.dropped()));
            let _ = answer.send(reply);
        }
    }
}

/// The end of a call in flight, when dropped.
struct Turn<B: Batch>(Arc<Batcher<B>>);

impl<B: Batch> Drop for Turn<B> {
    fn drop(&mut self) {
        self.0.call_ended();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Answers each call with itself; counts the batches and their sizes.
    #[derive(Default)]
    struct Echo {
        batches: AtomicUsize,
        calls: AtomicUsize,
    }

    impl Batch for Echo {
        type Call = u32;
        type Reply = u32;

        async fn send(&self, calls: Vec<u32>) -> Vec<Result<u32, StoreError>> {
            self.batches.fetch_add(1, Ordering::Relaxed);
            self.calls.fetch_add(calls.len(), Ordering::Relaxed);
            tokio::task::yield_now().await;
            calls.into_iter().map(Ok).collect()
        }

        fn dropped(&self) -> StoreError {
            StoreError::Unavailable("dropped".into())
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn calls_beyond_the_ones_in_flight_go_together_and_each_gets_its_answer() {
        let batcher = Arc::new(Batcher::new(
            Echo::default(),
            Limits {
                max_in_flight: 1,
                max_batch: 8,
            },
        ));
        let (release, held) = oneshot::channel::<()>();
        // The one call in flight waits until every other call is queued.
        let first = {
            let batcher = Arc::clone(&batcher);
            tokio::spawn(async move {
                batcher
                    .submit(0, |call| async move {
                        let _ = held.await;
                        Ok(call)
                    })
                    .await
            })
        };
        tokio::task::yield_now().await;
        while batcher.lock().in_flight == 0 {
            tokio::task::yield_now().await;
        }
        let others: Vec<_> = (1..=20u32)
            .map(|n| {
                let batcher = Arc::clone(&batcher);
                tokio::spawn(async move {
                    batcher
                        .submit(n, |_| async { Err(StoreError::Protocol("alone".into())) })
                        .await
                })
            })
            .collect();
        while batcher.lock().queue.len() < 20 {
            tokio::task::yield_now().await;
        }
        let _ = release.send(());
        assert_eq!(first.await.expect("task").expect("answer"), 0);
        for (n, task) in (1..=20u32).zip(others) {
            assert_eq!(task.await.expect("task").expect("answer"), n);
        }
        let echo = batcher.batch();
        assert_eq!(echo.calls.load(Ordering::Relaxed), 20);
        assert_eq!(echo.batches.load(Ordering::Relaxed), 3, "8 + 8 + 4");
        assert_eq!(batcher.lock().in_flight, 0, "every turn ended");
    }
}
