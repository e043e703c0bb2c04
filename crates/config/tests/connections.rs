//! `http:`'s connection bounds (header-read and idle timeouts, the connection cap, the
//! shutdown deadline) and the admin token's minimum length: values, defaults, and errors
//! placed at their line, column and field.

use sluice_config::{Config, ConfigError, HttpConfig, load_str};

fn with(text: &str, vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
    let vars: Vec<(String, String)> = vars
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let env = move |name: &str| vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
    load_str(text, "test.yaml", &env, &[])
}

fn ok(text: &str) -> Config {
    with(text, &[]).unwrap_or_else(|error| panic!("{error}"))
}

fn err(text: &str) -> ConfigError {
    match with(text, &[]) {
        Ok(config) => panic!("expected an error for {text:?}, got {config:?}"),
        Err(error) => error,
    }
}

fn assert_at(error: &ConfigError, line: usize, column: usize, field: &str, message: &str) {
    let shown = error.to_string();
    assert_eq!(error.line, Some(line), "{shown}");
    assert_eq!(error.column, Some(column), "{shown}");
    assert_eq!(error.field.as_deref(), Some(field), "{shown}");
    assert!(error.message.contains(message), "{shown}");
    let prefix = format!("test.yaml:{line}:{column}: {field}: ");
    assert!(
        shown.starts_with(&prefix),
        "{shown:?} should start with {prefix:?}"
    );
}

#[test]
fn connection_bounds_default_to_safe_values() {
    let http = ok("").http;
    assert_eq!(http.header_read_timeout_ms, 10_000);
    assert_eq!(http.body_read_timeout_ms, 10_000);
    assert_eq!(http.idle_timeout_ms, 60_000);
    assert_eq!(http.max_connections, 10_000);
    assert_eq!(http.shutdown_timeout_ms, 25_000);
    assert_eq!(http, HttpConfig::default());
}

#[test]
fn connection_bounds_are_read() {
    let http = ok("\
http:
  header_read_timeout_ms: 250
  body_read_timeout_ms: 300
  idle_timeout_ms: 500
  max_connections: 3
  shutdown_timeout_ms: 0
")
    .http;
    assert_eq!(http.header_read_timeout_ms, 250);
    assert_eq!(http.body_read_timeout_ms, 300);
    assert_eq!(http.idle_timeout_ms, 500);
    assert_eq!(http.max_connections, 3);
    assert_eq!(http.shutdown_timeout_ms, 0);
}

#[test]
fn connection_bounds_out_of_range_are_errors_at_their_value() {
    let error = err("http:\n  header_read_timeout_ms: 0\n");
    assert_at(
        &error,
        2,
        27,
        "http.header_read_timeout_ms",
        "from 1 to 600000",
    );
    let error = err("http:\n  idle_timeout_ms: 3600001\n");
    assert_at(&error, 2, 20, "http.idle_timeout_ms", "from 1 to 3600000");
    let error = err("http:\n  max_connections: 0\n");
    assert_at(&error, 2, 20, "http.max_connections", "from 1 to 1000000");
    let error = err("http:\n  shutdown_timeout_ms: -1\n");
    assert_at(
        &error,
        2,
        24,
        "http.shutdown_timeout_ms",
        "from 0 to 600000",
    );
    let error = err("http:\n  idle_timeout_ms: 1s\n");
    assert_at(
        &error,
        2,
        20,
        "http.idle_timeout_ms",
        "expected a whole number",
    );
    let error = err("http:\n  idle_timeout: 500\n");
    assert_eq!(error.line, Some(2), "{error}");
    assert!(error.to_string().contains("idle_timeout_ms"), "{error}");
}

#[test]
fn a_short_or_blank_admin_token_is_an_error() {
    let error = err("admin:\n  token: \"   \"\n");
    assert_at(&error, 2, 10, "admin.token", "only whitespace");
    let error = err("admin:\n  token: secret-token\n");
    assert_at(
        &error,
        2,
        10,
        "admin.token",
        "admin.token is 12 bytes, shorter than 16",
    );
    // Surrounding whitespace does not count towards the length.
    let error = err("admin:\n  token: \"  0123456789abcde  \"\n");
    assert_at(&error, 2, 10, "admin.token", "15 bytes");
    // A short token from the environment is refused at the place it is used.
    let error = match with("admin:\n  token: ${TOKEN}\n", &[("TOKEN", "short")]) {
        Ok(_) => panic!("a 5-byte token from ${{TOKEN}} was accepted"),
        Err(error) => error,
    };
    assert_at(&error, 2, 10, "admin.token", "5 bytes");
    let token = ok("admin:\n  token: 0123456789abcdef\n").admin.token;
    assert_eq!(
        token.map(|t| t.expose().to_string()).as_deref(),
        Some("0123456789abcdef")
    );
}
