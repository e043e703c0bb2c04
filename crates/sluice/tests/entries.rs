//! Runtime entries through the admin API and `sluice admin`, black-box: plans and rate
//! overrides for one subject, block and allow lists by subject and address, their
//! expiry, bad input refused with nothing changed, and survival of a restart on the
//! disk store. (Several instances sharing Redis or PostgreSQL: `*_multi_instance.rs`.)

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::*;
use serde_json::{Value, json};

const TOKEN: &str = "entries-test-admin-token-0123456789";

const LIMITS: &str = r#"
limits:
  api:
    rate: 3/minute
    plans: {pro: {rate: 100/minute}}
  tokens: {rate: 1000/hour, algorithm: fixed_window}
"#;

fn config(extra: &str) -> String {
    format!("admin: {{token: {TOKEN}}}\n{LIMITS}{extra}")
}

fn add(s: &Server, body: Value) -> Resp {
    s.call("POST", "/v1/admin/entries", Some(TOKEN), Some(&body))
}

fn entries(s: &Server) -> Value {
    let r = s.call("GET", "/v1/admin/entries", Some(TOKEN), None);
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()
}

fn peek(s: &Server, limit: &str, key: &str) -> Value {
    s.check(json!({"checks": [{"limit": limit, "key": key}], "dry_run": true}))
}

#[test]
fn bad_entries_are_refused_and_change_nothing() {
    let s = Server::start(&config(""));
    let cases = [
        (
            json!({"kind": "plan", "subject": "c:1", "plan": "gold"}),
            400,
            "unknown_plan",
            "known plans: pro",
        ),
        (
            json!({"kind": "block", "ip": "10.0.0.0/33"}),
            400,
            "invalid_ip",
            "neither an address nor a CIDR",
        ),
        (
            json!({"kind": "block", "ip": "10.0.0.300"}),
            400,
            "invalid_ip",
            "CIDR",
        ),
        (
            json!({"kind": "block", "subject": "u", "expires_at_ms": 1000}),
            400,
            "expiry_in_the_past",
            "in the past",
        ),
        (
            json!({"kind": "rate", "subject": "u", "limit": "nope", "rate": "1/second"}),
            400,
            "unknown_limit",
            "limits:",
        ),
        (
            json!({"kind": "rate", "subject": "u", "limit": "api", "rate": "lots"}),
            400,
            "invalid_entry",
            "rate",
        ),
        (
            json!({"kind": "block"}),
            400,
            "invalid_entry",
            "exactly one of",
        ),
        (
            json!({"kind": "ban", "subject": "u"}),
            400,
            "invalid_request",
            "unknown variant",
        ),
        (
            json!({"kind": "block", "subject": "u", "colour": "red"}),
            400,
            "invalid_request",
            "colour",
        ),
    ];
    for (body, status, code, says) in cases {
        let r = add(&s, body.clone());
        assert_eq!(r.status, status, "{body}: {}", r.body);
        let answer = r.json();
        assert_eq!(answer["error"], code, "{body}: {answer}");
        assert!(
            answer["message"].as_str().unwrap_or("").contains(says),
            "{body}: {answer}"
        );
    }
    let no_token = s.call(
        "POST",
        "/v1/admin/entries",
        None,
        Some(&json!({"kind": "block", "subject": "u"})),
    );
    assert_eq!(no_token.status, 401, "{}", no_token.body);
    let wrong = s.call(
        "POST",
        "/v1/admin/entries",
        Some("wrong-token"),
        Some(&json!({"kind": "block", "subject": "u"})),
    );
    assert_eq!(wrong.status, 401);
    assert_eq!(s.call("GET", "/v1/admin/entries", None, None).status, 401);
    // A bulk write with one bad entry writes none of them, and names the bad one.
    let bulk = add(
        &s,
        json!([
            {"kind": "block", "subject": "a"},
            {"kind": "block", "ip": "300.1.1.1"},
            {"kind": "block", "subject": "b"}
        ]),
    );
    assert_eq!(bulk.status, 400, "{}", bulk.body);
    assert!(
        bulk.json()["message"]
            .as_str()
            .unwrap_or("")
            .starts_with("entry 1: "),
        "{}",
        bulk.body
    );
    assert_eq!(entries(&s)["entries"], json!([]), "nothing was written");
    let bulk = add(
        &s,
        json!([{"kind": "block", "subject": "a"}, {"kind": "allow", "subject": "b"}]),
    );
    assert_eq!(bulk.json()["written"], 2, "{}", bulk.body);
    assert_eq!(peek(&s, "api", "u")["allowed"], true);
    let gone = s.call(
        "POST",
        "/v1/admin/entries/remove",
        Some(TOKEN),
        Some(&json!({"kind": "block", "subject": "never"})),
    );
    assert_eq!(gone.status, 404, "{}", gone.body);
}

#[test]
fn plans_and_overrides_apply_to_one_subject_and_expire() {
    let s = Server::start(&config(""));
    assert_eq!(
        add(
            &s,
            json!({"kind": "plan", "subject": "customer:42", "plan": "pro"})
        )
        .status,
        200
    );
    let pro = s.hit("api", "customer:42", None);
    assert_eq!(pro["results"][0]["plan"], "pro");
    assert_eq!(pro["results"][0]["limit_value"], 100);
    assert_eq!(
        s.hit("api", "customer:1", None)["results"][0]["limit_value"],
        3,
        "others keep the default"
    );

    let r = add(
        &s,
        json!({"kind": "rate", "subject": "customer:43", "limit": "api", "rate": ["5/minute", "20/hour"], "ttl_ms": 1500, "reason": "trial"}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let custom = s.hit("api", "customer:43", None);
    assert_eq!(custom["results"][0]["plan"], "override");
    assert_eq!(custom["results"][0]["limit_value"], 5);
    assert_eq!(custom["results"][1]["limit_value"], 20);
    // An override beats a plan for its limit; other limits are untouched.
    assert_eq!(
        peek(&s, "tokens", "customer:43")["results"][0].get("plan"),
        None
    );

    let r = add(
        &s,
        json!({"kind": "block", "subject": "user:9", "ttl_ms": 1500}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(peek(&s, "api", "user:9")["listed"]["list"], "block");

    std::thread::sleep(Duration::from_millis(1600));
    let unblocked = peek(&s, "api", "user:9");
    assert_eq!(unblocked["allowed"], true, "the block expired: {unblocked}");
    assert_eq!(unblocked.get("listed"), None);
    let expired = peek(&s, "api", "customer:43");
    assert_eq!(
        expired["results"][0]["limit_value"], 3,
        "the override expired: {expired}"
    );
    let listed = entries(&s);
    let live: Vec<bool> = listed["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["live"].as_bool().unwrap())
        .collect();
    assert_eq!(live.iter().filter(|l| !**l).count(), 2, "{listed}");
}

/// A counting upstream that answers 200 to everything.
fn upstream() -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let seen = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&seen);
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let counter = Arc::clone(&counter);
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().expect("clone"));
                let mut writer = stream;
                while read_request(&mut reader).is_some() {
                    counter.fetch_add(1, Ordering::SeqCst);
                    let _ = writer.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
                }
                let _ = reader.fill_buf();
            });
        }
    });
    (url, seen)
}

#[test]
fn blocked_clients_never_reach_the_upstream_and_allowed_ones_skip_the_limits() {
    let (url, seen) = upstream();
    let s = Server::start(&config(&format!(
        "routes:\n  - match: {{path: /api}}\n    limits:\n      - {{limit: api, key: \"user:{{header.x-user}}\"}}\nproxy: {{upstream: '{url}', sluice_endpoints: main}}\n"
    )));
    let get = |user: &str| s.request("GET", "/api", &[("x-user", user)]);
    assert_eq!(get("a").status, 200);
    assert_eq!(seen.load(Ordering::SeqCst), 1);

    // A subject block: 403 JSON with the reason, before the upstream.
    assert_eq!(
        add(
            &s,
            json!({"kind": "block", "subject": "user:mallory", "reason": "abuse"})
        )
        .status,
        200
    );
    let blocked = get("mallory");
    assert_eq!(blocked.status, 403, "{}", blocked.describe());
    let body = blocked.json();
    assert_eq!(body["error"], "blocked");
    assert_eq!(body["reason"], "abuse");
    assert_eq!(blocked.header("retry-after"), None, "waiting does not help");
    assert_eq!(seen.load(Ordering::SeqCst), 1, "the upstream never saw it");

    // An address block covers paths no route limits, too.
    assert_eq!(
        add(&s, json!({"kind": "block", "ip": "127.0.0.0/8"})).status,
        200
    );
    assert_eq!(s.request("GET", "/unlimited", &[]).status, 403);
    // A forwarding header from an untrusted peer does not move the client elsewhere.
    for (name, value) in [
        ("x-forwarded-for", "198.51.100.9"),
        ("forwarded", "for=198.51.100.9"),
        ("x-real-ip", "198.51.100.9"),
    ] {
        assert_eq!(
            s.request("GET", "/unlimited", &[(name, value)]).status,
            403,
            "{name}"
        );
    }
    assert_eq!(get("a").status, 403);
    assert_eq!(seen.load(Ordering::SeqCst), 1);
    let removed = s.call(
        "POST",
        "/v1/admin/entries/remove",
        Some(TOKEN),
        Some(&json!({"kind": "block", "ip": "127.0.0.1/8"})),
    );
    assert_eq!(
        removed.status, 200,
        "named as added, host bits aside: {}",
        removed.body
    );
    assert_eq!(s.request("GET", "/unlimited", &[]).status, 200);

    // An allowed subject skips the limits only on a key the client cannot write: this
    // route's key reads a header, so allowing `user:ops` changes nothing for it...
    assert_eq!(
        add(&s, json!({"kind": "allow", "subject": "user:ops"})).status,
        200
    );
    let statuses: Vec<u16> = (0..4).map(|_| get("ops").status).collect();
    assert_eq!(statuses, [200, 200, 200, 429]);
    let limited: Vec<u16> = (0..4).map(|_| get("b").status).collect();
    assert_eq!(limited, [200, 200, 200, 429]);
    // ...while the same subject given to the decision API (the application chose it)
    // is allowed: more than 3 a minute get through.
    let statuses: Vec<bool> = (0..6)
        .map(|_| s.hit("api", "user:ops", None)["allowed"] == true)
        .collect();
    assert_eq!(statuses, [true; 6]);
    // The plan that applied is in the answer's headers.
    assert_eq!(
        add(
            &s,
            json!({"kind": "plan", "subject": "user:paying", "plan": "pro"})
        )
        .status,
        200
    );
    let paying = get("paying");
    let policy = paying.header("ratelimit-policy").unwrap_or("");
    assert!(
        policy.contains("q=100;w=60;plan=\"pro\""),
        "{}",
        paying.describe()
    );
    let metrics = s.metrics();
    assert_eq!(
        metric_value(&metrics, "sluice_blocked_requests_total", &[]),
        Some(6.0)
    );
    assert_eq!(
        metric_value(&metrics, "sluice_allow_listed_requests_total", &[]),
        Some(6.0)
    );
}

#[test]
fn the_admin_cli_writes_lists_and_removes_entries() {
    let s = Server::start(&config(""));
    let url = s.base.clone();
    let admin = |args: &[&str]| {
        let mut all = vec!["admin", "--url", url.as_str(), "--token", TOKEN];
        all.extend_from_slice(args);
        let (status, out, err) = run_cli(&all);
        (status.success(), out, err)
    };
    let (ok, out, err) = admin(&["assign", "customer:42", "pro", "--ttl", "1h"]);
    assert!(ok, "{out}{err}");
    let (ok, _, err) = admin(&["override", "customer:43", "api", "10/minute"]);
    assert!(ok, "{err}");
    let (ok, _, err) = admin(&["block", "--ip", "203.0.113.7", "--reason", "scraper"]);
    assert!(ok, "{err}");
    let (ok, _, err) = admin(&["allow", "--subject", "user:ops"]);
    assert!(ok, "{err}");
    let (ok, out, _) = admin(&["entries"]);
    assert!(ok);
    let listed: Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(
        listed["entries"].as_array().map(Vec::len),
        Some(4),
        "{listed}"
    );
    assert!(
        out.contains("203.0.113.7/32") && out.contains("scraper"),
        "{out}"
    );
    assert_eq!(peek(&s, "api", "customer:42")["results"][0]["plan"], "pro");

    let (ok, _, err) = admin(&["assign", "customer:42", "gold"]);
    assert!(!ok, "an unknown plan fails the command");
    assert!(err.contains("unknown plan"), "{err}");
    let (ok, _, err) = admin(&["block", "--ip", "not-an-ip"]);
    assert!(!ok && err.contains("CIDR"), "{err}");

    let (ok, _, err) = admin(&[
        "remove",
        "rate",
        "--subject",
        "customer:43",
        "--limit",
        "api",
    ]);
    assert!(ok, "{err}");
    let (ok, _, err) = admin(&["remove", "block", "--ip", "203.0.113.7"]);
    assert!(ok, "{err}");
    assert_eq!(entries(&s)["entries"].as_array().map(Vec::len), Some(2));
}

#[test]
fn entries_survive_a_restart_on_the_disk_store() {
    let dir = scratch_dir("entries-disk");
    let rest = config(&format!(
        "storage: {{backend: disk, path: '{}'}}\n",
        dir.display()
    ));
    {
        let s = Server::start(&rest);
        assert_eq!(
            add(
                &s,
                json!({"kind": "plan", "subject": "customer:42", "plan": "pro"})
            )
            .status,
            200
        );
        assert_eq!(
            add(&s, json!({"kind": "block", "subject": "user:7"})).status,
            200
        );
    }
    let s = Server::start(&rest);
    assert_eq!(peek(&s, "api", "customer:42")["results"][0]["plan"], "pro");
    assert_eq!(peek(&s, "api", "user:7")["listed"]["list"], "block");
}

#[test]
fn a_reservation_under_an_override_settles_on_the_override() {
    let s = Server::start(&config(""));
    assert_eq!(
        add(
            &s,
            json!({"kind": "rate", "subject": "team:1", "limit": "tokens", "rate": "50/day"})
        )
        .status,
        200
    );
    let reserved = s.post_json(
        "/v1/reserve",
        &json!({"checks": [{"limit": "tokens", "key": "team:1", "cost": 40}]}),
    );
    let reserved = reserved.json();
    assert_eq!(reserved["allowed"], true, "{reserved}");
    assert_eq!(reserved["results"][0]["plan"], "override");
    let token = reserved["reservation"].as_str().expect("token");
    let settled = s.post_json("/v1/settle", &json!({"reservation": token, "cost": 10}));
    assert_eq!(settled.status, 200, "{}", settled.body);
    let after = peek(&s, "tokens", "team:1");
    assert_eq!(
        after["results"][0]["remaining"], 39,
        "50, less 10 settled, less 1 for this look: {after}"
    );
}

#[test]
fn a_reload_that_drops_a_limit_skips_its_overrides_until_it_returns() {
    let s = Server::start(&config(""));
    let r = add(
        &s,
        json!({"kind": "rate", "subject": "team:1", "limit": "tokens", "rate": "50/day"}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let reload = || {
        let r = s.call("POST", "/v1/admin/reload", Some(TOKEN), None);
        assert_eq!(r.status, 200, "{}", r.body);
    };
    s.write_config_in_place(&format!(
        "admin: {{token: {TOKEN}}}\nlimits:\n  api: {{rate: 3/minute, plans: {{pro: {{rate: 100/minute}}}}}}\n"
    ));
    reload();
    let listed = entries(&s);
    assert_eq!(listed["entries"], json!([]), "{listed}");
    assert!(
        listed["skipped"][0]["why"]
            .as_str()
            .unwrap_or("")
            .contains("unknown limit \"tokens\""),
        "{listed}"
    );
    s.write_config_in_place(&config(""));
    reload();
    assert_eq!(
        peek(&s, "tokens", "team:1")["results"][0]["limit_value"],
        50
    );
}

/// The review's F3: an allow entry for a subject (here an internal host's per-IP key)
/// must not be reachable through a key the client writes. A client that repeats
/// `?api_key=` with the allowed subject beside its own key stays limited by every limit,
/// its per-IP one included; a client whose only key equals the subject is charged like
/// any other; the allowed host itself, whose `{client_ip}` key is the subject, still
/// goes past every limit, as does the subject through the decision API.
#[test]
fn an_allow_subject_is_not_reachable_through_a_key_the_client_writes() {
    let (url, seen) = upstream();
    let s = Server::start(&format!(
        r#"admin: {{token: {TOKEN}}}
client_ip: {{trusted_proxies: [127.0.0.1]}}
limits:
  per_ip: {{rate: 3/minute}}
  api_key: {{rate: 3/minute}}
routes:
  - match: {{path: /api/*}}
    limits:
      - {{limit: per_ip, key: "{{client_ip}}"}}
      - {{limit: api_key, key: "{{query.api_key}}"}}
proxy: {{upstream: '{url}', sluice_endpoints: main}}
"#
    ));
    let written = add(
        &s,
        json!({"kind": "allow", "subject": "10.20.30.40", "reason": "internal batch host"}),
    );
    assert_eq!(written.status, 200, "{}", written.body);
    assert!(
        written.json()["note"]
            .as_str()
            .unwrap_or("")
            .contains("only keys the client cannot choose"),
        "the answer says which keys the subject matches: {}",
        written.body
    );
    let get = |client: &str, query: &str| {
        s.request(
            "GET",
            &format!("/api/x?{query}"),
            &[("x-forwarded-for", client)],
        )
        .status
    };

    // The attacker spends its own per-IP quota and its own key's...
    let own: Vec<u16> = (0..4).map(|_| get("9.9.9.50", "api_key=mine")).collect();
    assert_eq!(own, [200, 200, 200, 429]);
    // ...then names the allowed subject beside its real key: still limited.
    let attack: Vec<u16> = (0..5)
        .map(|_| get("9.9.9.50", "api_key=10.20.30.40&api_key=mine"))
        .collect();
    assert_eq!(
        attack, [429; 5],
        "an allow subject reached through ?api_key="
    );
    assert_eq!(
        seen.load(Ordering::SeqCst),
        3,
        "the upstream saw only the 3"
    );

    // A fresh client whose only key spells the subject is charged as usual, on both
    // limits: not skipped, not refused.
    let named: Vec<u16> = (0..4)
        .map(|_| get("9.9.9.51", "api_key=10.20.30.40"))
        .collect();
    assert_eq!(named, [200, 200, 200, 429]);
    assert_eq!(
        peek(&s, "per_ip", "9.9.9.51")["results"][0]["remaining"],
        0,
        "its per-IP limit was charged"
    );
    assert_eq!(
        get("9.9.9.52", "api_key=10.20.30.40"),
        429,
        "and so was the api_key counter of the subject's spelling, as for any key"
    );
    assert_eq!(get("9.9.9.52", "api_key=fresh"), 200, "not the whole route");

    // The legitimate use: the allowed host's own `{client_ip}` key is trusted, so it
    // goes past every limit (its client-written key included)...
    let host: Vec<u16> = (0..6)
        .map(|_| get("10.20.30.40", "api_key=batch"))
        .collect();
    assert_eq!(host, [200; 6]);
    // ...and so does the subject given as a key to the decision API.
    let api = peek(&s, "api_key", "10.20.30.40");
    assert_eq!(api["allowed"], true, "{api}");
    assert_eq!(api["listed"]["list"], "allow", "{api}");
    assert_eq!(
        metric_value(&s.metrics(), "sluice_allow_listed_requests_total", &[]),
        Some(6.0),
        "the 6 requests of the allowed host (a dry run is not counted)"
    );
}
