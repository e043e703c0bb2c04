//! The PostgreSQL counter store: counters shared by every sluice instance that points
//! at one database.
//!
//! - **One round trip per decision** ([`store`]): a decision is one call of the plpgsql
//!   function `sluice_decide`, which runs the engine's arithmetic and atomic rule on the
//!   database's clock, under advisory locks taken in key order.
//! - **Batches** ([`batch`]): under load, concurrent charging decisions share one call of
//!   `sluice_decide_batch`, which locks the whole batch's counters once in key order and
//!   decides each request in arrival order as `sluice_decide` would alone.
//! - **Reservations** ([`store`]): `reserve` is one call of `sluice_reserve` (the decision
//!   plus, when allowed, a hold row and one slot row per concurrency window, whose
//!   state is counted from its key's live slots under the key's lock); `settle` is one
//!   call of `sluice_settle` (checks and closes the hold, frees its slots, refunds or
//!   forces `actual - estimate` into every charged window).
//! - **Schema** ([`schema`]): `schema.sql` is a versioned, idempotent migration
//!   ([`SCHEMA_VERSION`]), applied by [`PostgresStore::prepare`] (or only checked, with
//!   `migrate: false`) and printed for a DBA by [`migration_sql`].
//! - **Expiry** ([`sweeper`]): every row (counter, hold, slot) carries the moment its
//!   state stops mattering; a background task deletes expired rows, instances taking
//!   turns.
//! - **Connections** ([`store`], [`config`]): a pool of `pool_size` connections, opened
//!   on first use; sessions bounded by the store timeout, without waiting for disk
//!   flushes.
//! - **Failures** ([`error`]): a call that charges (a decision, refund, reservation or
//!   settlement) is never sent twice when it may have run; errors that prove the statement rolled back, and that a second attempt can
//!   cure, are retried once.
//!
//! What settings are valid (schema names, URL schemes) is decided in
//! `sluice-store-rules`, which the config loader applies too.

mod batch;
mod config;
mod error;
mod schema;
mod store;
mod sweeper;

pub use config::PostgresStoreConfig;
pub use error::PostgresStoreError;
pub use schema::{SCHEMA_VERSION, SchemaStatus, migration_sql};
pub use store::PostgresStore;

/// How long the sweep, the migration and `reset_limit` may run: longer than a decision.
const MAINTENANCE_TIMEOUT_MS: u64 = 60_000;
