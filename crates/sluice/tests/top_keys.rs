//! Who is spending (issue 18): `GET /v1/admin/top`, `sluice admin top`, the dashboard's
//! data and page, and the `stats:` config section, through the real binary. The browser
//! test of the page is `dashboard_browser.rs`.

mod common;

use common::*;
use serde_json::{Value, json};

const TOKEN: &str = ADMIN_TOKEN;

const CONFIG: &str = r#"
admin: {token: secret-token-for-tests}
storage: {backend: memory, max_keys: 100000}
client_ip: {hash: true, hash_secret: "a-secret-of-twenty-bytes"}
limits:
  api: {rate: 5/minute}
  costly:
    rate: 1000/hour
    plans:
      pro: {rate: 5000/hour}
  per_ip: {rate: 2/minute}
  tokens: {rate: 1000/hour}
routes:
  - match: {path: "/app/*"}
    limits:
      - {limit: per_ip, key: "{client_ip}"}
"#;

fn top(s: &Server, query: &str) -> Resp {
    s.call("GET", &format!("/v1/admin/top{query}"), Some(TOKEN), None)
}

fn ok_top(s: &Server, query: &str) -> Value {
    let r = top(s, query);
    assert_eq!(r.status, 200, "GET /v1/admin/top{query}: {}", r.body);
    r.json()
}

/// The (key, count) pairs of `limit` in a `/v1/admin/top` answer.
fn keys_of(answer: &Value, limit: &str) -> Vec<(String, u64)> {
    let entry = answer["limits"]
        .as_array()
        .and_then(|all| all.iter().find(|l| l["limit"] == limit))
        .unwrap_or_else(|| panic!("no limit {limit} in {answer}"));
    entry["keys"]
        .as_array()
        .unwrap_or_else(|| panic!("no keys in {entry}"))
        .iter()
        .map(|k| (k["key"].as_str().unwrap_or("").to_string(), u(k, "count")))
        .collect()
}

fn traefik(s: &Server, uri: &str) -> HttpResp {
    s.request(
        "GET",
        "/v1/forward-auth",
        &[("X-Forwarded-Method", "GET"), ("X-Forwarded-Uri", uri)],
    )
}

#[test]
fn top_keys_rank_spend_and_denials_from_every_http_front_door() {
    let s = Server::start(CONFIG);
    // The decision API: alice spends 3 of cost 1 (then is denied twice at 5/minute
    // after two more), bob spends cost 10 once on `costly`.
    for _ in 0..7 {
        s.hit("api", "alice", None);
    }
    s.hit("api", "bob", None);
    s.hit("costly", "bob", Some(10));
    s.hit("costly", "alice", Some(3));
    // Reservations count their reserved cost as spend.
    let r = s.post_json(
        "/v1/reserve",
        &json!({"checks": [{"limit": "tokens", "key": "carol", "cost": 40}]}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    // Forward-auth: the client address is the key, hashed (client_ip.hash).
    let codes: Vec<u16> = (0..4).map(|_| traefik(&s, "/app/x").status).collect();
    assert_eq!(codes[..2], [200, 200], "{codes:?}");

    let spend = ok_top(&s, "");
    assert_eq!(spend["by"], "spend");
    assert_eq!(spend["window"], "minute");
    assert_eq!(spend["capacity"], 100);
    assert_eq!(
        keys_of(&spend, "api"),
        [("alice".to_string(), 5), ("bob".to_string(), 1)],
        "api spend: {spend}"
    );
    assert_eq!(
        keys_of(&spend, "costly"),
        [("bob".to_string(), 10), ("alice".to_string(), 3)]
    );
    assert_eq!(keys_of(&spend, "tokens"), [("carol".to_string(), 40)]);
    let api = spend["limits"]
        .as_array()
        .and_then(|a| a.iter().find(|l| l["limit"] == "api"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(api["total"], 6);

    let denials = ok_top(&s, "?by=denials&limit=api");
    assert_eq!(denials["limits"].as_array().map(Vec::len), Some(1));
    assert_eq!(keys_of(&denials, "api"), [("alice".to_string(), 2)]);

    // With client_ip.hash the key shown is the hashed one: the raw address is nowhere.
    let ip_spend = keys_of(&spend, "per_ip");
    assert_eq!(ip_spend.len(), 1, "{spend}");
    assert_eq!(ip_spend[0].1, 2);
    let ip_denied = keys_of(&ok_top(&s, "?by=denials&limit=per_ip"), "per_ip");
    assert_eq!(ip_denied, [(ip_spend[0].0.clone(), 2)]);
    for query in ["", "?by=denials", "?window=hour", "?by=denials&window=hour"] {
        let body = top(&s, query).body;
        assert!(
            !body.contains("127.0.0.1"),
            "a raw client address in /v1/admin/top{query}: {body}"
        );
    }
    let dashboard = s
        .call("GET", "/v1/admin/dashboard/data", Some(TOKEN), None)
        .body;
    assert!(
        !dashboard.contains("127.0.0.1"),
        "a raw client address in the dashboard data"
    );

    // The hour window holds the same (everything happened within the minute).
    let hour = ok_top(&s, "?window=hour&limit=costly&n=1");
    assert_eq!(hour["window"], "hour");
    assert_eq!(keys_of(&hour, "costly"), [("bob".to_string(), 10)]);

    // The CLI prints a table, the busiest key first.
    let (status, out, err) = run_cli(&["admin", "--url", &s.base, "--token", TOKEN, "top", "api"]);
    assert!(status.success(), "sluice admin top: {err}");
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines[0].starts_with("api: top keys by spend, last minute (total 6"),
        "{out}"
    );
    assert!(
        lines[2].contains("alice") && lines[2].trim_end().ends_with('0'),
        "{out}"
    );
    assert!(lines[3].contains("bob"), "{out}");
    let (status, out, _) = run_cli(&[
        "admin", "--url", &s.base, "--token", TOKEN, "top", "--by", "denials", "--window", "hour",
        "--json",
    ]);
    assert!(status.success());
    let json: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(keys_of(&json, "api"), [("alice".to_string(), 2)]);
    let (status, _, err) = run_cli(&["admin", "--url", &s.base, "--token", TOKEN, "top", "nope"]);
    assert!(!status.success());
    assert!(err.contains("unknown_limit"), "{err}");
}

#[test]
fn bad_top_queries_get_clear_errors() {
    let s = Server::start(CONFIG);
    for (query, code, needle) in [
        (
            "?limit=nope",
            "unknown_limit",
            "configured limits: api, costly, per_ip, tokens",
        ),
        ("?window=day", "invalid_request", "use minute or hour"),
        ("?by=cost", "invalid_request", "use spend or denials"),
        ("?n=0", "invalid_request", "from 1 to 100"),
        ("?n=101", "invalid_request", "from 1 to 100"),
        ("?n=ten", "invalid_request", "from 1 to 100"),
        (
            "?limits=api",
            "invalid_request",
            "unknown query parameter \"limits\"",
        ),
    ] {
        let r = top(&s, query);
        assert_eq!(r.status, 400, "{query}: {}", r.body);
        let body = r.json();
        assert_eq!(body["error"], code, "{query}: {body}");
        let message = body["message"].as_str().unwrap_or("");
        assert!(message.contains(needle), "{query}: {message}");
    }
    let r = s.call(
        "GET",
        "/v1/admin/top",
        Some("wrong-token-wrong-token"),
        None,
    );
    assert_eq!(r.status, 401, "{}", r.body);
}

#[test]
fn top_keys_off_is_refused_and_the_dashboard_says_so() {
    let s = Server::start(&format!("{CONFIG}stats: {{top_keys: false}}\n"));
    s.hit("api", "alice", None);
    let r = top(&s, "");
    assert_eq!(r.status, 409, "{}", r.body);
    assert_eq!(r.json()["error"], "top_keys_disabled");
    let data = s
        .call("GET", "/v1/admin/dashboard/data", Some(TOKEN), None)
        .json();
    assert_eq!(data["top_keys"]["enabled"], false);
    let api = &data["limits"][0];
    assert_eq!(api["limit"]["name"], "api");
    assert!(api["top_spend"].is_null(), "{api}");
    // The charts still count.
    let minutes = api["minutes"].as_array().cloned().unwrap_or_default();
    assert_eq!(minutes.iter().map(|m| u(m, "decisions")).sum::<u64>(), 1);
}

#[test]
fn stats_config_errors_name_the_line() {
    let dir = scratch_dir("stats-config");
    for (text, line, needle) in [
        (
            "limits: {a: {rate: 1/second}}\nstats:\n  top_keys_capacity: 5\n",
            3,
            "stats.top_keys_capacity",
        ),
        ("stats:\n  top_keys: maybe\n", 2, "stats.top_keys"),
        (
            "stats: {top_keys: false, top_keys_capacity: 50}\n",
            1,
            "stats.top_keys is false",
        ),
        ("stats: {top: true}\n", 1, "unknown field `top`"),
    ] {
        let path = write_file(&dir, "bad.yaml", text);
        let path = path.to_string_lossy().to_string();
        let (status, out, err) = run_cli(&["check-config", &path]);
        assert!(!status.success(), "{text} was accepted: {out}");
        assert!(
            err.contains(&format!("bad.yaml:{line}:")),
            "{text}: expected line {line} in {err}"
        );
        assert!(err.contains(needle), "{text}: expected {needle:?} in {err}");
    }
    let path = write_file(
        &dir,
        "good.yaml",
        "stats: {top_keys: true, top_keys_capacity: 10}\n",
    );
    let (status, _, err) = run_cli(&["check-config", &path.to_string_lossy()]);
    assert!(status.success(), "{err}");
}

#[test]
fn dashboard_data_has_limits_charts_top_keys_store_and_reload_status() {
    let mut s = Server::start(CONFIG);
    for _ in 0..3 {
        s.hit("api", "dora", None);
    }
    s.hit("costly", "dora", Some(7));
    // A rejected reload shows as the last config error.
    s.write_config_in_place("limits: {broken: {rate: 5/fortnight}}\n");
    let r = s.call("POST", "/v1/admin/reload", Some(TOKEN), None);
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(s.is_running());

    let r = s.call("GET", "/v1/admin/dashboard/data", Some(TOKEN), None);
    assert_eq!(r.status, 200, "{}", r.body);
    let data = r.json();
    let names: Vec<&str> = data["limits"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|l| l["limit"]["name"].as_str())
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(names, ["api", "costly", "per_ip", "tokens"]);
    let costly = &data["limits"][1];
    assert_eq!(costly["limit"]["rates"], json!(["1000/hour"]));
    assert_eq!(costly["limit"]["plans"][0]["plan"], "pro");
    assert_eq!(costly["top_spend"]["keys"][0]["key"], "dora");
    assert_eq!(costly["top_spend"]["keys"][0]["count"], 7);
    let api = &data["limits"][0];
    let minutes = api["minutes"].as_array().cloned().unwrap_or_default();
    let last = minutes.last().cloned().unwrap_or_default();
    assert_eq!(last["minutes_ago"], 0, "{minutes:?}");
    assert_eq!(u(&last, "decisions"), 3);
    assert_eq!(api["totals"]["allowed"], 3);

    assert_eq!(data["store"]["backend"], "memory");
    assert_eq!(data["store"]["reachable"], true);
    assert_eq!(data["store"]["on_error"], "local");
    assert_eq!(data["store"]["deciding_by_on_error"], false);
    let reload = &data["reload"]["last_reload"];
    assert_eq!(reload["ok"], false, "{reload}");
    let error = reload["error"].as_str().unwrap_or("");
    assert!(
        error.contains("sluice.yaml:") && error.contains("fortnight"),
        "{error}"
    );
    assert_eq!(data["top_keys"]["capacity"], 100);
}

#[test]
fn dashboard_page_is_self_contained_under_a_strict_csp() {
    let s = Server::start(CONFIG);
    let csp = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'";
    let mut bodies = Vec::new();
    for (path, kind) in [
        ("/v1/admin/dashboard", "text/html"),
        ("/v1/admin/dashboard/app.js", "text/javascript"),
        ("/v1/admin/dashboard/app.css", "text/css"),
    ] {
        let r = s.request("GET", path, &[]);
        assert_eq!(r.status, 200, "{path}: {}", r.body);
        assert_eq!(r.header("content-security-policy"), Some(csp), "{path}");
        assert_eq!(
            r.header("x-content-type-options"),
            Some("nosniff"),
            "{path}"
        );
        assert!(
            r.header("content-type")
                .is_some_and(|t| t.starts_with(kind)),
            "{path}: {:?}",
            r.header("content-type")
        );
        bodies.push(r.body);
    }
    let html = &bodies[0];
    // No inline script or style the CSP would have to allow, and nothing from elsewhere.
    assert_eq!(html.matches("<script").count(), 1, "{html}");
    assert!(html.contains(r#"<script src="dashboard/app.js" defer></script>"#));
    assert!(!html.contains("style="), "inline style in the page");
    assert!(!html.contains("<style"), "a style element in the page");
    assert!(
        !html.to_ascii_lowercase().contains(" on"),
        "an inline handler"
    );
    for (body, what) in bodies.iter().zip(["page", "script", "style"]) {
        for scheme in ["https://", "//cdn", "url("] {
            assert!(
                !body.contains(scheme),
                "{what} loads from elsewhere: {scheme}"
            );
        }
        let http: Vec<&str> = body
            .match_indices("http://")
            .map(|(i, _)| &body[i..(i + 30).min(body.len())])
            .collect();
        assert!(
            http.iter()
                .all(|h| h.starts_with("http://www.w3.org/2000/svg")),
            "{what} names an http URL other than the SVG namespace: {http:?}"
        );
    }
    // The script puts keys in with textContent, never as HTML.
    assert!(!bodies[1].contains("innerHTML") && !bodies[1].contains("insertAdjacentHTML"));
    // The page holds no data, and its data needs the token.
    assert!(
        !html.contains("api"),
        "limit names in the unauthenticated page"
    );
    let r = s.call("GET", "/v1/admin/dashboard/data", None, None);
    assert_eq!(r.status, 401, "{}", r.body);
    let r = s.call(
        "GET",
        "/v1/admin/dashboard/data",
        Some("not-the-token-at-all"),
        None,
    );
    assert_eq!(r.status, 401, "{}", r.body);
    assert!(!r.body.contains("api"), "{}", r.body);
}
