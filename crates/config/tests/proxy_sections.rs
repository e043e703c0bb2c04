//! The reverse-proxy sections (`proxy`, `sessions`): values, defaults, and errors placed
//! at their line and field.

use sluice_config::{Config, ConfigError, ProxyConfig, SluiceEndpoints, load_str};

fn load(text: &str) -> Result<Config, ConfigError> {
    let env =
        |name: &str| (name == "SESSION_SECRET").then(|| "0123456789abcdef-secret".to_string());
    load_str(text, "test.yaml", &env, &[])
}

fn error(text: &str) -> ConfigError {
    load(text).expect_err("the config should be rejected")
}

fn assert_at(error: &ConfigError, line: usize, field: &str, message: &str) {
    assert_eq!(error.line, Some(line), "{error}");
    assert_eq!(error.field.as_deref(), Some(field), "{error}");
    assert!(error.message.contains(message), "{error}");
    assert!(
        error.to_string().starts_with(&format!("test.yaml:{line}:")),
        "{error}"
    );
}

const LIMITS: &str = "limits:\n  l: {rate: 5/minute}\n";

#[test]
fn a_full_proxy_section_is_read() {
    let config = load(&format!(
        "{LIMITS}admin:\n  listen: 127.0.0.1:8081\nproxy:\n  upstream: http://127.0.0.1:9000/api\n  connect_timeout_ms: 250\n  timeout_ms: 3000\n  refund_on_status: [404, \"5xx\", \"429\"]\n  quota_path: /_quota/\n  sluice_endpoints: admin\nsessions:\n  cookie: sid\n  secret: ${{SESSION_SECRET}}\n  secure: true\n  max_age_seconds: 3600\nroutes:\n  - match: {{path: /x}}\n    limits:\n      - {{limit: l, key: [\"s:{{session}}\", \"{{client_ip}}\"]}}\n"
    ))
    .expect("valid");
    let proxy = config.proxy.as_ref().expect("proxy");
    assert_eq!(proxy.upstream.to_string(), "http://127.0.0.1:9000/api");
    assert_eq!((proxy.connect_timeout_ms, proxy.timeout_ms), (250, 3000));
    for (status, refunded) in [
        (404, true),
        (500, true),
        (503, true),
        (429, true),
        (400, false),
        (200, false),
    ] {
        assert_eq!(
            proxy.refund_on_status.contains(status),
            refunded,
            "{status}"
        );
    }
    assert_eq!(proxy.quota_path.as_deref(), Some("/_quota"));
    assert_eq!(proxy.sluice_endpoints, SluiceEndpoints::Admin);
    assert_eq!(config.sessions.cookie.name, "sid");
    assert!(config.sessions.cookie.always_secure);
    assert_eq!(config.sessions.cookie.max_age_seconds, 3600);
    assert_eq!(
        config.sessions.secret.as_ref().map(|s| s.expose()),
        Some("0123456789abcdef-secret")
    );
    assert!(config.routes.uses_session());
    assert!(
        !format!("{config:?}").contains("0123456789abcdef-secret"),
        "the session secret never shows in Debug"
    );
}

#[test]
fn defaults_apply_and_a_prefix_is_normalised() {
    let config =
        load("proxy: {upstream: 'http://app:9000', sluice_endpoints: /_sluice/}\n").expect("valid");
    let proxy = config.proxy.expect("proxy");
    assert_eq!(
        proxy.connect_timeout_ms,
        ProxyConfig::DEFAULT_CONNECT_TIMEOUT_MS
    );
    assert_eq!(proxy.timeout_ms, ProxyConfig::DEFAULT_TIMEOUT_MS);
    assert!(proxy.refund_on_status.is_empty());
    assert_eq!(proxy.quota_path, None);
    assert_eq!(
        proxy.sluice_endpoints,
        SluiceEndpoints::Prefix("/_sluice".into())
    );
    assert_eq!(config.sessions.cookie.name, "sluice_session");
    assert!(config.sessions.secret.is_none());
    assert!(load("").expect("empty").proxy.is_none());
}

#[test]
fn bad_upstreams_are_refused_with_the_reason() {
    for (upstream, why) in [
        ("https://app:9000", "https"),
        ("ftp://app", "scheme other than http"),
        ("app:9000", "no scheme"),
        ("/just/a/path", "no scheme"),
        ("http://app:9000/?x=1", "query"),
        ("http://user:pw@app:9000", "credentials"),
        ("not a url", "URL"),
    ] {
        let e = error(&format!("proxy:\n  upstream: '{upstream}'\n"));
        assert_at(&e, 2, "proxy.upstream", why);
    }
    assert_at(
        &error("proxy:\n  timeout_ms: 10\n"),
        2,
        "proxy",
        "missing field `upstream`",
    );
    assert_at(
        &error("proxy:\n  upstream: http://a:1\n  timeout: 5\n"),
        3,
        "proxy.timeout",
        "unknown field `timeout`",
    );
    assert_at(
        &error("proxy:\n  upstream: http://a:1\n  connect_timeout_ms: 0\n"),
        3,
        "proxy.connect_timeout_ms",
        "from 1 to",
    );
}

#[test]
fn bad_refund_statuses_are_refused_at_their_entry() {
    for (entry, message) in [
        ("\"6xx\"", "not a status"),
        ("\"abc\"", "not a status"),
        ("700", "from 100 to 599"),
        ("true", "expected a status"),
        ("[1]", "expected a status"),
    ] {
        let e = error(&format!(
            "proxy:\n  upstream: http://a:1\n  refund_on_status:\n    - 404\n    - {entry}\n"
        ));
        assert_at(&e, 5, "proxy.refund_on_status[1]", message);
    }
    let one = load("proxy: {upstream: 'http://a:1', refund_on_status: 404}\n").expect("one code");
    assert!(one.proxy.expect("proxy").refund_on_status.contains(404));
}

#[test]
fn endpoint_placement_and_quota_path_conflicts_are_explained() {
    assert_at(
        &error("proxy:\n  upstream: http://a:1\n  sluice_endpoints: admin\n"),
        3,
        "proxy.sluice_endpoints",
        "admin.listen",
    );
    assert_at(
        &error("proxy:\n  upstream: http://a:1\n  sluice_endpoints: elsewhere\n"),
        3,
        "proxy.sluice_endpoints",
        "unknown sluice_endpoints",
    );
    assert_at(
        &error("proxy:\n  upstream: http://a:1\n  sluice_endpoints: /\n"),
        3,
        "proxy.sluice_endpoints",
        "not a usable prefix",
    );
    assert_at(
        &error("proxy:\n  upstream: http://a:1\n  quota_path: /metrics\n"),
        3,
        "proxy.quota_path",
        "one of sluice's own endpoints",
    );
    assert_at(
        &error("proxy:\n  upstream: http://a:1\n  quota_path: quota\n"),
        3,
        "proxy.quota_path",
        "must be a path",
    );
    assert_at(
        &error(
            "proxy:\n  upstream: http://a:1\n  sluice_endpoints: /_sluice\n  quota_path: /_sluice/quota\n",
        ),
        4,
        "proxy.quota_path",
        "under sluice_endpoints",
    );
}

#[test]
fn sessions_need_the_proxy_and_a_long_secret() {
    assert_at(
        &error("sessions:\n  cookie: sid\n"),
        2,
        "sessions",
        "add a `proxy:` section",
    );
    let with_proxy = "proxy: {upstream: 'http://a:1'}\nsessions:\n";
    assert_at(
        &error(&format!("{with_proxy}  secret: short\n")),
        3,
        "sessions.secret",
        "at least 16 bytes",
    );
    assert_at(
        &error(&format!("{with_proxy}  cookie: 'a b'\n")),
        3,
        "sessions.cookie",
        "not a usable cookie name",
    );
    assert_at(
        &error(&format!("{with_proxy}  max_age_seconds: 0\n")),
        3,
        "sessions.max_age_seconds",
        "from 1 to",
    );
}

#[test]
fn a_session_key_needs_the_proxy() {
    let routes =
        "routes:\n  - match: {path: /x}\n    limits:\n      - {limit: l, key: \"{session}\"}\n";
    let e = error(&format!("{LIMITS}{routes}"));
    assert_at(
        &e,
        6,
        "routes[0].limits[0].key",
        "only the reverse proxy issues",
    );
    // With the proxy, wherever it is written in the file.
    let config = load(&format!(
        "{routes}{LIMITS}proxy: {{upstream: 'http://a:1'}}\n"
    ))
    .expect("accepted with a proxy");
    assert!(config.routes.uses_session());
}

#[test]
fn proxy_settings_can_be_overridden_from_the_environment() {
    let overrides = [
        (
            "SLUICE_PROXY__UPSTREAM".to_string(),
            "http://10.0.0.5:8000".to_string(),
        ),
        (
            "SLUICE_PROXY__REFUND_ON_STATUS".to_string(),
            "[\"4xx\"]".to_string(),
        ),
    ];
    let config = load_str("", "test.yaml", &|_| None, &overrides).expect("valid");
    let proxy = config.proxy.expect("proxy from the environment");
    assert_eq!(proxy.upstream.to_string(), "http://10.0.0.5:8000/");
    assert!(proxy.refund_on_status.contains(404));
}
