//! The HTTP sections (`client_ip`, `responses`, `forward_auth`, `routes`): values, defaults,
//! overrides, and errors placed at their line and field.

use std::collections::HashMap;
use std::net::IpAddr;
use std::str::FromStr;

use http::header::{HeaderMap, HeaderValue};
use http::{Method, StatusCode};
use sluice_config::{Config, ConfigError, ForwardAuthConfig, load_str};
use sluice_http::{
    BodyTemplate, ClientIpResolver, ForwardedHeader, HeaderStyles, PathPattern, RequestFacts,
};

const SECRET: &str = "0123456789abcdef-very-secret";

/// Every HTTP section, with `routes` before the `limits` they name.
const FULL: &str = r#"listen: 127.0.0.1:8080
routes:
  - match: {path: /chat/message, methods: [post], header: X-Api-Key}
    limits:
      - {limit: chat_user, key: ["user:{header.x-user-id}", "ip:{client_ip}"], cost: 2}
      - {limit: chat_ip, key: "{client_ip}"}
  - match: {path: "/api/*"}
    limits:
      - {limit: global, key: all}
  - match: {path: "~^/v[0-9]+/", methods: GET}
    limits:
      - {limit: global, key: "v:{path}", cost: 0}
  - match: default
    limits:
      - {limit: chat_ip, key: "{client_ip}"}
limits:
  chat_user: {rate: [5/minute, 60/hour]}
  chat_ip:   {rate: 30/minute}
  global:    {rate: 10000/hour}
client_ip:
  trusted_proxies: [10.0.0.0/8, 127.0.0.1, "::1"]
  header: forwarded
  ipv6_prefix: 56
  hash: true
  hash_secret: ${SLUICE_IP_HASH_SECRET}
responses:
  deny_status: 503
  block_status: 451
  headers: [ietf]
  body: '{"error": "rate_limited", "limit": "{limit}", "retry_after_ms": {retry_after_ms}}'
  content_type: application/problem+json
forward_auth:
  deny_status: 403
"#;

fn with(
    text: &str,
    vars: &[(&str, &str)],
    overrides: &[(&str, &str)],
) -> Result<Config, ConfigError> {
    let vars: HashMap<String, String> = vars
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let env = move |name: &str| vars.get(name).cloned();
    let overrides: Vec<(String, String)> = overrides
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    load_str(text, "test.yaml", &env, &overrides)
}

fn ok(text: &str) -> Config {
    with(text, &[], &[]).unwrap_or_else(|error| panic!("{error}"))
}

fn err(text: &str) -> ConfigError {
    err_with(text, &[], &[])
}

fn err_with(text: &str, vars: &[(&str, &str)], overrides: &[(&str, &str)]) -> ConfigError {
    match with(text, vars, overrides) {
        Ok(config) => panic!("expected an error, got {config:?}"),
        Err(error) => error,
    }
}

/// Asserts an error's position, field and (part of) its message, and that its text shows them.
fn assert_at(error: &ConfigError, line: usize, column: usize, field: &str, message: &str) {
    assert_eq!(error.source, "test.yaml", "{error}");
    assert_eq!(error.line, Some(line), "{error}");
    assert_eq!(error.column, Some(column), "{error}");
    assert_eq!(error.field.as_deref(), Some(field), "{error}");
    assert!(error.message.contains(message), "{error}");
    let shown = error.to_string();
    let prefix = format!("test.yaml:{line}:{column}: {field}: ");
    assert!(
        shown.starts_with(&prefix),
        "{shown:?} should start with {prefix:?}"
    );
}

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (name, value) in pairs {
        map.append(*name, HeaderValue::from_str(value).unwrap());
    }
    map
}

fn facts<'a>(method: &'a str, path: &'a str, headers: &'a HeaderMap) -> RequestFacts<'a> {
    RequestFacts {
        method,
        path,
        literal_path: path,
        query: None,
        headers,
        client_ip: Some("198.51.100.7"),
        session: None,
        claims: None,
        token_refused: false,
        plan_unknown: false,
        plan: None,
    }
}

/// The checks a request makes, as `(limit, key, cost)`.
fn checks(config: &Config, facts: &RequestFacts<'_>) -> Vec<(String, String, u64)> {
    config
        .routes
        .checks(facts)
        .expect("keys resolve")
        .iter()
        .map(|c| (c.limit().name().to_string(), c.key().to_string(), c.cost()))
        .collect()
}

fn check(limit: &str, key: &str, cost: u64) -> (String, String, u64) {
    (limit.to_string(), key.to_string(), cost)
}

fn full() -> Config {
    with(FULL, &[("SLUICE_IP_HASH_SECRET", SECRET)], &[]).unwrap_or_else(|e| panic!("{e}"))
}

// ---- values ----

#[test]
fn the_full_example_loads_client_ip_responses_and_forward_auth() {
    let config = full();

    let client_ip = &config.client_ip;
    let trusted = |text: &str| {
        client_ip
            .trusted_proxies
            .iter()
            .any(|net| net.contains(&ip(text)))
    };
    assert!(trusted("10.1.2.3"));
    assert!(trusted("127.0.0.1"));
    assert!(trusted("::1"));
    assert!(!trusted("127.0.0.2"), "a single address is a /32");
    assert!(!trusted("::2"), "a single IPv6 address is a /128");
    assert!(!trusted("11.0.0.1"));
    assert_eq!(client_ip.trusted_proxies.len(), 3);
    assert_eq!(client_ip.header, ForwardedHeader::Forwarded);
    assert_eq!(client_ip.ipv6_prefix, 56);
    assert_eq!(client_ip.hash_secret.as_deref(), Some(SECRET.as_bytes()));

    // The resolver built from it walks `Forwarded` from a trusted peer, groups by /56 and hashes.
    let resolver = ClientIpResolver::new(client_ip.clone());
    let forwarded = headers(&[("forwarded", "for=6.6.6.6, for=198.51.100.7, for=10.0.0.2")]);
    assert_eq!(
        resolver.resolve(ip("10.0.0.1"), &forwarded),
        ip("198.51.100.7")
    );
    let key = resolver.key(ip("2001:db8:1:2ff::1"));
    assert!(key.starts_with("ip:"), "{key}");
    assert_eq!(key, resolver.key(ip("2001:db8:1:200::9")), "same /56");

    assert_eq!(
        config.responses.deny_status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(
        config.responses.block_status,
        StatusCode::UNAVAILABLE_FOR_LEGAL_REASONS
    );
    assert_eq!(
        config.responses.headers,
        HeaderStyles {
            ietf: true,
            legacy: false
        }
    );
    assert_eq!(
        config.responses.body,
        BodyTemplate::from_str(
            r#"{"error": "rate_limited", "limit": "{limit}", "retry_after_ms": {retry_after_ms}}"#
        )
        .unwrap()
    );
    assert_eq!(
        config.responses.content_type,
        HeaderValue::from_static("application/problem+json")
    );
    assert_eq!(
        config.forward_auth,
        ForwardAuthConfig {
            deny_status: Some(StatusCode::FORBIDDEN)
        }
    );
}

#[test]
fn the_full_example_routes_requests_to_their_checks() {
    let config = full();
    assert!(!config.routes.is_empty());
    assert!(!config.routes.uses_session());

    // Exact path, method matched case-insensitively, header present: both limits, user key first.
    let h = headers(&[("x-api-key", "k"), ("x-user-id", "42")]);
    let chat = facts("POST", "/chat/message", &h);
    let matching = config.routes.matching(&chat);
    assert_eq!(matching.len(), 1);
    assert!(!matching[0].default);
    assert_eq!(matching[0].matcher.methods, [Method::POST]);
    assert_eq!(
        matching[0].matcher.header.as_ref().map(|h| h.as_str()),
        Some("x-api-key"),
        "header names are lowercased"
    );
    assert_eq!(
        matching[0].matcher.path,
        Some(PathPattern::Exact("/chat/message".to_string()))
    );
    assert_eq!(
        checks(&config, &chat),
        [
            check("chat_user", "user:42", 2),
            check("chat_ip", "198.51.100.7", 1)
        ]
    );
    // The limit is the configured one, shared.
    assert!(std::sync::Arc::ptr_eq(
        &matching[0].limits[0].limit,
        config.limits.get("chat_user").unwrap()
    ));

    // Without a user id the second key template is used.
    let h = headers(&[("x-api-key", "k")]);
    assert_eq!(
        checks(&config, &facts("POST", "/chat/message", &h))[0],
        check("chat_user", "ip:198.51.100.7", 2)
    );

    // Without the header, or with another method, only the default route applies.
    let none = HeaderMap::new();
    for facts in [
        facts("POST", "/chat/message", &none),
        facts("GET", "/chat/message", &h),
        facts("GET", "/elsewhere", &none),
    ] {
        let matching = config.routes.matching(&facts);
        assert_eq!(matching.len(), 1, "{facts:?}");
        assert!(matching[0].default, "{facts:?}");
        assert_eq!(
            checks(&config, &facts),
            [check("chat_ip", "198.51.100.7", 1)]
        );
    }

    // A prefix, and a regex with a single method given as a string.
    assert_eq!(
        checks(&config, &facts("DELETE", "/api/users/7", &none)),
        [check("global", "all", 1)]
    );
    assert_eq!(
        checks(&config, &facts("GET", "/v2/models", &none)),
        [check("global", "v:/v2/models", 0)]
    );
}

#[test]
fn absent_http_sections_take_their_defaults() {
    for text in [
        "",
        "client_ip:\nresponses: {}\nforward_auth: ~\nroutes:\n",
        "routes: []\n",
    ] {
        let config = ok(text);
        assert!(config.client_ip.trusted_proxies.is_empty(), "{text:?}");
        assert_eq!(config.client_ip.header, ForwardedHeader::XForwardedFor);
        assert_eq!(config.client_ip.ipv6_prefix, 64);
        assert!(config.client_ip.hash_secret.is_none());
        assert_eq!(config.responses.deny_status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(config.responses.block_status, StatusCode::FORBIDDEN);
        assert_eq!(config.responses.headers, HeaderStyles::default());
        assert_eq!(config.responses.body, BodyTemplate::default());
        assert_eq!(config.responses.content_type, "application/json");
        assert_eq!(config.forward_auth.deny_status, None);
        assert!(config.routes.is_empty());
    }
}

#[test]
fn smaller_forms_are_accepted() {
    let config = ok("\
limits: {a: {rate: 1/s}}
client_ip:
  trusted_proxies: 192.168.0.0/16
  header: X-Forwarded-For
  hash: false
responses:
  headers: []
  body: plain text, {limit}
routes:
  - match: {}
    limits:
      - limit: a
        key: \"{method}:{path}\"
");
    assert_eq!(config.client_ip.trusted_proxies.len(), 1);
    assert_eq!(config.client_ip.header, ForwardedHeader::XForwardedFor);
    assert!(config.client_ip.hash_secret.is_none());
    assert_eq!(
        config.responses.headers,
        HeaderStyles {
            ietf: false,
            legacy: false
        }
    );
    let none = HeaderMap::new();
    assert_eq!(
        checks(&config, &facts("PUT", "/x", &none)),
        [check("a", "PUT:/x", 1)],
        "an empty match matches every request"
    );
}

#[test]
fn the_hash_secret_never_shows_in_debug_output() {
    let shown = format!("{:?}", full());
    assert!(!shown.contains(SECRET), "{shown}");
    let bytes = format!("{:?}", SECRET.as_bytes());
    assert!(!shown.contains(&bytes[1..20]), "{shown}");
    assert!(shown.contains("hash_secret: Some([redacted])"), "{shown}");
}

// ---- overrides ----

#[test]
fn overrides_reach_the_http_sections() {
    let config = with(
        FULL,
        &[("SLUICE_IP_HASH_SECRET", SECRET)],
        &[
            ("SLUICE_RESPONSES__DENY_STATUS", "429"),
            ("SLUICE_RESPONSES__HEADERS", "[legacy]"),
            ("SLUICE_CLIENT_IP__TRUSTED_PROXIES", "[172.16.0.0/12]"),
            ("SLUICE_FORWARD_AUTH__DENY_STATUS", "401"),
        ],
    )
    .unwrap();
    assert_eq!(config.responses.deny_status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        config.responses.headers,
        HeaderStyles {
            ietf: false,
            legacy: true
        }
    );
    assert_eq!(
        config.client_ip.trusted_proxies,
        ["172.16.0.0/12".parse().unwrap()]
    );
    assert_eq!(config.client_ip.ipv6_prefix, 56, "siblings are kept");
    assert_eq!(
        config.forward_auth.deny_status,
        Some(StatusCode::UNAUTHORIZED)
    );

    let config = with(
        "limits: {a: {rate: 1/s}}\n",
        &[],
        &[
            ("SLUICE_RESPONSES__DENY_STATUS", "403"),
            (
                "SLUICE_ROUTES",
                "[{match: default, limits: [{limit: a, key: '{client_ip}'}]}]",
            ),
        ],
    )
    .unwrap();
    assert_eq!(config.responses.deny_status, StatusCode::FORBIDDEN);
    let none = HeaderMap::new();
    assert_eq!(
        checks(&config, &facts("GET", "/", &none)),
        [check("a", "198.51.100.7", 1)]
    );
}

#[test]
fn a_bad_override_of_an_http_section_names_the_variable() {
    let error = err_with("", &[], &[("SLUICE_RESPONSES__DENY_STATUS", "200")]);
    assert!(error.is_env_override());
    assert_eq!(
        error.to_string(),
        "SLUICE_RESPONSES__DENY_STATUS (overrides responses.deny_status): must be from 400 to 599, found 200: a deny status is a client or server error code, e.g. 429 or 403"
    );
    let error = err_with(
        "limits: {a: {rate: 1/s}}\n",
        &[],
        &[(
            "SLUICE_ROUTES",
            "[{match: default, limits: [{limit: b, key: x}]}]",
        )],
    );
    assert!(
        error.to_string().starts_with(
            "SLUICE_ROUTES (overrides routes): routes[0].limits[0].limit: unknown limit `b`: the configured limits are `a`"
        ),
        "{error}"
    );
}

// ---- errors ----

#[test]
fn the_top_level_error_lists_the_new_sections() {
    let error = err("route:\n  - match: default\n");
    assert_at(
        &error,
        1,
        1,
        "route",
        "unknown field `route`, expected one of `listen`, `admin`, `storage`, `limits`, `http`, `client_ip`, `responses`, `forward_auth`, `routes`",
    );
}

#[test]
fn an_unknown_limit_in_a_route_lists_the_configured_ones() {
    let error = err("\
routes:
  - match: {path: /chat}
    limits:
      - {limit: chat_ip, key: \"{client_ip}\"}
      - limit: chat_usr
        key: \"{header.x-user-id}\"
limits:
  chat_user: {rate: 5/minute}
  chat_ip: {rate: 30/minute}
");
    assert_at(
        &error,
        5,
        16,
        "routes[0].limits[1].limit",
        "unknown limit `chat_usr`: the configured limits are `chat_user`, `chat_ip`",
    );
    let error = err("routes:\n  - match: default\n    limits: [{limit: a, key: x}]\n");
    assert_at(
        &error,
        3,
        22,
        "routes[0].limits[0].limit",
        "unknown limit `a`: no limits are configured",
    );
}

#[test]
fn a_bad_key_template_is_reported_at_its_element() {
    let error = err("\
limits: {a: {rate: 1/s}}
routes:
  - match: {path: /x}
    limits:
      - {limit: a, key: all}
      - {limit: a, key: [\"user:{header.x-user-id\", \"{client_ip}\"]}
");
    assert_at(
        &error,
        6,
        26,
        "routes[0].limits[1].key[0]",
        "unbalanced brace in key template",
    );
    let error = err(
        "limits: {a: {rate: 1/s}}\nroutes:\n  - match: default\n    limits: [{limit: a, key: \"{ip}\"}]\n",
    );
    assert_at(
        &error,
        4,
        30,
        "routes[0].limits[0].key",
        "unknown placeholder {ip}",
    );
    // Unquoted, `{client_ip}` is a YAML mapping: say so.
    let error = err(
        "limits: {a: {rate: 1/s}}\nroutes:\n  - match: default\n    limits:\n      - limit: a\n        key: {client_ip}\n",
    );
    assert_at(
        &error,
        6,
        14,
        "routes[0].limits[0].key",
        "quote templates that start with `{`",
    );
    let error = err(
        "limits: {a: {rate: 1/s}}\nroutes:\n  - match: default\n    limits: [{limit: a, key: []}]\n",
    );
    assert_at(
        &error,
        4,
        30,
        "routes[0].limits[0].key",
        "key is an empty list",
    );
}

#[test]
fn a_bad_path_regex_or_method_or_header_is_reported_at_its_value() {
    let routes = |matcher: &str| {
        format!(
            "limits: {{a: {{rate: 1/s}}}}\nroutes:\n  - match: {matcher}\n    limits: [{{limit: a, key: all}}]\n"
        )
    };
    let error = err(&routes("{path: \"~^/v[0-9+/\"}"));
    assert_at(
        &error,
        3,
        19,
        "routes[0].match.path",
        "path regex \"^/v[0-9+/\" is invalid",
    );
    let error = err(&routes("{path: api/*}"));
    assert_at(&error, 3, 19, "routes[0].match.path", "must start with '/'");
    let error = err(&routes("{methods: [GET, \"PO ST\"]}"));
    assert_at(
        &error,
        3,
        28,
        "routes[0].match.methods[1]",
        "`PO ST` is not an HTTP method",
    );
    let error = err(&routes("{methods: []}"));
    assert_at(&error, 3, 22, "routes[0].match.methods", "methods is empty");
    let error = err(&routes("{header: \"x api key\"}"));
    assert_at(
        &error,
        3,
        21,
        "routes[0].match.header",
        "`x api key` is not a valid header name",
    );
    let error = err(&routes("/chat"));
    assert_at(
        &error,
        3,
        12,
        "routes[0].match",
        "expected `default` or a mapping such as {path: /api/*, methods: [GET]}, found the string `/chat`: write `match: {path: /chat}`",
    );
}

#[test]
fn two_default_routes_are_an_error() {
    let error = err("\
limits: {a: {rate: 1/s}}
routes:
  - match: default
    limits: [{limit: a, key: all}]
  - match: {path: /x}
    limits: [{limit: a, key: all}]
  - match: default
    limits: [{limit: a, key: \"{client_ip}\"}]
");
    assert_at(
        &error,
        7,
        12,
        "routes[2].match",
        "a second default route (the first is routes[0], on line 3)",
    );
}

#[test]
fn unknown_and_missing_fields_in_a_route_are_errors() {
    let error = err("\
limits: {a: {rate: 1/s}}
routes:
  - match: default
    limit: [{limit: a, key: all}]
");
    assert_at(
        &error,
        4,
        5,
        "routes[0].limit",
        "unknown field `limit`, expected one of `match`, `limits`",
    );
    let error = err(
        "limits: {a: {rate: 1/s}}\nroutes:\n  - match: {paths: /x}\n    limits: [{limit: a, key: all}]\n",
    );
    assert_at(
        &error,
        3,
        13,
        "routes[0].match.paths",
        "unknown field `paths`, expected one of `path`, `methods`, `header`",
    );
    let error = err(
        "limits: {a: {rate: 1/s}}\nroutes:\n  - match: default\n    limits: [{limit: a, key: all, weight: 2}]\n",
    );
    assert_at(
        &error,
        4,
        35,
        "routes[0].limits[0].weight",
        "unknown field `weight`, expected one of `limit`, `key`, `cost`",
    );
    let error = err("limits: {a: {rate: 1/s}}\nroutes:\n  - limits: [{limit: a, key: all}]\n");
    assert_at(&error, 3, 5, "routes[0]", "missing field `match`");
    let error = err("limits: {a: {rate: 1/s}}\nroutes:\n  - match: default\n");
    assert_at(&error, 3, 5, "routes[0]", "missing field `limits`");
    let error = err("limits: {a: {rate: 1/s}}\nroutes:\n  - match: default\n    limits: []\n");
    assert_at(
        &error,
        4,
        13,
        "routes[0].limits",
        "expected a non-empty list of limits",
    );
    let error =
        err("limits: {a: {rate: 1/s}}\nroutes:\n  - match: default\n    limits: [{key: all}]\n");
    assert_at(
        &error,
        4,
        14,
        "routes[0].limits[0]",
        "missing field `limit`",
    );
    let error =
        err("limits: {a: {rate: 1/s}}\nroutes:\n  - match: default\n    limits: [{limit: a}]\n");
    assert_at(&error, 4, 14, "routes[0].limits[0]", "missing field `key`");
    let error = err("limits: {a: {rate: 1/s}}\nroutes:\n  -\n");
    assert_at(
        &error,
        3,
        4,
        "routes[0]",
        "route has no settings: give it `match` and `limits`",
    );
    let error = err("limits: {a: {rate: 1/s}}\nroutes:\n  - match: default\n    limits: [~]\n");
    assert_at(
        &error,
        4,
        14,
        "routes[0].limits[0]",
        "empty entry: name a limit and a key",
    );
    let error = err(
        "limits: {a: {rate: 1/s}}\nroutes:\n  - match: default\n    limits: [{limit: a, key: x, cost: -1}]\n",
    );
    assert_at(
        &error,
        4,
        39,
        "routes[0].limits[0].cost",
        "must be at least 0, found -1",
    );
    let error = err("routes: {match: default}\n");
    assert_at(&error, 1, 9, "routes", "expected a list of routes");
}

#[test]
fn hash_needs_a_long_enough_secret_and_the_secret_needs_hash() {
    let error = err("client_ip:\n  hash: true\n");
    assert_at(
        &error,
        2,
        9,
        "client_ip.hash",
        "hash: true needs hash_secret, a secret of at least 16 bytes",
    );

    let short = "short-s3cret";
    let error = err_with(
        "client_ip:\n  hash: true\n  hash_secret: ${SECRET}\n",
        &[("SECRET", short)],
        &[],
    );
    assert_at(
        &error,
        3,
        16,
        "client_ip.hash_secret",
        "hash_secret must be at least 16 bytes",
    );
    assert!(!error.to_string().contains(short), "{error}");
    assert!(!format!("{error:?}").contains(short), "{error:?}");
    // The same from an override: still not shown.
    let error = err_with(
        "client_ip: {hash: true}\n",
        &[],
        &[("SLUICE_CLIENT_IP__HASH_SECRET", short)],
    );
    assert!(error.is_env_override());
    assert!(error.message.contains("at least 16 bytes"), "{error}");
    assert!(!format!("{error} {error:?}").contains(short), "{error:?}");

    for text in [
        "client_ip:\n  hash_secret: 0123456789abcdef0123\n",
        "client_ip:\n  hash: false\n  hash_secret: 0123456789abcdef0123\n",
    ] {
        let error = err(text);
        let line = text.lines().count();
        assert_at(
            &error,
            line,
            16,
            "client_ip.hash_secret",
            "hash_secret is set but hash is not true",
        );
        assert!(!error.to_string().contains("0123456789"), "{error}");
    }
}

#[test]
fn other_client_ip_values_are_checked() {
    let error = err("client_ip:\n  trusted_proxies: [10.0.0.0/8, 10.0.0.0/33]\n");
    assert_at(
        &error,
        2,
        33,
        "client_ip.trusted_proxies[1]",
        "`10.0.0.0/33` is not an IP address or CIDR range",
    );
    let error = err("client_ip:\n  header: x-real-ip\n");
    assert_at(
        &error,
        2,
        11,
        "client_ip.header",
        "unknown forwarding header `x-real-ip`, expected `x-forwarded-for` or `forwarded`",
    );
    let error = err("client_ip:\n  ipv6_prefix: 129\n");
    assert_at(
        &error,
        2,
        16,
        "client_ip.ipv6_prefix",
        "must be from 1 to 128, found 129",
    );
    let error = err("client_ip:\n  hash: yes\n");
    assert_at(&error, 2, 9, "client_ip.hash", "expected true or false");
    let error = err("client_ip:\n  trusted: [10.0.0.0/8]\n");
    assert_at(
        &error,
        2,
        3,
        "client_ip.trusted",
        "unknown field `trusted`, expected one of `trusted_proxies`, `header`, `ipv6_prefix`, `hash`, `hash_secret`",
    );
}

#[test]
fn a_deny_status_outside_4xx_and_5xx_is_rejected() {
    let error = err("responses:\n  deny_status: 200\n");
    assert_at(
        &error,
        2,
        16,
        "responses.deny_status",
        "must be from 400 to 599, found 200",
    );
    let error = err("forward_auth:\n  deny_status: 302\n");
    assert_at(
        &error,
        2,
        16,
        "forward_auth.deny_status",
        "must be from 400 to 599, found 302",
    );
    let error = err("forward_auth:\n  deny_status: \"403\"\n");
    assert_at(
        &error,
        2,
        16,
        "forward_auth.deny_status",
        "remove the quotes",
    );
    assert_eq!(
        ok("forward_auth: {deny_status: 401}")
            .forward_auth
            .deny_status,
        Some(StatusCode::UNAUTHORIZED)
    );
}

#[test]
fn other_response_values_are_checked() {
    let error = err("responses:\n  headers: [ietf, draft]\n");
    assert_at(
        &error,
        2,
        19,
        "responses.headers[1]",
        "unknown header style `draft`, expected `ietf`",
    );
    let error = err("responses:\n  body: '{\"limit\": \"{limt}\"}'\n");
    assert_at(
        &error,
        2,
        9,
        "responses.body",
        "unknown placeholder {limt} in the deny body",
    );
    let error = err("responses:\n  body: {error: rate_limited}\n");
    assert_at(
        &error,
        2,
        9,
        "responses.body",
        "expected the body as a string, found a mapping: quote it",
    );
    let error = err("responses:\n  content_type: \"application/json\\x01\"\n");
    assert_at(
        &error,
        2,
        17,
        "responses.content_type",
        "is not a valid header value",
    );
    let error = err("responses:\n  content_type: ''\n");
    assert_at(
        &error,
        2,
        17,
        "responses.content_type",
        "content_type is empty",
    );
    let error = err("responses:\n  status: 429\n");
    assert_at(
        &error,
        2,
        3,
        "responses.status",
        "unknown field `status`, expected one of `deny_status`, `block_status`, `headers`, `body`, `content_type`",
    );
    let error = err("forward_auth:\n  status: 403\n");
    assert_at(
        &error,
        2,
        3,
        "forward_auth.status",
        "unknown field `status`, expected one of `deny_status`",
    );
}

#[test]
fn a_session_key_is_refused_until_sessions_exist() {
    let text = "limits:\n  l: {rate: 5/minute}\nroutes:\n  - match: {path: /x}\n    limits:\n      - {limit: l, key: [\"{session}\"]}\n";
    let error = sluice_config::load_str(text, "s.yaml", &|_| None, &[])
        .unwrap_err()
        .to_string();
    assert!(error.starts_with("s.yaml:6:"), "{error}");
    assert!(
        error.contains("routes[0].limits[0].key[0]") && error.contains("{session}"),
        "{error}"
    );
}
