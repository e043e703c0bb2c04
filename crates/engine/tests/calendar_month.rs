//! `N/month` fixed windows: one window per UTC calendar month, whatever its length.

use sluice_engine::calendar::days_from_civil;
use sluice_engine::{Algorithm, Limit, LimitError, LimitSpec, Micros, Rate, State, Window};

const DAY: Micros = 86_400 * 1_000_000;

/// 00:00 UTC on `y-m-d`, in microseconds.
fn at(y: i64, m: u32, d: u32) -> Micros {
    days_from_civil(y, m, d) * DAY
}

fn monthly(quota: u64) -> Window {
    let rate: Rate = format!("{quota}/month").parse().expect("rate");
    Window::new(Algorithm::FixedWindow, rate, None).expect("a fixed calendar-month window")
}

/// Charges `cost` at `now` and returns the state after, asserting it was allowed.
fn spend(window: &Window, state: Option<State>, now: Micros, cost: u64) -> State {
    let evaluation = window.evaluate(state, now, cost);
    assert!(evaluation.allowed, "spending {cost} at {now}");
    evaluation.charged
}

#[test]
fn the_last_microsecond_of_january_is_january_and_february_starts_fresh() {
    let window = monthly(3);
    let feb = at(2025, 2, 1);
    let state = spend(&window, None, at(2025, 1, 15), 3);
    assert_eq!(window.expires_at(&state), feb, "kept until February starts");

    let last = feb - 1;
    let denied = window.evaluate(Some(state), last, 1);
    assert!(
        !denied.allowed,
        "January's quota is spent until its very end"
    );
    assert_eq!(denied.retry_after, Some(1), "one microsecond to go");
    assert_eq!(window.remaining(&state, last), 0);
    assert_eq!(window.reset_after(&state, last), 1);

    let fresh = window.evaluate(Some(state), feb, 1);
    assert!(fresh.allowed, "February is a new window");
    assert_eq!(
        fresh.current,
        State::Fixed {
            start: feb,
            count: 0
        }
    );
    assert_eq!(window.remaining(&fresh.charged, feb), 2);
    assert_eq!(window.reset_after(&fresh.charged, feb), 28 * DAY);
    assert_eq!(window.expires_at(&fresh.charged), at(2025, 3, 1));
}

#[test]
fn december_runs_into_january_of_the_next_year() {
    let window = monthly(2);
    let now = at(2025, 12, 10) + 3_600 * 1_000_000;
    let state = spend(&window, None, now, 2);
    let denied = window.evaluate(Some(state), now, 1);
    assert!(!denied.allowed);
    let new_year = at(2026, 1, 1);
    assert_eq!(denied.retry_after, Some(new_year - now));
    assert_eq!(window.reset_after(&state, now), new_year - now);
    assert_eq!(window.expires_at(&state), new_year);
    assert_eq!(
        window.evaluate(Some(state), new_year, 2).current,
        State::Fixed {
            start: new_year,
            count: 0
        }
    );
}

#[test]
fn february_2028_has_twenty_nine_days() {
    let window = monthly(10);
    let feb = at(2028, 2, 1);
    let state = spend(&window, None, feb, 4);
    assert_eq!(window.expires_at(&state), at(2028, 3, 1));
    assert_eq!(window.reset_after(&state, feb), 29 * DAY);
    // All of February 29 still counts February's spending.
    let leap_day_end = at(2028, 2, 29) + DAY - 1;
    assert_eq!(window.remaining(&state, at(2028, 2, 29)), 6);
    assert_eq!(window.remaining(&state, leap_day_end), 6);
    assert_eq!(window.remaining(&state, at(2028, 3, 1)), 10);
    // 2100 is not a leap year.
    let state = spend(&window, None, at(2100, 2, 1), 1);
    assert_eq!(window.expires_at(&state), at(2100, 3, 1));
    assert_eq!(at(2100, 3, 1) - at(2100, 2, 1), 28 * DAY);
}

#[test]
fn refunds_and_later_windows_follow_the_calendar() {
    let window = monthly(5);
    let now = at(2025, 4, 30) + DAY - 10;
    let state = spend(&window, None, now, 3);
    let refunded = window.refund(Some(state), now, 2).expect("given back");
    assert_eq!(window.remaining(&refunded, now), 4);
    assert_eq!(window.expires_at(&refunded), at(2025, 5, 1));
    // Next month, April's charge is gone: nothing to give back.
    assert_eq!(window.refund(Some(state), at(2025, 5, 1), 2), None);
    // A state written by a decision whose clock read May already is May's window, not
    // a foreign one: its count stays.
    let written_in_may = spend(&window, None, at(2025, 5, 1) + 10, 5);
    let late = window.evaluate(Some(written_in_may), now, 1);
    assert!(!late.allowed);
    assert_eq!(window.remaining(&late.current, now), 0);
}

fn spec(rates: &[&str], algorithm: Algorithm) -> LimitSpec {
    let mut spec = LimitSpec::new(rates.iter().map(|r| r.parse().expect("rate")).collect());
    spec.algorithm = algorithm;
    spec
}

#[test]
fn only_the_fixed_window_takes_a_calendar_month() {
    for algorithm in [Algorithm::Gcra, Algorithm::SlidingWindow] {
        let error = Limit::new("budget", spec(&["100/month"], algorithm)).unwrap_err();
        assert!(
            matches!(error, LimitError::CalendarMonthNeedsFixedWindow(_, a) if a == algorithm),
            "{error:?}"
        );
        let message = error.to_string();
        assert!(
            message.contains("100/month")
                && message.contains(algorithm.as_str())
                && message.contains("algorithm: fixed_window"),
            "{message}"
        );
    }
    let limit = Limit::new(
        "budget",
        spec(&["100/month", "100/30d", "10/day"], Algorithm::FixedWindow),
    )
    .expect("a month beside day-based windows");
    let counters: Vec<&str> = limit.windows().iter().map(|w| &*w.counter).collect();
    assert_eq!(
        counters,
        ["budget:f1mo", "budget:f2592000", "budget:f86400"]
    );
    assert_eq!(&*limit.windows()[0].rate_text, "100/month");
    assert!(matches!(
        Limit::new("budget", spec(&["1/month", "2/mo"], Algorithm::FixedWindow)),
        Err(LimitError::SamePeriod(..))
    ));
}
