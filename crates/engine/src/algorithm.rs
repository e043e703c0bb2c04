//! The three algorithms, each a pure function of (window, stored state, now, cost).
//!
//! All times are microseconds since the Unix epoch ([`Micros`]). A window's state
//! is a few integers, so a store can keep it compactly and a server-side script
//! (Lua, SQL) can run the same arithmetic.
//!
//! - **gcra**: the generic cell rate algorithm. `N/P` has an emission interval
//!   `T = P / N` (integer microseconds) and a bucket of `burst` cells, so
//!   `tau = burst * T`. State is one timestamp, the theoretical arrival time
//!   (TAT). A request of cost `c` is admitted when `max(TAT, now) + c*T - now <= tau`.
//!   Exact; the truncation of `T` to whole microseconds makes the rate at most
//!   one microsecond per cell faster than written.
//! - **fixed_window**: windows aligned to the Unix epoch in UTC (`50/day` resets
//!   at 00:00 UTC); a counter per window. A calendar-month rate (`100/month`) has
//!   one window per UTC calendar month, from 00:00 UTC on the 1st to the next 1st
//!   ([`crate::calendar`]); it is the only algorithm that takes one.
//! - **sliding_window**: the count over the last period, estimated from the
//!   current fixed window plus the previous one weighted by how much of it still
//!   overlaps: `used = ceil(previous * (P - elapsed) / P) + current`. Rounding the
//!   weighted part up never admits more than the estimate. The estimate assumes
//!   the previous window's requests were spread evenly: within any fixed window
//!   at most `N` are admitted, so any span of length `P` (which overlaps at most
//!   two fixed windows) sees at most `2N` in the worst case, when a full previous
//!   window was spent at its very end. With evenly arriving traffic the estimate
//!   is exact.
//!
//! - **concurrency**: calls in flight, not a rate. The state is how many slots are
//!   held now and when the first of them expires; the store keeps who holds which
//!   slot (a reservation, until it is settled, released or expires) and derives the
//!   state from that, so the arithmetic here is a counter against a capacity.
//!
//! A cost of 0 is a read: always allowed, never charged. A cost above what the
//! window can ever admit (the burst for gcra, the quota otherwise) is denied with
//! no retry time.
//!
//! **Debt.** [`Window::force`] charges past the limit: work that already happened
//! (a settled reservation that cost more than its estimate, a stream that ended) is
//! booked, not dropped. gcra moves its TAT further than the bucket (later requests
//! wait until it has drained back, up to [`MAX_DEBT_MICROS`]); window counters go
//! above their quota, so nothing fits until the window (for sliding windows, its
//! weighted tail) has passed.

use std::fmt;
use std::str::FromStr;

use crate::clock::Micros;
use crate::limit::LimitError;
use crate::rate::Rate;

/// How a window counts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Algorithm {
    /// Generic cell rate algorithm (a token bucket kept as one timestamp). The default.
    #[default]
    Gcra,
    /// Weighted two-window estimate of the last period.
    SlidingWindow,
    /// Epoch-aligned fixed windows.
    FixedWindow,
    /// Calls in flight (`concurrency: N`): slots held by open reservations.
    Concurrency,
}

/// How far ahead of now a forced charge may push a gcra window's TAT: about 35 years,
/// which keeps every stored time below 2^53 (exact in Lua's doubles).
pub const MAX_DEBT_MICROS: Micros = 1 << 50;

impl Algorithm {
    /// The config spelling: `gcra`, `sliding_window`, `fixed_window`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Algorithm::Gcra => "gcra",
            Algorithm::SlidingWindow => "sliding_window",
            Algorithm::FixedWindow => "fixed_window",
            Algorithm::Concurrency => "concurrency",
        }
    }

    /// A one-letter tag used in counter names, so a change of algorithm starts fresh counters.
    pub fn tag(&self) -> char {
        match self {
            Algorithm::Gcra => 'g',
            Algorithm::SlidingWindow => 's',
            Algorithm::FixedWindow => 'f',
            Algorithm::Concurrency => 'c',
        }
    }
}

impl FromStr for Algorithm {
    type Err = LimitError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "gcra" => Ok(Algorithm::Gcra),
            "sliding_window" => Ok(Algorithm::SlidingWindow),
            "fixed_window" => Ok(Algorithm::FixedWindow),
            other => Err(LimitError::UnknownAlgorithm(other.to_string())),
        }
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The stored state of one window for one key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// gcra: the theoretical arrival time.
    Gcra {
        /// When the bucket will be completely refilled.
        tat: Micros,
    },
    /// fixed_window: the window's start and what was spent in it.
    Fixed {
        /// Start of the window the count belongs to.
        start: Micros,
        /// Cost spent in that window.
        count: u64,
    },
    /// sliding_window: the current fixed window's start and count, and the previous window's count.
    Sliding {
        /// Start of the window `count` belongs to.
        start: Micros,
        /// Cost spent in that window.
        count: u64,
        /// Cost spent in the window before it.
        previous: u64,
    },
    /// concurrency: slots held now, as the store counted them from its open reservations.
    Concurrency {
        /// Slots held by open, unexpired reservations.
        open: u64,
        /// When the first of them expires (now when none is held).
        free_at: Micros,
    },
}

/// One window of a limit: a rate and the algorithm that enforces it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Window {
    algorithm: Algorithm,
    rate: Rate,
    burst: u64,
    /// gcra's emission interval, `period / quota` in microseconds: kept, because a
    /// decision would otherwise divide for it several times.
    interval: i64,
}

/// What a window says about one request, before anything is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Evaluation {
    /// Whether the request fits.
    pub allowed: bool,
    /// Microseconds until the same request would fit: 0 when allowed, `None` when never.
    pub retry_after: Option<Micros>,
    /// The state now, without this request.
    pub current: State,
    /// The state if this request is charged.
    pub charged: State,
}

impl Window {
    /// A window; `burst` is only meaningful for gcra (default: the rate's quota).
    pub fn new(algorithm: Algorithm, rate: Rate, burst: Option<u64>) -> Result<Self, LimitError> {
        // gcra's interval and the sliding window's weighting need one fixed period
        // length; a calendar month has none.
        if rate.is_calendar_month() && algorithm != Algorithm::FixedWindow {
            return Err(LimitError::CalendarMonthNeedsFixedWindow(rate, algorithm));
        }
        if burst.is_some() && algorithm != Algorithm::Gcra {
            return Err(LimitError::BurstNeedsGcra(algorithm));
        }
        let burst = burst.unwrap_or(rate.quota());
        if burst == 0 || burst > crate::rate::MAX_QUOTA {
            return Err(LimitError::BadBurst(burst));
        }
        if algorithm == Algorithm::Gcra {
            let interval = rate.period_micros() / rate.quota() as i64;
            if interval == 0 {
                return Err(LimitError::RateTooFine(rate));
            }
            // Keep tau (and the 2*tau lockout bound) inside i64 and Lua's 53-bit integers.
            if (burst as i128) * (interval as i128) > 2 * rate.period_micros() as i128 * 1_000 {
                return Err(LimitError::BadBurst(burst));
            }
        }
        Ok(Window {
            algorithm,
            rate,
            burst,
            interval: rate.period_micros() / rate.quota() as i64,
        })
    }

    /// A concurrency window: at most `slots` calls in flight per key.
    pub fn concurrency(slots: u64) -> Result<Self, LimitError> {
        if slots == 0 || slots > crate::rate::MAX_QUOTA {
            return Err(LimitError::BadConcurrency(slots));
        }
        // The rate is never used for time: slots per (nominal) second keeps `capacity`,
        // `rate()` and the reported limit meaningful.
        let rate = Rate::new(slots, 1).map_err(|_| LimitError::BadConcurrency(slots))?;
        Ok(Window {
            algorithm: Algorithm::Concurrency,
            rate,
            burst: slots,
            interval: rate.period_micros() / rate.quota() as i64,
        })
    }

    /// The algorithm.
    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// The rate.
    pub fn rate(&self) -> Rate {
        self.rate
    }

    /// The largest cost the window can ever admit at once, reported as the result's `limit_value`:
    /// the burst for gcra, the quota otherwise.
    pub fn capacity(&self) -> u64 {
        self.burst
    }

    /// gcra's emission interval `T` in microseconds.
    fn interval(&self) -> i64 {
        self.interval
    }

    /// gcra's bucket depth `tau = burst * T` in microseconds.
    fn tau(&self) -> i64 {
        self.burst as i64 * self.interval()
    }

    fn window_start(&self, now: Micros) -> Micros {
        if self.rate.is_calendar_month() {
            return crate::calendar::month_start(now);
        }
        now - now.rem_euclid(self.rate.period_micros())
    }

    /// Where the fixed window starting at `start` ends (the next one's start): months
    /// differ in length, so a calendar month's end comes from the calendar.
    fn window_end(&self, start: Micros) -> Micros {
        if self.rate.is_calendar_month() {
            return crate::calendar::next_month_start(start);
        }
        start + self.rate.period_micros()
    }

    /// Decides a request of `cost` at `now` against `state` (`None`: never seen or expired).
    pub fn evaluate(&self, state: Option<State>, now: Micros, cost: u64) -> Evaluation {
        let current = self.normalize(state, now);
        let quota = self.rate.quota();
        match current {
            State::Gcra { tat } => {
                let tau = self.tau() as i128;
                let charged_tat = tat as i128 + cost as i128 * self.interval() as i128;
                let allowed = cost == 0 || charged_tat - now as i128 <= tau;
                let retry_after = if allowed {
                    Some(0)
                } else if cost > self.burst {
                    None
                } else {
                    Some((charged_tat - tau - now as i128) as Micros)
                };
                // Denied attempts charged under `charge_denied` lock a client out for at
                // most one more bucket's worth after its last attempt, not forever.
                let lockout_bound = now as i128 + 2 * tau;
                let charged = State::Gcra {
                    tat: charged_tat.min(lockout_bound.max(tat as i128)) as Micros,
                };
                Evaluation {
                    allowed,
                    retry_after,
                    current,
                    charged,
                }
            }
            State::Fixed { start, count } => {
                let spent = count.saturating_add(cost);
                let allowed = cost == 0 || spent <= quota;
                let retry_after = if allowed {
                    Some(0)
                } else if cost > quota {
                    None
                } else {
                    Some(self.window_end(start) - now)
                };
                let charged = State::Fixed {
                    start,
                    count: spent,
                };
                Evaluation {
                    allowed,
                    retry_after,
                    current,
                    charged,
                }
            }
            State::Sliding {
                start,
                count,
                previous,
            } => {
                let period = self.rate.period_micros();
                let used = self.sliding_used(start, count, previous, now);
                let allowed = cost == 0 || used.saturating_add(cost) <= quota;
                let retry_after = if allowed {
                    Some(0)
                } else if cost > quota {
                    None
                } else if count.saturating_add(cost) > quota {
                    // Not in this window: wait until this window's count, weighted as the
                    // previous one, leaves room. `count > quota - cost >= 0` here.
                    let room = (quota - cost) as i128;
                    let elapsed = period as i128 - room * period as i128 / count as i128;
                    Some((start as i128 + period as i128 + elapsed.max(0) - now as i128) as Micros)
                } else {
                    // Within this window, once the previous window's weight has decayed
                    // enough. Denied with room left means `previous > 0`.
                    let room = (quota - count - cost) as i128;
                    let elapsed = period as i128 - room * period as i128 / previous.max(1) as i128;
                    Some((start as i128 + elapsed - now as i128) as Micros)
                };
                let charged = State::Sliding {
                    start,
                    count: count.saturating_add(cost),
                    previous,
                };
                Evaluation {
                    allowed,
                    retry_after,
                    current,
                    charged,
                }
            }
            State::Concurrency { open, free_at } => {
                let held = open.saturating_add(cost);
                let allowed = cost == 0 || held <= self.burst;
                let retry_after = if allowed {
                    Some(0)
                } else if cost > self.burst {
                    None
                } else {
                    // A slot may come back sooner (a settle); this is when one must.
                    Some((free_at - now).max(0))
                };
                Evaluation {
                    allowed,
                    retry_after,
                    current,
                    charged: State::Concurrency {
                        open: held,
                        free_at,
                    },
                }
            }
        }
    }

    /// Charges `cost` whatever the limit says (debt, see the module doc): the state
    /// after the charge. A concurrency window is not charged this way (its slots belong
    /// to reservations), so its state comes back unchanged.
    pub fn force(&self, state: Option<State>, now: Micros, cost: u64) -> State {
        match self.normalize(state, now) {
            State::Gcra { tat } => {
                let pushed = tat as i128 + cost as i128 * self.interval() as i128;
                State::Gcra {
                    tat: pushed.min(now as i128 + MAX_DEBT_MICROS as i128) as Micros,
                }
            }
            State::Fixed { start, count } => State::Fixed {
                start,
                count: count.saturating_add(cost),
            },
            State::Sliding {
                start,
                count,
                previous,
            } => State::Sliding {
                start,
                count: count.saturating_add(cost),
                previous,
            },
            concurrency @ State::Concurrency { .. } => concurrency,
        }
    }

    /// Gives back `cost` that an earlier decision charged to `state`: the state after the
    /// refund, or `None` when there is nothing to give back (the counter is absent,
    /// expired or already full).
    ///
    /// gcra moves the TAT back by `cost` intervals, never before `now`. Window counters
    /// are decremented, never below zero: fixed windows in the current window; sliding
    /// windows from the current window's count first and then from the previous one's.
    /// A refund is applied to the window current when it arrives, so a refund that
    /// crosses a window boundary may give back in the new window what the old one spent
    /// (at most `cost` more than the quota in that window).
    pub fn refund(&self, state: Option<State>, now: Micros, cost: u64) -> Option<State> {
        let state = state?;
        if cost == 0 {
            return None;
        }
        let refunded = match self.normalize(Some(state), now) {
            State::Gcra { tat } => {
                let back = (cost as i128 * self.interval() as i128).min(i64::MAX as i128) as i64;
                State::Gcra {
                    tat: tat.saturating_sub(back).max(now),
                }
            }
            State::Fixed { start, count } => State::Fixed {
                start,
                count: count.saturating_sub(cost),
            },
            State::Sliding {
                start,
                count,
                previous,
            } => {
                let from_count = count.min(cost);
                let from_previous = previous.min(cost - from_count);
                State::Sliding {
                    start,
                    count: count - from_count,
                    previous: previous - from_previous,
                }
            }
            // Slots come back when their reservation ends, not by refund.
            State::Concurrency { .. } => return None,
        };
        (refunded != self.normalize(Some(state), now)).then_some(refunded)
    }

    /// Brings a stored state to `now`: an expired or foreign state becomes the empty one.
    fn normalize(&self, state: Option<State>, now: Micros) -> State {
        match self.algorithm {
            Algorithm::Gcra => {
                let tat = match state {
                    Some(State::Gcra { tat }) => tat.max(now),
                    _ => now,
                };
                State::Gcra { tat }
            }
            Algorithm::FixedWindow => {
                let start = self.window_start(now);
                match state {
                    // A state from a later window (written by a decision whose clock read
                    // later) is the current window, not a foreign one: never drop its count.
                    Some(State::Fixed { start: s, count }) if s >= start => {
                        State::Fixed { start: s, count }
                    }
                    _ => State::Fixed { start, count: 0 },
                }
            }
            Algorithm::SlidingWindow => {
                let start = self.window_start(now);
                let period = self.rate.period_micros();
                let (start, count, previous) = match state {
                    // As for fixed windows: a later window's state is the current one.
                    Some(State::Sliding {
                        start: s,
                        count,
                        previous,
                    }) if s >= start => (s, count, previous),
                    // A state from the window before: its count is now the previous window's.
                    Some(State::Sliding {
                        start: s, count, ..
                    }) if s == start - period => (start, 0, count),
                    _ => (start, 0, 0),
                };
                State::Sliding {
                    start,
                    count,
                    previous,
                }
            }
            Algorithm::Concurrency => match state {
                Some(State::Concurrency { open, free_at }) if open > 0 => State::Concurrency {
                    open,
                    free_at: free_at.max(now),
                },
                _ => State::Concurrency {
                    open: 0,
                    free_at: now,
                },
            },
        }
    }

    fn sliding_used(&self, start: Micros, count: u64, previous: u64, now: Micros) -> u64 {
        let period = self.rate.period_micros() as u128;
        let left = (period as i128 - (now - start) as i128).clamp(0, period as i128) as u128;
        let weighted = (previous as u128 * left).div_ceil(period);
        (weighted as u64).saturating_add(count)
    }

    /// What `after` leaves at `now`: the cost remaining and the microseconds until the
    /// window is fully restored, as [`Window::remaining`] and [`Window::reset_after`]
    /// report them. `after` must be a state [`Window::evaluate`] returned for `now`
    /// (its `current` or `charged`), which is already brought to `now`: a decision
    /// reports both figures without normalizing the state twice more.
    pub(crate) fn report(&self, after: &State, now: Micros) -> (u64, Micros) {
        (
            self.remaining_of(after, now),
            self.reset_after_of(after, now),
        )
    }

    /// What is left in `state` at `now`, in units of cost.
    pub fn remaining(&self, state: &State, now: Micros) -> u64 {
        self.remaining_of(&self.normalize(Some(*state), now), now)
    }

    /// [`Window::remaining`] of a state already brought to `now`.
    fn remaining_of(&self, state: &State, now: Micros) -> u64 {
        match *state {
            State::Gcra { tat } => ((now + self.tau() - tat).max(0) / self.interval()) as u64,
            State::Fixed { count, .. } => self.rate.quota().saturating_sub(count),
            State::Sliding {
                start,
                count,
                previous,
            } => self
                .rate
                .quota()
                .saturating_sub(self.sliding_used(start, count, previous, now)),
            State::Concurrency { open, .. } => self.burst.saturating_sub(open),
        }
    }

    /// Microseconds from `now` until `state` is fully restored (0 when it already is).
    pub fn reset_after(&self, state: &State, now: Micros) -> Micros {
        self.reset_after_of(&self.normalize(Some(*state), now), now)
    }

    /// [`Window::reset_after`] of a state already brought to `now`.
    fn reset_after_of(&self, state: &State, now: Micros) -> Micros {
        let period = self.rate.period_micros();
        match *state {
            State::Gcra { tat } => (tat - now).max(0),
            State::Fixed { start, count } if count > 0 => self.window_end(start) - now,
            State::Sliding { start, count, .. } if count > 0 => start + 2 * period - now,
            State::Sliding {
                start, previous, ..
            } if previous > 0 => start + period - now,
            State::Concurrency { open, free_at } if open > 0 => free_at - now,
            _ => 0,
        }
    }

    /// When `state` becomes indistinguishable from no state: the time a store may drop it.
    pub fn expires_at(&self, state: &State) -> Micros {
        let period = self.rate.period_micros();
        match *state {
            State::Gcra { tat } => tat,
            State::Fixed { start, .. } => self.window_end(start),
            State::Sliding { start, count, .. } if count > 0 => start + 2 * period,
            State::Sliding { start, .. } => start + period,
            State::Concurrency { free_at, .. } => free_at,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// A decision reports from `report`, which skips normalizing: on every state
        /// `evaluate` returns, it says what `remaining` and `reset_after` say.
        #[test]
        fn report_agrees_with_remaining_and_reset_after(
            algorithm in prop_oneof![
                Just(Algorithm::Gcra),
                Just(Algorithm::FixedWindow),
                Just(Algorithm::SlidingWindow),
            ],
            quota in 1u64..50,
            period in prop_oneof![Just("second"), Just("minute"), Just("hour")],
            costs in proptest::collection::vec((0u64..60, 0i64..90_000_000), 1..12),
        ) {
            let rate = format!("{quota}/{period}").parse().unwrap();
            let window = Window::new(algorithm, rate, None).unwrap();
            let mut state = None;
            let mut now: Micros = 1_700_000_000_000_000;
            for (cost, step) in costs {
                now += step;
                let evaluation = window.evaluate(state, now, cost);
                for after in [evaluation.current, evaluation.charged] {
                    prop_assert_eq!(
                        window.report(&after, now),
                        (window.remaining(&after, now), window.reset_after(&after, now))
                    );
                }
                if evaluation.allowed {
                    state = Some(evaluation.charged);
                }
            }
        }

        /// Concurrency windows too, from any count of holders.
        #[test]
        fn report_agrees_for_concurrency(slots in 1u64..10, open in 0u64..12, cost in 0u64..12, late in -5i64..5) {
            let window = Window::concurrency(slots).unwrap();
            let now: Micros = 1_700_000_000_000_000;
            let state = State::Concurrency { open, free_at: now + late };
            let evaluation = window.evaluate(Some(state), now, cost);
            for after in [evaluation.current, evaluation.charged] {
                prop_assert_eq!(
                    window.report(&after, now),
                    (window.remaining(&after, now), window.reset_after(&after, now))
                );
            }
        }
    }

    /// A decision that read the clock just before a boundary may find a state written
    /// just after it; that state is the current window's and keeps its count.
    #[test]
    fn a_state_from_a_later_window_is_not_reset() {
        for algorithm in [Algorithm::FixedWindow, Algorithm::SlidingWindow] {
            let window = Window::new(algorithm, "3/second".parse().unwrap(), None).unwrap();
            let boundary: Micros = 1_700_000_001_000_000;
            let written_after = window.evaluate(None, boundary + 10, 3).charged;
            let late = window.evaluate(Some(written_after), boundary - 10, 1);
            assert!(!late.allowed, "{algorithm}: the full window still counts");
            assert_eq!(
                window.remaining(&late.current, boundary - 10),
                0,
                "{algorithm}"
            );
        }
    }
}
