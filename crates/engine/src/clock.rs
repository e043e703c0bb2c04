//! Time for in-process stores. Shared stores (Redis, PostgreSQL) use their server's clock instead.

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Microseconds since the Unix epoch, UTC.
pub type Micros = i64;

/// `micros` in whole milliseconds, rounded up (negative counts as 0): a wait reported
/// this way is always long enough. Every answer in milliseconds uses it.
pub fn millis_ceil(micros: Micros) -> u64 {
    (micros.max(0) as u64).div_ceil(1_000)
}

/// `micros` in whole seconds, rounded up (negative counts as 0): `Retry-After`, reset
/// times in headers and the quota endpoint.
pub fn seconds_ceil(micros: Micros) -> u64 {
    (micros.max(0) as u64).div_ceil(1_000_000)
}

/// A source of the current time.
pub trait Clock: Send + Sync {
    /// Now, in microseconds since the Unix epoch.
    fn now(&self) -> Micros;
}

/// Wall-clock time that never runs backwards: the system time read once at start,
/// advanced by a monotonic [`Instant`]. Epoch-aligned windows stay aligned to UTC
/// while an NTP step cannot hand out a quota twice.
#[derive(Debug, Clone)]
pub struct SystemClock {
    anchor_wall: Micros,
    anchor: Instant,
}

impl SystemClock {
    /// A clock anchored at the current system time.
    pub fn new() -> Self {
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO);
        SystemClock {
            anchor_wall: wall.as_micros() as Micros,
            anchor: Instant::now(),
        }
    }
}

impl Default for SystemClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for SystemClock {
    fn now(&self) -> Micros {
        self.anchor_wall + self.anchor.elapsed().as_micros() as Micros
    }
}

/// A clock that moves only when told to: for tests and simulations.
#[derive(Debug)]
pub struct ManualClock {
    now: AtomicI64,
}

impl ManualClock {
    /// A clock standing at `start`.
    pub fn new(start: Micros) -> Self {
        ManualClock {
            now: AtomicI64::new(start),
        }
    }

    /// Moves the clock forward by `by`.
    pub fn advance(&self, by: Duration) {
        self.now
            .fetch_add(by.as_micros() as Micros, Ordering::SeqCst);
    }

    /// Sets the clock to `to`.
    pub fn set(&self, to: Micros) {
        self.now.store(to, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Micros {
        self.now.load(Ordering::SeqCst)
    }
}
