//! Time for in-process stores. Shared stores (Redis, PostgreSQL) use their server's clock instead.

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

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
/// advanced by the monotonic clock. Epoch-aligned windows stay aligned to UTC while
/// an NTP step cannot hand out a quota twice.
#[derive(Debug, Clone)]
pub struct SystemClock {
    anchor_wall: Micros,
    anchor: Monotonic,
}

impl SystemClock {
    /// A clock anchored at the current system time.
    pub fn new() -> Self {
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO);
        SystemClock {
            anchor_wall: wall.as_micros() as Micros,
            anchor: Monotonic::now(),
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
        self.anchor_wall + Monotonic::now().micros_since(&self.anchor)
    }
}

/// A reading of the monotonic clock (`CLOCK_MONOTONIC`, as std's `Instant` on Linux).
/// On Unix it is read with libc's `clock_gettime` (the vDSO) and kept as microseconds:
/// std's `Instant` arithmetic (a checked `Timespec` subtraction, a `Duration`, a
/// 128-bit product) was most of what reading the clock cost a decision. rustix goes
/// through libc (`use-libc`) because its own vDSO reader cannot run under valgrind,
/// which `bench/instructions-per-request.sh` needs.
#[cfg(unix)]
#[derive(Debug, Clone, Copy)]
struct Monotonic(Micros);

#[cfg(unix)]
impl Monotonic {
    fn now() -> Self {
        let now = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
        Monotonic(now.tv_sec as Micros * 1_000_000 + now.tv_nsec as Micros / 1_000)
    }

    fn micros_since(&self, earlier: &Monotonic) -> Micros {
        self.0 - earlier.0
    }
}

/// Elsewhere, std's `Instant`.
#[cfg(not(unix))]
#[derive(Debug, Clone, Copy)]
struct Monotonic(std::time::Instant);

#[cfg(not(unix))]
impl Monotonic {
    fn now() -> Self {
        Monotonic(std::time::Instant::now())
    }

    fn micros_since(&self, earlier: &Monotonic) -> Micros {
        self.0.duration_since(earlier.0).as_micros() as Micros
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

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(unix)]
    #[test]
    fn the_system_clock_reads_utc_in_microseconds_and_never_runs_backwards() {
        let clock = SystemClock::new();
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("after 1970")
            .as_micros() as Micros;
        let first = clock.now();
        assert!((first - wall).abs() < 1_000_000, "{first} vs {wall}");
        let mut last = first;
        for _ in 0..10_000 {
            let now = clock.now();
            assert!(now >= last, "{now} after {last}");
            last = now;
        }
        // Across a whole second of the monotonic clock, where a mistake in combining
        // seconds and nanoseconds would show, it agrees with std's `Instant`. Each read
        // of the clock is bracketed by `Instant`s, so a preempted thread cannot fail it.
        let outer = std::time::Instant::now();
        let start = clock.now();
        let inner = std::time::Instant::now();
        let into_second = Monotonic::now().micros_since(&Monotonic(0)) % 1_000_000;
        std::thread::sleep(Duration::from_micros(
            (1_000_000 - into_second) as u64 + 5_000,
        ));
        let at_least = inner.elapsed().as_micros() as Micros;
        let slept = clock.now() - start;
        let at_most = outer.elapsed().as_micros() as Micros;
        assert!(
            (at_least - 2..=at_most + 2).contains(&slept),
            "the clock read {slept} µs where Instant read {at_least} to {at_most} µs"
        );
    }
}
