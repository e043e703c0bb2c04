//! Expiry: deleting counters, holds and slots whose state no longer matters.
//!
//! Every row carries the moment its state stops mattering (a counter's is the engine's
//! `expires_at`; a reservation's hold and concurrency slots expire with its ttl).
//! A background task ([`PostgresStore::start_sweeper`]) deletes expired rows in batches
//! (each up to 10,000 rows of each table); instances sharing a table take turns (at most
//! one sweep per interval across them; `sluice_sweep` records the last one in the table
//! `sluice_sweeper`), and a sweep skips rows a decision or settlement holds, so it never
//! waits for one.

use std::sync::{Arc, Weak};
use std::time::Duration;

use sluice_engine::StoreError;

use crate::PostgresStore;

/// Rows of each table one sweep statement deletes at most (each batch is its own
/// transaction).
const SWEEP_BATCH: i32 = 10_000;

/// Batches one sweep runs at most before waiting for the next interval.
const SWEEP_MAX_BATCHES: usize = 100;

/// How long after expiring a row may still be swept. Decisions read the clock a few
/// microseconds before they read a row; the margin keeps a row that expired in between
/// from vanishing under them.
const SWEEP_GRACE: Duration = Duration::from_secs(1);

impl PostgresStore {
    /// Deletes expired counters, holds and slots now, batch after batch; returns how many
    /// rows went, or
    /// `None` when another instance swept less than `every` ago (`every` zero: sweep
    /// regardless).
    pub async fn sweep(&self, every: Duration) -> Result<Option<u64>, StoreError> {
        self.ensure_ready().await?;
        let mut total = 0u64;
        let mut every_us = every.as_micros() as i64;
        for _ in 0..SWEEP_MAX_BATCHES {
            let grace = SWEEP_GRACE.as_micros() as i64;
            let row = self
                .maintenance_query(&self.statements.sweep, &[&SWEEP_BATCH, &grace, &every_us])
                .await?;
            let deleted: i64 = row.get(0);
            if deleted < 0 {
                return Ok(None);
            }
            total += deleted as u64;
            if deleted < i64::from(SWEEP_BATCH) {
                break;
            }
            // This instance won the turn: go on without asking again.
            every_us = 0;
        }
        Ok(Some(total))
    }

    /// Sweeps expired counters every `every` in a background task, until the store is
    /// dropped. Must be called inside a Tokio runtime.
    pub fn start_sweeper(self: &Arc<Self>, every: Duration) {
        let store: Weak<Self> = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(every);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                let Some(store) = store.upgrade() else {
                    return;
                };
                match store.sweep(every).await {
                    Ok(Some(deleted)) if deleted > 0 => {
                        tracing::debug!(deleted, "expired counters swept");
                    }
                    Ok(_) => {}
                    // An outage is logged once by the failure policy; this repeats it.
                    Err(error) => tracing::debug!(%error, "sweep failed"),
                }
            }
        });
    }
}
