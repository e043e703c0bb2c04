//! The reservation behaviour every store must show (`Store::reserve`, `Store::settle`;
//! see `sluice_engine::reservation`), as async functions over a [`Harness`]: settle
//! less, more, into debt, twice, after expiry, forged; release; concurrency slots and
//! their expiry; a charge for work already done.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use sluice_engine::{
    Algorithm, Check, Decision, DecisionRequest, Hold, HoldId, Limit, LimitSpec, Micros,
    SettleStatus, Settlement, decide,
};

use crate::Harness;

const ALGORITHMS: [Algorithm; 3] = [
    Algorithm::Gcra,
    Algorithm::FixedWindow,
    Algorithm::SlidingWindow,
];

fn rate_limit(name: &str, rate: &str, algorithm: Algorithm) -> Arc<Limit> {
    let mut spec = LimitSpec::new(vec![rate.parse().expect("test rate")]);
    spec.algorithm = algorithm;
    Arc::new(Limit::new(name, spec).expect("test limit"))
}

fn in_flight(name: &str, slots: u64) -> Arc<Limit> {
    Arc::new(Limit::new(name, LimitSpec::concurrency(slots)).expect("test limit"))
}

fn request(checks: &[(&Arc<Limit>, &str, u64)]) -> DecisionRequest {
    DecisionRequest {
        checks: checks
            .iter()
            .map(|(l, k, c)| Check::new(Arc::clone(l), *k, *c).expect("test check"))
            .collect(),
        dry_run: false,
    }
}

/// A fresh hold id: unique within the test process and across processes sharing a store.
fn new_hold(ttl: Duration) -> Hold {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let n = NEXT.fetch_add(1, Ordering::Relaxed) as u128;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    Hold {
        id: HoldId {
            id: format!(
                "{:032x}",
                (nanos << 32) ^ (u128::from(std::process::id()) << 16) ^ n
            ),
            digest: format!("digest-{n}"),
        },
        ttl: ttl.as_micros() as Micros,
    }
}

/// A reservation made: what it was decided, and what settling it needs.
struct Reserved {
    decision: Decision,
    request: DecisionRequest,
    hold: Hold,
}

impl Reserved {
    fn settlement(&self, actual: &[u64]) -> Settlement {
        Settlement {
            hold: Some(self.hold.id.clone()),
            request: self.request.clone(),
            actual: actual.to_vec(),
            windows: self.decision.results.iter().map(|r| r.allowed).collect(),
        }
    }
}

async fn reserve<H: Harness>(
    h: &H,
    checks: &[(&Arc<Limit>, &str, u64)],
    ttl: Duration,
) -> Reserved {
    let request = request(checks);
    let hold = new_hold(ttl);
    let outcomes = h
        .store()
        .reserve(&request, &hold)
        .await
        .expect("the store reserves");
    let decision = Decision::from_outcomes(&request, &outcomes.windows, outcomes.degraded);
    Reserved {
        decision,
        request,
        hold,
    }
}

async fn settle<H: Harness>(h: &H, settlement: &Settlement) -> SettleStatus {
    h.store()
        .settle(settlement)
        .await
        .expect("the store settles")
}

async fn read<H: Harness>(h: &H, l: &Arc<Limit>, key: &str) -> Decision {
    decide(&*h.store(), &request(&[(l, key, 0)]))
        .await
        .expect("the store decides")
}

async fn remaining<H: Harness>(h: &H, l: &Arc<Limit>, key: &str) -> u64 {
    read(h, l, key).await.results[0].remaining
}

const HOUR: Duration = Duration::from_secs(3600);

/// A reservation charges its estimate like a check; settling for less gives back the
/// difference, for every algorithm.
pub async fn settle_less_refunds_the_difference<H: Harness>(h: &H) {
    for algorithm in ALGORITHMS {
        let l = rate_limit("settle_less", "10/hour", algorithm);
        let key = algorithm.as_str();
        let r = reserve(h, &[(&l, key, 6)], HOUR).await;
        assert!(r.decision.allowed, "{algorithm}");
        assert_eq!(
            r.decision.results[0].remaining, 4,
            "{algorithm}: estimate charged"
        );
        assert_eq!(settle(h, &r.settlement(&[2])).await, SettleStatus::Settled);
        assert_eq!(
            remaining(h, &l, key).await,
            8,
            "{algorithm}: actual 2 is what stays"
        );
    }
}

/// Settling for more than the estimate charges the extra even past the limit: the
/// window is in debt, later requests are denied with a retry time that covers the debt.
pub async fn settle_more_goes_into_debt<H: Harness>(h: &H) {
    for algorithm in ALGORITHMS {
        let l = rate_limit("settle_more", "10/hour", algorithm);
        let key = algorithm.as_str();
        let r = reserve(h, &[(&l, key, 6)], HOUR).await;
        assert!(r.decision.allowed);
        assert_eq!(settle(h, &r.settlement(&[15])).await, SettleStatus::Settled);
        let after = read(h, &l, key).await;
        assert_eq!(after.results[0].remaining, 0, "{algorithm}: nothing left");
        let denied = decide(&*h.store(), &request(&[(&l, key, 1)]))
            .await
            .expect("decide");
        assert!(!denied.allowed, "{algorithm}: in debt, the next call waits");
        let retry = denied.retry_after.expect("a retry time");
        assert!(retry > 0, "{algorithm}");
        if algorithm == Algorithm::Gcra {
            // 15 spent of a 10-deep bucket refilling one per 360 s: one more fits once
            // 6 cells have drained, 2160 s from now.
            let expected: Micros = 2_160_000_000;
            let slack = h.slack().as_micros() as Micros;
            assert!(
                retry <= expected && retry >= expected - slack,
                "gcra debt drains at the rate: retry {retry} µs, expected {expected}"
            );
        }
    }
}

/// Settling twice changes nothing the second time; a release after a settle too.
pub async fn settling_twice_changes_nothing<H: Harness>(h: &H) {
    let l = rate_limit("settle_twice", "10/hour", Algorithm::Gcra);
    let r = reserve(h, &[(&l, "k", 5)], HOUR).await;
    assert_eq!(settle(h, &r.settlement(&[1])).await, SettleStatus::Settled);
    assert_eq!(remaining(h, &l, "k").await, 9);
    assert_eq!(
        settle(h, &r.settlement(&[1])).await,
        SettleStatus::AlreadySettled
    );
    assert_eq!(
        settle(h, &r.settlement(&[0])).await,
        SettleStatus::AlreadySettled,
        "a release after the settle"
    );
    assert_eq!(remaining(h, &l, "k").await, 9, "nothing moved twice");
}

/// Releasing gives the whole estimate back.
pub async fn release_gives_back_the_whole_estimate<H: Harness>(h: &H) {
    for algorithm in ALGORITHMS {
        let l = rate_limit("released", "10/hour", algorithm);
        let key = algorithm.as_str();
        let r = reserve(h, &[(&l, key, 7)], HOUR).await;
        assert_eq!(remaining(h, &l, key).await, 3);
        assert_eq!(settle(h, &r.settlement(&[0])).await, SettleStatus::Settled);
        assert_eq!(remaining(h, &l, key).await, 10, "{algorithm}");
    }
}

/// A reservation that expires unsettled keeps its estimate, and can no longer be
/// settled; a denied reservation holds nothing to settle; a settlement with the wrong
/// digest or an unknown id moves nothing.
pub async fn expired_denied_and_forged_reservations_settle_nothing<H: Harness>(h: &H) {
    let l = rate_limit("settle_expired", "10/hour", Algorithm::FixedWindow);
    let r = reserve(h, &[(&l, "k", 4)], Duration::from_millis(300)).await;
    assert!(r.decision.allowed);
    h.advance(Duration::from_millis(600)).await;
    assert_eq!(settle(h, &r.settlement(&[0])).await, SettleStatus::Unknown);
    assert_eq!(remaining(h, &l, "k").await, 6, "settled at its estimate");

    let denied = reserve(h, &[(&l, "k", 7)], HOUR).await;
    assert!(!denied.decision.allowed);
    assert_eq!(
        settle(h, &denied.settlement(&[0])).await,
        SettleStatus::Unknown
    );
    assert_eq!(
        remaining(h, &l, "k").await,
        6,
        "a denied reservation refunds nothing"
    );

    let r = reserve(h, &[(&l, "k", 2)], HOUR).await;
    let mut forged = r.settlement(&[0]);
    forged.hold = Some(HoldId {
        id: r.hold.id.id.clone(),
        digest: "not-the-digest".into(),
    });
    assert_eq!(settle(h, &forged).await, SettleStatus::Unknown);
    let mut unknown = r.settlement(&[0]);
    unknown.hold = Some(new_hold(HOUR).id);
    assert_eq!(settle(h, &unknown).await, SettleStatus::Unknown);
    assert_eq!(remaining(h, &l, "k").await, 4, "forgeries move nothing");
    assert_eq!(settle(h, &r.settlement(&[2])).await, SettleStatus::Settled);
}

/// A settlement with no hold (work already done, e.g. Envoy's stream-done call) is
/// booked unconditionally, past the limit.
pub async fn a_charge_for_work_done_is_booked_past_the_limit<H: Harness>(h: &H) {
    for algorithm in ALGORITHMS {
        let l = rate_limit("work_done", "10/hour", algorithm);
        let key = algorithm.as_str();
        let done = Settlement {
            hold: None,
            request: request(&[(&l, key, 0)]),
            actual: vec![25],
            windows: vec![true],
        };
        assert_eq!(settle(h, &done).await, SettleStatus::Settled);
        let next = decide(&*h.store(), &request(&[(&l, key, 1)]))
            .await
            .expect("decide");
        assert!(!next.allowed, "{algorithm}: the debt is owed");
        assert_eq!(next.results[0].remaining, 0);
    }
}

/// `concurrency: 2` admits two open reservations per key, a third waits; a settled
/// or released one gives its slot back at once, an expired one at its expiry. A
/// reservation denied by another limit takes no slot.
pub async fn concurrency_slots_are_held_until_settled_or_expired<H: Harness>(h: &H) {
    let c = in_flight("in_flight", 2);
    let a = reserve(h, &[(&c, "user", 1)], HOUR).await;
    let b = reserve(h, &[(&c, "user", 1)], Duration::from_millis(400)).await;
    assert!(a.decision.allowed && b.decision.allowed);
    assert_eq!(b.decision.results[0].remaining, 0);
    assert_eq!(b.decision.results[0].limit_value, 2);
    let third = reserve(h, &[(&c, "user", 1)], HOUR).await;
    assert!(!third.decision.allowed, "two calls in flight already");
    assert!(
        reserve(h, &[(&c, "other", 1)], HOUR).await.decision.allowed,
        "another key has its own slots"
    );

    assert_eq!(settle(h, &a.settlement(&[1])).await, SettleStatus::Settled);
    let after_settle = reserve(h, &[(&c, "user", 1)], HOUR).await;
    assert!(
        after_settle.decision.allowed,
        "a settled call frees its slot"
    );
    assert!(!reserve(h, &[(&c, "user", 1)], HOUR).await.decision.allowed);

    h.advance(Duration::from_millis(800)).await;
    let after_expiry = reserve(h, &[(&c, "user", 1)], HOUR).await;
    assert!(
        after_expiry.decision.allowed,
        "an expired reservation frees its slot"
    );
    assert_eq!(
        settle(h, &b.settlement(&[1])).await,
        SettleStatus::Unknown,
        "and can no longer be settled"
    );

    // A reservation denied by its rate limit takes no slot.
    let c2 = in_flight("in_flight_rated", 1);
    let r = rate_limit("in_flight_rate", "1/hour", Algorithm::Gcra);
    assert!(
        reserve(h, &[(&c2, "k", 1), (&r, "k", 1)], HOUR)
            .await
            .decision
            .allowed
    );
    let released = reserve(h, &[(&c2, "j", 1), (&r, "j", 1)], HOUR).await;
    assert_eq!(
        settle(h, &released.settlement(&[1, 1])).await,
        SettleStatus::Settled
    );
    let denied = reserve(h, &[(&c2, "j", 1), (&r, "j", 1)], HOUR).await;
    assert!(!denied.decision.allowed, "the rate is spent");
    assert!(
        reserve(h, &[(&c2, "j", 1)], HOUR).await.decision.allowed,
        "the denied reservation took no slot"
    );
}

/// Many reservations at once never hold more slots than the limit.
pub async fn concurrent_reservations_never_exceed_the_slots<H: Harness>(h: &H) {
    let c = in_flight("in_flight_race", 5);
    let store = h.store();
    let tasks: Vec<_> = (0..40)
        .map(|_| {
            let store = Arc::clone(&store);
            let c = Arc::clone(&c);
            tokio::spawn(async move {
                let request = request(&[(&c, "shared", 1)]);
                let hold = new_hold(HOUR);
                let outcomes = store.reserve(&request, &hold).await.expect("reserve");
                u32::from(outcomes.windows[0].allowed)
            })
        })
        .collect();
    let mut admitted = 0;
    for task in tasks {
        admitted += task.await.expect("task");
    }
    assert_eq!(admitted, 5, "exactly the slots");
}
