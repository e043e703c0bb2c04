//! Decisions from concurrent requests sharing transactions (the queue itself is
//! `sluice-store-batch`'s, as Redis's is).
//!
//! A charging decision arriving while fewer than [`LIMITS`]' `max_in_flight` calls are
//! in flight is sent at once, as one `sluice_decide` statement: no added latency when
//! load is light. One arriving while they are waits in a queue; when a call in flight
//! ends, everything queued (up to `max_batch` requests) goes as one `sluice_decide_batch`
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
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use deadpool_postgres::Pool;
use sluice_engine::StoreError;
use sluice_store_batch::{Batch, Limits, answer_each};

use crate::error::{Failure, pool_failure, query_failure};

/// How many calls may be in flight before decisions queue, and how many requests one
/// batch holds at most. One in flight, where Redis has two: a batch's cost in
/// PostgreSQL is mostly per transaction, so the fewer calls, the bigger the batches and
/// the less CPU per decision (measured with 64 connections on 2 cores: 32 µs of
/// PostgreSQL CPU per decision with 1 in flight, 43-56 with 2, 53-78 with 4, 210-335
/// unbatched; BENCHMARKS.md), and more requests per second. Other instances' calls
/// still run beside this one's. The batch bound keeps the statement's arguments, and
/// the time a batch holds its locks, bounded.
pub(crate) const LIMITS: Limits = Limits {
    max_in_flight: 1,
    max_batch: 256,
};

/// One decision's arguments as `sluice_decide` takes them: its distinct counters, and
/// seven integers per window whose slots index `keys` (1-based).
pub(crate) struct Call {
    pub(crate) keys: Vec<String>,
    pub(crate) args: Vec<i64>,
}

/// Sends queued decisions as one `sluice_decide_batch` statement.
pub(crate) struct PgBatch {
    pool: Pool,
    /// `sluice_decide_batch`'s statement, schema filled in.
    batch_sql: String,
    address: String,
    /// The store's "schema is installed" flag: a batch that finds the schema gone
    /// clears it, so that the next decision installs it again.
    ready: Arc<AtomicBool>,
}

impl PgBatch {
    pub(crate) fn new(
        pool: Pool,
        batch_sql: String,
        address: String,
        ready: Arc<AtomicBool>,
    ) -> Self {
        PgBatch {
            pool,
            batch_sql,
            address,
            ready,
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

impl Batch for PgBatch {
    type Call = Call;
    type Reply = Vec<i64>;

    /// Sent once, and again only when the server's answer proves the first attempt
    /// rolled back; a schema found gone is not retried here (installing it needs the
    /// store): the next decision does it.
    async fn send(&self, calls: Vec<Call>) -> Vec<Result<Vec<i64>, StoreError>> {
        let (keys, args, windows) = batch_args(&calls);
        let answer = match self.attempt(&keys, &args, &windows).await {
            Err(failure) if failure.may_retry && !failure.schema_gone => {
                self.attempt(&keys, &args, &windows).await
            }
            answer => answer,
        };
        let reply = answer.map_err(|failure| failure.error);
        answer_each(calls.len(), reply, |values| {
            next_reply(values, &self.address)
        })
    }

    fn dropped(&self) -> StoreError {
        StoreError::Unavailable(format!(
            "PostgreSQL at {}: the batch holding this decision was dropped",
            self.address
        ))
    }
}

/// `sluice_decide_batch`'s arguments: the batch's distinct counters, every request's
/// windows with their slots renumbered into them, and each request's window count.
fn batch_args(batch: &[Call]) -> (Vec<String>, Vec<i64>, Vec<i32>) {
    let mut keys: Vec<String> = Vec::new();
    let mut index: HashMap<&str, i64> = HashMap::new();
    let mut args: Vec<i64> = Vec::with_capacity(batch.iter().map(|call| call.args.len()).sum());
    let mut windows: Vec<i32> = Vec::with_capacity(batch.len());
    for call in batch {
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
fn next_reply(
    values: &mut impl Iterator<Item = i64>,
    address: &str,
) -> Result<Vec<i64>, StoreError> {
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

    fn queued(keys: &[&str], args: Vec<i64>) -> Call {
        Call {
            keys: keys.iter().map(|k| k.to_string()).collect(),
            args,
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
        assert_eq!(
            slots,
            [2, 1, 2, 3, 0],
            "a slot out of range stays out of range"
        );
    }

    #[test]
    fn a_refused_request_fails_alone() {
        let mut values = vec![4, 1, 2, 3, 4, -1, 1, 0].into_iter();
        assert_eq!(next_reply(&mut values, "db").expect("first"), [1, 2, 3, 4]);
        assert!(matches!(
            next_reply(&mut values, "db"),
            Err(StoreError::Protocol(_))
        ));
        assert_eq!(
            next_reply(&mut values, "db").expect("third"),
            Vec::<i64>::new()
        );
        assert!(next_reply(&mut values, "db").is_err(), "nothing left");
    }
}
