//! Redis over TLS, black-box: `sluice serve` decides over `rediss://` against Debian's
//! `redis-server` listening only on a TLS port, with certificates `openssl` makes for
//! the test (a private CA, a server certificate for `IP:127.0.0.1`, a client
//! certificate). A CA that did not sign the server's certificate, a certificate for
//! another host and a missing client certificate stop sluice at start with a message
//! that says so; a `redis://` URL against the TLS port never decides by Redis; a Redis
//! Cluster whose nodes speak only TLS serves decisions too.

mod common;

use std::path::Path;

use common::{Server, admits_exactly};
use serde_json::json;
use sluice_testkit::servers::{RedisCluster, RedisServer, TestCertificates};

const LIMITS: &str = "limits:\n  api: {rate: 3/hour}\n";

fn tls_section(certs: &TestCertificates, ca: &str, client: bool) -> String {
    let mut section = format!("tls: {{ca_file: '{}'", certs.path(ca).display());
    if client {
        section.push_str(&format!(
            ", cert_file: '{}', key_file: '{}'",
            certs.path("client.pem").display(),
            certs.path("client.key").display()
        ));
    }
    section.push('}');
    section
}

/// Three requests allowed by Redis, the fourth denied: the counter is shared state on the
/// TLS server.
fn decides_by_redis(s: &Server, redis: &RedisServer) {
    admits_exactly(s, &json!([{"limit": "api", "key": "k"}]), 3);
    let keys = redis.cli(&["KEYS", "*"]).expect("redis-cli over TLS");
    assert!(
        keys.contains("{api:k}"),
        "the counter is on the TLS server: {keys}"
    );
}

fn storage(url: &str, tls: &str) -> String {
    format!("storage: {{backend: redis, url: '{url}', timeout_ms: 2000, {tls}}}\n{LIMITS}")
}

#[test]
fn sluice_decides_over_tls_with_a_private_ca_and_a_client_certificate() {
    let certs = TestCertificates::generate("IP:127.0.0.1").expect("openssl certificates");
    let redis = RedisServer::start_tls(&certs, true).expect("redis-server with --tls-port");
    let s = Server::start(&storage(&redis.url(), &tls_section(&certs, "ca.pem", true)));
    decides_by_redis(&s, &redis);
    assert!(
        s.stderr().contains("redis store connected"),
        "{}",
        s.stderr()
    );
}

#[test]
fn a_wrong_ca_a_wrong_host_or_no_client_certificate_stop_sluice_at_start() {
    let certs = TestCertificates::generate("IP:127.0.0.1").expect("openssl certificates");
    let redis = RedisServer::start_tls(&certs, true).expect("redis-server with --tls-port");

    let err = common::bin().serve_refuses(&storage(
        &redis.url(),
        &tls_section(&certs, "other-ca.pem", true),
    ));
    assert!(err.contains("TLS with Redis at"), "{err}");
    assert!(err.contains("UnknownIssuer"), "the reason is named: {err}");
    assert!(
        err.contains("ca_file"),
        "the setting to check is named: {err}"
    );

    // A certificate for another name: the same CA, a server certificate for a DNS name only.
    let elsewhere = TestCertificates::generate("DNS:redis.elsewhere.example").expect("certs");
    let other_host = RedisServer::start_tls(&elsewhere, false).expect("redis-server");
    let err = common::bin().serve_refuses(&storage(
        &other_host.url(),
        &tls_section(&elsewhere, "ca.pem", false),
    ));
    assert!(err.contains("TLS with Redis at"), "{err}");
    assert!(
        err.contains("certificate not valid for name \"127.0.0.1\""),
        "the reason is named: {err}"
    );

    // The server demands a client certificate and none is given.
    let err = common::bin().serve_refuses(&storage(
        &redis.url(),
        &tls_section(&certs, "ca.pem", false),
    ));
    assert!(err.contains("TLS with Redis at"), "{err}");
}

#[test]
fn plain_redis_urls_never_decide_against_a_tls_port() {
    let certs = TestCertificates::generate("IP:127.0.0.1").expect("openssl certificates");
    let redis = RedisServer::start_tls(&certs, false).expect("redis-server with --tls-port");
    let plain = format!("redis://127.0.0.1:{}/", redis.port());

    // Certificates with a redis:// URL: a config error, at its line.
    let err = common::bin().serve_refuses(&storage(&plain, &tls_section(&certs, "ca.pem", false)));
    assert!(
        err.contains("storage.tls is set but storage.url is not rediss://"),
        "{err}"
    );
    assert!(err.contains("sluice.yaml:2:"), "file:line: {err}");

    // A plain URL alone: sluice starts (Redis may just be down), but nothing is decided
    // by Redis and nothing reaches it.
    let s = Server::start(&format!(
        "storage: {{backend: redis, url: '{plain}', timeout_ms: 300, on_error: deny}}\n{LIMITS}"
    ));
    for _ in 0..3 {
        let d = s.check(json!({"checks": [{"limit": "api", "key": "k"}]}));
        assert_eq!(d["degraded"], true, "{d}");
        assert_eq!(d["allowed"], false, "on_error: deny: {d}");
    }
    assert_eq!(redis.cli(&["DBSIZE"]).expect("DBSIZE"), "0");
}

#[test]
fn unreadable_or_invalid_certificate_files_are_config_errors_with_their_place() {
    let certs = TestCertificates::generate("IP:127.0.0.1").expect("openssl certificates");
    let missing = Path::new("/nonexistent/ca.pem");
    let err = common::bin().serve_refuses(&format!(
        "storage:\n  backend: redis\n  url: rediss://127.0.0.1:1\n  tls:\n    ca_file: {}\n{LIMITS}",
        missing.display()
    ));
    assert!(
        err.contains("sluice.yaml:6:"),
        "file:line of ca_file: {err}"
    );
    assert!(err.contains("cannot read"), "{err}");
    let err = common::bin().serve_refuses(&format!(
        "storage:\n  backend: redis\n  url: rediss://127.0.0.1:1\n  tls:\n    ca_file: {}\n    cert_file: {}\n    key_file: {}\n{LIMITS}",
        certs.path("ca.pem").display(),
        certs.path("client.pem").display(),
        certs.path("client.pem").display(),
    ));
    assert!(
        err.contains("sluice.yaml:8:"),
        "file:line of key_file: {err}"
    );
    assert!(err.contains("no PEM private key"), "{err}");
}

#[test]
fn a_redis_cluster_over_tls_decides_across_its_slots() {
    let certs = TestCertificates::generate("IP:127.0.0.1").expect("openssl certificates");
    let cluster = RedisCluster::start_tls(3, &certs).expect("a TLS Redis Cluster");
    let urls = cluster.urls();
    assert!(
        urls.iter().all(|url| url.starts_with("rediss://")),
        "{urls:?}"
    );
    let s = Server::start(&format!(
        "storage: {{backend: redis, url: '{}', cluster: true, timeout_ms: 2000, {}}}\n{LIMITS}  wide: {{rate: 1000/hour}}\n",
        urls[0],
        tls_section(&certs, "ca.pem", false)
    ));
    // Two checks in different slots: one script per slot, over TLS to two nodes.
    admits_exactly(
        &s,
        &json!([{"limit": "wide", "key": "all"}, {"limit": "api", "key": "k"}]),
        3,
    );
    let keys: Vec<String> = cluster
        .nodes()
        .iter()
        .map(|node| node.cli(&["KEYS", "*"]).expect("redis-cli over TLS"))
        .collect();
    assert!(keys.iter().any(|k| k.contains("{api:k}")), "{keys:?}");
    assert!(keys.iter().any(|k| k.contains("{wide:all}")), "{keys:?}");
}

#[test]
fn a_certificate_that_fails_while_running_is_decided_by_on_error_never_a_5xx() {
    let certs = TestCertificates::generate("IP:127.0.0.1").expect("openssl certificates");
    let mut redis = RedisServer::start_tls(&certs, false).expect("redis-server with --tls-port");
    let s = Server::start(&format!(
        "storage: {{backend: redis, url: '{}', timeout_ms: 500, on_error: deny, {}}}\n{LIMITS}",
        redis.url(),
        tls_section(&certs, "ca.pem", false)
    ));
    decides_by_redis(&s, &redis);
    // The server comes back on the same port with a certificate another CA signed
    // (sluice read its CA at start; the test's redis-cli uses the new one).
    let other = TestCertificates::generate("IP:127.0.0.1").expect("openssl certificates");
    for file in [
        "ca.pem",
        "server.pem",
        "server.key",
        "client.pem",
        "client.key",
    ] {
        std::fs::copy(other.path(file), certs.path(file)).expect("swap the certificate");
    }
    redis.restart().expect("redis-server restarts");
    // Decisions before and after the once-a-second probes that meet the new certificate.
    for round in 0..3 {
        for _ in 0..3 {
            let r = s.post_json(
                "/v1/check",
                &json!({"checks": [{"limit": "api", "key": "other"}]}),
            );
            assert_eq!(r.status, 200, "never a 5xx: {}", r.body);
            let d = r.json();
            assert_eq!(
                d["degraded"], true,
                "round {round}, decided by on_error: {d}"
            );
            assert_eq!(d["allowed"], false, "on_error: deny: {d}");
        }
        std::thread::sleep(std::time::Duration::from_millis(1_200));
    }
    let log = s.stderr();
    assert!(log.contains("store unreachable"), "{log}");
    assert!(
        !log.contains("store reachable again"),
        "a certificate from another CA is never accepted:\n{log}"
    );
}
