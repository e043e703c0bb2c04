//! Black-box tests of the reservation API (`/v1/reserve`, `/v1/settle`, `/v1/release`;
//! docs/design/front-doors.md, "Reservations"): what a client of the real binary sees.

mod common;

use common::*;
use serde_json::{Value, json};

const LIMITS: &str = r#"
limits:
  tokens_hour:
    rate: 1000/hour
  calls_in_flight:
    concurrency: 2
  requests_hour:
    rate: 100/hour
"#;

fn reserve(s: &Server, body: Value) -> Value {
    let r = s.post_json("/v1/reserve", &body);
    assert_eq!(r.status, 200, "reserve {body}: {} {}", r.status, r.body);
    r.json()
}

fn remaining(s: &Server, limit: &str, key: &str) -> u64 {
    u(&results(&s.hit(limit, key, Some(0)))[0], "remaining")
}

fn error_code(r: &Resp) -> String {
    let v: Value = serde_json::from_str(&r.body).unwrap_or_else(|e| panic!("{e}: {}", r.body));
    assert!(
        v["message"].as_str().is_some_and(|m| !m.is_empty()),
        "a message: {v}"
    );
    v["error"].as_str().unwrap_or_default().to_string()
}

#[test]
fn an_estimate_is_charged_then_settled_to_what_the_call_cost() {
    let s = Server::start(LIMITS);
    let r = reserve(
        &s,
        json!({"checks": [{"limit": "tokens_hour", "key": "u1"}], "cost": 600, "ttl_ms": 30000}),
    );
    assert!(allowed(&r));
    let token = r["reservation"].as_str().expect("a reservation token");
    assert!(u(&r, "expires_at_ms") > now_ms() + 25_000);
    assert_eq!(
        u(&results(&r)[0], "remaining"),
        400,
        "the estimate is charged"
    );

    let settled = s.post_json("/v1/settle", &json!({"reservation": token, "cost": 250}));
    assert_eq!(settled.status, 200, "{}", settled.body);
    assert_eq!(settled.json()["already_settled"], false);
    assert_eq!(
        remaining(&s, "tokens_hour", "u1"),
        750,
        "only the actual stays"
    );

    assert_eq!(settled.json()["costs"], json!([250]));

    // Settled again at another cost: nothing moves, and the answer does not show a
    // cost that was never applied.
    let again = s.post_json("/v1/settle", &json!({"reservation": token, "cost": 9}));
    assert_eq!(again.status, 200);
    assert_eq!(again.json()["already_settled"], true, "idempotent");
    assert_eq!(again.json().get("costs"), None, "{}", again.body);
    assert_eq!(remaining(&s, "tokens_hour", "u1"), 750);
}

#[test]
fn a_call_that_cost_more_puts_the_key_in_debt_with_an_honest_retry_after() {
    let s = Server::start(LIMITS);
    let r = reserve(
        &s,
        json!({"checks": [{"limit": "tokens_hour", "key": "u2"}], "cost": 500}),
    );
    let token = r["reservation"].as_str().expect("token");
    let settled = s.post_json("/v1/settle", &json!({"reservation": token, "cost": 1900}));
    assert_eq!(settled.status, 200, "{}", settled.body);
    let next = s.hit("tokens_hour", "u2", Some(1));
    assert!(!allowed(&next), "900 over the limit: the next call waits");
    // gcra 1000/hour: one token per 3.6 s; 1900 spent of a 1000 bucket, one more fits
    // after 901 tokens have drained: 3243.6 s.
    let retry = u(&next, "retry_after_ms");
    assert!(
        (3_243_000..=3_243_700).contains(&retry),
        "retry_after_ms {retry} covers the debt"
    );
}

#[test]
fn release_gives_the_estimate_back_and_per_check_costs_settle_each_check() {
    let s = Server::start(LIMITS);
    let r = reserve(
        &s,
        json!({"checks": [{"limit": "tokens_hour", "key": "u3"}], "cost": 800}),
    );
    let token = r["reservation"].as_str().expect("token");
    let released = s.post_json("/v1/release", &json!({"reservation": token}));
    assert_eq!(released.status, 200, "{}", released.body);
    assert_eq!(remaining(&s, "tokens_hour", "u3"), 1000);

    let r = reserve(
        &s,
        json!({"checks": [
            {"limit": "requests_hour", "key": "u3", "cost": 1},
            {"limit": "tokens_hour", "key": "u3", "cost": 300}
        ]}),
    );
    let token = r["reservation"].as_str().expect("token");
    let settled = s.post_json(
        "/v1/settle",
        &json!({"reservation": token, "costs": [1, 120]}),
    );
    assert_eq!(settled.status, 200, "{}", settled.body);
    assert_eq!(remaining(&s, "requests_hour", "u3"), 99);
    assert_eq!(remaining(&s, "tokens_hour", "u3"), 880);
}

#[test]
fn calls_in_flight_are_capped_and_come_back_when_settled() {
    let s = Server::start(LIMITS);
    let body = json!({"checks": [{"limit": "calls_in_flight", "key": "u4"}]});
    let a = reserve(&s, body.clone());
    let b = reserve(&s, body.clone());
    assert!(allowed(&a) && allowed(&b));
    let reset = u(&results(&a)[0], "reset_after_ms");
    assert!(
        (59_000..=60_000).contains(&reset),
        "a held slot comes back at the latest when its reservation expires: {reset} ms"
    );
    let c = reserve(&s, body.clone());
    assert!(!allowed(&c), "a third call in flight is denied");
    assert!(
        c.get("reservation").is_none(),
        "a denied reservation holds nothing"
    );
    let token = a["reservation"].as_str().expect("token");
    let r = s.post_json("/v1/settle", &json!({"reservation": token, "cost": 1}));
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(allowed(&reserve(&s, body)), "a slot came back");

    // A concurrency limit cannot be checked without a reservation.
    let r = s.post_json(
        "/v1/check",
        &json!({"checks": [{"limit": "calls_in_flight", "key": "u4"}]}),
    );
    assert_eq!(r.status, 400);
    assert_eq!(error_code(&r), "concurrency_needs_reserve");
}

#[test]
fn bad_settlements_get_clear_errors_and_move_nothing() {
    let s = Server::start(LIMITS);
    let r = reserve(
        &s,
        json!({"checks": [{"limit": "tokens_hour", "key": "u5"}], "cost": 100}),
    );
    let token = r["reservation"].as_str().expect("token").to_string();

    // A token whose content was changed (to settle a bigger estimate) is refused.
    use base64::Engine;
    let engine = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let payload = engine
        .decode(token.trim_start_matches("rsv1."))
        .expect("base64");
    let forged = String::from_utf8(payload)
        .expect("json")
        .replace("\"e\":100", "\"e\":1000");
    let forged = format!("rsv1.{}", engine.encode(forged));
    let r = s.post_json("/v1/settle", &json!({"reservation": forged, "cost": 0}));
    assert_eq!(r.status, 404, "{}", r.body);
    assert_eq!(error_code(&r), "unknown_reservation");

    let cases = [
        (
            json!({"reservation": "nonsense", "cost": 1}),
            400,
            "invalid_reservation",
        ),
        (
            json!({"reservation": 5, "cost": 1}),
            400,
            "invalid_reservation",
        ),
        (json!({"reservation": token}), 400, "invalid_request"),
        (
            json!({"reservation": token, "cost": 1, "costs": [1]}),
            400,
            "invalid_request",
        ),
        (
            json!({"reservation": token, "costs": [1, 2]}),
            400,
            "invalid_request",
        ),
        (
            json!({"reservation": token, "cost": -3}),
            400,
            "invalid_cost",
        ),
        (
            json!({"reservation": token, "cost": 1, "extra": 1}),
            400,
            "invalid_request",
        ),
    ];
    for (body, status, code) in cases {
        let r = s.post_json("/v1/settle", &body);
        assert_eq!(r.status, status, "{body}: {}", r.body);
        assert_eq!(error_code(&r), code, "{body}");
    }
    for ttl in [
        json!(0),
        json!(-1),
        json!(1.5),
        json!("10"),
        json!(86_400_001),
    ] {
        let r = s.post_json(
            "/v1/reserve",
            &json!({"checks": [{"limit": "tokens_hour", "key": "u5"}], "ttl_ms": ttl}),
        );
        assert_eq!(r.status, 400, "ttl {ttl}: {}", r.body);
        assert_eq!(error_code(&r), "invalid_ttl");
    }
    assert_eq!(remaining(&s, "tokens_hour", "u5"), 900, "nothing moved");
}

#[test]
fn an_expired_reservation_counts_at_its_estimate_and_says_so() {
    let s = Server::start(LIMITS);
    let r = reserve(
        &s,
        json!({"checks": [{"limit": "tokens_hour", "key": "u6"}, {"limit": "calls_in_flight", "key": "u6"}],
               "cost": 100, "ttl_ms": 200}),
    );
    let token = r["reservation"].as_str().expect("token");
    std::thread::sleep(std::time::Duration::from_millis(400));
    let r2 = s.post_json("/v1/settle", &json!({"reservation": token, "cost": 0}));
    assert_eq!(r2.status, 404);
    assert_eq!(error_code(&r2), "unknown_reservation");
    assert!(r2.body.contains("expired"), "{}", r2.body);
    assert_eq!(remaining(&s, "tokens_hour", "u6"), 900);
    let one = json!({"checks": [{"limit": "calls_in_flight", "key": "u6"}]});
    assert!(allowed(&reserve(&s, one.clone())));
    assert!(
        allowed(&reserve(&s, one)),
        "the expired reservation's slot came back"
    );
}
