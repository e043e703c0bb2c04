//! Loading never panics, whatever the input, environment or overrides.

use proptest::prelude::*;
use sluice_config::load_str;

const EXAMPLE: &str = "\
listen: ${HOST:-127.0.0.1}:8080
admin:
  token: ${SLUICE_ADMIN_TOKEN}
storage:
  backend: memory
  max_keys: 1000000
  on_error: local
limits:
  chat_user:   {rate: [5/minute, 60/hour]}
  chat_ip:     {rate: 30/minute, algorithm: sliding_window}
  a: &a {rate: 1/s, burst: 3}
  b: *a
  \"quoted\": !!map {rate: !!str 5/m}
";

/// The HTTP sections, for mutation.
const HTTP_EXAMPLE: &str = r#"
routes:
  - match: {path: /chat/message, methods: [POST], header: x-api-key}
    limits:
      - {limit: chat_user, key: ["user:{header.x-user-id}", "ip:{client_ip}"], cost: 1}
  - match: {path: "~^/v[0-9]+/"}
    limits: [{limit: chat_ip, key: "{client_ip}"}]
  - match: default
    limits: [{limit: chat_ip, key: all}]
limits:
  chat_user: {rate: 5/minute}
  chat_ip: {rate: 30/minute}
client_ip: {trusted_proxies: [10.0.0.0/8, "::1"], header: forwarded, ipv6_prefix: 56, hash: true, hash_secret: 0123456789abcdef}
responses: {deny_status: 429, headers: [ietf], body: '{"limit": "{limit}"}', content_type: application/json}
forward_auth: {deny_status: 403}
"#;

fn env(name: &str) -> Option<String> {
    match name {
        "SLUICE_ADMIN_TOKEN" => Some("t".to_string()),
        "E" => Some("${E}: [x".to_string()),
        _ => None,
    }
}

fn load(text: &str, overrides: &[(String, String)]) {
    let _ = load_str(text, "fuzz.yaml", &env, overrides).map_err(|error| error.to_string());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn yaml_like_garbage(text in "[a-z0-9_:{}\\[\\],'\"&*!|>#%@`$~?. \n\t-]{0,120}") {
        load(&text, &[]);
    }

    #[test]
    fn any_text(text in any::<String>()) {
        load(&text, &[]);
    }

    #[test]
    fn mutated_example(at in 0usize..EXAMPLE.len(), cut in 0usize..20, insert in "[a-z0-9:{}\\[\\],'\"&*!|>#$ \n-]{0,8}") {
        let mut text = EXAMPLE.to_string();
        let at = (0..=at).rev().find(|i| text.is_char_boundary(*i)).unwrap_or(0);
        let end = (at..=(at + cut).min(text.len())).rev().find(|i| text.is_char_boundary(*i)).unwrap_or(at);
        text.replace_range(at..end, &insert);
        load(&text, &[]);
    }

    #[test]
    fn mutated_http_example(at in 0usize..HTTP_EXAMPLE.len(), cut in 0usize..20, insert in "[a-z0-9:{}\\[\\],'\"&*!|>#$~/ \n-]{0,8}") {
        let mut text = HTTP_EXAMPLE.to_string();
        let at = (0..=at).rev().find(|i| text.is_char_boundary(*i)).unwrap_or(0);
        let end = (at..=(at + cut).min(text.len())).rev().find(|i| text.is_char_boundary(*i)).unwrap_or(at);
        text.replace_range(at..end, &insert);
        load(&text, &[]);
    }

    #[test]
    fn garbage_overrides(name in "SLUICE_[A-Z_]{0,30}", value in "[a-z0-9:{}\\[\\],'\"&*!#$ /-]{0,30}") {
        load(EXAMPLE, &[(name, value)]);
    }
}

#[test]
fn deep_nesting_and_huge_values() {
    load(&"[".repeat(100_000), &[]);
    load(&"{a: ".repeat(10_000), &[]);
    load(&"- ".repeat(10_000), &[]);
    load(
        &format!("storage: {{max_keys: {}}}", "9".repeat(10_000)),
        &[],
    );
    load(
        &format!("limits: {{x: {{rate: {}/s}}}}", "9".repeat(10_000)),
        &[],
    );
    let nested_override = (0..200).map(|_| "A").collect::<Vec<_>>().join("__");
    load(
        "",
        &[(format!("SLUICE_LIMITS__{nested_override}"), "x".to_string())],
    );
    load("", &[("SLUICE_LIMITS".to_string(), "[".repeat(10_000))]);
}

#[test]
fn the_http_example_itself_loads() {
    let result = load_str(HTTP_EXAMPLE, "fuzz.yaml", &env, &[]);
    assert!(result.is_ok(), "{result:?}");
}
