//! Decisions from concurrent requests sharing round trips (single server and Sentinel;
//! not a Redis Cluster, where scripts are per slot).
//!
//! A decision arriving while fewer than [`MAX_IN_FLIGHT`] calls are in flight is sent at
//! once, as one `EVALSHA` of `decide.lua`: no added latency when load is light. One
//! arriving while they are waits in a queue; when a call in flight ends, everything
//! queued goes as one
//! `EVALSHA` of the batch script (`batch.lua`), which runs `decide.lua` for each request
//! in turn inside one script run and answers each its own reply (or its own error). So
//! under load the number of calls (and Redis's per-call work: the command, the script's
//! setup, `TIME`) falls with the number of requests waiting, while each decision stays
//! what it was alone: Redis runs the batch as one script, requests in arrival order.
//!
//! A batch is sent once, never again (it charges): when it fails, every request in it
//! gets the failure, and the `on_error` policy decides them. A request whose caller gave
//! up (a timeout) while queued is still decided when its batch goes, as a call that
//! timed out may still have run on the server.

use std::sync::{Arc, Mutex};

use redis::Value;
use sluice_engine::StoreError;
use tokio::sync::oneshot;

use crate::connection::Connections;
use crate::store_error;

/// How many calls may be in flight before decisions queue: two keeps Redis busy while
/// the previous reply travels back.
const MAX_IN_FLIGHT: usize = 2;

/// One decision's script keys and arguments (`decide.lua`'s KEYS and ARGV).
pub(crate) struct Call {
    pub(crate) keys: Vec<String>,
    pub(crate) args: Vec<Vec<u8>>,
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
    connections: Connections,
    decide_script: redis::Script,
    batch_script: redis::Script,
    address: String,
}

impl Batcher {
    pub(crate) fn new(
        connections: Connections,
        decide_script: redis::Script,
        batch_script: redis::Script,
        address: String,
    ) -> Self {
        Batcher {
            state: Mutex::new(State::default()),
            connections,
            decide_script,
            batch_script,
            address,
        }
    }

    /// Decides `call` (never repeated): at once when few calls are in flight, else with
    /// the others waiting, in one batch.
    pub(crate) async fn decide(self: &Arc<Self>, call: Call) -> Result<Vec<i64>, StoreError> {
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
                return self.run_one(&call).await;
            }
        };
        waiting.await.unwrap_or_else(|_| {
            Err(StoreError::Unavailable(format!(
                "Redis at {}: the batch holding this decision was dropped",
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
            std::mem::take(&mut state.queue)
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

    async fn run_one(&self, call: &Call) -> Result<Vec<i64>, StoreError> {
        let mut invocation = self.decide_script.prepare_invoke();
        for key in &call.keys {
            invocation.key(key);
        }
        for arg in &call.args {
            invocation.arg(arg.as_slice());
        }
        invoke_once(&invocation, &self.connections, &self.address).await
    }

    /// Sends `batch` as one call (one alone as a plain decision) and answers each.
    async fn run_batch(&self, batch: Vec<Queued>) {
        if let [_] = batch.as_slice() {
            for queued in batch {
                let answer = self.run_one(&queued.call).await;
                let _ = queued.answer.send(answer);
            }
            return;
        }
        let mut invocation = self.batch_script.prepare_invoke();
        invocation.arg(batch.len());
        for queued in &batch {
            invocation
                .arg(queued.call.keys.len())
                .arg(queued.call.args.len());
            for key in &queued.call.keys {
                invocation.key(key);
            }
        }
        for queued in &batch {
            for arg in &queued.call.args {
                invocation.arg(arg.as_slice());
            }
        }
        let reply: Result<Vec<Value>, StoreError> =
            invoke_once(&invocation, &self.connections, &self.address).await;
        match reply {
            Ok(values) => {
                let mut values = values.into_iter();
                for queued in batch {
                    let _ = queued.answer.send(next_reply(&mut values, &self.address));
                }
            }
            Err(error) => {
                for queued in batch {
                    let _ = queued.answer.send(Err(error.clone()));
                }
            }
        }
    }
}

/// Runs `invocation` once; again only if the connection was refused (nothing was sent).
async fn invoke_once<T: redis::FromRedisValue>(
    invocation: &redis::ScriptInvocation<'_>,
    connections: &Connections,
    address: &str,
) -> Result<T, StoreError> {
    match invocation.invoke_async(&mut connections.get()).await {
        Err(error) if error.is_connection_refusal() => invocation
            .invoke_async(&mut connections.get())
            .await
            .map_err(|error| store_error(address, error)),
        answer => answer.map_err(|error| store_error(address, error)),
    }
}

/// The end of a call in flight, when dropped.
struct Turn(Arc<Batcher>);

impl Drop for Turn {
    fn drop(&mut self) {
        self.0.call_ended();
    }
}

/// One request's part of the batch script's reply: a count and that many integers, or
/// -1 and the error's text.
fn next_reply(
    values: &mut impl Iterator<Item = Value>,
    address: &str,
) -> Result<Vec<i64>, StoreError> {
    let malformed = || StoreError::Protocol(format!("Redis at {address}: a malformed batch reply"));
    let count = match values.next() {
        Some(Value::Int(count)) => count,
        _ => return Err(malformed()),
    };
    if count < 0 {
        let text = match values.next() {
            Some(Value::BulkString(bytes)) => String::from_utf8_lossy(&bytes).into_owned(),
            Some(Value::SimpleString(text)) => text,
            _ => return Err(malformed()),
        };
        return Err(StoreError::Protocol(format!(
            "Redis at {address}: the decision script failed: {text}"
        )));
    }
    (0..count)
        .map(|_| match values.next() {
            Some(Value::Int(n)) => Ok(n),
            _ => Err(malformed()),
        })
        .collect()
}
