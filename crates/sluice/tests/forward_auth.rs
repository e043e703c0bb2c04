//! Black-box tests of `/v1/forward-auth` (docs/design/front-doors.md, "Forward-auth";
//! docs/design/http.md, "Client IP", "Paths", "Routes"): the endpoint nginx
//! `auth_request`, Traefik ForwardAuth and Envoy ext_authz call before letting a
//! request through. Each test starts the real `sluice serve` with its own `routes:`
//! config and talks to it over raw HTTP (request targets are sent byte for byte, so
//! `//` and `%6d` reach the server unnormalised), looking only at what a proxy sees:
//! status, headers, body — plus `/v1/check` and `/metrics` where they show the effect.
//!
//! The socket peer is always 127.0.0.1; tests make it a trusted proxy or not.

mod common;

use std::collections::BTreeMap;

use common::*;
use serde_json::Value;

// ---------------------------------------------------------------------------
// helpers local to this file

const FA: &str = "/v1/forward-auth";

/// A Traefik ForwardAuth call: the original request in `X-Forwarded-Method`/`-Uri`.
fn traefik(s: &Server, method: &str, uri: &str, extra: &[(&str, &str)]) -> HttpResp {
    let mut h = vec![
        ("X-Forwarded-Method", method),
        ("X-Forwarded-Uri", uri),
        ("X-Forwarded-Host", "app.example"),
        ("X-Forwarded-Proto", "https"),
    ];
    h.extend_from_slice(extra);
    s.request("GET", FA, &h)
}

/// An nginx `auth_request` subrequest: the original in `X-Original-Method`/`-URI`.
fn nginx(s: &Server, method: &str, uri: &str, extra: &[(&str, &str)]) -> HttpResp {
    let mut h = vec![("X-Original-Method", method), ("X-Original-URI", uri)];
    h.extend_from_slice(extra);
    s.request("GET", FA, &h)
}

/// The `RateLimit` field as name -> parameters (`r`, `t`); empty map when absent.
fn ratelimit(r: &HttpResp) -> BTreeMap<String, BTreeMap<String, i64>> {
    r.header_joined("ratelimit")
        .map(|f| parse_sf_list(&f).into_iter().collect())
        .unwrap_or_default()
}

/// The `RateLimit-Policy` field as name -> parameters (`q`, `w`); empty when absent.
fn policy(r: &HttpResp) -> BTreeMap<String, BTreeMap<String, i64>> {
    r.header_joined("ratelimit-policy")
        .map(|f| parse_sf_list(&f).into_iter().collect())
        .unwrap_or_default()
}

/// `r=` of item `name` in the `RateLimit` field; panics when the item is missing.
fn rem(what: &str, r: &HttpResp, name: &str) -> i64 {
    let items = ratelimit(r);
    let item = items.get(name).unwrap_or_else(|| {
        panic!(
            "{what}: RateLimit has no item {name:?} (items {:?}); response:\n{}",
            items.keys().collect::<Vec<_>>(),
            r.describe()
        )
    });
    *item.get("r").unwrap_or_else(|| {
        panic!(
            "{what}: item {name:?} has no r= ; response:\n{}",
            r.describe()
        )
    })
}

fn assert_allowed(what: &str, r: &HttpResp) {
    assert_eq!(
        r.status,
        200,
        "{what}: expected 200 (allowed); got\n{}",
        r.describe()
    );
    assert!(
        r.body.is_empty(),
        "{what}: an allowed forward-auth answer has an empty body; got\n{}",
        r.describe()
    );
}

fn assert_denied(what: &str, r: &HttpResp, status: u16) {
    assert_eq!(
        r.status,
        status,
        "{what}: expected {status} (denied); got\n{}",
        r.describe()
    );
}

/// No rate-limit headers at all: the request matched no route.
fn assert_unlimited(what: &str, r: &HttpResp) {
    assert_allowed(what, r);
    for h in [
        "ratelimit",
        "ratelimit-policy",
        "x-ratelimit-limit",
        "x-ratelimit-remaining",
        "x-ratelimit-reset",
        "retry-after",
    ] {
        assert!(
            r.header(h).is_none(),
            "{what}: matched no route, so no {h} header expected; got\n{}",
            r.describe()
        );
    }
}

fn retry_after(what: &str, r: &HttpResp) -> u64 {
    let v = r.header("retry-after").unwrap_or_else(|| {
        panic!(
            "{what}: denied answer has no Retry-After; got\n{}",
            r.describe()
        )
    });
    v.parse().unwrap_or_else(|_| {
        panic!(
            "{what}: Retry-After {v:?} is not whole seconds; got\n{}",
            r.describe()
        )
    })
}

/// `remaining` of (limit, key) as /v1/check sees it now, without charging.
fn peek(s: &Server, limit: &str, key: &str) -> u64 {
    let d = s.hit(limit, key, Some(0));
    u(&results(&d)[0], "remaining")
}

const CHAT3: &str = "\
limits:
  plain3: {rate: 3/minute}
routes:
  - match: {path: /chat/message, methods: [POST]}
    limits:
      - {limit: plain3, key: \"{client_ip}\"}
";

// ---------------------------------------------------------------------------
// 1. the three ways a proxy describes the original request

#[test]
fn traefik_headers_select_the_route_and_count_down() {
    let s = Server::start(CHAT3);
    for want in [2, 1, 0] {
        let r = traefik(&s, "POST", "/chat/message", &[]);
        assert_allowed("traefik POST /chat/message", &r);
        assert_eq!(rem("traefik POST /chat/message", &r, "plain3"), want);
        let p = policy(&r);
        assert_eq!(
            p.get("plain3").map(|m| (m["q"], m["w"])),
            Some((3, 60)),
            "RateLimit-Policy should be \"plain3\";q=3;w=60; got\n{}",
            r.describe()
        );
    }
    let r = traefik(&s, "POST", "/chat/message", &[]);
    assert_denied("4th traefik POST /chat/message", &r, 429);
    // the forward-auth call's own method (GET) is not what is matched
    let r = traefik(&s, "GET", "/chat/message", &[]);
    assert_unlimited("traefik GET /chat/message (route is POST-only)", &r);
    let r = traefik(&s, "POST", "/chat/other", &[]);
    assert_unlimited("traefik POST /chat/other (no route)", &r);
}

#[test]
fn nginx_headers_select_the_route_and_count_down() {
    let s = Server::start(CHAT3);
    for want in [2, 1, 0] {
        let r = nginx(&s, "POST", "/chat/message", &[]);
        assert_allowed("nginx POST /chat/message", &r);
        assert_eq!(rem("nginx POST /chat/message", &r, "plain3"), want);
    }
    assert_denied(
        "4th nginx POST /chat/message",
        &nginx(&s, "POST", "/chat/message", &[]),
        429,
    );
    assert_unlimited(
        "nginx GET /chat/message",
        &nginx(&s, "GET", "/chat/message", &[]),
    );
    // the forward-auth call itself may be a POST (any method is accepted)
    let r = s.request(
        "POST",
        FA,
        &[
            ("X-Original-Method", "GET"),
            ("X-Original-URI", "/chat/message"),
        ],
    );
    assert_unlimited("POST /v1/forward-auth describing GET /chat/message", &r);
}

#[test]
fn envoy_path_suffix_selects_the_route() {
    let s = Server::start(CHAT3);
    let r = s.request("POST", "/v1/forward-auth/chat/message", &[]);
    assert_allowed("POST /v1/forward-auth/chat/message", &r);
    assert_eq!(rem("envoy form", &r, "plain3"), 2);
    let r = s.request("POST", "/v1/forward-auth/chat/message?x=1", &[]);
    assert_allowed("POST /v1/forward-auth/chat/message?x=1", &r);
    assert_eq!(rem("envoy form with query", &r, "plain3"), 1);
    let r = s.request("POST", "/v1/forward-auth/chat/message", &[]);
    assert_eq!(rem("envoy form", &r, "plain3"), 0);
    assert_denied(
        "4th POST /v1/forward-auth/chat/message",
        &s.request("POST", "/v1/forward-auth/chat/message", &[]),
        429,
    );
    // own method GET: the POST-only route does not apply
    assert_unlimited(
        "GET /v1/forward-auth/chat/message",
        &s.request("GET", "/v1/forward-auth/chat/message", &[]),
    );
    assert_unlimited(
        "POST /v1/forward-auth/chat",
        &s.request("POST", "/v1/forward-auth/chat", &[]),
    );
    // neither headers nor suffix: the original URI is `/`, which matches nothing here
    assert_unlimited("POST /v1/forward-auth", &s.request("POST", FA, &[]));
    // X-Original-URI wins over the suffix
    assert_denied(
        "POST /v1/forward-auth/elsewhere with X-Original-URI /chat/message",
        &s.request(
            "POST",
            "/v1/forward-auth/elsewhere",
            &[("X-Original-URI", "/chat/message")],
        ),
        429,
    );
}

#[test]
fn a_cost_that_can_never_fit_is_denied_without_retry_after() {
    let s = Server::start(
        "\
limits:
  plain3: {rate: 3/minute}
routes:
  - match: {path: /upload}
    limits: [{limit: plain3, key: \"{client_ip}\", cost: 5}]
",
    );
    let r = nginx(&s, "POST", "/upload", &[]);
    let what = "POST /upload costing 5 against 3/minute";
    assert_denied(what, &r, 429);
    assert!(
        r.header("retry-after").is_none(),
        "{what}: it can never fit, so no Retry-After; got\n{}",
        r.describe()
    );
    let body = r.json();
    assert_eq!(body["limit"], "plain3", "{what}: body {body}");
    assert!(
        body["retry_after_seconds"].is_null(),
        "{what}: retry_after_seconds should be null; body {body}"
    );
    assert_eq!(
        peek(&s, "plain3", "127.0.0.1"),
        3,
        "{what}: nothing charged"
    );
}

#[test]
fn query_of_the_original_uri_feeds_query_placeholders() {
    let s = Server::start(
        "\
limits:
  plain3: {rate: 3/minute}
routes:
  - match: {path: /search}
    limits:
      - {limit: plain3, key: \"apikey:{query.api_key}\"}
",
    );
    for want in [2, 1, 0] {
        let r = traefik(&s, "GET", "/search?q=x&api_key=AAA", &[]);
        assert_allowed("GET /search?api_key=AAA", &r);
        assert_eq!(rem("api_key=AAA", &r, "plain3"), want);
    }
    assert_denied(
        "4th GET /search?api_key=AAA",
        &traefik(&s, "GET", "/search?api_key=AAA&q=y", &[]),
        429,
    );
    let r = nginx(&s, "GET", "/search?api_key=BBB", &[]);
    assert_allowed("GET /search?api_key=BBB (other key)", &r);
    assert_eq!(rem("api_key=BBB", &r, "plain3"), 2);
    assert_eq!(
        peek(&s, "plain3", "apikey:AAA"),
        0,
        "the forward-auth key should be apikey:AAA as the template says"
    );
    // without the parameter the only template does not resolve: the limit is skipped
    let r = traefik(&s, "GET", "/search?q=z", &[]);
    assert_allowed("GET /search without api_key", &r);
    assert!(
        ratelimit(&r).is_empty(),
        "a limit whose key does not resolve is skipped; got\n{}",
        r.describe()
    );
}

// ---------------------------------------------------------------------------
// 2. the denied answer

#[test]
fn nth_request_denied_with_retry_after_headers_and_json_body() {
    let s = Server::start(CHAT3);
    let started = std::time::Instant::now();
    for _ in 0..3 {
        assert_allowed(
            "POST /chat/message",
            &traefik(&s, "POST", "/chat/message", &[]),
        );
    }
    let r = traefik(&s, "POST", "/chat/message", &[]);
    let elapsed = started.elapsed().as_secs();
    let what = "4th POST /chat/message at 3/minute";
    assert_denied(what, &r, 429);
    // gcra 3/minute: one request every 20 s, so the real wait is at most 20 s
    let ra = retry_after(what, &r);
    assert!(
        (1..=20).contains(&ra),
        "{what}: Retry-After {ra} should be in 1..=20 (real wait, not the 60 s window); got\n{}",
        r.describe()
    );
    assert!(
        ra + elapsed + 1 >= 20,
        "{what}: Retry-After {ra} is below the ~{} s really left; got\n{}",
        20 - elapsed.min(20),
        r.describe()
    );
    assert_eq!(rem(what, &r, "plain3"), 0);
    let t = ratelimit(&r)["plain3"]["t"];
    assert!(
        (1..=60).contains(&t),
        "{what}: RateLimit t={t} out of 1..=60"
    );
    assert_eq!(
        policy(&r).get("plain3").map(|m| (m["q"], m["w"])),
        Some((3, 60)),
        "{what}: RateLimit-Policy; got\n{}",
        r.describe()
    );
    assert_eq!(
        r.header("x-ratelimit-limit"),
        Some("3"),
        "{what}\n{}",
        r.describe()
    );
    assert_eq!(
        r.header("x-ratelimit-remaining"),
        Some("0"),
        "{what}\n{}",
        r.describe()
    );
    let reset: u64 = r
        .header("x-ratelimit-reset")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            panic!(
                "{what}: X-RateLimit-Reset missing or not a number\n{}",
                r.describe()
            )
        });
    assert!(
        (1..=60).contains(&reset),
        "{what}: X-RateLimit-Reset {reset}"
    );
    let ct = r.header("content-type").unwrap_or("");
    assert!(
        ct.starts_with("application/json"),
        "{what}: Content-Type {ct:?}, expected application/json\n{}",
        r.describe()
    );
    let body = r.json();
    assert_eq!(body["error"], "rate_limited", "{what}: body {body}");
    assert_eq!(body["limit"], "plain3", "{what}: body {body}");
    assert_eq!(
        body["retry_after_seconds"].as_u64(),
        Some(ra),
        "{what}: body's retry_after_seconds should equal Retry-After {ra}; body {body}"
    );
    let msg = body["message"].as_str().unwrap_or("");
    assert_eq!(
        msg,
        format!("Too many requests for plain3; retry in {ra} seconds."),
        "{what}: default message; body {body}"
    );
    // a denied request charged nothing: still denied, still ~20 s away (not 40)
    let r2 = traefik(&s, "POST", "/chat/message", &[]);
    assert_denied("5th POST /chat/message", &r2, 429);
    assert!(
        retry_after("5th", &r2) <= 20,
        "denials must not push the wait out\n{}",
        r2.describe()
    );
}

#[test]
fn retry_after_is_the_real_wait_of_an_hourly_limit() {
    let s = Server::start(
        "\
limits:
  hourly: {rate: 1/hour}
routes:
  - match: {path: /x}
    limits: [{limit: hourly, key: \"{client_ip}\"}]
",
    );
    assert_allowed("1st /x", &nginx(&s, "GET", "/x", &[]));
    let r = nginx(&s, "GET", "/x", &[]);
    assert_denied("2nd /x at 1/hour", &r, 429);
    let ra = retry_after("2nd /x", &r);
    assert!(
        (3580..=3600).contains(&ra),
        "2nd /x at 1/hour: Retry-After {ra}, expected about 3600\n{}",
        r.describe()
    );
    assert_eq!(r.json()["retry_after_seconds"].as_u64(), Some(ra));
}

#[test]
fn forward_auth_deny_status_overrides_responses_deny_status() {
    let s = Server::start(&format!(
        "responses: {{deny_status: 418}}\nforward_auth: {{deny_status: 403}}\n{CHAT3}"
    ));
    for _ in 0..3 {
        assert_allowed(
            "POST /chat/message",
            &nginx(&s, "POST", "/chat/message", &[]),
        );
    }
    let r = nginx(&s, "POST", "/chat/message", &[]);
    assert_denied("4th POST with forward_auth.deny_status 403", &r, 403);
    assert!(retry_after("403 denial", &r) >= 1);
    assert!(
        r.header("ratelimit").is_some(),
        "403 denial carries RateLimit\n{}",
        r.describe()
    );
    assert_eq!(r.json()["limit"], "plain3");
}

#[test]
fn responses_deny_status_applies_to_forward_auth() {
    let s = Server::start(&format!("responses: {{deny_status: 418}}\n{CHAT3}"));
    for _ in 0..3 {
        assert_allowed(
            "POST /chat/message",
            &nginx(&s, "POST", "/chat/message", &[]),
        );
    }
    let r = nginx(&s, "POST", "/chat/message", &[]);
    assert_denied("4th POST with responses.deny_status 418", &r, 418);
    assert_eq!(r.json()["error"], "rate_limited");
}

#[test]
fn several_rates_are_named_per_window_and_legacy_shows_the_tightest() {
    let s = Server::start(
        "\
limits:
  chat_user: {rate: [5/minute, 60/hour]}
routes:
  - match: {path: /chat/message, methods: [POST]}
    limits: [{limit: chat_user, key: \"u:{header.x-user-id}\"}]
",
    );
    let r = nginx(&s, "POST", "/chat/message", &[("X-User-Id", "alice")]);
    let what = "1st POST at [5/minute, 60/hour]";
    assert_allowed(what, &r);
    assert_eq!(rem(what, &r, "chat_user-60s"), 4);
    assert_eq!(rem(what, &r, "chat_user-3600s"), 59);
    let p = policy(&r);
    assert_eq!(
        p.get("chat_user-60s").map(|m| (m["q"], m["w"])),
        Some((5, 60)),
        "{what}\n{}",
        r.describe()
    );
    assert_eq!(
        p.get("chat_user-3600s").map(|m| (m["q"], m["w"])),
        Some((60, 3600)),
        "{what}\n{}",
        r.describe()
    );
    assert_eq!(
        r.header("x-ratelimit-limit"),
        Some("5"),
        "{what}\n{}",
        r.describe()
    );
    assert_eq!(
        r.header("x-ratelimit-remaining"),
        Some("4"),
        "{what}\n{}",
        r.describe()
    );
}

// ---------------------------------------------------------------------------
// 3. client identity

#[test]
fn spoofed_x_forwarded_for_from_an_untrusted_peer_is_ignored() {
    // 127.0.0.1 is not a trusted proxy here
    let s = Server::start(&format!(
        "client_ip: {{trusted_proxies: [10.0.0.0/8]}}\n{CHAT3}"
    ));
    for (i, fake) in ["1.1.1.1", "2.2.2.2", "3.3.3.3"].iter().enumerate() {
        let r = traefik(&s, "POST", "/chat/message", &[("X-Forwarded-For", fake)]);
        assert_allowed(&format!("POST with fake XFF {fake}"), &r);
        assert_eq!(
            rem(&format!("fake XFF {fake}"), &r, "plain3"),
            2 - i as i64,
            "fake X-Forwarded-For values must all share 127.0.0.1's bucket"
        );
    }
    let r = traefik(
        &s,
        "POST",
        "/chat/message",
        &[("X-Forwarded-For", "4.4.4.4")],
    );
    assert_denied("4th POST with yet another fake XFF", &r, 429);
    let r = traefik(&s, "POST", "/chat/message", &[("Forwarded", "for=5.5.5.5")]);
    assert_denied("POST with a fake Forwarded header", &r, 429);
    assert_eq!(
        peek(&s, "plain3", "127.0.0.1"),
        0,
        "the bucket charged should be the socket peer's, 127.0.0.1"
    );
}

#[test]
fn trusted_proxy_x_forwarded_for_decides_the_client_and_ipv6_is_grouped_by_64() {
    let s = Server::start(&format!(
        "client_ip: {{trusted_proxies: [127.0.0.1, \"::1\"]}}\n{CHAT3}"
    ));
    let post = |xff: &str| traefik(&s, "POST", "/chat/message", &[("X-Forwarded-For", xff)]);
    // IPv4: each address its own bucket
    for want in [2, 1, 0] {
        let r = post("203.0.113.5");
        assert_allowed("POST as 203.0.113.5", &r);
        assert_eq!(rem("203.0.113.5", &r, "plain3"), want);
    }
    assert_denied("4th POST as 203.0.113.5", &post("203.0.113.5"), 429);
    // the rightmost untrusted entry is the client; a spoofed left part is not
    assert_denied(
        "XFF `6.6.6.6, 203.0.113.5` (client prepended a fake)",
        &post("6.6.6.6, 203.0.113.5"),
        429,
    );
    // trusted hops on the right are skipped
    assert_denied(
        "XFF `203.0.113.5, 127.0.0.1` (a second trusted hop)",
        &post("203.0.113.5, 127.0.0.1"),
        429,
    );
    let r = post("203.0.113.6");
    assert_allowed("POST as 203.0.113.6", &r);
    assert_eq!(rem("203.0.113.6", &r, "plain3"), 2);
    assert_eq!(
        peek(&s, "plain3", "127.0.0.1"),
        3,
        "with a trusted peer the proxy's own address must not be charged"
    );

    // IPv6: rotating addresses inside one /64 share a bucket
    let r = post("2001:db8:1:2::a");
    assert_allowed("2001:db8:1:2::a", &r);
    assert_eq!(rem("2001:db8:1:2::a", &r, "plain3"), 2);
    let r = post("2001:db8:1:2::b");
    assert_allowed("2001:db8:1:2::b", &r);
    assert_eq!(rem("2001:db8:1:2::b (same /64)", &r, "plain3"), 1);
    let r = post("2001:db8:1:2:ffff:ffff:ffff:ffff");
    assert_allowed("2001:db8:1:2:ffff:ffff:ffff:ffff", &r);
    assert_eq!(rem("2001:db8:1:2:ffff:... (same /64)", &r, "plain3"), 0);
    assert_denied(
        "4th address in 2001:db8:1:2::/64",
        &post("2001:db8:1:2::1234"),
        429,
    );
    // the neighbouring /64 has its own bucket
    let r = post("2001:db8:1:3::a");
    assert_allowed("2001:db8:1:3::a (other /64)", &r);
    assert_eq!(rem("2001:db8:1:3::a", &r, "plain3"), 2);
}

/// A client's own `X-Forwarded-For` with a byte outside ASCII, which the trusted proxy
/// appends the real address to: the client is still the address on the right, not the
/// proxy (whose bucket it would otherwise share, escaping its own and any block entry).
#[test]
fn a_non_ascii_byte_from_the_client_does_not_hide_the_address_the_proxy_appended() {
    let s = Server::start(&format!(
        "client_ip: {{trusted_proxies: [127.0.0.1]}}\n{CHAT3}"
    ));
    for (want, xff) in [
        (2, "caf\u{e9}, 203.0.113.5"),
        (1, "\u{e9}, 203.0.113.5"),
        (0, "6.6.6.6, na\u{ef}ve, 203.0.113.5"),
    ] {
        let r = traefik(&s, "POST", "/chat/message", &[("X-Forwarded-For", xff)]);
        assert_allowed(&format!("XFF {xff:?}"), &r);
        assert_eq!(rem(&format!("XFF {xff:?}"), &r, "plain3"), want, "{xff:?}");
    }
    assert_denied(
        "4th POST as 203.0.113.5 behind a non-ASCII entry",
        &traefik(
            &s,
            "POST",
            "/chat/message",
            &[("X-Forwarded-For", "\u{fc}, 203.0.113.5")],
        ),
        429,
    );
    assert_eq!(
        peek(&s, "plain3", "127.0.0.1"),
        3,
        "the trusted proxy's own bucket (3 remaining) must not be charged"
    );
}

#[test]
fn rfc7239_forwarded_header_when_configured() {
    let s = Server::start(&format!(
        "client_ip: {{trusted_proxies: [127.0.0.1], header: forwarded}}\n{CHAT3}"
    ));
    let post = |h: &[(&str, &str)]| traefik(&s, "POST", "/chat/message", h);
    for want in [2, 1, 0] {
        let r = post(&[("Forwarded", "for=198.51.100.1;proto=https")]);
        assert_allowed("Forwarded for=198.51.100.1", &r);
        assert_eq!(rem("Forwarded for=198.51.100.1", &r, "plain3"), want);
    }
    assert_denied(
        "4th Forwarded for=198.51.100.1",
        &post(&[("Forwarded", "for=198.51.100.1")]),
        429,
    );
    let r = post(&[("Forwarded", "for=\"[2001:db8:9::1]:4711\"")]);
    assert_allowed("Forwarded for=[2001:db8:9::1]", &r);
    assert_eq!(rem("Forwarded IPv6", &r, "plain3"), 2);
    // in this mode X-Forwarded-For is not read: the client is the peer itself
    let r = post(&[("X-Forwarded-For", "198.51.100.1")]);
    assert_allowed("X-Forwarded-For 198.51.100.1 when header: forwarded", &r);
    assert_eq!(rem("XFF ignored in forwarded mode", &r, "plain3"), 2);
}

#[test]
fn user_key_with_ip_fallback() {
    let s = Server::start(
        "\
limits:
  plain3: {rate: 3/minute}
routes:
  - match: {path: /chat/message, methods: [POST]}
    limits:
      - {limit: plain3, key: [\"user:{header.x-user-id}\", \"ip:{client_ip}\"]}
",
    );
    let as_user = |u: &str| nginx(&s, "POST", "/chat/message", &[("X-User-Id", u)]);
    for want in [2, 1, 0] {
        let r = as_user("alice");
        assert_allowed("POST as alice", &r);
        assert_eq!(rem("alice", &r, "plain3"), want);
    }
    assert_denied("4th POST as alice", &as_user("alice"), 429);
    let r = as_user("bob");
    assert_allowed("POST as bob (own bucket)", &r);
    assert_eq!(rem("bob", &r, "plain3"), 2);
    // no user header: the IP bucket, untouched by alice and bob
    for want in [2, 1, 0] {
        let r = nginx(&s, "POST", "/chat/message", &[]);
        assert_allowed("anonymous POST", &r);
        assert_eq!(rem("anonymous (ip bucket)", &r, "plain3"), want);
    }
    assert_denied(
        "4th anonymous POST",
        &nginx(&s, "POST", "/chat/message", &[]),
        429,
    );
    let r = as_user("carol");
    assert_allowed("carol after the IP bucket is empty", &r);
    assert_eq!(peek(&s, "plain3", "user:alice"), 0, "key user:alice");
    assert_eq!(peek(&s, "plain3", "user:bob"), 2, "key user:bob");
    assert_eq!(peek(&s, "plain3", "ip:127.0.0.1"), 0, "key ip:127.0.0.1");
}

#[test]
fn hashed_client_ip_never_uses_the_raw_address() {
    let s = Server::start(&format!(
        "client_ip: {{trusted_proxies: [127.0.0.1], hash: true, hash_secret: \"0123456789abcdef-test-secret\"}}\n{CHAT3}"
    ));
    let post = |xff: &str| traefik(&s, "POST", "/chat/message", &[("X-Forwarded-For", xff)]);
    for want in [2, 1, 0] {
        let r = post("198.51.100.77");
        assert_allowed("POST as 198.51.100.77 (hashed)", &r);
        assert_eq!(rem("hashed", &r, "plain3"), want);
        assert!(
            !format!("{:?}", r.headers).contains("198.51.100.77"),
            "the raw address leaked into a header:\n{}",
            r.describe()
        );
    }
    let r = post("198.51.100.77");
    assert_denied("4th POST as 198.51.100.77 (hashed)", &r, 429);
    assert!(
        !r.body.contains("198.51.100.77"),
        "raw address in body: {}",
        r.body
    );
    let r = post("198.51.100.78");
    assert_allowed("another address, another hash", &r);
    assert_eq!(rem("198.51.100.78", &r, "plain3"), 2);
    assert_eq!(
        peek(&s, "plain3", "198.51.100.77"),
        3,
        "with hash: true the raw address must not be the key"
    );
    assert!(
        !s.stderr().contains("198.51.100.77"),
        "the raw address appears in the server log:\n{}",
        s.stderr()
    );
}

#[test]
fn check_config_requires_a_long_hash_secret_with_hash_true() {
    let dir = scratch_dir("fa-hash");
    for (name, section) in [
        ("no secret", "client_ip: {hash: true}\n"),
        (
            "short secret",
            "client_ip: {hash: true, hash_secret: \"short\"}\n",
        ),
    ] {
        let p = write_file(
            &dir,
            "c.yaml",
            &format!("listen: 127.0.0.1:0\n{section}{CHAT3}"),
        );
        let (st, out, err) = run_cli(&["check-config", p.to_str().unwrap()]);
        assert!(
            !st.success(),
            "check-config should reject hash: true with {name}; stdout {out:?} stderr {err:?}"
        );
        assert!(
            format!("{out}{err}").contains("hash_secret"),
            "the error for {name} should name hash_secret; stdout {out:?} stderr {err:?}"
        );
    }
    let p = write_file(
        &dir,
        "ok.yaml",
        &format!(
            "listen: 127.0.0.1:0\nclient_ip: {{hash: true, hash_secret: \"0123456789abcdef\"}}\n{CHAT3}"
        ),
    );
    let (st, out, err) = run_cli(&["check-config", p.to_str().unwrap()]);
    assert!(
        st.success(),
        "a 16-byte secret is enough; stdout {out:?} stderr {err:?}"
    );
}

// ---------------------------------------------------------------------------
// 4. routes: several at once, normalisation, shadow, default

#[test]
fn several_routes_and_limits_in_one_atomic_decision() {
    let s = Server::start(
        "\
limits:
  wide5: {rate: 5/minute}
  narrow2: {rate: 2/minute}
routes:
  - match: {path: \"/api/*\"}
    limits: [{limit: wide5, key: \"{client_ip}\"}]
  - match: {path: \"~^/api/chat$\", methods: [POST]}
    limits:
      - {limit: wide5, key: \"{client_ip}\"}
      - {limit: narrow2, key: \"{client_ip}\"}
",
    );
    // POST /api/chat matches both routes; wide5 on the same key is charged once
    let r = traefik(&s, "POST", "/api/chat", &[]);
    assert_allowed("1st POST /api/chat", &r);
    assert_eq!(
        rem("1st POST /api/chat", &r, "wide5"),
        4,
        "the same (limit, key) from two routes must be charged once"
    );
    assert_eq!(rem("1st POST /api/chat", &r, "narrow2"), 1);
    let r = traefik(&s, "POST", "/api/chat", &[]);
    assert_eq!(rem("2nd POST /api/chat", &r, "wide5"), 3);
    assert_eq!(rem("2nd POST /api/chat", &r, "narrow2"), 0);
    for i in 3..=4 {
        let r = traefik(&s, "POST", "/api/chat", &[]);
        let what = format!("POST /api/chat #{i} (narrow2 exhausted)");
        assert_denied(&what, &r, 429);
        assert_eq!(r.json()["limit"], "narrow2", "{what}: the denying limit");
        assert!(
            ratelimit(&r).contains_key("wide5"),
            "{what}: RateLimit should list every limit of the decision\n{}",
            r.describe()
        );
    }
    // only the prefix route: wide5 was not charged by the two denied decisions
    let r = traefik(&s, "GET", "/api/other", &[]);
    assert_allowed("GET /api/other", &r);
    assert_eq!(
        rem("GET /api/other after two denials", &r, "wide5"),
        2,
        "denied decisions must charge nothing (3 left before them, 2 after this request)"
    );
    assert!(
        !ratelimit(&r).contains_key("narrow2"),
        "GET /api/other matches only the prefix route\n{}",
        r.describe()
    );
    assert_unlimited("GET /apix", &traefik(&s, "GET", "/apix", &[]));
}

#[test]
fn path_normalisation_variants_count_against_one_bucket() {
    let s = Server::start(
        "\
limits:
  five: {rate: 5/minute}
routes:
  - match: {path: /chat/message, methods: [POST]}
    limits: [{limit: five, key: \"{client_ip}\"}]
",
    );
    for (i, uri) in [
        "/chat/message",
        "/chat/message/",
        "/chat/%6dessage",
        "//chat//message",
        "/CHAT/Message",
    ]
    .iter()
    .enumerate()
    {
        let r = nginx(&s, "POST", uri, &[]);
        let what = format!("POST {uri}");
        assert_allowed(&what, &r);
        assert_eq!(
            rem(&what, &r, "five"),
            4 - i as i64,
            "{uri} should hit the /chat/message route's bucket"
        );
    }
    assert_denied(
        "POST /chat/%6D%65ssage?x=1 (6th)",
        &nginx(&s, "POST", "/chat/%6D%65ssage?x=1", &[]),
        429,
    );
    assert_denied(
        "envoy form POST /v1/forward-auth/chat/message/ (6th)",
        &s.request("POST", "/v1/forward-auth/chat/message/", &[]),
        429,
    );
    assert_unlimited(
        "POST /chat/messages (a different path)",
        &nginx(&s, "POST", "/chat/messages", &[]),
    );
}

/// What applications decode differently is refused, never decided as another path:
/// uvicorn turns `/chat%2Fmessage` into `/chat/message` and runs that handler.
#[test]
fn ambiguous_paths_are_refused_not_let_through() {
    let config = "\
limits:
  one: {rate: 1/hour}
routes:
  - match: {path: /chat/message, methods: [POST]}
    limits: [{limit: one, key: \"{client_ip}\"}]
";
    let s = Server::start(config);
    assert_allowed("first", &nginx(&s, "POST", "/chat/message", &[]));
    for uri in [
        "/chat%2Fmessage",
        "/chat%2fmessage",
        "/chat%5Cmessage",
        "/chat\\message",
        "/chat/message;jsessionid=1",
        "/chat/message%3B",
        "/chat/message%00",
        "/chat/x/../message",
        "/chat/%2e/message",
    ] {
        for (who, r) in [
            ("nginx", nginx(&s, "POST", uri, &[])),
            ("traefik", traefik(&s, "POST", uri, &[])),
        ] {
            assert_eq!(r.status, 400, "{who} POST {uri}: {}", r.describe());
            assert_eq!(r.json()["error"], "invalid_path", "{who} POST {uri}");
        }
    }
    // nginx passes only 401 and 403 through: with a deny status set, refusals use it.
    let s = Server::start(&format!("forward_auth: {{deny_status: 403}}\n{config}"));
    let r = nginx(&s, "POST", "/chat%2Fmessage", &[]);
    assert_eq!(r.status, 403, "{}", r.describe());
    assert_eq!(r.json()["error"], "invalid_path");
}

/// nginx passes the request line's bytes through in `X-Original-URI`: raw UTF-8 is
/// decided as the path it is, not as `/`.
#[test]
fn raw_utf8_in_the_original_uri_is_decided_for_what_it_is() {
    let s = Server::start(
        "\
limits:
  one: {rate: 1/hour}
  catch_all: {rate: 1/hour}
routes:
  - match: {path: /caf%C3%A9}
    limits: [{limit: one, key: \"{client_ip}\"}]
  - match: default
    limits: [{limit: catch_all, key: \"{client_ip}\"}]
",
    );
    assert_allowed("first", &nginx(&s, "GET", "/café", &[]));
    assert_denied("raw UTF-8, 2nd", &nginx(&s, "GET", "/café", &[]), 429);
    assert_denied("encoded, 3rd", &nginx(&s, "GET", "/caf%c3%a9", &[]), 429);
    // Another raw path is not `/`: it falls to the default route, its own bucket.
    assert_allowed("other raw path", &traefik(&s, "GET", "/naïve", &[]));
    assert_denied(
        "other raw path, 2nd",
        &traefik(&s, "GET", "/naïve", &[]),
        429,
    );
}

/// A proxy that appends its `X-Original-URI` after the copy the client sent, instead of
/// replacing it: every copy is decided, so the client's copy cannot stand in for the
/// real one; more copies than a proxy would ever send are refused.
#[test]
fn every_copy_of_the_original_uri_header_is_decided() {
    let s = Server::start(CHAT3);
    for want in [2, 1, 0] {
        let r = nginx(
            &s,
            "POST",
            "/not-limited",
            &[("X-Original-URI", "/chat/message")],
        );
        assert_allowed("client's copy first, the proxy's second", &r);
        assert_eq!(rem("two copies", &r, "plain3"), want);
    }
    assert_denied(
        "4th, the real path in the second copy",
        &nginx(
            &s,
            "POST",
            "/not-limited",
            &[("X-Original-URI", "/chat/message")],
        ),
        429,
    );
    let copies: Vec<String> = (0..9).map(|i| format!("/p{i}")).collect();
    let extra: Vec<(&str, &str)> = copies
        .iter()
        .map(|c| ("X-Forwarded-Uri", c.as_str()))
        .collect();
    let r = s.request("GET", FA, &extra);
    assert_eq!(r.status, 400, "{}", r.describe());
    assert_eq!(r.json()["error"], "ambiguous_request", "{}", r.body);
}

/// HEAD is served by GET handlers, so it is limited by GET routes.
#[test]
fn head_counts_as_get() {
    let s = Server::start(
        "\
limits:
  one: {rate: 1/hour}
routes:
  - match: {path: /search, methods: [GET]}
    limits: [{limit: one, key: \"{client_ip}\"}]
",
    );
    assert_allowed("GET", &nginx(&s, "GET", "/search", &[]));
    assert_denied("HEAD after GET", &nginx(&s, "HEAD", "/search", &[]), 429);
    assert_unlimited("POST", &nginx(&s, "POST", "/search", &[]));
}

/// `?api_key=junk&api_key=REAL`: Starlette reads the last, Flask the first; every
/// distinct value is charged, so neither copy goes free. The same for cookies.
#[test]
fn every_copy_of_a_repeated_parameter_or_cookie_is_charged() {
    let s = Server::start(
        "\
limits:
  per_key: {rate: 1/hour}
routes:
  - match: {path: /q}
    limits: [{limit: per_key, key: [\"k:{query.api_key}\", \"c:{cookie.sid}\"]}]
",
    );
    assert_allowed("REAL", &nginx(&s, "GET", "/q?api_key=REAL", &[]));
    assert_denied(
        "junk then REAL",
        &nginx(&s, "GET", "/q?api_key=junk&api_key=REAL", &[]),
        429,
    );
    assert_denied(
        "REAL then junk",
        &nginx(&s, "GET", "/q?api_key=REAL&api_key=junk2", &[]),
        429,
    );
    assert_allowed(
        "cookie s1",
        &nginx(&s, "GET", "/q", &[("Cookie", "sid=s1")]),
    );
    assert_denied(
        "cookie twice",
        &nginx(&s, "GET", "/q", &[("Cookie", "sid=other; sid=s1")]),
        429,
    );
    let many: String = (0..9).map(|i| format!("api_key=v{i}&")).collect();
    let r = nginx(&s, "GET", &format!("/q?{many}"), &[]);
    assert_eq!(r.status, 400, "{}", r.describe());
    assert_eq!(r.json()["error"], "ambiguous_key");
}

/// A byte outside ASCII in another cookie of the line (`x=café`) left a cookie-keyed
/// limit without its key, and so not applied, while the app still read the cookie.
#[test]
fn a_non_ascii_cookie_does_not_hide_the_others_in_its_line() {
    let s = Server::start(
        "\
limits:
  one: {rate: 1/hour}
routes:
  - match: {path: /x}
    limits: [{limit: one, key: \"{cookie.session}\"}]
",
    );
    assert_allowed(
        "first",
        &nginx(&s, "GET", "/x", &[("Cookie", "session=abc")]),
    );
    for line in ["session=abc; x=caf\u{e9}", "x=\u{fc}; session=abc"] {
        assert_denied(
            &format!("Cookie: {line:?}"),
            &nginx(&s, "GET", "/x", &[("Cookie", line)]),
            429,
        );
    }
    // A value that is itself not plain ASCII is a key of its own, and limited too.
    assert_allowed(
        "session=\u{e9}",
        &nginx(&s, "GET", "/x", &[("Cookie", "session=\u{e9}")]),
    );
    assert_denied(
        "session=\u{e9} again",
        &nginx(&s, "GET", "/x", &[("Cookie", "session=\u{e9}; y=1")]),
        429,
    );
}

/// RFC 7239: a quoted comma belongs to its value. Splitting inside the quotes would
/// key the client as the proxy, in one bucket with everyone behind it.
#[test]
fn a_quoted_comma_in_forwarded_does_not_merge_clients() {
    let s = Server::start(&format!(
        "client_ip: {{trusted_proxies: [127.0.0.1], header: forwarded}}\n{CHAT3}"
    ));
    for client in ["203.0.113.15", "203.0.113.16"] {
        let forwarded = format!("for={client};by=\"a,b\"");
        let r = traefik(&s, "POST", "/chat/message", &[("Forwarded", &forwarded)]);
        assert_allowed(&forwarded, &r);
        assert_eq!(
            rem(&forwarded, &r, "plain3"),
            2,
            "{client} has its own bucket"
        );
    }
}

#[test]
fn shadow_limit_over_quota_is_reported_but_never_denies() {
    let s = Server::start(
        "\
limits:
  plain3: {rate: 3/minute}
  shadow1: {rate: 1/minute, shadow: true}
routes:
  - match: {path: /chat/message}
    limits:
      - {limit: shadow1, key: \"{client_ip}\"}
      - {limit: plain3, key: \"{client_ip}\"}
",
    );
    for (i, want) in [2, 1, 0].into_iter().enumerate() {
        let r = traefik(&s, "POST", "/chat/message", &[]);
        let what = format!("POST #{} with shadow1 (1/minute) over quota", i + 1);
        assert_allowed(&what, &r);
        assert_eq!(rem(&what, &r, "shadow1"), 0, "{what}");
        assert_eq!(rem(&what, &r, "plain3"), want, "{what}");
        // the legacy headers describe the enforced window, not the shadow one
        assert_eq!(
            r.header("x-ratelimit-limit"),
            Some("3"),
            "{what}: X-RateLimit-Limit should be the enforced plain3's\n{}",
            r.describe()
        );
    }
    let r = traefik(&s, "POST", "/chat/message", &[]);
    assert_denied("4th POST (plain3 exhausted)", &r, 429);
    assert_eq!(
        r.json()["limit"],
        "plain3",
        "the body names the enforced limit, not the shadow one"
    );
    let m = s.metrics();
    assert!(
        metric_value(
            &m,
            "sluice_decisions_total",
            &[("limit", "shadow1"), ("outcome", "shadow_denied")]
        )
        .unwrap_or(0.0)
            >= 2.0,
        "shadow denials from forward-auth should be counted; decision samples: {:?}",
        m.iter()
            .filter(|x| x.name.starts_with("sluice_decisions"))
            .collect::<Vec<_>>()
    );
}

#[test]
fn default_route_applies_only_when_nothing_else_matched() {
    let s = Server::start(
        "\
limits:
  plain3: {rate: 3/minute}
  anon: {rate: 2/minute}
routes:
  - match: {path: /chat/message, methods: [POST]}
    limits: [{limit: plain3, key: \"{client_ip}\"}]
  - match: default
    limits: [{limit: anon, key: \"{client_ip}\"}]
",
    );
    let r = traefik(&s, "GET", "/other", &[]);
    assert_allowed("GET /other (default route)", &r);
    assert_eq!(rem("GET /other", &r, "anon"), 1);
    let r = traefik(&s, "POST", "/somewhere/else", &[]);
    assert_eq!(rem("POST /somewhere/else", &r, "anon"), 0);
    let r = traefik(&s, "GET", "/other", &[]);
    assert_denied("3rd unmatched request (anon 2/minute)", &r, 429);
    assert_eq!(r.json()["limit"], "anon");
    // GET /chat/message does not match the POST-only route, so the default applies
    assert_denied(
        "GET /chat/message (default route, anon exhausted)",
        &traefik(&s, "GET", "/chat/message", &[]),
        429,
    );
    // a matched route replaces the default: anon is not consulted
    for want in [2, 1] {
        let r = traefik(&s, "POST", "/chat/message", &[]);
        assert_allowed("POST /chat/message while anon is exhausted", &r);
        assert_eq!(rem("POST /chat/message", &r, "plain3"), want);
        assert!(
            !ratelimit(&r).contains_key("anon"),
            "the default route must not apply to a matched request\n{}",
            r.describe()
        );
    }
}

// ---------------------------------------------------------------------------
// 5. response configuration

#[test]
fn ietf_only_headers_omit_the_legacy_ones() {
    let s = Server::start(&format!("responses: {{headers: [ietf]}}\n{CHAT3}"));
    for i in 1..=4 {
        let r = nginx(&s, "POST", "/chat/message", &[]);
        assert!(
            r.header("ratelimit").is_some(),
            "#{i}: RateLimit expected\n{}",
            r.describe()
        );
        assert!(
            r.header("ratelimit-policy").is_some(),
            "#{i}: RateLimit-Policy expected\n{}",
            r.describe()
        );
        for h in [
            "x-ratelimit-limit",
            "x-ratelimit-remaining",
            "x-ratelimit-reset",
        ] {
            assert!(
                r.header(h).is_none(),
                "#{i}: headers: [ietf] must not send {h}\n{}",
                r.describe()
            );
        }
        if i == 4 {
            assert_denied("4th", &r, 429);
            assert!(retry_after("4th", &r) >= 1);
        }
    }
}

#[test]
fn legacy_only_headers_omit_the_ietf_ones() {
    let s = Server::start(&format!("responses: {{headers: [legacy]}}\n{CHAT3}"));
    let r = nginx(&s, "POST", "/chat/message", &[]);
    assert_allowed("1st", &r);
    assert_eq!(
        r.header("x-ratelimit-remaining"),
        Some("2"),
        "\n{}",
        r.describe()
    );
    assert!(
        r.header("ratelimit").is_none(),
        "headers: [legacy] must not send RateLimit\n{}",
        r.describe()
    );
    assert!(
        r.header("ratelimit-policy").is_none(),
        "headers: [legacy] must not send RateLimit-Policy\n{}",
        r.describe()
    );
}

#[test]
fn custom_body_template() {
    let s = Server::start(&format!(
        "responses:\n  body: '{{\"oops\": \"{{limit}}\", \"wait\": {{retry_after_seconds}}, \"code\": {{status}}}}'\n{CHAT3}"
    ));
    for _ in 0..3 {
        assert_allowed("POST", &traefik(&s, "POST", "/chat/message", &[]));
    }
    let r = traefik(&s, "POST", "/chat/message", &[]);
    assert_denied("4th with a custom body", &r, 429);
    let ra = retry_after("4th", &r);
    let body: Value = r.json();
    assert_eq!(
        body,
        serde_json::json!({"oops": "plain3", "wait": ra, "code": 429}),
        "custom body template rendered wrong\n{}",
        r.describe()
    );
}

// ---------------------------------------------------------------------------
// 6. the rest of the server keeps working

#[test]
fn forward_auth_decisions_are_in_metrics_and_check_api_still_works() {
    let s = Server::start(CHAT3);
    for _ in 0..3 {
        assert_allowed("POST", &nginx(&s, "POST", "/chat/message", &[]));
    }
    assert_denied("4th", &nginx(&s, "POST", "/chat/message", &[]), 429);
    let m = s.metrics();
    let get = |outcome: &str| {
        metric_value(
            &m,
            "sluice_decisions_total",
            &[("limit", "plain3"), ("outcome", outcome)],
        )
    };
    let samples: Vec<_> = m
        .iter()
        .filter(|x| x.name.starts_with("sluice_decisions"))
        .collect();
    assert_eq!(
        get("allowed"),
        Some(3.0),
        "forward-auth allowed decisions; samples {samples:?}"
    );
    assert_eq!(
        get("denied"),
        Some(1.0),
        "forward-auth denied decisions; samples {samples:?}"
    );
    // /v1/check on the same limit and key sees the same bucket
    let d = s.hit("plain3", "other-key", None);
    assert!(allowed(&d), "POST /v1/check still works: {d}");
    let d = s.hit("plain3", "127.0.0.1", None);
    assert!(
        !allowed(&d),
        "/v1/check sees the bucket forward-auth emptied: {d}"
    );
}

// ---------------------------------------------------------------------------
// spoofed descriptions of the original request

/// nginx passes the client's own headers into the auth subrequest, so a client can add
/// Traefik's `X-Forwarded-Uri`/`-Method` naming an unlimited path. The real route (from
/// nginx's `X-Original-*`) must still be decided.
#[test]
fn a_client_cannot_dodge_a_limit_with_the_other_proxys_headers() {
    let s = Server::start(CHAT3);
    let spoof = [
        ("X-Forwarded-Uri", "/unlimited"),
        ("X-Forwarded-Method", "GET"),
    ];
    for i in 1..=3 {
        assert_allowed(
            &format!("spoofed request {i}"),
            &nginx(&s, "POST", "/chat/message", &spoof),
        );
    }
    assert_denied(
        "the fourth, spoofed or not",
        &nginx(&s, "POST", "/chat/message", &spoof),
        429,
    );
    // And the other way round, through Traefik.
    let s = Server::start(CHAT3);
    let spoof = [
        ("X-Original-URI", "/unlimited"),
        ("X-Original-Method", "GET"),
    ];
    for i in 1..=3 {
        assert_allowed(
            &format!("spoofed request {i}"),
            &traefik(&s, "POST", "/chat/message", &spoof),
        );
    }
    assert_denied(
        "the fourth",
        &traefik(&s, "POST", "/chat/message", &spoof),
        429,
    );
}

/// The body's `{status}` is the status actually sent, including forward-auth's own.
#[test]
fn the_body_status_placeholder_matches_the_forward_auth_status() {
    let s = Server::start(&format!(
        "forward_auth: {{deny_status: 403}}\nresponses: {{body: '{{\"status\": {{status}}}}'}}\n{CHAT3}"
    ));
    for _ in 0..3 {
        nginx(&s, "POST", "/chat/message", &[]);
    }
    let denied = nginx(&s, "POST", "/chat/message", &[]);
    assert_denied("fourth", &denied, 403);
    assert_eq!(
        denied.body.as_str(),
        r#"{"status": 403}"#,
        "{}",
        denied.describe()
    );
}
