//! The embedded durable counter store (`storage.backend: disk`): counters survive a
//! restart and a `kill -9`, for a single sluice instance with no database.
//!
//! Decisions are served from memory: a [`MemoryStore`] decides every request with
//! [`sluice_engine::apply`] under its shard locks, exactly as the memory backend does.
//! Behind it, every counter a decision changes is written to an embedded
//! [fjall](https://docs.rs/fjall) LSM keyspace, and [`DiskStore`]'s `decide` returns only
//! once that write has been committed:
//!
//! - **Acknowledged means written.** With the default `sync: false` the commit has
//!   reached the operating system (`write(2)` of fjall's journal), which survives the
//!   process being killed at any instant. With `sync: true` it has also been
//!   `fdatasync`ed, which survives a power loss or kernel crash.
//! - **Group commit.** Changes are queued while the decision still holds its counters'
//!   locks, so two decisions on one counter are persisted in decision order; one writer
//!   thread commits everything queued as one batch (one journal write, one sync), while
//!   the HTTP event loops keep serving other connections.
//! - **Restart.** [`DiskStore::open`] replays fjall's journal, reads every unexpired
//!   counter into memory and serves from there.
//! - **Expiry.** Expired counters are dropped from memory by the memory store's
//!   sweeper; on disk a compaction filter turns every expired counter it meets into a
//!   tombstone, and a maintenance thread runs a full compaction when the tables have
//!   doubled since the last one, so a key flood leaves a bounded data directory.
//!
//! - **Reservations.** Hold records (under the reserved counter name `~hold`) and
//!   concurrency windows' holders are journaled with the counters a reservation or
//!   settlement changes, in the same batch, and read back at start: a reservation
//!   made before a restart is settled after it, and its slot stays held.
//!
//! Memory is bounded by `max_keys` as for the memory store. A counter evicted from
//! memory under pressure keeps its last state on disk until it expires; it is read back
//! only on the next start.

mod codec;
mod journal;

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use fjall::compaction::filter::{
    CompactionFilter, CompactionFilterResult, Context, Factory, ItemAccessor, Verdict,
};
use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use sluice_engine::{
    Clock, DecisionRequest, Hold, Limit, Outcomes, Record, Records, SettleStatus, Settlement,
    Store, StoreError, StoreFuture, StoreStats, SystemClock,
};
use sluice_store_memory::MemoryStore;
pub use sluice_store_memory::MemoryStoreConfig;

use crate::journal::Journal;

/// The keyspace (fjall's name for a table) the counters live in.
const KEYSPACE: &str = "counters";

/// The keyspace runtime records live in.
const RECORDS_KEYSPACE: &str = "records";

/// Sealed journal files kept at most before fjall flushes the keyspaces that pin them
/// (fjall's smallest setting). The active journal is sealed at 64 MB.
const MAX_SEALED_JOURNALS: u64 = 64 * 1024 * 1024;

/// Settings of a [`DiskStore`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskStoreConfig {
    /// The data directory; created when missing. One sluice process at a time may use it.
    pub path: PathBuf,
    /// `fdatasync` every commit: acknowledged decisions survive a power loss, not only a
    /// crash of the process. Costs a disk flush per group commit.
    pub sync: bool,
    /// The in-memory layer decisions are served from (`max_keys`, `sweep_interval`).
    pub memory: MemoryStoreConfig,
    /// How often the maintenance thread checks whether the tables have grown enough to
    /// compact expired counters away.
    pub maintenance_interval: Duration,
    /// Table size below which no full compaction is started, in bytes.
    pub compaction_floor_bytes: u64,
}

impl DiskStoreConfig {
    /// Defaults for a data directory: no sync, the memory store's defaults, maintenance
    /// every 10 s, no full compaction below 32 MiB of tables.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        DiskStoreConfig {
            path: path.into(),
            sync: false,
            memory: MemoryStoreConfig::default(),
            maintenance_interval: Duration::from_secs(10),
            compaction_floor_bytes: 32 * 1024 * 1024,
        }
    }
}

/// Why the disk store could not open or maintain its data.
#[derive(Debug, thiserror::Error)]
pub enum DiskStoreError {
    /// The data directory could not be created.
    #[error("cannot create the data directory {path}: {source}")]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// fjall could not open or recover the database (locked by another process, corrupt,
    /// unreadable).
    #[error(
        "cannot open the disk store at {path}: {source} (is another sluice using this directory?)"
    )]
    Open {
        /// The directory.
        path: PathBuf,
        /// fjall's error.
        source: fjall::Error,
    },
    /// Reading the stored counters back failed.
    #[error("cannot read the counters stored at {path}: {source}")]
    Load {
        /// The directory.
        path: PathBuf,
        /// fjall's error.
        source: fjall::Error,
    },
    /// A compaction failed.
    #[error("compaction of the disk store failed: {0}")]
    Compact(fjall::Error),
    /// A background thread could not be started.
    #[error("cannot start the disk store's {what} thread: {source}")]
    Thread {
        /// Which thread.
        what: &'static str,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// What [`DiskStore::open`] found in the data directory.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoadReport {
    /// Unexpired counters read back into memory.
    pub restored: u64,
    /// Expired counters skipped.
    pub expired: u64,
    /// Entries that could not be read (written by another format) and were skipped.
    pub unreadable: u64,
}

/// A durable store: decisions from memory, every change committed to fjall before the
/// decision is returned. Cheap to share behind an `Arc`.
pub struct DiskStore {
    memory: MemoryStore,
    journal: Journal,
    db: Database,
    keyspace: Keyspace,
    /// Runtime records (see [`sluice_engine::records`]), apart from the counters: they
    /// never expire by themselves, and are few.
    records: Keyspace,
    path: PathBuf,
    loaded: LoadReport,
    stop_maintenance: Mutex<Option<mpsc::Sender<()>>>,
    maintenance: Mutex<Option<JoinHandle<()>>>,
}

impl DiskStore {
    /// Opens (or creates) the store at `config.path` on the system clock.
    pub fn open(config: DiskStoreConfig) -> Result<Self, DiskStoreError> {
        Self::open_with_clock(config, Arc::new(SystemClock::new()))
    }

    /// Opens (or creates) the store on the given clock (tests use a manual one).
    pub fn open_with_clock(
        config: DiskStoreConfig,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, DiskStoreError> {
        let path = config.path.clone();
        std::fs::create_dir_all(&path).map_err(|source| DiskStoreError::CreateDir {
            path: path.clone(),
            source,
        })?;
        let open_error = |source| DiskStoreError::Open {
            path: path.clone(),
            source,
        };
        let factory: Arc<dyn Factory> = Arc::new(DropExpired {
            clock: AssertUnwindSafe(Arc::clone(&clock)),
        });
        let db = Database::builder(&path)
            .worker_threads(1)
            .max_journaling_size(MAX_SEALED_JOURNALS)
            .with_compaction_filter_factories(Arc::new(move |name: &str| {
                (name == KEYSPACE).then(|| Arc::clone(&factory))
            }))
            .open()
            .map_err(open_error)?;
        let keyspace = db
            .keyspace(KEYSPACE, || {
                // The journal writer rotates at `ROTATE_BYTES`; this is only the backstop
                // at which fjall's worker would be asked to (see journal.rs).
                KeyspaceCreateOptions::default().max_memtable_size(64 * 1024 * 1024)
            })
            .map_err(open_error)?;

        let records = db
            .keyspace(RECORDS_KEYSPACE, KeyspaceCreateOptions::default)
            .map_err(open_error)?;

        let memory = MemoryStore::with_clock(config.memory, Arc::clone(&clock));
        for item in records.iter() {
            let (id, body) = item.into_inner().map_err(|source| DiskStoreError::Load {
                path: path.clone(),
                source,
            })?;
            memory.put_record_sync(&Record {
                id: String::from_utf8_lossy(&id).into_owned(),
                body: String::from_utf8_lossy(&body).into_owned(),
            });
        }
        let loaded =
            load(&keyspace, &memory, clock.now()).map_err(|source| DiskStoreError::Load {
                path: path.clone(),
                source,
            })?;

        let mode = if config.sync {
            PersistMode::SyncData
        } else {
            PersistMode::Buffer
        };
        let journal = Journal::start(db.clone(), keyspace.clone(), mode).map_err(|source| {
            DiskStoreError::Thread {
                what: "journal",
                source,
            }
        })?;

        let (stop, stopped) = mpsc::channel();
        let maintenance = {
            let keyspace = keyspace.clone();
            let interval = config.maintenance_interval.max(Duration::from_millis(10));
            let floor = config.compaction_floor_bytes;
            std::thread::Builder::new()
                .name("sluice-disk-maintenance".into())
                .spawn(move || maintain(&keyspace, &stopped, interval, floor))
        };
        let maintenance = match maintenance {
            Ok(handle) => handle,
            Err(source) => {
                journal.close();
                return Err(DiskStoreError::Thread {
                    what: "maintenance",
                    source,
                });
            }
        };
        Ok(DiskStore {
            memory,
            journal,
            db,
            keyspace,
            records,
            path,
            loaded,
            stop_maintenance: Mutex::new(Some(stop)),
            maintenance: Mutex::new(Some(maintenance)),
        })
    }

    /// The data directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What opening found in the data directory.
    pub fn load_report(&self) -> LoadReport {
        self.loaded
    }

    /// How many counters are held in memory.
    pub fn len(&self) -> usize {
        self.memory.len()
    }

    /// Whether no counters are held in memory.
    pub fn is_empty(&self) -> bool {
        self.memory.is_empty()
    }

    /// Drops expired counters from memory now (a background thread does this periodically).
    pub fn sweep(&self) {
        self.memory.sweep();
    }

    /// Flushes the in-memory write buffer to a table and compacts every table, dropping
    /// expired counters from disk now (the maintenance thread does this when the tables
    /// have doubled). Blocks until done.
    pub fn compact(&self) -> Result<(), DiskStoreError> {
        self.keyspace
            .rotate_memtable_and_wait()
            .map_err(DiskStoreError::Compact)?;
        self.keyspace
            .major_compact()
            .map_err(DiskStoreError::Compact)
    }

    /// Bytes the store's tables and journals take on disk.
    pub fn disk_space(&self) -> u64 {
        self.db.disk_space().unwrap_or(0)
    }

    /// Writes a record change through to disk, synced: admin calls are rare, and an
    /// acknowledged block must survive a power loss.
    fn write_record(
        &self,
        change: impl FnOnce(&Keyspace) -> Result<(), fjall::Error>,
    ) -> Result<(), StoreError> {
        change(&self.records)
            .and_then(|()| self.db.persist(PersistMode::SyncAll))
            .map_err(|e| StoreError::Unavailable(format!("disk record write failed: {e}")))
    }

    fn failed(&self) -> Option<StoreError> {
        self.journal
            .failure()
            .map(|e| StoreError::Unavailable(format!("disk journal write failed: {e}")))
    }
}

impl Drop for DiskStore {
    fn drop(&mut self) {
        // Commit what is queued, then stop maintenance, before fjall closes.
        self.journal.close();
        let stop = self
            .stop_maintenance
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        drop(stop);
        if let Some(handle) = self
            .maintenance
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            let _ = handle.join();
        }
        if let Err(error) = self.db.persist(PersistMode::SyncAll) {
            tracing::warn!(%error, "disk store: final sync failed");
        }
    }
}

/// Reads every stored counter back into `memory`.
fn load(keyspace: &Keyspace, memory: &MemoryStore, now: i64) -> Result<LoadReport, fjall::Error> {
    let mut report = LoadReport::default();
    let mut names: HashMap<Box<str>, Arc<str>> = HashMap::new();
    for item in keyspace.iter() {
        let (raw_key, raw_value) = item.into_inner()?;
        let (Some((counter, key)), Some((stored, expires_at))) =
            (codec::split_key(&raw_key), codec::decode_any(&raw_value))
        else {
            report.unreadable += 1;
            continue;
        };
        if expires_at <= now {
            report.expired += 1;
            continue;
        }
        let name = match names.get(counter) {
            Some(name) => Arc::clone(name),
            None => {
                let name: Arc<str> = counter.into();
                names.insert(counter.into(), Arc::clone(&name));
                name
            }
        };
        match stored {
            codec::Stored::Counter(state) => memory.restore(&name, key, state, expires_at),
            codec::Stored::Holders(holders) => memory.restore_holders(&name, key, &holders),
            codec::Stored::Hold { digest, settled } => {
                let Some(id) = sluice_store_memory::parse_hold_id(key) else {
                    report.unreadable += 1;
                    continue;
                };
                memory.restore_hold(id, &digest, expires_at, settled);
            }
        }
        report.restored += 1;
    }
    Ok(report)
}

/// Full compaction whenever the tables have doubled since the last one (and are past
/// `floor`): bounds the space expired counters can take.
fn maintain(keyspace: &Keyspace, stop: &mpsc::Receiver<()>, interval: Duration, floor: u64) {
    let mut after_last = 0u64;
    while let Err(RecvTimeoutError::Timeout) = stop.recv_timeout(interval) {
        let size = keyspace.disk_space();
        if size > floor.max(after_last.saturating_mul(2)) {
            match keyspace.major_compact() {
                Ok(()) => after_last = keyspace.disk_space(),
                Err(error) => tracing::warn!(%error, "disk store: compaction failed"),
            }
        }
    }
}

/// The compaction filter: an expired counter becomes a tombstone.
struct DropExpired {
    // A clock is read, never left half-updated: nothing to observe after a panic.
    clock: AssertUnwindSafe<Arc<dyn Clock>>,
}

impl Factory for DropExpired {
    fn name(&self) -> &str {
        "sluice-drop-expired"
    }

    fn make_filter(&self, _: &Context) -> Box<dyn CompactionFilter> {
        Box::new(DropExpiredFilter {
            now: self.clock.now(),
        })
    }
}

struct DropExpiredFilter {
    now: i64,
}

impl CompactionFilter for DropExpiredFilter {
    fn filter_item(&mut self, item: ItemAccessor<'_>, _: &Context) -> CompactionFilterResult {
        let value = item.value()?;
        Ok(match codec::expires_at(&value) {
            Some(at) if at <= self.now => Verdict::Remove,
            _ => Verdict::Keep,
        })
    }
}

impl Store for DiskStore {
    fn decide<'a>(&'a self, request: &'a DecisionRequest) -> StoreFuture<'a, Outcomes> {
        if let Some(error) = self.failed() {
            return Box::pin(std::future::ready(Err(error)));
        }
        let mut seq = None;
        let outcomes = self.memory.decide_sync_with(request, |changes| {
            seq = Some(self.journal.put(changes));
        });
        match seq {
            // Nothing written (a read, a dry run, a denial): nothing to wait for.
            None => Box::pin(std::future::ready(Ok(outcomes))),
            Some(seq) => Box::pin(async move {
                self.journal.committed(seq).await?;
                Ok(outcomes)
            }),
        }
    }

    fn refund<'a>(
        &'a self,
        request: &'a DecisionRequest,
        charged: &'a [bool],
    ) -> StoreFuture<'a, ()> {
        if let Some(error) = self.failed() {
            return Box::pin(std::future::ready(Err(error)));
        }
        let mut seq = None;
        self.memory.refund_sync_with(request, charged, |changes| {
            seq = Some(self.journal.put(changes));
        });
        match seq {
            None => Box::pin(std::future::ready(Ok(()))),
            Some(seq) => Box::pin(async move { self.journal.committed(seq).await }),
        }
    }

    fn reserve<'a>(
        &'a self,
        request: &'a DecisionRequest,
        hold: &'a Hold,
    ) -> StoreFuture<'a, Outcomes> {
        if let Some(error) = self.failed() {
            return Box::pin(std::future::ready(Err(error)));
        }
        let mut seq = None;
        let outcomes = self
            .memory
            .reserve_sync_with(request, hold, |changes, hold| {
                seq = Some(self.journal.put_reservation(changes, hold));
            });
        match seq {
            None => Box::pin(std::future::ready(Ok(outcomes))),
            Some(seq) => Box::pin(async move {
                self.journal.committed(seq).await?;
                Ok(outcomes)
            }),
        }
    }

    fn settle<'a>(&'a self, settlement: &'a Settlement) -> StoreFuture<'a, SettleStatus> {
        if let Some(error) = self.failed() {
            return Box::pin(std::future::ready(Err(error)));
        }
        let mut seq = None;
        let status = self.memory.settle_sync_with(settlement, |changes, hold| {
            seq = Some(self.journal.put_reservation(changes, hold));
        });
        match seq {
            None => Box::pin(std::future::ready(Ok(status))),
            Some(seq) => Box::pin(async move {
                self.journal.committed(seq).await?;
                Ok(status)
            }),
        }
    }

    fn reset_limit<'a>(&'a self, limit: &'a Limit) -> StoreFuture<'a, u64> {
        let mut seq = 0;
        let removed = self.memory.reset_limit_sync_with(limit, |counter, key| {
            seq = seq.max(self.journal.remove(counter, key));
        });
        Box::pin(async move {
            self.journal.committed(seq).await?;
            Ok(removed)
        })
    }

    fn reset<'a>(&'a self, limit: &'a Limit, key: &'a str) -> StoreFuture<'a, ()> {
        let mut seq = 0;
        self.memory.reset_sync_with(limit, key, |counter| {
            seq = self.journal.remove(counter, key);
        });
        Box::pin(async move { self.journal.committed(seq).await })
    }

    fn records(&self) -> StoreFuture<'_, Records> {
        Box::pin(std::future::ready(Ok(self.memory.records_sync())))
    }

    fn records_version(&self) -> StoreFuture<'_, u64> {
        Box::pin(std::future::ready(Ok(self.memory.records_sync().version)))
    }

    // Written through (synced) before memory, so what was acknowledged is on disk. A
    // blocking write on the caller's thread: admin calls are rare.
    fn put_record<'a>(&'a self, record: &'a Record) -> StoreFuture<'a, u64> {
        let written = self
            .write_record(|records| records.insert(record.id.as_bytes(), record.body.as_bytes()))
            .map(|()| self.memory.put_record_sync(record));
        Box::pin(std::future::ready(written))
    }

    fn remove_record<'a>(&'a self, id: &'a str) -> StoreFuture<'a, bool> {
        let written = self
            .write_record(|records| records.remove(id.as_bytes()))
            .map(|()| self.memory.remove_record_sync(id));
        Box::pin(std::future::ready(written))
    }

    fn ping(&self) -> StoreFuture<'_, ()> {
        Box::pin(std::future::ready(match self.failed() {
            Some(error) => Err(error),
            None => Ok(()),
        }))
    }

    fn stats(&self) -> StoreStats {
        self.memory.stats()
    }

    fn backend(&self) -> &'static str {
        "disk"
    }
}
