//! The behaviour every store must show, as async functions over a [`Harness`].
//!
//! Timing assertions allow [`Harness::slack`] for stores on a real clock; with a manual
//! clock they are exact. Rates are chosen so a real store finishes each case in at most
//! a few seconds.

use std::sync::Arc;
use std::time::Duration;

use sluice_engine::calendar::{days_from_civil, next_month_start};
use sluice_engine::{
    Algorithm, Check, Decision, DecisionRequest, Limit, LimitSpec, Micros, decide,
};

use crate::Harness;

fn limit(name: &str, rates: &[&str], configure: impl FnOnce(&mut LimitSpec)) -> Arc<Limit> {
    let rates = rates
        .iter()
        .map(|r| r.parse().expect("test rate"))
        .collect();
    let mut spec = LimitSpec::new(rates);
    configure(&mut spec);
    Arc::new(Limit::new(name, spec).expect("test limit"))
}

fn plain(name: &str, rate: &str) -> Arc<Limit> {
    limit(name, &[rate], |_| {})
}

fn with_algorithm(name: &str, rate: &str, algorithm: Algorithm) -> Arc<Limit> {
    limit(name, &[rate], |s| s.algorithm = algorithm)
}

const ALGORITHMS: [Algorithm; 3] = [
    Algorithm::Gcra,
    Algorithm::FixedWindow,
    Algorithm::SlidingWindow,
];

async fn run<H: Harness>(h: &H, checks: &[(&Arc<Limit>, &str, u64)], dry_run: bool) -> Decision {
    let request = DecisionRequest {
        checks: checks
            .iter()
            .map(|(l, k, c)| Check::new(Arc::clone(l), *k, *c).expect("test check"))
            .collect(),
        dry_run,
    };
    decide(&*h.store(), &request).await.expect("store decides")
}

async fn one<H: Harness>(h: &H, l: &Arc<Limit>, key: &str, cost: u64) -> Decision {
    run(h, &[(l, key, cost)], false).await
}

async fn remaining<H: Harness>(h: &H, l: &Arc<Limit>, key: &str) -> u64 {
    one(h, l, key, 0).await.results[0].remaining
}

fn ms(n: u64) -> Micros {
    n as Micros * 1_000
}

fn slack<H: Harness>(h: &H) -> Micros {
    h.slack().as_micros() as Micros
}

/// `actual` is `expected`, or up to `slack` less (time passed between calls on a real clock).
fn assert_about(actual: Micros, expected: Micros, slack: Micros, what: &str) {
    assert!(
        actual <= expected && actual >= expected - slack,
        "{what}: got {actual} µs, expected {expected} µs (minus up to {slack} µs)"
    );
}

/// `5/minute` admits five at once, then one every 12 s; retry times say exactly when.
pub async fn gcra_admits_the_burst_then_one_per_interval<H: Harness>(h: &H) {
    let l = plain("chat", "5/minute");
    for expected in (0..5).rev() {
        let d = one(h, &l, "user:1", 1).await;
        assert!(d.allowed);
        assert_eq!(d.retry_after, Some(0));
        assert_eq!(d.results[0].remaining, expected);
        assert_eq!(d.results[0].limit_value, 5);
    }
    let d = one(h, &l, "user:1", 1).await;
    assert!(!d.allowed, "the sixth request in a minute is denied");
    assert_eq!(d.results[0].remaining, 0);
    let retry = d.retry_after.expect("a retry time");
    assert_about(retry, ms(12_000), slack(h), "retry after the burst");
    assert_eq!(d.results[0].retry_after, Some(retry));
    assert_about(
        d.results[0].reset_after,
        ms(60_000),
        slack(h),
        "reset after the burst",
    );

    // One cell comes back per interval: 5/second refills every 200 ms.
    let fast = plain("fast", "5/second");
    for _ in 0..5 {
        assert!(one(h, &fast, "k", 1).await.allowed);
    }
    let denied = one(h, &fast, "k", 1).await;
    assert!(!denied.allowed);
    h.advance(Duration::from_micros(
        denied.retry_after.expect("retry") as u64
    ))
    .await;
    assert!(
        one(h, &fast, "k", 1).await.allowed,
        "allowed once the retry time has passed"
    );
    assert!(
        !one(h, &fast, "k", 1).await.allowed,
        "and only one cell came back"
    );
}

/// `burst` is the bucket depth: `1/second, burst 3` admits three at once.
pub async fn gcra_burst_option_sets_capacity<H: Harness>(h: &H) {
    let l = limit("bursty", &["1/second"], |s| s.burst = Some(3));
    for expected in [2, 1, 0] {
        let d = one(h, &l, "k", 1).await;
        assert!(d.allowed);
        assert_eq!(d.results[0].limit_value, 3);
        assert_eq!(d.results[0].remaining, expected);
    }
    let d = one(h, &l, "k", 1).await;
    assert!(!d.allowed);
    assert_about(
        d.retry_after.expect("retry"),
        ms(1_000),
        slack(h),
        "burst refill",
    );
}

/// Fixed windows are aligned to the epoch: everything comes back at the boundary.
pub async fn fixed_window_resets_at_the_epoch_aligned_boundary<H: Harness>(h: &H) {
    let l = with_algorithm("fixed", "3/2s", Algorithm::FixedWindow);
    h.align_to(Duration::from_secs(2)).await;
    for expected in [2, 1, 0] {
        let d = one(h, &l, "k", 1).await;
        assert!(d.allowed);
        assert_eq!(d.results[0].remaining, expected);
    }
    let d = one(h, &l, "k", 1).await;
    assert!(!d.allowed);
    let retry = d.retry_after.expect("retry");
    // Aligned just past a boundary, so the next one is at most 2 s away.
    assert!(
        retry <= ms(2_000) && retry > ms(2_000) - ms(100) - 2 * slack(h),
        "retry {retry}"
    );
    assert!(
        (d.results[0].reset_after - retry).abs() <= slack(h),
        "reset and retry meet at the boundary"
    );
    h.advance(Duration::from_micros(retry as u64)).await;
    let d = one(h, &l, "k", 1).await;
    assert!(d.allowed, "a new window");
    assert_eq!(d.results[0].remaining, 2);
}

/// The sliding window counts the previous window, weighted by how much of it still overlaps.
pub async fn sliding_window_weighs_the_previous_window<H: Harness>(h: &H) {
    let l = with_algorithm("sliding", "10/2s", Algorithm::SlidingWindow);
    h.align_to(Duration::from_secs(2)).await;
    for _ in 0..10 {
        assert!(one(h, &l, "k", 1).await.allowed);
    }
    let d = one(h, &l, "k", 1).await;
    assert!(!d.allowed);
    // Room for one more once ten spent in the previous window weigh at most nine:
    // 200 ms into the next window.
    let retry = d.retry_after.expect("retry");
    assert!(retry <= ms(2_200) && retry > ms(2_000), "retry {retry}");
    // Halfway into the next window, half of the previous window still counts.
    h.align_to(Duration::from_secs(2)).await;
    h.advance(Duration::from_millis(1_000)).await;
    assert_eq!(remaining(h, &l, "k").await, 5);
    for _ in 0..5 {
        assert!(one(h, &l, "k", 1).await.allowed);
    }
    assert!(!one(h, &l, "k", 1).await.allowed);
}

/// After a denial, waiting exactly `retry_after` is enough, whatever the algorithm.
pub async fn retry_after_is_honest_for_every_algorithm<H: Harness>(h: &H) {
    for algorithm in ALGORITHMS {
        let l = with_algorithm("honest", "3/second", algorithm);
        let mut denied = None;
        for _ in 0..10 {
            let d = one(h, &l, algorithm.as_str(), 1).await;
            if !d.allowed {
                denied = Some(d);
                break;
            }
        }
        let d = denied.unwrap_or_else(|| panic!("{algorithm}: never denied"));
        let retry = d.retry_after.expect("retry");
        assert!(
            retry > 0 && retry <= ms(2_000),
            "{algorithm}: retry {retry}"
        );
        h.advance(Duration::from_micros(retry as u64)).await;
        assert!(
            one(h, &l, algorithm.as_str(), 1).await.allowed,
            "{algorithm}: allowed after retry_after"
        );
    }
}

/// Cost 0 reads the state and charges nothing.
pub async fn cost_zero_reads_without_charging<H: Harness>(h: &H) {
    for algorithm in ALGORITHMS {
        let l = with_algorithm("read", "5/hour", algorithm);
        let key = algorithm.as_str();
        one(h, &l, key, 2).await;
        for _ in 0..3 {
            let d = one(h, &l, key, 0).await;
            assert!(d.allowed);
            assert_eq!(d.results[0].remaining, 3, "{algorithm}");
        }
        one(h, &l, key, 3).await;
        let d = one(h, &l, key, 0).await;
        assert!(d.allowed, "{algorithm}: a read is never denied");
        assert_eq!(d.results[0].remaining, 0);
    }
}

/// `dry_run` answers as if charging, and charges nothing.
pub async fn dry_run_decides_without_charging<H: Harness>(h: &H) {
    for algorithm in ALGORITHMS {
        let l = with_algorithm("dry", "5/hour", algorithm);
        let key = algorithm.as_str();
        let d = run(h, &[(&l, key, 2)], true).await;
        assert!(d.allowed);
        assert_eq!(d.results[0].remaining, 3, "{algorithm}: what would be left");
        assert_eq!(
            remaining(h, &l, key).await,
            5,
            "{algorithm}: nothing charged"
        );
        one(h, &l, key, 5).await;
        let d = run(h, &[(&l, key, 1)], true).await;
        assert!(!d.allowed);
        assert!(d.retry_after.expect("retry") > 0);
        assert_eq!(remaining(h, &l, key).await, 0);
    }
}

/// A cost the window can never admit is denied with no retry time, and charges nothing.
pub async fn cost_above_capacity_is_denied_with_no_retry_time<H: Harness>(h: &H) {
    for algorithm in ALGORITHMS {
        let l = with_algorithm("huge", "5/hour", algorithm);
        let key = algorithm.as_str();
        let d = one(h, &l, key, 6).await;
        assert!(!d.allowed, "{algorithm}");
        assert_eq!(d.retry_after, None, "{algorithm}: never");
        assert_eq!(d.results[0].retry_after, None);
        assert_eq!(
            remaining(h, &l, key).await,
            5,
            "{algorithm}: nothing charged"
        );
        assert!(
            one(h, &l, key, 5).await.allowed,
            "{algorithm}: the full quota still fits"
        );
    }
}

/// When one check denies, no other check of the decision is charged, whatever the
/// algorithm of either.
pub async fn denied_decision_charges_nothing<H: Harness>(h: &H) {
    for algorithm in ALGORITHMS {
        let wide = with_algorithm(&format!("wide_{algorithm}"), "5/hour", algorithm);
        let narrow = with_algorithm(&format!("narrow_{algorithm}"), "1/hour", algorithm);
        assert!(one(h, &narrow, "k", 1).await.allowed);
        let d = run(h, &[(&wide, "k", 1), (&narrow, "k", 1)], false).await;
        assert!(!d.allowed, "{algorithm}");
        assert!(
            d.results[0].allowed,
            "{algorithm}: the wide limit alone would allow"
        );
        assert!(!d.results[1].allowed);
        assert_eq!(d.results[0].remaining, 5, "{algorithm}: reported uncharged");
        assert_eq!(
            remaining(h, &wide, "k").await,
            5,
            "{algorithm}: and really uncharged"
        );
        assert_eq!(d.retry_after, d.results[1].retry_after);
    }
}

/// Concurrent decisions of two checks, one of them the bottleneck: exactly its quota is
/// admitted, and the other check is charged for the admitted ones only, never for the
/// denied ones (in a Redis Cluster the two live in different slots).
pub async fn concurrent_denials_leave_no_charge_on_the_other_check<H: Harness>(h: &H) {
    let scarce = plain("scarce", "20/day");
    let ample = plain("ample", "1000/day");
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let store = h.store();
            let (scarce, ample) = (Arc::clone(&scarce), Arc::clone(&ample));
            tokio::spawn(async move {
                let mut admitted = 0;
                for _ in 0..10 {
                    let request = DecisionRequest {
                        checks: vec![
                            Check::new(Arc::clone(&ample), "wide", 1).expect("check"),
                            Check::new(Arc::clone(&scarce), "hot", 1).expect("check"),
                        ],
                        dry_run: false,
                    };
                    admitted += u32::from(decide(&*store, &request).await.expect("decide").allowed);
                }
                admitted
            })
        })
        .collect();
    let mut admitted = 0;
    for task in tasks {
        admitted += task.await.expect("task");
    }
    assert_eq!(admitted, 20, "exactly the scarce quota");
    assert_eq!(
        remaining(h, &ample, "wide").await,
        980,
        "the ample check paid for the 20 admitted decisions only"
    );
}

/// `charge_denied` limits are charged on denied attempts too, so hammering keeps a client out.
pub async fn charge_denied_limits_count_every_attempt<H: Harness>(h: &H) {
    let sticky = limit("sticky", &["5/hour"], |s| s.charge_denied = true);
    let narrow = plain("narrow", "1/hour");
    assert!(one(h, &narrow, "k", 1).await.allowed);
    assert!(
        !run(h, &[(&sticky, "k", 1), (&narrow, "k", 1)], false)
            .await
            .allowed
    );
    assert_eq!(
        remaining(h, &sticky, "k").await,
        4,
        "charged although denied"
    );

    let hammered = limit("hammered", &["2/minute"], |s| s.charge_denied = true);
    let polite = plain("polite", "2/minute");
    for l in [&hammered, &polite] {
        one(h, l, "k", 1).await;
        one(h, l, "k", 1).await;
    }
    let first = |d: Decision| d.retry_after.expect("retry");
    let (h1, h2) = (
        first(one(h, &hammered, "k", 1).await),
        first(one(h, &hammered, "k", 1).await),
    );
    let (p1, p2) = (
        first(one(h, &polite, "k", 1).await),
        first(one(h, &polite, "k", 1).await),
    );
    assert!(
        h2 >= h1 + ms(29_000),
        "each denied attempt extends the lockout: {h1} then {h2}"
    );
    assert!(
        (p2 - p1).abs() <= slack(h) + ms(1),
        "without charge_denied it does not: {p1} then {p2}"
    );
    // The lockout is bounded: never more than two bucket depths.
    for _ in 0..20 {
        one(h, &hammered, "k", 1).await;
    }
    assert!(first(one(h, &hammered, "k", 1).await) <= ms(120_000));
}

/// `charge_denied` counts attempts that could have fitted; a cost the window can never
/// admit is the caller's mistake and charges nothing, even there.
pub async fn charge_denied_never_charges_a_cost_that_cannot_fit<H: Harness>(h: &H) {
    for algorithm in ALGORITHMS {
        let sticky = limit("sticky", &["5/hour"], |s| {
            s.charge_denied = true;
            s.algorithm = algorithm;
        });
        let key = algorithm.as_str();
        let d = one(h, &sticky, key, 6).await;
        assert!(!d.allowed);
        assert_eq!(d.retry_after, None);
        assert_eq!(
            remaining(h, &sticky, key).await,
            5,
            "{algorithm}: nothing charged"
        );
        assert!(
            one(h, &sticky, key, 5).await.allowed,
            "{algorithm}: the whole quota is still there"
        );
    }
}

/// A shadow limit decides and reports, and never denies.
pub async fn shadow_limits_report_but_never_deny<H: Harness>(h: &H) {
    let shadow = limit("rollout", &["1/hour"], |s| s.shadow = true);
    let enforced = plain("enforced", "5/hour");
    assert!(
        run(h, &[(&shadow, "k", 1), (&enforced, "k", 1)], false)
            .await
            .allowed
    );
    let d = run(h, &[(&shadow, "k", 1), (&enforced, "k", 1)], false).await;
    assert!(d.allowed, "over a shadow limit, still allowed");
    assert_eq!(d.retry_after, Some(0));
    assert!(
        !d.results[0].allowed && d.results[0].shadow,
        "reported as a would-be denial"
    );
    assert!(d.results[0].retry_after.expect("retry") > 0);
    assert!(d.results[1].allowed && !d.results[1].shadow);
    assert_eq!(
        remaining(h, &enforced, "k").await,
        3,
        "enforced limits were charged"
    );
}

/// Every window of a multi-rate limit must allow; results come one per window.
pub async fn every_window_of_a_limit_must_allow<H: Harness>(h: &H) {
    let l = limit("layered", &["2/hour", "3/day"], |_| {});
    for _ in 0..2 {
        let d = one(h, &l, "k", 1).await;
        assert!(d.allowed);
        assert_eq!(d.results.len(), 2);
    }
    let d = one(h, &l, "k", 1).await;
    assert!(!d.allowed);
    assert_eq!((d.results[0].window, d.results[1].window), (0, 1));
    assert_eq!((d.results[0].limit_value, d.results[1].limit_value), (2, 3));
    assert!(!d.results[0].allowed && d.results[1].allowed);
    let read = one(h, &l, "k", 0).await;
    assert_eq!(
        read.results[1].remaining, 1,
        "the day window was not charged by the denial"
    );
}

/// Two checks on one counter in one request see each other.
pub async fn repeated_counter_in_one_request_counts_twice<H: Harness>(h: &H) {
    let single = plain("single", "1/hour");
    let d = run(h, &[(&single, "k", 1), (&single, "k", 1)], false).await;
    assert!(!d.allowed, "two units do not fit a quota of one");
    assert_eq!(remaining(h, &single, "k").await, 1);

    let double = plain("double", "2/hour");
    let d = run(h, &[(&double, "k", 1), (&double, "k", 1)], false).await;
    assert!(d.allowed);
    assert_eq!((d.results[0].remaining, d.results[1].remaining), (1, 0));
    assert_eq!(remaining(h, &double, "k").await, 0);
}

/// Reset forgets one key of one limit.
pub async fn reset_forgets_a_key<H: Harness>(h: &H) {
    let l = limit("resettable", &["2/hour", "3/day"], |_| {});
    for key in ["a", "b"] {
        one(h, &l, key, 2).await;
    }
    assert!(!one(h, &l, "a", 1).await.allowed);
    h.store().reset(&l, "a").await.expect("reset");
    let d = one(h, &l, "a", 1).await;
    assert!(d.allowed);
    assert_eq!((d.results[0].remaining, d.results[1].remaining), (1, 2));
    assert!(
        !one(h, &l, "b", 1).await.allowed,
        "other keys keep their counters"
    );
}

/// A key's spending does not touch other keys or other limits.
pub async fn keys_and_limits_are_independent<H: Harness>(h: &H) {
    let a = plain("a", "2/hour");
    let b = plain("b", "2/hour");
    one(h, &a, "k1", 2).await;
    assert!(!one(h, &a, "k1", 1).await.allowed);
    assert!(one(h, &a, "k2", 1).await.allowed);
    assert!(one(h, &b, "k1", 1).await.allowed);
    assert!(
        one(h, &a, "k1 ", 1).await.allowed,
        "keys are compared exactly"
    );
}

/// Any key a client can put in a request is a counter of its own: a zero byte,
/// control characters, quotes, braces and non-ASCII text neither fail the store (which
/// would hand every client's decisions to the `on_error` policy) nor merge keys.
pub async fn keys_with_any_characters_are_counters_of_their_own<H: Harness>(h: &H) {
    let l = plain("odd_keys", "1/hour");
    let keys = [
        "a\0b",
        "a\0c",
        "\0",
        "\u{1}610062",
        "a\u{1}",
        "quote'\"\\",
        "{tag}}:x",
        "caf\u{e9}\u{1F600}",
        "tab\tnl\n",
        "%00",
    ];
    for key in keys {
        let first = one(h, &l, key, 1).await;
        assert!(
            first.allowed && !first.degraded,
            "{key:?}: the store decided it"
        );
        assert!(!one(h, &l, key, 1).await.allowed, "{key:?}: and counted it");
    }
    assert!(
        one(h, &l, "a", 1).await.allowed,
        "a prefix of an odd key is another key"
    );
}

/// Counters expire: a flood of keys leaves nothing once its windows have passed.
pub async fn expired_counters_leave_nothing_behind<H: Harness>(h: &H) {
    let limits = [
        with_algorithm("g", "2/second", Algorithm::Gcra),
        with_algorithm("f", "2/second", Algorithm::FixedWindow),
        with_algorithm("s", "2/second", Algorithm::SlidingWindow),
    ];
    let started = std::time::Instant::now();
    for i in 0..20 {
        let key = format!("flood:{i}");
        for l in &limits {
            one(h, l, &key, 1).await;
        }
    }
    let live = h.live_counters().await;
    // On a real server's clock a gcra state here lives 500 ms: the count is exact only
    // when the writes took less (a loaded machine may take longer; then some are
    // already gone, which is what this case goes on to check anyway).
    if started.elapsed() < Duration::from_millis(400) {
        assert_eq!(live, 60, "every counter written is held");
    } else {
        assert!(
            (1..=60).contains(&live),
            "counters written are held until they expire: {live}"
        );
    }
    h.advance(Duration::from_millis(2_100)).await;
    assert_eq!(h.live_counters().await, 0, "every counter expired");
}

/// Many concurrent decisions on one key admit exactly the quota, never more.
pub async fn concurrent_decisions_admit_exactly_the_quota<H: Harness>(h: &H) {
    for algorithm in ALGORITHMS {
        let l = with_algorithm("contended", "100/day", algorithm);
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let store = h.store();
                let l = Arc::clone(&l);
                tokio::spawn(async move {
                    let mut admitted = 0;
                    for _ in 0..50 {
                        let request = DecisionRequest {
                            checks: vec![Check::new(Arc::clone(&l), "hot", 1).expect("check")],
                            dry_run: false,
                        };
                        admitted +=
                            u32::from(decide(&*store, &request).await.expect("decide").allowed);
                    }
                    admitted
                })
            })
            .collect();
        let mut admitted = 0;
        for task in tasks {
            admitted += task.await.expect("task");
        }
        assert_eq!(admitted, 100, "{algorithm}: exactly the quota");
    }
}

async fn refund<H: Harness>(h: &H, checks: &[(&Arc<Limit>, &str, u64)]) -> Decision {
    let request = DecisionRequest {
        checks: checks
            .iter()
            .map(|(l, k, c)| Check::new(Arc::clone(l), *k, *c).expect("test check"))
            .collect(),
        dry_run: false,
    };
    let decision = decide(&*h.store(), &request).await.expect("store decides");
    let charged = decision.charged_windows(&request);
    h.store()
        .refund(&request, &charged)
        .await
        .expect("the store refunds");
    decision
}

/// A refund gives back exactly what the decision charged, for every algorithm and every
/// window of a multi-rate limit; other keys are untouched, and a denied decision (which
/// charged nothing) refunds nothing.
pub async fn refund_gives_back_what_was_charged<H: Harness>(h: &H) {
    for algorithm in ALGORITHMS {
        let l = with_algorithm("refunded", "5/hour", algorithm);
        let key = algorithm.as_str();
        one(h, &l, key, 2).await;
        one(h, &l, "other", 1).await;
        let d = refund(h, &[(&l, key, 2)]).await;
        assert!(d.allowed);
        assert_eq!(d.results[0].remaining, 1, "{algorithm}: charged first");
        assert_eq!(
            remaining(h, &l, key).await,
            3,
            "{algorithm}: the refunded cost is back"
        );
        assert_eq!(
            remaining(h, &l, "other").await,
            4,
            "{algorithm}: other keys keep their charge"
        );
        // Spend the rest: the next is denied, and refunding that denial gives nothing.
        one(h, &l, key, 3).await;
        let denied = refund(h, &[(&l, key, 1)]).await;
        assert!(!denied.allowed, "{algorithm}");
        assert_eq!(remaining(h, &l, key).await, 0, "{algorithm}: still spent");
    }

    // gcra: a refund moves the TAT back, so after a charge and its refund the whole
    // burst fits again.
    let g = plain("refund_gcra", "2/hour");
    refund(h, &[(&g, "k", 1)]).await;
    one(h, &g, "k", 2).await;
    assert!(!one(h, &g, "k", 1).await.allowed);

    let layered = limit("refund_layered", &["2/hour", "3/day"], |_| {});
    one(h, &layered, "k", 1).await;
    refund(h, &[(&layered, "k", 1)]).await;
    let read = one(h, &layered, "k", 0).await;
    assert_eq!(
        (read.results[0].remaining, read.results[1].remaining),
        (1, 2),
        "both windows refunded"
    );

    // Two checks on one counter: both charges come back.
    let twice = plain("refund_twice", "4/hour");
    refund(h, &[(&twice, "k", 1), (&twice, "k", 1)]).await;
    assert_eq!(remaining(h, &twice, "k").await, 4);
}

/// Refunding more than is spent stops at a full window: never above the quota, for a
/// counter that was never charged, already refunded, or expired.
pub async fn refund_never_fills_beyond_the_quota<H: Harness>(h: &H) {
    for algorithm in ALGORITHMS {
        let l = with_algorithm("overfilled", "3/hour", algorithm);
        let key = algorithm.as_str();
        let request = DecisionRequest {
            checks: vec![Check::new(Arc::clone(&l), key, 2).expect("check")],
            dry_run: false,
        };
        let decision = decide(&*h.store(), &request).await.expect("decide");
        let charged = decision.charged_windows(&request);
        for _ in 0..3 {
            h.store()
                .refund(&request, &charged)
                .await
                .expect("the store refunds");
        }
        assert_eq!(
            remaining(h, &l, key).await,
            3,
            "{algorithm}: full, not more"
        );
        assert!(
            !one(h, &l, key, 4).await.allowed,
            "{algorithm}: the quota did not grow"
        );
        // A counter that does not exist takes a refund without coming into being.
        let fresh = DecisionRequest {
            checks: vec![Check::new(Arc::clone(&l), "never-seen", 1).expect("check")],
            dry_run: false,
        };
        h.store()
            .refund(&fresh, &[true])
            .await
            .expect("refund of nothing");
        assert_eq!(remaining(h, &l, "never-seen").await, 3, "{algorithm}");
    }
    let before = h.live_counters().await;
    let g = plain("refund_absent", "1/hour");
    let absent = DecisionRequest {
        checks: vec![Check::new(Arc::clone(&g), "ghost", 1).expect("check")],
        dry_run: false,
    };
    h.store().refund(&absent, &[true]).await.expect("refund");
    assert_eq!(
        h.live_counters().await,
        before,
        "a refund of an absent counter stores nothing"
    );
}

/// 00:00 UTC on `y-m-d`, in microseconds.
fn utc_midnight(y: i64, m: u32, d: u32) -> Micros {
    days_from_civil(y, m, d) * 86_400 * 1_000_000
}

/// `N/month` fixed windows count one UTC calendar month: a denial waits until 00:00 UTC
/// on the next 1st, whatever the month's length, and refunds, reads and a day window
/// beside it work as for any fixed window. On the real clock the month is the current
/// one; where the harness sets the clock, also the last microsecond of December and
/// February 29.
pub async fn calendar_month_windows_end_at_the_next_utc_month_start<H: Harness>(h: &H) {
    let l = with_algorithm("budget", "3/month", Algorithm::FixedWindow);
    let before = h.now();
    for expected in [2, 1, 0] {
        let d = one(h, &l, "k", 1).await;
        assert!(d.allowed);
        assert_eq!(d.results[0].limit_value, 3);
        assert_eq!(d.results[0].remaining, expected);
    }
    let d = one(h, &l, "k", 1).await;
    let after = h.now();
    assert!(!d.allowed, "the fourth in a month is denied");
    let next = next_month_start(before);
    // A test that ran across a month start has no one month to compare with.
    if next_month_start(after) == next {
        // Decided on the store's clock somewhere between `before` and `after` (plus the
        // slack of a server's clock): the wait ends at the next month start.
        let spread = after - before + slack(h);
        let retry = d.retry_after.expect("a retry time");
        assert_about(retry, next - before, spread, "retry until the next month");
        assert_about(
            d.results[0].reset_after,
            next - before,
            spread,
            "reset at the next month",
        );
    }
    let too_much = one(h, &l, "other", 4).await;
    assert!(!too_much.allowed);
    assert_eq!(
        too_much.retry_after, None,
        "more than a month's quota: never"
    );
    assert_eq!(remaining(h, &l, "other").await, 3, "and nothing charged");

    // Refunds give back into the month; a day window beside it is a counter of its own.
    refund(h, &[(&l, "refunded", 2)]).await;
    assert_eq!(remaining(h, &l, "refunded").await, 3);
    let layered = limit("layered_budget", &["3/month", "2/day"], |s| {
        s.algorithm = Algorithm::FixedWindow;
    });
    one(h, &layered, "k", 2).await;
    let d = one(h, &layered, "k", 1).await;
    assert!(!d.allowed, "the day window is spent");
    assert!(!d.results[1].allowed && d.results[0].allowed);
    assert_eq!(
        (d.results[0].remaining, d.results[1].remaining),
        (1, 0),
        "the month window counts apart from the day window"
    );

    // December's last millisecond, then January of the next year.
    let new_year = utc_midnight(2026, 1, 1);
    if !h.jump_to(new_year - 1_000).await {
        return;
    }
    one(h, &l, "dec", 3).await;
    let d = one(h, &l, "dec", 1).await;
    assert!(!d.allowed);
    assert_eq!(d.retry_after, Some(1_000), "one millisecond to January");
    assert_eq!(d.results[0].reset_after, 1_000);
    assert!(h.jump_to(new_year).await);
    let d = one(h, &l, "dec", 1).await;
    assert!(d.allowed, "January is a new window");
    assert_eq!(d.results[0].remaining, 2);
    assert_eq!(
        d.results[0].reset_after,
        utc_midnight(2026, 2, 1) - new_year
    );

    // February 2028 has 29 days: the leap day still counts February's spending.
    let leap_day = utc_midnight(2028, 2, 29);
    let march = utc_midnight(2028, 3, 1);
    assert!(h.jump_to(utc_midnight(2028, 2, 1)).await);
    one(h, &l, "leap", 3).await;
    assert!(h.jump_to(leap_day).await);
    let d = one(h, &l, "leap", 1).await;
    assert!(!d.allowed);
    assert_eq!(
        d.retry_after,
        Some(march - leap_day),
        "a whole leap day to go"
    );
    assert!(h.jump_to(march - 1).await);
    assert!(!one(h, &l, "leap", 1).await.allowed, "still February");
    assert_eq!(h.live_counters().await, 1, "older months' counters expired");
    assert!(h.jump_to(march).await);
    assert_eq!(
        h.live_counters().await,
        0,
        "February's counter expires with it"
    );
    let d = one(h, &l, "leap", 1).await;
    assert!(d.allowed, "March is a new window");
    assert_eq!(d.results[0].remaining, 2);
}

/// Instants around every UTC month start from December 1969 to December 2200 (the last
/// microsecond before, the first, the one after, and mid-month): where a store's own
/// calendar (a Redis script's, a SQL function's) is compared with the engine's
/// [`sluice_engine::calendar`], through leap years and the 2100 and 2200 non-leap ones.
pub fn month_boundary_instants() -> Vec<Micros> {
    let mut instants = Vec::new();
    let mut start = utc_midnight(1969, 12, 1);
    while start < utc_midnight(2201, 1, 1) {
        let next = next_month_start(start);
        instants.extend([start - 1, start, start + 1, start + (next - start) / 2]);
        start = next;
    }
    instants
}
