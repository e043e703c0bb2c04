//! Black-box tests of the `sluice` binary's HTTP decision API (docs/design/engine.md,
//! docs/design/front-doors.md "Decision API") and its command line (`serve`,
//! `check-config`; docs/design/operations.md).
//!
//! Every test starts its own `sluice serve` on a free port with its own config,
//! so tests are independent and can run in parallel.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};

// ---------------------------------------------------------------------------
// helpers local to this file

/// Asserts an API error: status, JSON body `{"error": code, "message": ...}`
/// with a non-empty message that mentions one of `mentions` (case-insensitive).
fn assert_error(what: &str, r: &Resp, status: u16, codes: &[&str], mentions: &[&str]) {
    assert_eq!(
        r.status, status,
        "{what}: expected status {status}, got {} with body {:?}",
        r.status, r.body
    );
    let ct = r.content_type.clone().unwrap_or_default();
    assert!(
        ct.contains("json"),
        "{what}: error response should be JSON, Content-Type is {ct:?}, body {:?}",
        r.body
    );
    let v: Value = serde_json::from_str(&r.body)
        .unwrap_or_else(|e| panic!("{what}: error body is not JSON ({e}): {:?}", r.body));
    let code = v["error"]
        .as_str()
        .unwrap_or_else(|| panic!("{what}: no string `error` field in {v}"));
    assert!(
        codes.contains(&code),
        "{what}: error code {code:?}, expected one of {codes:?}; body {v}"
    );
    let msg = v["message"]
        .as_str()
        .unwrap_or_else(|| panic!("{what}: no string `message` field in {v}"));
    assert!(!msg.trim().is_empty(), "{what}: empty message in {v}");
    if !mentions.is_empty() {
        let lower = msg.to_lowercase();
        assert!(
            mentions.iter().any(|m| lower.contains(&m.to_lowercase())),
            "{what}: message {msg:?} should mention one of {mentions:?}"
        );
    }
}

fn check_raw(s: &Server, body: &[u8]) -> Resp {
    s.post_raw("/v1/check", body, Some("application/json"))
}

/// Largest `retry_after_ms` among the denied results (None = some is null).
fn max_denied_retry(d: &Value) -> Option<u64> {
    let mut max = 0;
    for r in results(d).iter().filter(|r| r["allowed"] == false) {
        match r["retry_after_ms"].as_u64() {
            Some(x) => max = max.max(x),
            None => return None,
        }
    }
    Some(max)
}

fn assert_allowed_result(r: &Value) {
    assert_eq!(r["allowed"], true, "result should be allowed: {r}");
    assert_eq!(r["retry_after_ms"], 0, "allowed result has retry 0: {r}");
}

// ---------------------------------------------------------------------------
// 1. a 5/minute (gcra) user limit

#[test]
fn gcra_five_per_minute_counts_down_then_denies_with_retry() {
    let s = Server::standard();
    for (i, want) in [4u64, 3, 2, 1, 0].into_iter().enumerate() {
        let d = s.hit("chat_user", "user:42", None);
        assert!(allowed(&d), "request {} should be allowed: {d}", i + 1);
        assert_eq!(d["retry_after_ms"], 0, "allowed decision has retry 0: {d}");
        assert_eq!(d["degraded"], false, "memory store is never degraded: {d}");
        assert_eq!(results(&d).len(), 2, "two rates give two results: {d}");
        let m = result(&d, "chat_user", Some("5/minute"));
        assert_allowed_result(m);
        assert_eq!(m["key"], "user:42", "{m}");
        assert_eq!(m["limit_value"], 5, "{m}");
        assert_eq!(m["shadow"], false, "{m}");
        assert_eq!(
            u(m, "remaining"),
            want,
            "remaining after request {}: {m}",
            i + 1
        );
        assert!(u(m, "reset_after_ms") <= 60_000, "{m}");
        let h = result(&d, "chat_user", Some("60/hour"));
        assert_allowed_result(h);
        assert_eq!(h["limit_value"], 60, "{h}");
        assert_eq!(
            u(h, "remaining"),
            59 - i as u64,
            "hour window counts too: {h}"
        );
    }

    let d = s.hit("chat_user", "user:42", None);
    assert!(!allowed(&d), "6th request in a minute must be denied: {d}");
    let m = result(&d, "chat_user", Some("5/minute"));
    assert_eq!(m["allowed"], false, "{m}");
    assert_eq!(u(m, "remaining"), 0, "{m}");
    let retry = u(m, "retry_after_ms");
    assert!(
        (1..=12_000).contains(&retry),
        "gcra 5/minute frees one cell every 12 s; retry_after_ms was {retry}: {d}"
    );
    assert!(u(m, "reset_after_ms") >= retry, "reset >= retry: {m}");
    assert_eq!(
        d["retry_after_ms"].as_u64(),
        max_denied_retry(&d),
        "decision retry_after_ms must be the largest denied result's: {d}"
    );
    assert_eq!(u(&d, "retry_after_ms"), retry, "{d}");

    // A different key is untouched.
    let d = s.hit("chat_user", "user:43", None);
    assert!(allowed(&d), "another key is independent: {d}");
    assert_eq!(u(result(&d, "chat_user", Some("5/minute")), "remaining"), 4);
}

// ---------------------------------------------------------------------------
// 2. atomicity: a denied decision charges nothing

#[test]
fn denied_decision_charges_none_of_its_checks() {
    let s = Server::standard();
    // Exhaust `tiny` (1/hour) for key t.
    assert!(allowed(&s.hit("tiny", "t", None)));
    assert!(!allowed(&s.hit("tiny", "t", None)));

    // Both orders: the allowed check must not be charged in either.
    for (user, checks) in [
        (
            "user:a",
            json!([{"limit": "chat_user", "key": "user:a"}, {"limit": "tiny", "key": "t"}]),
        ),
        (
            "user:b",
            json!([{"limit": "tiny", "key": "t"}, {"limit": "chat_user", "key": "user:b"}]),
        ),
    ] {
        for _ in 0..3 {
            let d = s.check(json!({ "checks": checks }));
            assert!(!allowed(&d), "tiny is exhausted, decision denied: {d}");
            assert_eq!(result(&d, "tiny", None)["allowed"], false, "{d}");
            let r = u(&d, "retry_after_ms");
            assert!(r > 0 && r <= 3_600_000, "retry within the hour: {d}");
        }
        let read = s.hit("chat_user", user, Some(0));
        assert!(allowed(&read), "cost 0 read is allowed: {read}");
        assert_eq!(
            u(result(&read, "chat_user", Some("5/minute")), "remaining"),
            5,
            "{user} must not have been charged by denied decisions: {read}"
        );
        assert_eq!(
            u(result(&read, "chat_user", Some("60/hour")), "remaining"),
            60,
            "{user} hour window must not have been charged: {read}"
        );
    }
}

#[test]
fn decision_retry_is_the_largest_denied_and_duplicates_are_summed() {
    let s = Server::standard();
    assert!(allowed(&s.hit("tiny", "t", None)));
    for _ in 0..5 {
        assert!(allowed(&s.hit("five", "m", None)));
    }
    let d = s.check(json!({"checks": [
        {"limit": "five", "key": "m"},
        {"limit": "tiny", "key": "t"}]}));
    assert!(!allowed(&d), "{d}");
    let five = u(result(&d, "five", None), "retry_after_ms");
    let tiny = u(result(&d, "tiny", None), "retry_after_ms");
    assert!(five <= 12_000 && tiny > 3_000_000, "{d}");
    assert_eq!(
        u(&d, "retry_after_ms"),
        tiny,
        "the decision waits for the slowest: {d}"
    );

    // The same limit and key twice in one decision: 3 + 3 > 5 must not pass.
    let d = s.check(json!({"checks": [
        {"limit": "five", "key": "dup", "cost": 3},
        {"limit": "five", "key": "dup", "cost": 3}]}));
    assert!(
        !allowed(&d),
        "two checks of cost 3 on one 5/minute key: {d}"
    );
    let read = s.hit("five", "dup", Some(0));
    assert_eq!(u(result(&read, "five", None), "remaining"), 5, "{read}");
    let d = s.check(json!({"checks": [
        {"limit": "five", "key": "dup", "cost": 2},
        {"limit": "five", "key": "dup", "cost": 3}]}));
    assert!(allowed(&d), "2 + 3 fits: {d}");
    let read = s.hit("five", "dup", Some(0));
    assert_eq!(
        u(result(&read, "five", None), "remaining"),
        0,
        "both charged: {read}"
    );
}

// ---------------------------------------------------------------------------
// 3. charge_denied keeps a hammering client locked out

#[test]
fn charge_denied_keeps_hammering_client_locked_but_plain_limit_does_not() {
    let s = Server::standard();
    for (limit, charges) in [("widget_ip", true), ("plain3", false)] {
        let key = "203.0.113.7";
        for i in 0..3 {
            let d = s.hit(limit, key, None);
            assert!(
                allowed(&d),
                "{limit}: request {} of 3/minute allowed: {d}",
                i + 1
            );
        }
        let first = s.hit(limit, key, None);
        assert!(!allowed(&first), "{limit}: 4th denied: {first}");
        let r1 = u(&first, "retry_after_ms");
        assert!(r1 > 0, "{first}");
        std::thread::sleep(Duration::from_millis(50));
        let mut last = first.clone();
        for _ in 0..3 {
            last = s.hit(limit, key, None);
            assert!(!allowed(&last), "{limit}: still denied: {last}");
            assert_eq!(u(result(&last, limit, None), "remaining"), 0, "{last}");
        }
        let r4 = u(&last, "retry_after_ms");
        if charges {
            assert!(
                r4 > r1,
                "{limit} has charge_denied: denied attempts must push the retry time out \
                 (first denial retry {r1} ms, after 3 more denials {r4} ms)"
            );
        } else {
            assert!(
                r4 < r1,
                "{limit} has no charge_denied: denied attempts must not charge, so the \
                 retry time only shrinks with time (first {r1} ms, later {r4} ms)"
            );
        }
        // A cost-0 read agrees.
        let read = s.hit(limit, key, Some(0));
        assert_eq!(u(result(&read, limit, None), "remaining"), 0, "{read}");
    }
}

#[test]
fn charge_denied_charges_only_its_own_limit_and_never_on_dry_run() {
    let s = Server::standard();
    let w = "198.51.100.77";
    for _ in 0..3 {
        assert!(allowed(&s.hit("widget_ip", w, None)));
    }
    let reset_of = |s: &Server| {
        let d = s.hit("widget_ip", w, Some(0));
        u(result(&d, "widget_ip", None), "reset_after_ms")
    };
    let before = reset_of(&s);
    // dry runs never charge, even a charge_denied limit
    for _ in 0..3 {
        let d = s.check(json!({"checks": [{"limit": "widget_ip", "key": w}], "dry_run": true}));
        assert!(!allowed(&d), "{d}");
    }
    let after_dry = reset_of(&s);
    assert!(
        after_dry <= before,
        "dry runs charged widget_ip: reset_after_ms went from {before} to {after_dry}"
    );
    // a real denied decision charges widget_ip but not its companion check
    let d = s.check(json!({"checks": [
        {"limit": "widget_ip", "key": w},
        {"limit": "five", "key": "companion"}]}));
    assert!(!allowed(&d), "{d}");
    let after = reset_of(&s);
    assert!(
        after > after_dry + 10_000,
        "a denied attempt on a charge_denied limit is charged (one 20 s cell): \
         reset_after_ms went from {after_dry} to {after}"
    );
    let read = s.hit("five", "companion", Some(0));
    assert_eq!(
        u(result(&read, "five", None), "remaining"),
        5,
        "the other check of a denied decision is not charged: {read}"
    );
}

// ---------------------------------------------------------------------------
// 4. shadow limits decide and report but never deny

#[test]
fn shadow_limit_reports_denial_but_allows_and_counts_it_in_metrics() {
    let s = Server::standard();
    for i in 0..2 {
        let d = s.hit("global", "all", None);
        assert!(allowed(&d), "request {}: {d}", i + 1);
        let g = result(&d, "global", None);
        assert_eq!(g["allowed"], true, "{g}");
        assert_eq!(g["shadow"], true, "shadow limit is flagged: {g}");
    }
    let d = s.hit("global", "all", None);
    assert!(allowed(&d), "a shadow limit never denies the decision: {d}");
    assert_eq!(d["retry_after_ms"], 0, "allowed decision: {d}");
    let g = result(&d, "global", None);
    assert_eq!(
        g["allowed"], false,
        "the shadow result reports the denial: {g}"
    );
    assert_eq!(g["shadow"], true, "{g}");

    // With a real limit in the same decision, only the real one decides.
    let d = s.check(json!({"checks": [
        {"limit": "global", "key": "all"},
        {"limit": "five", "key": "k"}]}));
    assert!(allowed(&d), "{d}");
    assert_eq!(
        u(result(&d, "five", None), "remaining"),
        4,
        "five was charged: {d}"
    );

    let m = s.metrics();
    let shadow = metric_value(
        &m,
        "sluice_decisions_total",
        &[("limit", "global"), ("outcome", "shadow_denied")],
    );
    assert_eq!(
        shadow,
        Some(2.0),
        "two shadow denials of `global` expected in /metrics; samples: {:?}",
        m.iter()
            .filter(|x| x.name.starts_with("sluice_decisions"))
            .collect::<Vec<_>>()
    );
    let denied = metric_value(
        &m,
        "sluice_decisions_total",
        &[("limit", "global"), ("outcome", "denied")],
    )
    .unwrap_or(0.0);
    assert_eq!(denied, 0.0, "a shadow limit is never counted as denied");
}

// ---------------------------------------------------------------------------
// 5. dry_run, cost 0, oversized cost, top-level default cost

#[test]
fn dry_run_and_cost_zero_do_not_charge() {
    let s = Server::standard();
    // dry run: remaining is what would be left after it
    let d = s.check(json!({"checks": [{"limit": "five", "key": "d"}], "dry_run": true}));
    assert!(allowed(&d), "{d}");
    assert_eq!(
        u(result(&d, "five", None), "remaining"),
        4,
        "dry run of cost 1: {d}"
    );
    let d = s.check(json!({"checks": [{"limit": "five", "key": "d", "cost": 3}], "dry_run": true}));
    assert_eq!(
        u(result(&d, "five", None), "remaining"),
        2,
        "dry run of cost 3: {d}"
    );

    // cost 0: remaining is what is left now (nothing was charged so far)
    let d = s.hit("five", "d", Some(0));
    assert!(allowed(&d), "{d}");
    assert_eq!(
        u(result(&d, "five", None), "remaining"),
        5,
        "dry runs charged: {d}"
    );
    assert_eq!(d["retry_after_ms"], 0, "{d}");

    // real charge of 2, then reads
    let d = s.hit("five", "d", Some(2));
    assert!(allowed(&d), "{d}");
    assert_eq!(u(result(&d, "five", None), "remaining"), 3, "{d}");
    for _ in 0..3 {
        let d = s.hit("five", "d", Some(0));
        assert_eq!(
            u(result(&d, "five", None), "remaining"),
            3,
            "cost 0 charged: {d}"
        );
    }
    // a dry run that would not fit is denied with a finite retry, and charges nothing
    let d = s.check(json!({"checks": [{"limit": "five", "key": "d", "cost": 4}], "dry_run": true}));
    assert!(!allowed(&d), "4 > 3 remaining: {d}");
    let r = d["retry_after_ms"].as_u64().unwrap_or_else(|| {
        panic!("cost 4 fits a 5/minute limit eventually, retry must be a number: {d}")
    });
    assert!(r > 0 && r <= 60_000, "{d}");
    let d = s.hit("five", "d", Some(0));
    assert_eq!(u(result(&d, "five", None), "remaining"), 3, "{d}");

    // cost 3 still fits exactly
    let d = s.hit("five", "d", Some(3));
    assert!(allowed(&d), "{d}");
    assert_eq!(u(result(&d, "five", None), "remaining"), 0, "{d}");
}

#[test]
fn cost_larger_than_limit_is_denied_with_null_retry() {
    let s = Server::standard();
    let d = s.hit("five", "big", Some(6));
    assert!(!allowed(&d), "cost 6 can never fit 5/minute: {d}");
    assert!(
        d["retry_after_ms"].is_null(),
        "decision retry_after_ms must be null when the cost can never fit: {d}"
    );
    let r = result(&d, "five", None);
    assert_eq!(r["allowed"], false, "{r}");
    assert!(
        r["retry_after_ms"].is_null(),
        "result retry_after_ms must be null: {r}"
    );
    // and it charged nothing
    let d = s.hit("five", "big", Some(0));
    assert_eq!(u(result(&d, "five", None), "remaining"), 5, "{d}");

    // A huge cost must not overflow anything.
    let d = s.check(json!({"checks": [{"limit": "five", "key": "big", "cost": u64::MAX}]}));
    assert!(!allowed(&d), "{d}");
    assert!(d["retry_after_ms"].is_null(), "{d}");
    let d = s.hit("five", "big", Some(5));
    assert!(allowed(&d), "the key is still fresh: {d}");
}

#[test]
fn top_level_cost_is_default_for_checks_without_their_own() {
    let s = Server::standard();
    let d = s.check(json!({
        "checks": [
            {"limit": "five", "key": "tc"},
            {"limit": "chat_ip", "key": "198.51.100.1", "cost": 1}
        ],
        "cost": 3
    }));
    assert!(allowed(&d), "{d}");
    assert_eq!(
        u(result(&d, "five", None), "remaining"),
        2,
        "top cost 3 applied: {d}"
    );
    assert_eq!(
        u(result(&d, "chat_ip", None), "remaining"),
        29,
        "a check's own cost wins over the top-level one: {d}"
    );
    // canonical rate strings
    assert_eq!(result(&d, "five", None)["rate"], "5/minute", "{d}");
    assert_eq!(result(&d, "chat_ip", None)["rate"], "30/minute", "{d}");
}

// ---------------------------------------------------------------------------
// 6. fixed windows are aligned to UTC midnight

#[test]
fn fixed_window_day_resets_at_utc_midnight() {
    let s = Server::standard();
    const DAY: u64 = 86_400_000;
    let d = s.hit("daily", "u1", None);
    let now = now_ms();
    assert!(allowed(&d), "{d}");
    let r = result(&d, "daily", None);
    assert_eq!(r["rate"], "50/day", "{r}");
    assert_eq!(r["limit_value"], 50, "{r}");
    assert_eq!(u(r, "remaining"), 49, "{r}");
    let reset = u(r, "reset_after_ms");
    assert!(reset <= DAY, "{r}");
    let expected = DAY - now % DAY;
    let off = (now + reset) % DAY; // 0 when the reset lands on 00:00 UTC
    assert!(
        off <= 2_000 || off >= DAY - 2_000,
        "reset_after_ms {reset} should be the time until next 00:00 UTC (~{expected} ms)"
    );
}

// ---------------------------------------------------------------------------
// 7. malformed requests

#[test]
fn malformed_requests_get_400_with_code_and_message() {
    let s = Server::standard();
    let long_key = "a".repeat(513);
    // (what, body, accepted error codes, words the message should mention)
    type Case = (
        &'static str,
        Vec<u8>,
        &'static [&'static str],
        &'static [&'static str],
    );
    let cases: Vec<Case> = vec![
        (
            "truncated JSON",
            br#"{"checks": ["#.to_vec(),
            &["invalid_json"],
            &[],
        ),
        ("not JSON", b"checks=five".to_vec(), &["invalid_json"], &[]),
        (
            "missing checks",
            b"{}".to_vec(),
            &["invalid_request"],
            &["checks"],
        ),
        (
            "empty checks",
            br#"{"checks": []}"#.to_vec(),
            &["invalid_request"],
            &["checks"],
        ),
        (
            "unknown top-level field",
            br#"{"checks":[{"limit":"five","key":"a"}],"bogus_field":1}"#.to_vec(),
            &["invalid_request"],
            &["bogus_field"],
        ),
        (
            "unknown check field",
            br#"{"checks":[{"limit":"five","key":"a","extra_field":true}]}"#.to_vec(),
            &["invalid_request"],
            &["extra_field"],
        ),
        (
            "checks not an array",
            br#"{"checks":"five"}"#.to_vec(),
            &["invalid_request"],
            &["checks", "five"],
        ),
        (
            "dry_run not a bool",
            br#"{"checks":[{"limit":"five","key":"a"}],"dry_run":"yes"}"#.to_vec(),
            &["invalid_request"],
            &["dry_run", "yes"],
        ),
        (
            "limit not a string",
            br#"{"checks":[{"limit":5,"key":"a"}]}"#.to_vec(),
            &["invalid_request"],
            &["limit", "integer"],
        ),
        (
            "missing limit",
            br#"{"checks":[{"key":"a"}]}"#.to_vec(),
            &["invalid_request"],
            &["limit"],
        ),
        (
            "check not an object",
            br#"{"checks":["five"]}"#.to_vec(),
            &["invalid_request"],
            &[],
        ),
        (
            "unknown limit",
            br#"{"checks":[{"limit":"no_such_limit","key":"a"}]}"#.to_vec(),
            &["unknown_limit"],
            &["checks[0].limit", "no_such_limit"],
        ),
        (
            "negative cost",
            br#"{"checks":[{"limit":"five","key":"a","cost":-1}]}"#.to_vec(),
            &["invalid_cost"],
            &["checks[0].cost"],
        ),
        (
            "fractional cost",
            br#"{"checks":[{"limit":"five","key":"a","cost":1.5}]}"#.to_vec(),
            &["invalid_cost"],
            &["cost"],
        ),
        (
            "string cost",
            br#"{"checks":[{"limit":"five","key":"a","cost":"1"}]}"#.to_vec(),
            &["invalid_cost"],
            &["cost"],
        ),
        (
            "negative top-level cost",
            br#"{"checks":[{"limit":"five","key":"a"}],"cost":-2}"#.to_vec(),
            &["invalid_cost"],
            &["cost"],
        ),
        (
            "fractional top-level cost",
            br#"{"checks":[{"limit":"five","key":"a"}],"cost":2.5}"#.to_vec(),
            &["invalid_cost"],
            &["cost"],
        ),
        (
            "empty key",
            br#"{"checks":[{"limit":"five","key":""}]}"#.to_vec(),
            &["invalid_key"],
            &["checks[0].key"],
        ),
        (
            "513-byte key",
            format!(r#"{{"checks":[{{"limit":"five","key":"{long_key}"}}]}}"#).into_bytes(),
            &["invalid_key"],
            &["key", "512"],
        ),
        (
            "513-byte multibyte key",
            format!(
                r#"{{"checks":[{{"limit":"five","key":"{}a"}}]}}"#,
                "é".repeat(256)
            )
            .into_bytes(),
            &["invalid_key"],
            &["key", "512"],
        ),
        (
            "numeric key",
            br#"{"checks":[{"limit":"five","key":5}]}"#.to_vec(),
            &["invalid_key"],
            &["key"],
        ),
        (
            "null key",
            br#"{"checks":[{"limit":"five","key":null}]}"#.to_vec(),
            &["invalid_key"],
            &["key"],
        ),
        ("array body", b"[]".to_vec(), &["invalid_request"], &[]),
        ("null body", b"null".to_vec(), &["invalid_request"], &[]),
        ("number body", b"42".to_vec(), &["invalid_request"], &[]),
        (
            "empty body",
            Vec::new(),
            &["invalid_json", "invalid_request"],
            &[],
        ),
        (
            "invalid UTF-8 in a key",
            b"{\"checks\":[{\"limit\":\"five\",\"key\":\"\xff\xfe\"}]}".to_vec(),
            &["invalid_json", "invalid_key", "invalid_request"],
            &[],
        ),
        (
            "invalid UTF-8 garbage",
            vec![0xc3, 0x28, 0xff, 0x00, 0x80],
            &["invalid_json"],
            &[],
        ),
        (
            "deeply nested arrays",
            format!("{}{}", "[".repeat(30_000), "]".repeat(30_000)).into_bytes(),
            &["invalid_json", "invalid_request"],
            &[],
        ),
        (
            "deeply nested cost",
            format!(
                r#"{{"checks":[{{"limit":"five","key":"a","cost":{}1{}}}]}}"#,
                "{\"a\":".repeat(10_000),
                "}".repeat(10_000)
            )
            .into_bytes(),
            &["invalid_json", "invalid_request", "invalid_cost"],
            &[],
        ),
    ];
    for (what, body, codes, mentions) in &cases {
        let r = check_raw(&s, body);
        assert_error(what, &r, 400, codes, mentions);
    }
    // A cost beyond u64 is refused, not clamped to u64::MAX; so is a float too large
    // to be exact, with a message that says so rather than "not a whole number".
    for (what, cost) in [
        ("cost beyond u64", "18446744073709551616"),
        ("cost of 1e308", "1e308"),
        ("cost of 2^60 as a float", "1152921504606846976.0"),
    ] {
        let r = check_raw(
            &s,
            format!(r#"{{"checks":[{{"limit":"five","key":"a","cost":{cost}}}]}}"#).as_bytes(),
        );
        assert_error(what, &r, 400, &["invalid_cost"], &["too large"]);
    }
    assert!(
        s.get("/healthz").status == 200,
        "server survived malformed input"
    );

    // The limit was never charged by any of them.
    let d = s.hit("five", "a", Some(0));
    assert_eq!(u(result(&d, "five", None), "remaining"), 5, "{d}");
}

#[test]
fn key_length_is_512_bytes_and_keys_are_opaque_utf8() {
    let s = Server::standard();
    for key in [
        "a".repeat(512),
        "é".repeat(256), // 512 bytes, 256 chars
        "k\u{0}ey with \"quotes\", \\ and 🦀 and {braces}".to_string(),
        " ".to_string(),
    ] {
        let d = s.hit("five", &key, None);
        assert!(allowed(&d), "key of {} bytes is valid: {d}", key.len());
        let r = result(&d, "five", None);
        assert_eq!(r["key"], key.as_str(), "key echoed back unchanged");
        assert_eq!(u(r, "remaining"), 4, "each key is its own counter: {d}");
    }
}

#[test]
fn content_type_must_be_json() {
    let s = Server::standard();
    let body = br#"{"checks":[{"limit":"five","key":"ct"}]}"#;
    for ct in [
        None,
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
    ] {
        let r = s.post_raw("/v1/check", body, ct);
        assert_error(
            &format!("Content-Type {ct:?}"),
            &r,
            400,
            &["unsupported_media_type"],
            &["content-type", "application/json"],
        );
    }
    // With charset it is still JSON.
    let r = s.post_raw("/v1/check", body, Some("application/json; charset=utf-8"));
    assert_eq!(
        r.status, 200,
        "application/json with charset is fine: {}",
        r.body
    );
    let d = r.json();
    // None of the rejected requests charged anything.
    assert_eq!(u(result(&d, "five", None), "remaining"), 4, "{d}");
}

#[test]
fn body_size_limit_is_64_kib() {
    let s = Server::standard();
    let base = br#"{"checks":[{"limit":"five","key":"size"}]}"#.to_vec();
    let padded = |total: usize| {
        let mut b = base.clone();
        b.resize(total, b' ');
        b
    };
    let ct = Some("application/json");
    let r = check_raw(&s, &padded(64 * 1024));
    assert_eq!(
        r.status, 200,
        "a 64 KiB body is within the limit: {}",
        r.body
    );
    // Fresh client connections: see the keep-alive test below for reuse.
    let r = s.post_raw_fresh("/v1/check", &padded(64 * 1024 + 1), ct);
    assert_error(
        "64 KiB + 1 body",
        &r,
        400,
        &["body_too_large"],
        &["65536", "64"],
    );

    // 1 MiB over a raw socket, declared up front; the server may answer before
    // reading it all, but the answer must still be a 400. (Write errors are
    // ignored here; see the next test for a client that does not ignore them.)
    let big = padded(1024 * 1024);
    let mut req = format!(
        "POST /v1/check HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        big.len()
    )
    .into_bytes();
    req.extend_from_slice(&big);
    let (code, text) = raw_http(s.port, &req).expect("raw request");
    assert_eq!(code, 400, "raw 1 MiB body: {text}");
    assert!(text.contains("body_too_large"), "{text}");
    assert_eq!(s.get("/healthz").status, 200);
}

/// A body that is cut short or badly framed is called that, not "too large".
#[test]
fn a_broken_or_truncated_body_is_an_invalid_body_not_a_large_one() {
    use std::io::{Read, Write};
    let s = Server::standard();
    let head = "POST /v1/check HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n";
    // A chunk size that is not hexadecimal, and a chunk longer than its size.
    for body in [
        "Transfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
        "Transfer-Encoding: chunked\r\n\r\n2\r\n{\"checks\":[]}\r\n0\r\n\r\n",
    ] {
        let (code, text) = raw_http(s.port, format!("{head}{body}").as_bytes()).expect("answered");
        assert_eq!(code, 400, "{body:?}: {text}");
        assert!(text.contains("\"invalid_body\""), "{body:?}: {text}");
        assert!(!text.contains("body_too_large"), "{body:?}: {text}");
    }
    // Fewer bytes than Content-Length says, then the client stops sending.
    let mut sock = std::net::TcpStream::connect(("127.0.0.1", s.port)).expect("connect");
    sock.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    sock.write_all(format!("{head}Content-Length: 100\r\n\r\n{{\"checks\"").as_bytes())
        .expect("write");
    sock.shutdown(std::net::Shutdown::Write)
        .expect("half-close");
    let mut answer = String::new();
    let _ = sock.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("\"invalid_body\""), "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("connection: close"),
        "{answer}"
    );
    assert_eq!(s.get("/healthz").status, 200);
}

/// A client that waits for `100 Continue` before sending a body over the cap is
/// refused at once: it is never invited to upload what will be refused.
#[test]
fn an_oversized_body_behind_expect_100_continue_is_refused_before_upload() {
    use std::io::{Read, Write};
    let s = Server::standard();
    let mut sock = std::net::TcpStream::connect(("127.0.0.1", s.port)).expect("connect");
    sock.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    sock.write_all(
        b"POST /v1/check HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
          Content-Length: 70000\r\nExpect: 100-continue\r\n\r\n",
    )
    .expect("write");
    let started = std::time::Instant::now();
    let mut answer = String::new();
    let _ = sock.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(
        !answer.contains("100 Continue"),
        "invited to upload: {answer}"
    );
    assert!(answer.contains("\"body_too_large\""), "{answer}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "answered only after {:?}: it waited for a body the client will not send",
        started.elapsed()
    );
}

/// A plain HTTP client (ureq) writes the whole 1 MiB body before it reads the
/// answer; it must get the 400 body_too_large, not a broken pipe.
#[test]
fn one_mib_body_gets_400_not_a_broken_pipe() {
    let s = Server::standard();
    let mut big = br#"{"checks":[{"limit":"five","key":"big"}]}"#.to_vec();
    big.resize(1024 * 1024, b' ');
    for _ in 0..3 {
        let r = s.post_raw_fresh("/v1/check", &big, Some("application/json"));
        assert_error("1 MiB body", &r, 400, &["body_too_large"], &[]);
    }
}

/// After answering body_too_large without reading the body, a server that
/// closes the connection must say so (`Connection: close`); otherwise a
/// keep-alive client reuses a dead connection and its next request fails
/// (ureq: "Broken pipe").
#[test]
fn body_too_large_response_is_honest_about_keep_alive() {
    use std::io::{Read, Write};
    let s = Server::standard();
    let mut big = br#"{"checks":[{"limit":"five","key":"ka"}]}"#.to_vec();
    big.resize(64 * 1024 + 1, b' ');
    let mut req = format!(
        "POST /v1/check HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n",
        big.len()
    )
    .into_bytes();
    req.extend_from_slice(&big);
    let mut sock = std::net::TcpStream::connect(("127.0.0.1", s.port)).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    sock.write_all(&req).unwrap();
    let mut buf = vec![0u8; 4096];
    let mut got = Vec::new();
    while !String::from_utf8_lossy(&got).contains("body_too_large") {
        let n = sock.read(&mut buf).expect("read first response");
        assert!(
            n > 0,
            "connection closed before a response: {:?}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
    }
    let first = String::from_utf8_lossy(&got).to_lowercase();
    assert!(first.starts_with("http/1.1 400"), "{first}");
    if first.contains("connection: close") {
        return; // honest: the client will not reuse it
    }
    // Keep-alive was implied, so the connection must still work.
    let small = br#"{"checks":[{"limit":"five","key":"ka"}]}"#;
    let req2 = format!(
        "POST /v1/check HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{}",
        small.len(),
        std::str::from_utf8(small).unwrap()
    );
    let write = sock.write_all(req2.as_bytes());
    let mut second = Vec::new();
    let read = sock.read_to_end(&mut second);
    let second = String::from_utf8_lossy(&second);
    assert!(
        write.is_ok() && read.is_ok() && second.starts_with("HTTP/1.1 200"),
        "the 400 body_too_large response did not say `Connection: close`, yet the server \
         closed the connection: a keep-alive client's next request fails \
         (write {write:?}, read {read:?}, second response {second:?}); first response:\n{first}"
    );
}

#[test]
fn unknown_paths_are_404_json_and_wrong_methods_are_client_errors() {
    let s = Server::standard();
    for path in ["/nope", "/v1/nope", "/v1/check/extra"] {
        let r = s.get(path);
        assert_eq!(r.status, 404, "GET {path}: {}", r.body);
        let v = r.json();
        assert!(v["error"].is_string(), "404 body has an error code: {v}");
    }
    let r = s.post_raw("/v2/check", b"{}", Some("application/json"));
    assert_eq!(r.status, 404, "{}", r.body);
    assert!(r.json()["error"].is_string());
    let r = s.get("/v1/check");
    assert!(
        (400..500).contains(&r.status),
        "GET /v1/check is a client error, got {} {}",
        r.status,
        r.body
    );
}

// ---------------------------------------------------------------------------
// 8. admin reset

#[test]
fn reset_needs_the_admin_token_and_restores_the_counter() {
    let s = Server::standard();
    for _ in 0..5 {
        assert!(allowed(&s.hit("five", "victim", None)));
    }
    assert!(!allowed(&s.hit("five", "victim", None)));
    let body = json!({"limit": "five", "key": "victim"});

    let r = s.reset(None, &body);
    assert_eq!(r.status, 401, "reset without a token: {}", r.body);
    assert!(
        r.json()["error"].is_string(),
        "401 body is a JSON error: {}",
        r.body
    );
    let r = s.reset(Some("wrong-token"), &body);
    assert_eq!(r.status, 401, "reset with a wrong token: {}", r.body);
    assert!(r.json()["error"].is_string(), "{}", r.body);
    let r = s.reset(Some("secret-token-for-tests-but-longer"), &body);
    assert_eq!(
        r.status, 401,
        "reset with a token that only starts right: {}",
        r.body
    );
    assert!(
        !allowed(&s.hit("five", "victim", None)),
        "failed resets must not reset anything"
    );

    let r = s.reset(Some(ADMIN_TOKEN), &body);
    assert_eq!(r.status, 200, "reset with the admin token: {}", r.body);
    let d = s.hit("five", "victim", None);
    assert!(allowed(&d), "after reset the key is fresh: {d}");
    assert_eq!(u(result(&d, "five", None), "remaining"), 4, "{d}");

    // Both windows of a two-rate limit are cleared.
    for _ in 0..5 {
        s.hit("chat_user", "user:r", None);
    }
    let r = s.reset(
        Some(ADMIN_TOKEN),
        &json!({"limit": "chat_user", "key": "user:r"}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let d = s.hit("chat_user", "user:r", Some(0));
    assert_eq!(
        u(result(&d, "chat_user", Some("5/minute")), "remaining"),
        5,
        "{d}"
    );
    assert_eq!(
        u(result(&d, "chat_user", Some("60/hour")), "remaining"),
        60,
        "{d}"
    );

    let r = s.reset(Some(ADMIN_TOKEN), &json!({"limit": "five"}));
    assert_error(
        "reset without key",
        &r,
        400,
        &["invalid_request", "invalid_key"],
        &["key"],
    );
    let msg = r.json()["message"].as_str().unwrap_or("").to_string();
    assert!(
        !msg.contains("checks"),
        "a /v1/reset error should not describe the /v1/check body: {msg:?}"
    );
    let r = s.reset(
        Some(ADMIN_TOKEN),
        &json!({"limit": "no_such_limit", "key": "x"}),
    );
    assert_error(
        "reset of unknown limit",
        &r,
        400,
        &["unknown_limit"],
        &["no_such_limit"],
    );
}

// ---------------------------------------------------------------------------
// 9. /v1/limits

#[test]
fn limits_endpoint_lists_configured_limits() {
    let s = Server::standard();
    let r = s.get("/v1/limits");
    assert_eq!(r.status, 200, "{}", r.body);
    let _: Value = r.json(); // it is JSON
    for needle in [
        "chat_user",
        "chat_ip",
        "daily",
        "widget_ip",
        "global",
        "burst_demo",
        "5/minute",
        "60/hour",
        "30/minute",
        "50/day",
        "3/minute",
        "2/hour",
        "10/second",
        "sliding_window",
        "fixed_window",
        "gcra",
    ] {
        assert!(
            r.body.contains(&format!("\"{needle}\"")),
            "/v1/limits should mention {needle:?}: {}",
            r.body
        );
    }
}

// ---------------------------------------------------------------------------
// 10. /metrics

#[test]
fn metrics_count_decisions_by_limit_and_outcome() {
    let s = Server::standard();
    for _ in 0..6 {
        s.hit("chat_user", "user:m", None);
    }
    s.hit("five", "m", Some(9)); // never fits: denied
    let m = s.metrics();
    let get = |limit: &str, outcome: &str| {
        metric_value(
            &m,
            "sluice_decisions_total",
            &[("limit", limit), ("outcome", outcome)],
        )
    };
    assert_eq!(
        get("chat_user", "allowed"),
        Some(5.0),
        "sluice_decisions_total{{limit=\"chat_user\",outcome=\"allowed\"}}; decision samples: {:?}",
        m.iter()
            .filter(|x| x.name.starts_with("sluice_decisions"))
            .collect::<Vec<_>>()
    );
    assert_eq!(
        get("chat_user", "denied"),
        Some(1.0),
        "one denial of chat_user"
    );
    assert_eq!(get("five", "denied"), Some(1.0), "one denial of five");
    assert_eq!(get("five", "allowed").unwrap_or(0.0), 0.0);
    let keys = metric_value(&m, "sluice_store_keys", &[]);
    assert!(
        keys.is_some_and(|k| k >= 1.0),
        "sluice_store_keys should count the keys in use, got {keys:?}"
    );
    assert!(
        metric_value(&m, "sluice_store_evictions_total", &[]).is_some(),
        "sluice_store_evictions_total should be exposed"
    );
}

// ---------------------------------------------------------------------------
// 11. check-config

#[test]
fn check_config_reports_file_line_and_field() {
    let dir = scratch_dir("check-config");
    let bad = write_file(
        &dir,
        "bad.yaml",
        "listen: 127.0.0.1:9\n\
         admin: {token: x0123456789abcdef}\n\
         storage: {backend: memory}\n\
         limits:\n\
         \x20 fine: {rate: 5/minute}\n\
         \x20 broken: {rate: 5/minit}\n",
    );
    let bad_s = bad.to_str().unwrap();
    let (status, out, err) = run_cli(&["check-config", bad_s]);
    assert!(
        !status.success(),
        "bad rate must fail check-config; stdout {out:?} stderr {err:?}"
    );
    assert!(
        err.contains(bad_s),
        "stderr names the file {bad_s}: {err:?}"
    );
    assert!(
        err.contains(&format!("{bad_s}:6:")),
        "stderr has file:line with line 6: {err:?}"
    );
    assert!(
        err.contains("limits.broken.rate"),
        "stderr names the field: {err:?}"
    );

    let bad2 = write_file(
        &dir,
        "bad2.yaml",
        "listen: 127.0.0.1:9\n\
         admin: {token: x0123456789abcdef}\n\
         limits:\n\
         \x20 a: {rate: 5/minute}\n\
         \x20 b: {rate: 5/minute}\n\
         \x20 c:\n\
         \x20   rate: 5/minute\n\
         \x20   algorithm: leaky_bucket_typo\n",
    );
    let bad2_s = bad2.to_str().unwrap();
    let (status, _, err) = run_cli(&["check-config", bad2_s]);
    assert!(!status.success(), "unknown algorithm must fail: {err:?}");
    assert!(
        err.contains(&format!("{bad2_s}:8:")),
        "file:line 8: {err:?}"
    );
    assert!(err.contains("limits.c.algorithm"), "field path: {err:?}");

    let good = write_file(
        &dir,
        "good.yaml",
        &format!("listen: 127.0.0.1:9\n{STANDARD}"),
    );
    let (status, out, err) = run_cli(&["check-config", good.to_str().unwrap()]);
    assert!(
        status.success(),
        "a valid file passes: stdout {out:?} stderr {err:?}"
    );
    assert!(
        format!("{out}{err}").to_lowercase().contains("ok"),
        "check-config says ok: stdout {out:?} stderr {err:?}"
    );

    let missing = dir.join("does-not-exist.yaml");
    let missing_s = missing.to_str().unwrap();
    let (status, _, err) = run_cli(&["check-config", missing_s]);
    assert!(!status.success(), "a missing file fails");
    assert!(
        err.contains("does-not-exist.yaml"),
        "names the missing file: {err:?}"
    );
}

// ---------------------------------------------------------------------------
// 12. concurrency

#[test]
fn concurrent_requests_never_over_admit() {
    let s = Server::standard();
    const HOUR: u64 = 3_600_000;
    let url = s.url("/v1/check");
    for attempt in 0..2 {
        let key = format!("shared-{attempt}");
        let before = now_ms() / HOUR;
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let url = url.clone();
                let key = key.clone();
                std::thread::spawn(move || {
                    let agent = agent();
                    let body = json!({"checks": [{"limit": "conc", "key": key}]}).to_string();
                    let mut ok = 0u32;
                    for _ in 0..50 {
                        let mut r = agent
                            .post(&url)
                            .header("content-type", "application/json")
                            .send(body.as_bytes())
                            .expect("request");
                        assert_eq!(r.status().as_u16(), 200);
                        let v: Value =
                            serde_json::from_str(&r.body_mut().read_to_string().unwrap()).unwrap();
                        if v["allowed"] == true {
                            ok += 1;
                        }
                    }
                    ok
                })
            })
            .collect();
        let total: u32 = handles.into_iter().map(|h| h.join().unwrap()).sum();
        if now_ms() / HOUR != before {
            continue; // crossed an hour boundary: two windows; try again
        }
        assert_eq!(
            total, 100,
            "8x50 requests on a 100/hour fixed window admit exactly 100"
        );
        return;
    }
    panic!("crossed an hour boundary twice?");
}

// ---------------------------------------------------------------------------
// 13. serve refuses a bad config

#[test]
fn serve_with_bad_config_exits_with_file_line_message() {
    let dir = scratch_dir("bad-serve");
    let port = free_port();
    let path = write_file(
        &dir,
        "bad.yaml",
        &format!(
            "listen: 127.0.0.1:{port}\n\
             admin: {{token: x0123456789abcdef}}\n\
             limits:\n\
             \x20 ok_limit: {{rate: 5/minute}}\n\
             \x20 bad_limit: {{rate: -5/minute}}\n"
        ),
    );
    let p = path.to_str().unwrap();
    let (status, _, err) = run_cli_timeout(&["serve", "--config", p], Duration::from_secs(10))
        .unwrap_or_else(|| panic!("sluice serve with an invalid config kept running"));
    assert!(
        !status.success(),
        "serve must fail on a bad config: {err:?}"
    );
    assert!(
        err.contains(&format!("{p}:5:")),
        "stderr has file:line 5: {err:?}"
    );
    assert!(
        err.contains("limits.bad_limit.rate"),
        "stderr names the field: {err:?}"
    );
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "nothing listens on the configured port"
    );
}

// ---------------------------------------------------------------------------
// extra: burst, health endpoints, sliding window

#[test]
fn gcra_burst_admits_burst_then_one_per_interval() {
    let s = Server::standard();
    let d = s.hit("burst_demo", "b", Some(20));
    assert!(allowed(&d), "burst 20 admits a cost of 20 at once: {d}");
    let r = result(&d, "burst_demo", None);
    assert_eq!(u(r, "remaining"), 0, "{r}");
    assert_eq!(r["rate"], "10/second", "{r}");
    let d = s.hit("burst_demo", "b", None);
    if !allowed(&d) {
        let retry = u(&d, "retry_after_ms");
        assert!(
            (1..=100).contains(&retry),
            "10/second frees a cell every 100 ms, retry was {retry}: {d}"
        );
    }
    let d = s.hit("burst_demo", "b2", Some(21));
    assert!(!allowed(&d), "21 > burst 20 never fits: {d}");
    assert!(d["retry_after_ms"].is_null(), "{d}");
}

#[test]
fn sliding_window_admits_its_quota() {
    let s = Server::standard();
    let mut allowed_n = 0;
    for _ in 0..35 {
        if allowed(&s.hit("chat_ip", "198.51.100.9", None)) {
            allowed_n += 1;
        }
    }
    assert_eq!(
        allowed_n, 30,
        "30/minute sliding window admits 30 in a burst"
    );
    let d = s.hit("chat_ip", "198.51.100.9", None);
    assert!(!allowed(&d), "{d}");
    // Hits at the very start of a window keep it full until period/quota into
    // the next one: the longest wait is 60 s + 2 s.
    let retry = u(&d, "retry_after_ms");
    assert!(retry > 0 && retry <= 62_000, "{d}");
}

#[test]
fn health_and_readiness() {
    let s = Server::standard();
    assert_eq!(s.get("/healthz").status, 200);
    let r = s.get("/readyz");
    assert_eq!(
        r.status, 200,
        "memory store is always reachable: {}",
        r.body
    );
}
