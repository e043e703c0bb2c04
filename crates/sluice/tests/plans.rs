//! Plans: a limit's rates differ per plan (`plans:`), and a request's plan comes from a
//! verified token (`plan_from: "{jwt.plan}"`) or, on the decision API, from the caller;
//! and the tokens themselves: checked once, counted in `/metrics`. Black-box, against
//! the real binary.

mod common;

use common::*;
use jsonwebtoken::{EncodingKey, Header, encode};
use serde_json::{Value, json};

const SECRET: &str = "plans-test-secret-of-at-least-32-bytes";

const CONFIG: &str = r#"
jwt:
  algorithms: [HS256]
  secret: plans-test-secret-of-at-least-32-bytes
plan_from: "{jwt.plan}"
limits:
  api:
    rate: 2/minute
    plans:
      pro: {rate: 5/minute}
      enterprise: {rate: 1000/hour, algorithm: fixed_window}
routes:
  - match: {path: /api}
    limits:
      - {limit: api, key: ["user:{jwt.sub}", "ip:{client_ip}"]}
"#;

fn token(sub: &str, plan: Option<&str>, secret: &str) -> String {
    let exp = now_ms() / 1000 + 600;
    let mut claims = json!({"sub": sub, "exp": exp});
    if let Some(plan) = plan {
        claims["plan"] = plan.into();
    }
    encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("sign")
}

/// Forward-auth answers for `n` requests to /api with `token`: the statuses.
fn statuses(s: &Server, token: &str, n: usize) -> Vec<u16> {
    let bearer = format!("Bearer {token}");
    (0..n)
        .map(|_| {
            s.request(
                "GET",
                "/v1/forward-auth",
                &[
                    ("X-Original-Method", "GET"),
                    ("X-Original-URI", "/api"),
                    ("Authorization", &bearer),
                ],
            )
            .status
        })
        .collect()
}

#[test]
fn a_verified_plan_claim_picks_the_rates() {
    let s = Server::start(CONFIG);
    let allowed = |v: &[u16]| v.iter().filter(|&&c| c == 200).count();
    assert_eq!(
        allowed(&statuses(&s, &token("free-user", None, SECRET), 7)),
        2,
        "default plan"
    );
    assert_eq!(
        allowed(&statuses(&s, &token("pro-user", Some("pro"), SECRET), 7)),
        5,
        "pro"
    );
    assert_eq!(
        allowed(&statuses(
            &s,
            &token("odd-user", Some("platinum"), SECRET),
            7
        )),
        2,
        "a plan no limit has: the default rates"
    );
    // A forged token naming a generous plan is not believed: it is refused.
    let forged = token(
        "mallory",
        Some("enterprise"),
        "not-the-secret-but-at-least-32-bytes",
    );
    assert_eq!(
        statuses(&s, &forged, 3),
        [401, 401, 401],
        "forged plan refused"
    );
}

#[test]
fn the_decision_api_takes_a_plan_and_shows_it() {
    let s = Server::start(CONFIG);
    let check = |plan: Option<&str>| {
        let mut body = json!({"checks": [{"limit": "api", "key": "k"}]});
        if let Some(plan) = plan {
            body["plan"] = plan.into();
        }
        s.post_json("/v1/check", &body)
    };
    let pro = check(Some("pro"));
    assert_eq!(pro.status, 200, "{}", pro.body);
    let pro = pro.json();
    let result = &results(&pro)[0];
    assert_eq!(
        (u(result, "limit_value"), result["plan"].as_str()),
        (5, Some("pro"))
    );
    let default = check(None).json();
    assert_eq!(u(&results(&default)[0], "limit_value"), 2);
    assert!(results(&default)[0].get("plan").is_none());

    let unknown = check(Some("platinum"));
    assert_eq!(unknown.status, 400, "{}", unknown.body);
    let error: Value = unknown.json();
    assert_eq!(error["error"], "unknown_plan");
    let message = error["message"].as_str().unwrap_or_default();
    assert!(message.contains("enterprise, pro"), "{message}");

    let limits = s.get("/v1/limits").json();
    let plans = &limits["limits"][0]["plans"];
    assert_eq!(plans[0]["plan"], "pro");
    assert_eq!(plans[1]["rates"][0], "1000/hour");
}

#[test]
fn plan_mistakes_are_config_errors_with_their_place() {
    let dir = scratch_dir("plans");
    let cases = [
        (
            "limits:\n  api:\n    rate: 2/minute\n    plans:\n      pro: {rate: 5/minute, plans: {x: {rate: 1/second}}}\n",
            "plans of its own",
        ),
        (
            "limits:\n  api:\n    rate: 2/minute\n    plans:\n      \"p r o\": {rate: 5/minute}\n",
            "plan name",
        ),
        (
            "limits:\n  api:\n    rate: 2/minute\n    plans:\n      pro: {rate: 5/fortnight}\n",
            "unknown unit",
        ),
        (
            "plan_from: \"{jwt.plan}\"\nlimits:\n  api: {rate: 2/minute}\n",
            "no `jwt:` section",
        ),
    ];
    for (i, (text, expected)) in cases.iter().enumerate() {
        let path = write_file(&dir, &format!("bad{i}.yaml"), text);
        let (status, _, stderr) = run_cli(&["check-config", path.to_str().expect("path")]);
        assert!(!status.success(), "{text}");
        assert!(
            stderr.contains(&format!("bad{i}.yaml:")) && stderr.contains(expected),
            "{expected}: {stderr}"
        );
    }
}

/// The proxy's quota endpoint shows the caller's plan and that plan's quota.
#[test]
fn the_quota_endpoint_shows_the_callers_plan() {
    let config =
        format!("{CONFIG}proxy:\n  upstream: http://127.0.0.1:9\n  quota_path: /_sluice/quota\n");
    let s = Server::start(&config);
    let quota = |token: &str| {
        let bearer = format!("Bearer {token}");
        let r = s.request(
            "GET",
            "/_sluice/quota?path=/api",
            &[("Authorization", bearer.as_str())],
        );
        assert_eq!(r.status, 200, "{}", r.body);
        serde_json::from_str::<Value>(&r.body).expect("JSON")
    };
    let pro = quota(&token("pro-user", Some("pro"), SECRET));
    assert_eq!(pro["limits"][0]["plan"], "pro");
    assert_eq!(pro["limits"][0]["quota"], 5);
    let free = quota(&token("free-user", None, SECRET));
    assert!(free["limits"][0].get("plan").is_none(), "{free}");
    assert_eq!(free["limits"][0]["quota"], 2);
}

/// A caller's token is checked once and remembered; tokens nobody signed are checked
/// (and refused) every time. `/metrics` counts the checks by result.
#[test]
fn tokens_are_checked_once_and_the_checks_are_counted() {
    let s = Server::start(CONFIG);
    let checks = |s: &Server| {
        let m = s.metrics();
        let count = |result| {
            metric_value(
                &m,
                "sluice_jwt_signature_checks_total",
                &[("result", result)],
            )
            .unwrap_or_default()
        };
        (count("verified"), count("refused"))
    };
    assert_eq!(checks(&s), (0.0, 0.0));
    let pro = token("pro-user", Some("pro"), SECRET);
    let answers = statuses(&s, &pro, 7);
    assert_eq!(
        answers.iter().filter(|&&c| c == 200).count(),
        5,
        "still limited at the plan's rate while remembered: {answers:?}"
    );
    let forged = token(
        "pro-user",
        Some("pro"),
        "not-the-secret-but-at-least-32-bytes",
    );
    statuses(&s, &forged, 3);
    assert_eq!(
        checks(&s),
        (1.0, 3.0),
        "one check for seven requests with the same token, one per forged request"
    );
}

/// A JWT that does not verify is refused where a key reads a claim: the application
/// behind sluice may accept a spelling sluice does not (a padded signature, a second
/// `Authorization` header), and would know the user sluice counted as a stranger.
#[test]
fn a_token_that_does_not_verify_is_refused_where_a_key_reads_a_claim() {
    // /open: a limit without plans keyed by address (a login, a token refresh);
    // /by-ip: a limit whose rates depend on the plan, keyed by address.
    let config = CONFIG
        .replace("limits:\n  api:\n", "limits:\n  open: {rate: 100/minute}\n  api:\n")
        .replace(
            "routes:\n",
            "routes:\n  - match: {path: /open}\n    limits:\n      - {limit: open, key: \"{client_ip}\"}\n  - match: {path: /by-ip}\n    limits:\n      - {limit: api, key: \"{client_ip}\"}\n",
        );
    let s = Server::start(&config);
    let good = format!("Bearer {}", token("alice", None, SECRET));
    let ask = |uri: &str, authorization: &[&str]| {
        let mut headers = vec![("X-Original-Method", "GET"), ("X-Original-URI", uri)];
        headers.extend(authorization.iter().map(|value| ("Authorization", *value)));
        s.request("GET", "/v1/forward-auth", &headers)
    };
    assert_eq!(ask("/api", &[&good]).status, 200);
    assert_eq!(
        ask("/api", &[&good, &good]).status,
        200,
        "the same token twice"
    );
    let padded = format!("{good}=");
    for (authorization, why) in [
        (
            vec![good.as_str(), "Bearer other"],
            "two different credentials",
        ),
        (vec![padded.as_str()], "a padded signature"),
        (vec!["Bearer a.b.c"], "a forged token"),
    ] {
        let answer = ask("/api", &authorization);
        assert_eq!(answer.status, 401, "{why}: {}", answer.body);
        assert_eq!(
            answer.header("www-authenticate"),
            Some(r#"Bearer error="invalid_token""#),
            "{why}"
        );
        let error: Value = answer.json();
        assert_eq!(error["error"], "invalid_token", "{why}");
    }
    // Not a JWT: an API key counts as no token, keyed by address.
    assert_eq!(ask("/api", &["Bearer sk-live-0123"]).status, 200);
    // A route that reads no claim and whose limits have no plans takes the caller.
    assert_eq!(ask("/open", &[padded.as_str()]).status, 200);
    // One whose limit's rates depend on the plan cannot tell them.
    assert_eq!(ask("/by-ip", &[padded.as_str()]).status, 401);
    assert_eq!(ask("/by-ip", &[&good]).status, 200);

    // `unverified: anonymous` falls back to the next key instead.
    let lenient = CONFIG.replace(
        "  algorithms: [HS256]\n",
        "  algorithms: [HS256]\n  unverified: anonymous\n",
    );
    let s = Server::start(&lenient);
    let answer = s.request(
        "GET",
        "/v1/forward-auth",
        &[
            ("X-Original-Method", "GET"),
            ("X-Original-URI", "/api"),
            ("Authorization", padded.as_str()),
        ],
    );
    assert_eq!(answer.status, 200, "{}", answer.body);
}
