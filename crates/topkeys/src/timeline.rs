//! One limit's decisions and denials per minute over the last hour: the dashboard's
//! charts. Sixty slots of atomics, one per minute, in one shard per core (each thread
//! counts into its own, so cores do not pass the same cache line back and forth); a
//! slot is reset when its minute comes round again, and a read sums the shards.
//!
//! Lock-free and approximate at a minute's edge: a decision racing the reset of its
//! slot may be lost, or land in the minute before. The exact counts since start are
//! `sluice_decisions_total`.

use std::sync::atomic::{AtomicU64, Ordering};

/// Minutes kept.
pub const MINUTES: usize = 60;

#[derive(Debug, Default)]
struct Slot {
    /// The minute's number (seconds / 60) plus one; 0 when never used.
    minute: AtomicU64,
    decisions: AtomicU64,
    denied: AtomicU64,
}

/// One shard's minutes, on cache lines of its own.
#[derive(Debug)]
#[repr(align(128))]
struct Shard([Slot; MINUTES]);

/// Decisions and denials per minute for the last [`MINUTES`] minutes.
#[derive(Debug)]
pub struct Timeline {
    shards: Box<[Shard]>,
}

/// One minute of a [`Timeline`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Minute {
    /// Seconds (on the caller's clock) at the start of this minute.
    pub start_secs: u64,
    /// Checks decided in it.
    pub decisions: u64,
    /// Checks denied in it.
    pub denied: u64,
}

impl Default for Timeline {
    fn default() -> Self {
        Timeline {
            shards: (0..crate::default_shards())
                .map(|_| Shard(std::array::from_fn(|_| Slot::default())))
                .collect(),
        }
    }
}

impl Timeline {
    /// Counts one check at `now_secs`.
    pub fn record(&self, denied: bool, now_secs: u64) {
        let minute = now_secs / 60 + 1;
        let shard = &self.shards[crate::thread_slot() % self.shards.len()];
        let slot = &shard.0[(minute % MINUTES as u64) as usize];
        let seen = slot.minute.load(Ordering::Acquire);
        if seen != minute
            && slot
                .minute
                .compare_exchange(seen, minute, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            slot.decisions.store(0, Ordering::Release);
            slot.denied.store(0, Ordering::Release);
        }
        slot.decisions.fetch_add(1, Ordering::Relaxed);
        if denied {
            slot.denied.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The last [`MINUTES`] minutes up to `now_secs`, oldest first; minutes without a
    /// decision are zeros.
    pub fn minutes(&self, now_secs: u64) -> Vec<Minute> {
        let current = now_secs / 60 + 1;
        (0..MINUTES as u64)
            .rev()
            .filter_map(|ago| current.checked_sub(ago).filter(|m| *m >= 1))
            .map(|minute| {
                let index = (minute % MINUTES as u64) as usize;
                let mut sum = Minute {
                    start_secs: (minute - 1) * 60,
                    decisions: 0,
                    denied: 0,
                };
                for shard in &self.shards {
                    let slot = &shard.0[index];
                    if slot.minute.load(Ordering::Acquire) == minute {
                        sum.decisions += slot.decisions.load(Ordering::Relaxed);
                        sum.denied += slot.denied.load(Ordering::Relaxed);
                    }
                }
                sum
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_per_minute_and_forgets_after_an_hour() {
        let t = Timeline::default();
        t.record(false, 30);
        t.record(true, 59);
        t.record(false, 61);
        let now = 90;
        let minutes = t.minutes(now);
        assert_eq!(minutes.len(), 2);
        assert_eq!(
            minutes[0],
            Minute {
                start_secs: 0,
                decisions: 2,
                denied: 1
            }
        );
        assert_eq!(
            minutes[1],
            Minute {
                start_secs: 60,
                decisions: 1,
                denied: 0
            }
        );
        // An hour later the slot of minute 0 is reused.
        t.record(false, 3600 + 5);
        let later = t.minutes(3600 + 5);
        assert_eq!(later.len(), MINUTES);
        assert_eq!(later.iter().map(|m| m.decisions).sum::<u64>(), 2);
        assert_eq!(later.last().map(|m| m.decisions), Some(1));
    }
}
