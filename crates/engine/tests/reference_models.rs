//! Every algorithm against a plain reference model on a fake clock.
//!
//! The models keep no compact state: a token bucket with an explicit level for gcra,
//! and a log of admitted requests for the window algorithms. Random sequences of
//! (time step, cost) must get the same verdict, `remaining` and `retry_after` from
//! both, and every `retry_after` must be exact: the request is allowed at
//! `now + retry_after` and not one microsecond earlier.

use proptest::prelude::*;
use sluice_engine::{Algorithm, Micros, Rate, State, Window};

/// What a model says about a request at a time, without charging it.
struct Verdict {
    allowed: bool,
    remaining: u64,
    retry_after: Option<Micros>,
}

trait Model {
    fn verdict(&self, now: Micros, cost: u64) -> Verdict;
    fn charge(&mut self, now: Micros, cost: u64);
}

/// Token bucket with an explicit level, in microseconds of refill (one cell = `t`).
struct TokenBucket {
    t: i64,
    capacity: i64,
    level: i64,
    last: Micros,
    burst: u64,
}

impl TokenBucket {
    fn level_at(&self, now: Micros) -> i64 {
        (self.level + (now - self.last)).min(self.capacity)
    }
}

impl Model for TokenBucket {
    fn verdict(&self, now: Micros, cost: u64) -> Verdict {
        let level = self.level_at(now);
        let need = cost as i64 * self.t;
        let allowed = cost == 0 || level >= need;
        let after = if allowed { level - need } else { level };
        Verdict {
            allowed,
            remaining: (after / self.t) as u64,
            retry_after: if allowed {
                Some(0)
            } else if cost > self.burst {
                None
            } else {
                Some(need - level)
            },
        }
    }

    fn charge(&mut self, now: Micros, cost: u64) {
        self.level = self.level_at(now) - cost as i64 * self.t;
        self.last = now;
    }
}

/// A log of admitted requests, counted per epoch-aligned window.
struct Log {
    period: i64,
    quota: u64,
    sliding: bool,
    admitted: Vec<(Micros, u64)>,
}

impl Log {
    fn spent_in(&self, window: i64) -> u64 {
        self.admitted
            .iter()
            .filter(|(t, _)| t.div_euclid(self.period) == window)
            .map(|(_, c)| c)
            .sum()
    }

    fn used(&self, now: Micros, extra: u64) -> u64 {
        let window = now.div_euclid(self.period);
        let current = self.spent_in(window) + extra;
        if !self.sliding {
            return current;
        }
        let previous = self.spent_in(window - 1) as u128;
        let left = (self.period - now.rem_euclid(self.period)) as u128;
        (previous * left).div_ceil(self.period as u128) as u64 + current
    }

    fn fits(&self, now: Micros, cost: u64) -> bool {
        cost == 0 || self.used(now, cost) <= self.quota
    }
}

impl Model for Log {
    fn verdict(&self, now: Micros, cost: u64) -> Verdict {
        let allowed = self.fits(now, cost);
        let used = self.used(now, if allowed { cost } else { 0 });
        let retry_after = if allowed {
            Some(0)
        } else if cost > self.quota {
            None
        } else {
            // The earliest instant it fits, searched over the next two windows.
            let fits_at = |t: Micros| self.fits(t, cost);
            let (mut lo, mut hi) = (now, now + 2 * self.period);
            assert!(fits_at(hi), "model: fits within two windows");
            // Within a window, room only grows with time; across the boundary it can
            // only grow too. Binary search the first instant that fits.
            while hi - lo > 1 {
                let mid = lo + (hi - lo) / 2;
                if fits_at(mid) { hi = mid } else { lo = mid }
            }
            Some(hi - now)
        };
        Verdict {
            allowed,
            remaining: self.quota.saturating_sub(used),
            retry_after,
        }
    }

    fn charge(&mut self, now: Micros, cost: u64) {
        self.admitted.push((now, cost));
    }
}

fn model_for(window: &Window, algorithm: Algorithm, start: Micros) -> Box<dyn Model> {
    let rate = window.rate();
    match algorithm {
        Algorithm::Gcra => {
            let t = rate.period_micros() / rate.quota() as i64;
            let capacity = window.capacity() as i64 * t;
            Box::new(TokenBucket {
                t,
                capacity,
                level: capacity,
                last: start,
                burst: window.capacity(),
            })
        }
        _ => Box::new(Log {
            period: rate.period_micros(),
            quota: rate.quota(),
            sliding: algorithm == Algorithm::SlidingWindow,
            admitted: Vec::new(),
        }),
    }
}

fn algorithm() -> impl Strategy<Value = Algorithm> {
    prop_oneof![
        Just(Algorithm::Gcra),
        Just(Algorithm::FixedWindow),
        Just(Algorithm::SlidingWindow)
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn every_algorithm_matches_its_reference_model(
        algorithm in algorithm(),
        quota in 1u64..12,
        period_secs in 1u64..6,
        extra_burst in 0u64..4,
        start in 1_700_000_000_000_000i64..1_800_000_000_000_000i64,
        steps in prop::collection::vec((0i64..3_000_000, 0u64..8), 1..60),
    ) {
        let rate = Rate::new(quota, period_secs).unwrap();
        let burst = (algorithm == Algorithm::Gcra).then_some(quota + extra_burst);
        let window = Window::new(algorithm, rate, burst).unwrap();
        let mut model = model_for(&window, algorithm, start);
        let mut state: Option<State> = None;
        let mut now = start;
        for (step, cost) in steps {
            now += step;
            let expected = model.verdict(now, cost);
            let evaluation = window.evaluate(state, now, cost);
            prop_assert_eq!(evaluation.allowed, expected.allowed, "verdict at {} for cost {}", now - start, cost);
            prop_assert_eq!(evaluation.retry_after, expected.retry_after, "retry_after at {} for cost {}", now - start, cost);
            let after = if evaluation.allowed && cost > 0 { evaluation.charged } else { evaluation.current };
            prop_assert_eq!(window.remaining(&after, now), expected.remaining, "remaining at {}", now - start);
            if let Some(retry) = evaluation.retry_after.filter(|r| *r > 0) {
                prop_assert!(window.evaluate(Some(after), now + retry, cost).allowed, "allowed at now + retry_after");
                prop_assert!(!window.evaluate(Some(after), now + retry - 1, cost).allowed, "retry_after is the earliest");
            }
            if evaluation.allowed && cost > 0 {
                model.charge(now, cost);
                state = Some(evaluation.charged);
            }
            // A stored state may be dropped once it expires: it must then read as empty.
            if let Some(s) = state {
                let expiry = window.expires_at(&s);
                prop_assert_eq!(window.remaining(&s, expiry.max(now)), window.capacity(), "a state reads as full once it expires");
            }
        }
    }
}
