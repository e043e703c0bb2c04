//! What a client sees: status, Retry-After, rate-limit headers, body.

use std::sync::Arc;

use http::StatusCode;
use sluice_engine::{Check, Decision, DecisionRequest, Limit, LimitSpec, WindowOutcome};
use sluice_http::{BodyTemplate, HeaderStyles, ResponseConfig};

fn limit(name: &str, rates: &[&str], shadow: bool) -> Arc<Limit> {
    let mut spec = LimitSpec::new(rates.iter().map(|r| r.parse().unwrap()).collect());
    spec.shadow = shadow;
    Arc::new(Limit::new(name, spec).unwrap())
}

fn outcome(allowed: bool, remaining: u64, reset_ms: i64, retry_ms: Option<i64>) -> WindowOutcome {
    WindowOutcome {
        allowed,
        remaining,
        reset_after: reset_ms * 1000,
        retry_after: retry_ms.map(|r| r * 1000),
    }
}

fn decided(
    checks: &[(&Arc<Limit>, &str)],
    outcomes: &[WindowOutcome],
) -> (DecisionRequest, Decision) {
    let request = DecisionRequest {
        checks: checks
            .iter()
            .map(|(l, k)| Check::new(Arc::clone(l), *k, 1).unwrap())
            .collect(),
        dry_run: false,
    };
    let decision = Decision::from_outcomes(&request, outcomes, false);
    (request, decision)
}

fn header<'a>(headers: &'a http::HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).map(|v| v.to_str().unwrap())
}

#[test]
fn a_denial_has_status_retry_after_headers_and_the_default_body() {
    let (user, ip) = (
        limit("chat_user", &["5/minute", "60/hour"], false),
        limit("chat_ip", &["30/minute"], false),
    );
    let (request, decision) = decided(
        &[(&user, "user:42"), (&ip, "203.0.113.7")],
        &[
            outcome(false, 0, 59_900, Some(11_200)),
            outcome(true, 55, 300_000, Some(0)),
            outcome(true, 29, 2_000, Some(0)),
        ],
    );
    let denial = ResponseConfig::default().denial(&request, &decision);
    assert_eq!(denial.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        header(&denial.headers, "retry-after"),
        Some("12"),
        "11.2 s rounds up"
    );
    assert_eq!(
        header(&denial.headers, "ratelimit-policy"),
        Some(r#""chat_user-60s";q=5;w=60, "chat_user-3600s";q=60;w=3600, "chat_ip";q=30;w=60"#)
    );
    assert_eq!(
        header(&denial.headers, "ratelimit"),
        Some(r#""chat_user-60s";r=0;t=60, "chat_user-3600s";r=55;t=300, "chat_ip";r=29;t=2"#)
    );
    assert_eq!(header(&denial.headers, "x-ratelimit-remaining"), Some("0"));
    assert_eq!(header(&denial.headers, "x-ratelimit-limit"), Some("5"));
    assert_eq!(
        header(&denial.headers, "content-type"),
        Some("application/json")
    );
    let body: serde_json::Value = serde_json::from_slice(&denial.body).unwrap();
    assert_eq!(body["error"], "rate_limited");
    assert_eq!(body["limit"], "chat_user");
    assert_eq!(body["retry_after_seconds"], 12);
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("retry in 12 seconds")
    );
}

#[test]
fn retry_after_is_at_least_one_second_and_absent_when_never() {
    let l = limit("tiny", &["5/minute"], false);
    let (request, decision) = decided(&[(&l, "k")], &[outcome(false, 0, 1, Some(1))]);
    let denial = ResponseConfig::default().denial(&request, &decision);
    assert_eq!(
        header(&denial.headers, "retry-after"),
        Some("1"),
        "1 ms still says 1 second"
    );
    let (request, decision) = decided(&[(&l, "k")], &[outcome(false, 5, 0, None)]);
    let denial = ResponseConfig::default().denial(&request, &decision);
    assert_eq!(header(&denial.headers, "retry-after"), None);
    let body: serde_json::Value = serde_json::from_slice(&denial.body).unwrap();
    assert!(body["retry_after_seconds"].is_null());
}

#[test]
fn header_styles_and_a_custom_body() {
    let l = limit("search", &["50/day"], false);
    let (request, decision) = decided(
        &[(&l, "k")],
        &[outcome(false, 0, 3_600_000, Some(3_600_000))],
    );
    let config = ResponseConfig {
        deny_status: StatusCode::FORBIDDEN,
        block_status: StatusCode::FORBIDDEN,
        headers: HeaderStyles {
            ietf: false,
            legacy: true,
        },
        body: "{\"code\": {status}, \"wait_ms\": {retry_after_ms}, \"which\": \"{limit}\"}"
            .parse::<BodyTemplate>()
            .unwrap(),
        content_type: http::HeaderValue::from_static("application/problem+json"),
    };
    let denial = config.denial(&request, &decision);
    assert_eq!(denial.status, StatusCode::FORBIDDEN);
    assert!(denial.headers.get("ratelimit").is_none());
    assert_eq!(header(&denial.headers, "x-ratelimit-reset"), Some("3600"));
    assert_eq!(
        String::from_utf8(denial.body).unwrap(),
        r#"{"code": 403, "wait_ms": 3600000, "which": "search"}"#
    );
    assert!("{nope}".parse::<BodyTemplate>().is_err());
}

#[test]
fn shadow_windows_are_reported_but_do_not_deny() {
    let (enforced, shadow) = (
        limit("enforced", &["5/minute"], false),
        limit("rollout", &["1/hour"], true),
    );
    let (request, decision) = decided(
        &[(&enforced, "k"), (&shadow, "k")],
        &[
            outcome(true, 4, 12_000, Some(0)),
            outcome(false, 0, 3_600_000, Some(3_600_000)),
        ],
    );
    assert!(decision.allowed);
    let mut headers = http::HeaderMap::new();
    ResponseConfig::default().add_rate_limit_headers(&request, &decision, &mut headers);
    assert_eq!(
        header(&headers, "ratelimit"),
        Some(r#""enforced";r=4;t=12, "rollout";r=0;t=3600"#)
    );
    assert_eq!(
        header(&headers, "x-ratelimit-remaining"),
        Some("4"),
        "legacy headers describe enforced limits"
    );
}

/// A calendar-month window is named `-1mo` in a multi-window limit's policy, with the
/// nominal mean month as its window, and its reset counts down to the next month start.
#[test]
fn a_calendar_month_window_is_named_by_its_month() {
    let mut spec = LimitSpec::new(vec![
        "1000/month".parse().unwrap(),
        "100/day".parse().unwrap(),
    ]);
    spec.algorithm = sluice_engine::Algorithm::FixedWindow;
    let budget = Arc::new(Limit::new("budget", spec).unwrap());
    let (request, decision) = decided(
        &[(&budget, "key:1")],
        &[
            outcome(true, 10, 86_400_000, Some(0)),
            outcome(true, 90, 3_600_000, Some(0)),
        ],
    );
    let mut headers = http::HeaderMap::new();
    ResponseConfig::default().add_rate_limit_headers(&request, &decision, &mut headers);
    assert_eq!(
        header(&headers, "ratelimit-policy"),
        Some(r#""budget-1mo";q=1000;w=2629746, "budget-86400s";q=100;w=86400"#)
    );
    assert_eq!(
        header(&headers, "ratelimit"),
        Some(r#""budget-1mo";r=10;t=86400, "budget-86400s";r=90;t=3600"#)
    );
}
