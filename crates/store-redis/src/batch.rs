//! Decisions from concurrent requests sharing round trips.
//!
//! The queue is `sluice-store-batch`'s (as PostgreSQL's is): one on a single server or
//! through Sentinel, one per slot in a Redis Cluster (a script may only touch keys of
//! one slot, so only decisions of one slot can share a script call; slots are at most
//! 16384, so are the queues). A decision arriving while fewer than [`LIMITS`]'
//! `max_in_flight` calls are in flight (in its queue) is sent at once, as one
//! `EVALSHA` of `decide.lua`: no added latency when load is light. One arriving while
//! they are waits in a queue; when a call in flight ends, everything queued goes as one
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

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use redis::Value;
use redis::cluster_routing::Slot;
use sluice_engine::StoreError;
use sluice_store_batch::{Batch, Limits, answer_each};

use crate::connection::Connections;
use crate::store_error;

/// How many calls may be in flight before decisions queue: two keeps Redis busy while
/// the previous reply travels back. Batches are not bounded: one script run holds
/// Redis anyway, and a reply is a few integers per request.
const LIMITS: Limits = Limits {
    max_in_flight: 2,
    max_batch: usize::MAX,
};

/// One decision's script keys and arguments (`decide.lua`'s KEYS and ARGV).
pub(crate) struct Call {
    pub(crate) keys: Vec<String>,
    pub(crate) args: Vec<Vec<u8>>,
}

/// Queues decisions behind the calls in flight and sends them together.
pub(crate) struct Batcher {
    scripts: Arc<Scripts>,
    queues: Queues,
}

/// One queue of decisions that may share a script call.
type Queue = sluice_store_batch::Batcher<SharedScripts>;

/// Where a decision queues.
enum Queues {
    /// A single server (or the primary behind Sentinel): every decision.
    One(Arc<Queue>),
    /// A Redis Cluster: the decisions whose keys live in one slot, made on first use.
    PerSlot(Mutex<HashMap<Slot, Arc<Queue>>>),
}

/// The scripts, shared by every queue.
struct SharedScripts(Arc<Scripts>);

/// The scripts a decision goes through, alone or in a batch.
struct Scripts {
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
        let cluster = connections.is_cluster();
        let scripts = Arc::new(Scripts {
            connections,
            decide_script,
            batch_script,
            address,
        });
        let queues = if cluster {
            Queues::PerSlot(Mutex::new(HashMap::new()))
        } else {
            Queues::One(Arc::new(Queue::new(
                SharedScripts(Arc::clone(&scripts)),
                LIMITS,
            )))
        };
        Batcher { scripts, queues }
    }

    /// Decides `call` (never repeated): at once when few calls are in flight (in its
    /// slot, in a cluster), else with the others waiting, in one batch.
    pub(crate) async fn decide(&self, call: Call) -> Result<Vec<i64>, StoreError> {
        let scripts = &self.scripts;
        let alone = |call: Call| async move { scripts.run_one(&call).await };
        match &self.queues {
            Queues::One(queue) => queue.submit(call, alone).await,
            Queues::PerSlot(queues) => {
                Self::slot_queue(queues, scripts, &call)
                    .submit(call, alone)
                    .await
            }
        }
    }

    /// The queue of `call`'s slot, made on first use.
    fn slot_queue(
        queues: &Mutex<HashMap<Slot, Arc<Queue>>>,
        scripts: &Arc<Scripts>,
        call: &Call,
    ) -> Arc<Queue> {
        // Every key of a call is in one slot (the store splits decisions by slot).
        let slot = call.keys.first().map_or(Slot::for_key(""), Slot::for_key);
        // No code panics while holding it; a poisoned map is still a valid map.
        let mut queues = queues.lock().unwrap_or_else(|e| e.into_inner());
        let queue = queues
            .entry(slot)
            .or_insert_with(|| Arc::new(Queue::new(SharedScripts(Arc::clone(scripts)), LIMITS)));
        Arc::clone(queue)
    }
}

impl Scripts {
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
}

impl Batch for SharedScripts {
    type Call = Call;
    type Reply = Vec<i64>;

    async fn send(&self, batch: Vec<Call>) -> Vec<Result<Vec<i64>, StoreError>> {
        self.0.send(batch).await
    }

    fn dropped(&self) -> StoreError {
        StoreError::Unavailable(format!(
            "Redis at {}: the batch holding this decision was dropped",
            self.0.address
        ))
    }
}

impl Scripts {
    /// One `EVALSHA` of the batch script (one call alone as a plain decision), never
    /// repeated but for a refused connection. In a cluster every key of the batch is in
    /// one slot, so the client routes the call to the slot's node.
    async fn send(&self, batch: Vec<Call>) -> Vec<Result<Vec<i64>, StoreError>> {
        if let [call] = batch.as_slice() {
            return vec![self.run_one(call).await];
        }
        let mut invocation = self.batch_script.prepare_invoke();
        invocation.arg(batch.len());
        for call in &batch {
            invocation.arg(call.keys.len()).arg(call.args.len());
            for key in &call.keys {
                invocation.key(key);
            }
        }
        for call in &batch {
            for arg in &call.args {
                invocation.arg(arg.as_slice());
            }
        }
        let reply: Result<Vec<Value>, StoreError> =
            invoke_once(&invocation, &self.connections, &self.address).await;
        answer_each(batch.len(), reply, |values| {
            next_reply(values, &self.address)
        })
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
