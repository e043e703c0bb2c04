//! The runtime entries as one instance enforces them: the directory every decision
//! reads, refreshed from the store's records when their version moves. The sluice
//! server and the tower layer both hold one.
//!
//! Every instance polls the version every [`POLL_INTERVAL`] (one cheap store call), so
//! a change made through any instance is enforced by all of them within that interval
//! plus one store round trip. The instance that made a change refreshes at once. While
//! the store cannot be read, the entries last read stay in force.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use sluice_engine::{LimitSet, Records, Store, StoreError};

use crate::Directory;

/// How often every instance asks the store whether the entries changed.
pub const POLL_INTERVAL: Duration = Duration::from_millis(250);

/// The entries this instance enforces.
#[derive(Debug)]
pub struct Access {
    directory: ArcSwap<Directory>,
    /// Whether the store's records were read at least once.
    read: AtomicBool,
}

impl Access {
    /// No entries yet, against `limits`.
    pub fn new(limits: &LimitSet) -> Self {
        Access {
            directory: ArcSwap::from_pointee(Directory::build(&Records::default(), limits)),
            read: AtomicBool::new(false),
        }
    }

    /// Whether the store's records were read at least once (a new instance reads them
    /// before it answers its first request).
    pub fn has_read(&self) -> bool {
        self.read.load(Ordering::Acquire)
    }

    /// The directory now.
    pub fn directory(&self) -> Arc<Directory> {
        self.directory.load_full()
    }

    /// The directory now, for the hot path: no reference count is touched (threads
    /// would contend on it), so hold the guard only while deciding.
    pub fn current(&self) -> arc_swap::Guard<Arc<Directory>> {
        self.directory.load()
    }

    /// Reads the records when their version moved since the last read (or when none
    /// was read yet), and swaps in their directory. Answers whether it did.
    pub async fn refresh(&self, store: &dyn Store, limits: &LimitSet) -> Result<bool, StoreError> {
        if self.read.load(Ordering::Acquire)
            && store.records_version().await? == self.directory.load().version()
        {
            return Ok(false);
        }
        let records = store.records().await?;
        let directory = Directory::build(&records, limits);
        // The id is not logged: it may hold an address. `GET /v1/admin/entries` lists it.
        for (_, why) in directory.skipped() {
            tracing::warn!(%why, "runtime entry skipped: it does not fit the config (GET /v1/admin/entries lists it)");
        }
        self.directory.store(Arc::new(directory));
        self.read.store(true, Ordering::Release);
        Ok(true)
    }

    /// Rebuilds the directory against a reloaded config's `limits`.
    pub fn rebuild(&self, limits: &LimitSet) {
        let rebuilt = self.directory.load().rebuild(limits);
        self.directory.store(Arc::new(rebuilt));
    }

    /// Removes entries that have expired from the store (they already stopped applying).
    /// Any instance may do it; removing one twice is harmless.
    pub async fn remove_expired(&self, store: &dyn Store) {
        for id in self.directory().expired(now_ms()) {
            if let Err(error) = store.remove_record(&id).await {
                tracing::debug!(%error, "removing an expired runtime entry failed; retried later");
                return;
            }
        }
    }
}

/// Milliseconds since the Unix epoch, as entries' expiries count.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
