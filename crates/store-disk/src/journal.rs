//! Group commit: decisions append their changes to a shared queue while they still hold
//! their counters' locks, one writer thread commits everything queued as one fjall write
//! batch (one journal write, and one `fdatasync` with `sync: true`), and each decision
//! waits until the batch holding its changes has been committed.
//!
//! Order: changes are queued under the counters' shard locks, so two decisions on one
//! counter are queued, and therefore written, in the order they were decided; batches are
//! committed one after the other. A sequence number per decision says when it is safe.
//!
//! The wait is a [`tokio::sync::watch`] channel, which needs no particular runtime: the
//! HTTP threads' single-threaded runtimes wait on it while they serve other connections,
//! and that is what fills the batches.

use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;

use fjall::{Database, Keyspace, PersistMode};
use sluice_engine::{State, StoreError};
use sluice_store_memory::{Change, HoldChange};
use tokio::sync::watch;

use crate::codec;

/// One write to the keyspace.
enum Op {
    Put(Vec<u8>, codec::Value),
    /// A variable-length value: a concurrency window's holders, a hold record.
    PutBytes(Vec<u8>, Vec<u8>),
    Remove(Vec<u8>),
}

#[derive(Default)]
struct Pending {
    ops: Vec<Op>,
    /// The sequence number of the last decision queued.
    last_seq: u64,
    /// No more writes will be queued: the writer commits what is left and stops.
    closed: bool,
}

/// What the writer has made safe.
#[derive(Clone, Debug, Default)]
struct Durable {
    /// Every decision up to this sequence number is committed.
    seq: u64,
    /// A commit failed: the database refuses writes from now on (fjall poisons itself).
    failed: Option<Arc<str>>,
}

/// The queue and the writer thread behind it.
pub(crate) struct Journal {
    shared: Arc<Shared>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

struct Shared {
    pending: Mutex<Pending>,
    work: Condvar,
    durable: watch::Sender<Durable>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing panics while holding these locks; keep going with the data as it is.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Journal {
    /// Starts the writer thread, committing to `keyspace` with `mode`.
    pub(crate) fn start(
        db: Database,
        keyspace: Keyspace,
        mode: PersistMode,
    ) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            pending: Mutex::new(Pending::default()),
            work: Condvar::new(),
            durable: watch::Sender::new(Durable::default()),
        });
        let writer = {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name("sluice-disk-journal".into())
                .spawn(move || shared.write_until_closed(&db, &keyspace, mode))?
        };
        Ok(Journal {
            shared,
            writer: Mutex::new(Some(writer)),
        })
    }

    /// Queues a decision's changes; returns the sequence number to wait for.
    pub(crate) fn put(&self, changes: &[Change<'_>]) -> u64 {
        self.queue(changes.iter().map(|c| {
            Op::Put(
                codec::key(c.counter, c.key),
                codec::value(&c.state, c.expires_at),
            )
        }))
    }

    /// Queues a reservation's or settlement's changes (counters, concurrency holders and
    /// the hold record); returns the sequence number to wait for.
    pub(crate) fn put_reservation(
        &self,
        changes: &[Change<'_>],
        hold: Option<HoldChange<'_>>,
    ) -> u64 {
        let counters = changes.iter().map(|c| match c.state {
            State::Concurrency { .. } => Op::PutBytes(
                codec::key(c.counter, c.key),
                codec::holders_value(c.holders, c.expires_at),
            ),
            _ => Op::Put(
                codec::key(c.counter, c.key),
                codec::value(&c.state, c.expires_at),
            ),
        });
        let hold = hold.map(|h| {
            Op::PutBytes(
                codec::key(codec::HOLDS, &format!("{:032x}", h.id)),
                codec::hold_value(h.digest, h.expires_at, h.settled),
            )
        });
        self.queue(counters.chain(hold))
    }

    /// Queues the removal of `counter` on `key`; returns the sequence number to wait for.
    pub(crate) fn remove(&self, counter: &str, key: &str) -> u64 {
        self.queue(std::iter::once(Op::Remove(codec::key(counter, key))))
    }

    fn queue(&self, ops: impl Iterator<Item = Op>) -> u64 {
        let mut pending = lock(&self.shared.pending);
        let was_idle = pending.ops.is_empty();
        pending.ops.extend(ops);
        pending.last_seq += 1;
        let seq = pending.last_seq;
        drop(pending);
        if was_idle {
            self.shared.work.notify_one();
        }
        seq
    }

    /// Resolves once every change up to `seq` is committed.
    pub(crate) async fn committed(&self, seq: u64) -> Result<(), StoreError> {
        let mut durable = self.shared.durable.subscribe();
        let state = durable
            .wait_for(|d| d.seq >= seq || d.failed.is_some())
            .await
            .map_err(|_| StoreError::Unavailable("the disk journal writer stopped".into()))?;
        match &state.failed {
            Some(error) if state.seq < seq => Err(StoreError::Unavailable(format!(
                "disk journal write failed: {error}"
            ))),
            _ => Ok(()),
        }
    }

    /// Why the journal stopped accepting writes, if it did.
    pub(crate) fn failure(&self) -> Option<Arc<str>> {
        self.shared.durable.borrow().failed.clone()
    }

    /// Commits what is queued, stops the writer and waits for it.
    pub(crate) fn close(&self) {
        lock(&self.shared.pending).closed = true;
        self.shared.work.notify_one();
        if let Some(writer) = lock(&self.writer).take() {
            let _ = writer.join();
        }
    }
}

/// Bytes of keys and values after which the journal writer rotates the memtable itself,
/// well below the keyspace's `max_memtable_size` (see `write_until_closed`).
pub(crate) const ROTATE_BYTES: u64 = 4 * 1024 * 1024;

impl Shared {
    fn write_until_closed(&self, db: &Database, keyspace: &Keyspace, mode: PersistMode) {
        let mut ops = Vec::new();
        // Bytes written since this thread last rotated the memtable (see `ROTATE_BYTES`).
        let mut unrotated: u64 = 0;
        loop {
            let seq = {
                let mut pending = lock(&self.pending);
                while pending.ops.is_empty() && !pending.closed {
                    pending = self
                        .work
                        .wait(pending)
                        .unwrap_or_else(PoisonError::into_inner);
                }
                if pending.ops.is_empty() {
                    return;
                }
                std::mem::swap(&mut ops, &mut pending.ops);
                pending.last_seq
            };
            let mut batch = db.batch().durability(Some(mode));
            for op in ops.drain(..) {
                match op {
                    Op::Put(key, value) => {
                        unrotated += (key.len() + value.as_bytes().len()) as u64;
                        batch.insert(keyspace, key, value.as_bytes())
                    }
                    Op::PutBytes(key, value) => {
                        unrotated += (key.len() + value.len()) as u64;
                        batch.insert(keyspace, key, value)
                    }
                    Op::Remove(key) => {
                        unrotated += key.len() as u64;
                        batch.remove(keyspace, key)
                    }
                }
            }
            match batch.commit() {
                Ok(()) => {
                    self.durable.send_modify(|d| d.seq = seq);
                    // fjall 3.1 rotates a full memtable by a message to its single worker,
                    // which then sends itself a flush on the same bounded channel: under a
                    // write flood the channel fills with rotation requests and the worker
                    // blocks on its own queue, hanging every write (fjall-rs/fjall#323).
                    // Rotating here, on this thread, long before the memtable is full,
                    // means the worker is never asked to rotate.
                    if unrotated >= ROTATE_BYTES {
                        unrotated = 0;
                        if let Err(error) = keyspace.rotate_memtable() {
                            tracing::warn!(%error, "disk store: memtable rotation failed; retried after the next writes");
                        }
                    }
                }
                Err(error) => {
                    tracing::error!(%error, "disk store: journal write failed; decisions will fail until sluice is restarted");
                    let message: Arc<str> = error.to_string().into();
                    self.durable.send_modify(|d| d.failed = Some(message));
                }
            }
        }
    }
}
