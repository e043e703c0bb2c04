//! Decisions from concurrent requests sharing transactions.
//!
//! A charging decision arriving while fewer than [`MAX_IN_FLIGHT`] calls are in flight
//! is sent at once, as one `sluice_decide` statement: no added latency when load is
//! light. One arriving while they are waits in a queue; when a call in flight ends,
//! everything queued (up to [`MAX_BATCH`] requests) goes as one `sluice_decide_batch`
//! statement, which takes the advisory locks of every counter of the batch once, in
//! ascending order, and then decides each request in arrival order exactly as
//! `sluice_decide` would alone, each seeing the writes of the ones before it. Under
//! load the number of transactions (a commit, a WAL record, a lock round, a protocol
//! exchange and a backend wake-up each) falls with the number of requests waiting,
//! which is what bounded PostgreSQL's rate.
//!
//! A batch is sent once, and again only when the server's answer proves it rolled back
//! (as a single decision): when it fails, every request in it gets the failure, and the
//! `on_error` policy decides them. A request whose arguments the function refuses fails
//! alone. A request whose caller gave up (a timeout) while queued is still decided when
//! its batch goes, as a call that timed out may still have run on the server.
//!
//! Dry runs and requests that charge nothing take no lock and may be repeated: they
//! never queue.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use deadpool_postgres::Pool;
use sluice_engine::StoreError;
use tokio::sync::oneshot;

use crate::PostgresStore;
use crate::error::{Failure, pool_failure, query_failure};

/// How many calls may be in flight (each on its own connection) before decisions
/// queue. More than Redis's two: a PostgreSQL backend spends a batch's time on one
/// core, so a few calls in flight keep several backends (and both cores) busy while
/// the next batch gathers.
const MAX_IN_FLIGHT: usize = 4;

/// The most requests one batch holds: bounds the statement's arguments and the time a
/// batch holds its locks; the rest wait for the next call to end.
const MAX_BATCH: usize = 256;

/// One decision's arguments as `sluice_decide` takes them: its distinct counters, and
/// seven integers per window whose slots index `keys` (1-based).
pub(crate) struct Call {
    pub(crate) keys: Vec<String>,
    pub(crate) args: Vec<i64>,
}

/// A queued decision and where its answer goes.
struct Queued {
    call: Call,
    answer: oneshot::Sender<Result<Vec<i64>, StoreError>>,
}

#[derive(Default)]
struct State {
    in_flight: usize,
    queue: Vec<Queued>,
}

/// Queues decisions behind the calls in flight and sends them together.
pub(crate) struct Batcher {
    state: Mutex<State>,
    pool: Pool,
    /// `sluice_decide_batch`'s statement, schema filled in.
    batch_sql: String,
    address: String,
    /// The store's "schema is installed" flag: a batch that finds the schema gone
    /// clears it, so that the next decision installs it again.
    ready: Arc<AtomicBool>,
}

impl Batcher {
    pub(crate) fn new(
        pool: Pool,
        batch_sql: String,
        address: String,
        ready: Arc<AtomicBool>,
    ) -> Self {
        Batcher {
            state: Mutex::new(State::default()),
            pool,
            batch_sql,
            address,
            ready,
        }
    }

    /// Decides `call` (never repeated when it may have run): at once when few calls are
    /// in flight, else with the others waiting, in one batch. The schema is ready.
    pub(crate) async fn decide(
        self: &Arc<Self>,
        store: &PostgresStore,
        call: Call,
    ) -> Result<Vec<i64>, StoreError> {
        let waiting = {
            let mut state = self.lock();
            if state.in_flight < MAX_IN_FLIGHT {
                state.in_flight += 1;
                Err(call)
            } else {
                let (answer, waiting) = oneshot::channel();
                state.queue.push(Queued { call, answer });
                Ok(waiting)
            }
        };
        let waiting = match waiting {
            Ok(waiting) => waiting,
            Err(call) => {
                // Ends this call's turn even if the caller drops the future (a timeout).
                let _turn = Turn(Arc::clone(self));
                return store.decide_one(&call).await;
            }
        };
        waiting.await.unwrap_or_else(|_| {
            Err(StoreError::Unavailable(format!(
                "PostgreSQL at {}: the batch holding this decision was dropped",
                self.address
            )))
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
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
            let rest = state.queue.len().saturating_sub(MAX_BATCH);
            let mut batch = std::mem::take(&mut state.queue);
            // The newest stay queued, for the next call that ends.
            state.queue = batch.split_off(batch.len() - rest);
            batch
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            // No runtime (it is shutting down): the queued decisions are answered by the
            // dropped senders (Unavailable), and no call is in flight any more.
            self.lock().in_flight -= 1;
            return;
        };
        // Made before the task, so the turn ends even if the task is dropped unrun.
        let turn = Turn(Arc::clone(self));
        runtime.spawn(async move {
            turn.0.run_batch(batch).await;
            drop(turn);
        });
    }

    /// Sends `batch` as one statement and answers each request.
    async fn run_batch(&self, batch: Vec<Queued>) {
        let (keys, args, windows) = batch_args(&batch);
        let answer = match self.attempt(&keys, &args, &windows).await {
            Err(failure) if failure.may_retry && !failure.schema_gone => {
                self.attempt(&keys, &args, &windows).await
            }
            answer => answer,
        };
        match answer {
            Ok(reply) => {
                let mut values = reply.into_iter();
                for queued in batch {
                    let _ = queued.answer.send(next_reply(&mut values, &self.address));
                }
            }
            Err(failure) => {
                for queued in batch {
                    let _ = queued.answer.send(Err(failure.error.clone()));
                }
            }
        }
    }

    /// One attempt of the batch statement.
    async fn attempt(
        &self,
        keys: &[String],
        args: &[i64],
        windows: &[i32],
    ) -> Result<Vec<i64>, Failure> {
        let client = self
            .pool
            .get()
            .await
            .map_err(|e| pool_failure(&self.address, e))?;
        // Preparing runs nothing: a failure there may always be retried.
        let statement = client.prepare_cached(&self.batch_sql).await.map_err(|e| {
            let mut failure = self.query_failure(&e);
            failure.may_retry = true;
            failure
        })?;
        let row = client
            .query_one(&statement, &[&keys, &args, &windows])
            .await
            .map_err(|e| self.query_failure(&e))?;
        row.try_get(0).map_err(|e| Failure {
            error: StoreError::Protocol(format!("sluice_decide_batch answered: {e}")),
            may_retry: false,
            schema_gone: false,
        })
    }

    fn query_failure(&self, error: &tokio_postgres::Error) -> Failure {
        let failure = query_failure(&self.address, error);
        if failure.schema_gone {
            self.ready.store(false, Ordering::Release);
        }
        failure
    }
}

/// The end of a call in flight, when dropped.
struct Turn(Arc<Batcher>);

impl Drop for Turn {
    fn drop(&mut self) {
        self.0.call_ended();
    }
}

/// `sluice_decide_batch`'s arguments: the batch's distinct counters, every request's
/// windows with their slots renumbered into them, and each request's window count.
fn batch_args(batch: &[Queued]) -> (Vec<String>, Vec<i64>, Vec<i32>) {
    let mut keys: Vec<String> = Vec::new();
    let mut index: HashMap<&str, i64> = HashMap::new();
    let mut args: Vec<i64> = Vec::with_capacity(batch.iter().map(|q| q.call.args.len()).sum());
    let mut windows: Vec<i32> = Vec::with_capacity(batch.len());
    for queued in batch {
        let call = &queued.call;
        let slots: Vec<i64> = call
            .keys
            .iter()
            .map(|key| {
                *index.entry(key.as_str()).or_insert_with(|| {
                    keys.push(key.clone());
                    keys.len() as i64
                })
            })
            .collect();
        for window in call.args.chunks(7) {
            let mut window = window.to_vec();
            // A slot outside the request's keys is left out of range for the function
            // to refuse (0), as sluice_decide would fail on it.
            if let Some(slot) = window.first_mut() {
                *slot = usize::try_from(*slot - 1)
                    .ok()
                    .and_then(|i| slots.get(i).copied())
                    .unwrap_or(0);
            }
            args.extend_from_slice(&window);
        }
        windows.push((call.args.len() / 7) as i32);
    }
    (keys, args, windows)
}

/// One request's part of the batch's reply: a count and that many integers, or -1 and
/// a code.
fn next_reply(values: &mut impl Iterator<Item = i64>, address: &str) -> Result<Vec<i64>, StoreError> {
    let malformed = || {
        StoreError::Protocol(format!(
            "PostgreSQL at {address}: a malformed sluice_decide_batch reply"
        ))
    };
    let count = values.next().ok_or_else(malformed)?;
    if count < 0 {
        let code = values.next().ok_or_else(malformed)?;
        return Err(StoreError::Protocol(format!(
            "PostgreSQL at {address}: sluice_decide_batch refused this request's arguments (code {code})"
        )));
    }
    (0..count)
        .map(|_| values.next().ok_or_else(malformed))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queued(keys: &[&str], args: Vec<i64>) -> Queued {
        let (answer, _) = oneshot::channel();
        Queued {
            call: Call {
                keys: keys.iter().map(|k| k.to_string()).collect(),
                args,
            },
            answer,
        }
    }

    #[test]
    fn slots_are_renumbered_into_the_batchs_distinct_keys() {
        let batch = [
            queued(&["a", "b"], vec![2, 0, 1, 1, 1, 1, 0, 1, 0, 1, 1, 1, 1, 0]),
            queued(&["b", "c"], vec![1, 0, 1, 1, 1, 1, 0, 2, 0, 1, 1, 1, 1, 0]),
            queued(&["a"], vec![5, 0, 1, 1, 1, 1, 0]),
        ];
        let (keys, args, windows) = batch_args(&batch);
        assert_eq!(keys, ["a", "b", "c"]);
        assert_eq!(windows, [2, 2, 1]);
        let slots: Vec<i64> = args.chunks(7).map(|w| w[0]).collect();
        assert_eq!(slots, [2, 1, 2, 3, 0], "a slot out of range stays out of range");
    }

    #[test]
    fn a_refused_request_fails_alone() {
        let mut values = vec![4, 1, 2, 3, 4, -1, 1, 0].into_iter();
        assert_eq!(next_reply(&mut values, "db").expect("first"), [1, 2, 3, 4]);
        assert!(matches!(
            next_reply(&mut values, "db"),
            Err(StoreError::Protocol(_))
        ));
        assert_eq!(next_reply(&mut values, "db").expect("third"), Vec::<i64>::new());
        assert!(next_reply(&mut values, "db").is_err(), "nothing left");
    }
}
