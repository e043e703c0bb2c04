//! Records: the small map of settings an operator changes at run time (plan
//! assignments, rate overrides, block and allow entries), kept in the same store as the
//! counters so that every instance sharing the store sees them and they survive a
//! restart wherever counters do.
//!
//! The store treats a record as an opaque id and body; `sluice-access` gives them
//! meaning. Every change moves the store's records *version*, so an instance polls one
//! cheap value and reads the whole map only when it moved. Versions are compared for
//! equality, never order: a store that lost its data (a flushed Redis) may restart them.

/// One record: an id unique in the store, and its body (JSON, written by `sluice-access`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The id; a second record with the same id replaces the first.
    pub id: String,
    /// The body, opaque to the store.
    pub body: String,
}

/// Every record a store holds, with the version they are at.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Records {
    /// Moves with every change (see the module doc).
    pub version: u64,
    /// The records, in no particular order.
    pub records: Vec<Record>,
}
