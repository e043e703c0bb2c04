//! What a user of the config file notices: values, defaults and error messages.

use std::collections::HashMap;
use std::path::PathBuf;

use sluice_config::{Backend, Config, ConfigError, OnError, load, load_str};
use sluice_engine::Algorithm;

const EXAMPLE: &str = "\
listen: 127.0.0.1:8080
admin:
  token: ${SLUICE_ADMIN_TOKEN}
storage:
  backend: memory
  max_keys: 1000000
  on_error: local
limits:
  chat_user:   {rate: [5/minute, 60/hour]}
  chat_ip:     {rate: 30/minute, algorithm: sliding_window}
  playground:  {rate: 50/day, algorithm: fixed_window}
  widget_ip:   {rate: 3/minute, charge_denied: true}
  global:      {rate: 10000/hour, shadow: true}
  burst_demo:  {rate: 10/second, burst: 20}
";

fn env_of(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
    let map: HashMap<String, String> = vars
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    move |name: &str| map.get(name).cloned()
}

fn with(
    text: &str,
    vars: &[(&str, &str)],
    overrides: &[(&str, &str)],
) -> Result<Config, ConfigError> {
    let overrides: Vec<(String, String)> = overrides
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    load_str(text, "test.yaml", &env_of(vars), &overrides)
}

fn ok(text: &str) -> Config {
    with(text, &[], &[]).unwrap_or_else(|error| panic!("{error}"))
}

fn err(text: &str) -> ConfigError {
    match with(text, &[], &[]) {
        Ok(config) => panic!("expected an error, got {config:?}"),
        Err(error) => error,
    }
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

fn rates(config: &Config, name: &str) -> Vec<String> {
    let limit = config
        .limits
        .get(name)
        .unwrap_or_else(|| panic!("no limit {name}"));
    limit
        .windows()
        .iter()
        .map(|w| w.rate_text.to_string())
        .collect()
}

#[test]
fn the_design_example_loads_with_its_values() {
    let config = with(
        EXAMPLE,
        &[("SLUICE_ADMIN_TOKEN", "s3cret-s3cret-s3cret")],
        &[],
    )
    .unwrap();
    assert_eq!(config.listen, "127.0.0.1:8080".parse().unwrap());
    assert_eq!(
        config.admin.token.as_ref().map(|t| t.expose()),
        Some("s3cret-s3cret-s3cret")
    );
    assert_eq!(config.storage.backend, Backend::Memory);
    assert_eq!(config.storage.max_keys, 1_000_000);
    assert_eq!(config.storage.on_error, OnError::Local);
    assert_eq!(config.storage.prefix, "sluice:");
    assert_eq!(config.storage.sweep_interval_ms, 1000);
    assert_eq!(config.http.max_body_bytes, 65536);

    let names: Vec<&str> = config.limits.iter().map(|l| l.name()).collect();
    assert_eq!(
        names,
        [
            "chat_user",
            "chat_ip",
            "playground",
            "widget_ip",
            "global",
            "burst_demo"
        ],
        "limits keep the file's order"
    );
    assert_eq!(rates(&config, "chat_user"), ["5/minute", "60/hour"]);
    assert_eq!(
        config.limits.get("chat_user").unwrap().algorithm(),
        Algorithm::Gcra
    );
    assert_eq!(
        config.limits.get("chat_ip").unwrap().algorithm(),
        Algorithm::SlidingWindow
    );
    assert_eq!(rates(&config, "playground"), ["50/day"]);
    assert_eq!(
        config.limits.get("playground").unwrap().algorithm(),
        Algorithm::FixedWindow
    );
    assert!(config.limits.get("widget_ip").unwrap().charge_denied());
    assert!(!config.limits.get("widget_ip").unwrap().shadow());
    assert!(config.limits.get("global").unwrap().shadow());
    let burst = config.limits.get("burst_demo").unwrap();
    assert_eq!(burst.windows()[0].window.capacity(), 20);
}

#[test]
fn the_admin_token_never_shows_in_debug_output() {
    let config = with(
        EXAMPLE,
        &[("SLUICE_ADMIN_TOKEN", "s3cret-s3cret-s3cret")],
        &[],
    )
    .unwrap();
    let shown = format!("{config:?}");
    assert!(!shown.contains("s3cret"), "{shown}");
    assert!(shown.contains("[redacted]"), "{shown}");
    let token = config.admin.token.unwrap();
    assert_eq!(token.to_string(), "[redacted]");
}

#[test]
fn the_quickstart_example_loads() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/quickstart.yaml");
    let config = load(&path).unwrap_or_else(|error| panic!("{error}"));
    assert_eq!(config.listen, "127.0.0.1:8080".parse().unwrap());
    assert_eq!(config.storage.backend, Backend::Memory);
    assert_eq!(rates(&config, "chat_user"), ["5/minute", "60/hour"]);
    assert_eq!(rates(&config, "chat_ip"), ["30/minute"]);
    assert_eq!(
        config.limits.get("chat_ip").unwrap().algorithm(),
        Algorithm::SlidingWindow
    );
    assert_eq!(rates(&config, "global"), ["10000/hour"]);
}

#[test]
fn a_missing_file_is_named_in_the_error() {
    let error = load(std::path::Path::new("/nonexistent/sluice.yaml")).unwrap_err();
    assert_eq!(error.line, None);
    let shown = error.to_string();
    assert!(
        shown.starts_with("/nonexistent/sluice.yaml: cannot read the config file"),
        "{shown}"
    );
}

#[test]
fn absent_sections_take_their_defaults() {
    for text in [
        "",
        "\n# only a comment\n",
        "---\n",
        "limits:\n",
        "limits: {}\n",
        "storage: {}\nadmin:\nhttp: ~\n",
    ] {
        let config = ok(text);
        assert_eq!(config.listen, "127.0.0.1:8080".parse().unwrap(), "{text:?}");
        assert!(config.admin.token.is_none());
        assert_eq!(config.storage, sluice_config::StorageConfig::default());
        assert_eq!(config.storage.max_keys, 1_000_000);
        assert_eq!(config.storage.on_error, OnError::Local);
        assert_eq!(config.storage.prefix, "sluice:");
        assert_eq!(config.storage.sweep_interval_ms, 1000);
        assert_eq!(config.http.max_body_bytes, 65536);
        assert!(config.limits.is_empty());
    }
}

#[test]
fn every_storage_and_http_field_is_read() {
    let config = ok("\
listen: '[::1]:9000'
storage:
  backend: memory
  max_keys: 5
  on_error: deny
  prefix: \"prod:sluice:\"
  sweep_interval_ms: 250
http: {max_body_bytes: 1024}
");
    assert_eq!(config.listen, "[::1]:9000".parse().unwrap());
    assert_eq!(config.storage.max_keys, 5);
    assert_eq!(config.storage.on_error, OnError::Deny);
    assert_eq!(config.storage.prefix, "prod:sluice:");
    assert_eq!(config.storage.sweep_interval_ms, 250);
    assert_eq!(config.http.max_body_bytes, 1024);
    assert_eq!(
        ok("storage: {on_error: allow}").storage.on_error,
        OnError::Allow
    );
    assert_eq!(
        ok("listen: localhost:7000").listen,
        "127.0.0.1:7000".parse().unwrap()
    );
}

// ---- errors: file, line, column and field ----

#[test]
fn a_bad_rate_is_reported_at_its_value() {
    let error = err("limits:\n  chat_user: {rate: 5/minit}\n");
    assert_at(&error, 2, 21, "limits.chat_user.rate", "unknown unit");
    let error = err("limits:\n  chat_user:\n    rate:\n      - 5/minute\n      - 60 per hour\n");
    assert_at(&error, 5, 9, "limits.chat_user.rate[1]", "has no '/'");
}

#[test]
fn an_unknown_field_names_the_valid_ones() {
    let error = err("limits:\n  chat_user: {rat: 5/minute}\n");
    assert_at(
        &error,
        2,
        15,
        "limits.chat_user.rat",
        "unknown field `rat`, expected one of `rate`, `algorithm`, `burst`, `charge_denied`, `shadow`",
    );
    let error = err("storage:\n  backend: memory\n  max_key: 5\n");
    assert_at(
        &error,
        3,
        3,
        "storage.max_key",
        "unknown field `max_key`, expected one of `backend`, `max_keys`",
    );
}

#[test]
fn an_unknown_top_level_key_is_an_error() {
    let error = err("listen: 127.0.0.1:8080\nlimts:\n  a: {rate: 1/s}\n");
    assert_at(
        &error,
        2,
        1,
        "limts",
        "unknown field `limts`, expected one of `listen`, `admin`, `storage`, `limits`, `http`",
    );
}

#[test]
fn a_duplicate_key_is_an_error() {
    let error = err("limits:\n  a: {rate: 1/s}\n  b: {rate: 1/s}\n  a: {rate: 2/s}\n");
    assert_at(
        &error,
        4,
        3,
        "limits.a",
        "duplicate key `a` (first defined on line 2)",
    );
    let error = err("storage: {max_keys: 1, max_keys: 2}\n");
    assert_at(
        &error,
        1,
        24,
        "storage.max_keys",
        "duplicate key `max_keys`",
    );
}

#[test]
fn engine_errors_found_after_parsing_are_placed_at_their_field() {
    let error = err("limits:\n  x: {rate: 5/minute, algorithm: fixed_window, burst: 10}\n");
    assert_at(
        &error,
        2,
        55,
        "limits.x.burst",
        "burst only applies to algorithm gcra",
    );

    let error = err("limits:\n  x:\n    rate: [5/minute, 60/hour, 10/1m]\n");
    assert_at(&error, 3, 31, "limits.x.rate[2]", "have the same period");

    let error = err("limits:\n  x: {rate: 5/minute, algorithm: leaky}\n");
    assert_at(
        &error,
        2,
        34,
        "limits.x.algorithm",
        "unknown algorithm \"leaky\"",
    );

    let error = err("limits:\n  x: {rate: [1/s, 5/m], burst: 3}\n");
    assert_at(&error, 2, 32, "limits.x.burst", "one rate");

    let error = err("limits:\n  \"chat user\": {rate: 1/s}\n");
    assert_at(
        &error,
        2,
        3,
        "limits.chat user",
        "limit name \"chat user\" is invalid",
    );

    let error = err("limits:\n  x: {rate: 2000000/second}\n");
    assert_at(&error, 2, 13, "limits.x.rate", "too fine for gcra");
}

#[test]
fn a_calendar_month_rate_needs_the_fixed_window() {
    // gcra by default: the error is at the rate, and says what to write.
    let error = err("limits:\n  budget:\n    rate: 100/month\n");
    assert_at(
        &error,
        3,
        11,
        "limits.budget.rate",
        "rate 100/month counts UTC calendar months, which only algorithm fixed_window can do, not gcra; set algorithm: fixed_window",
    );
    let error = err("limits:\n  budget: {rate: [10/day, 100/mo], algorithm: sliding_window}\n");
    assert_at(
        &error,
        2,
        27,
        "limits.budget.rate[1]",
        "not sliding_window; set algorithm: fixed_window",
    );
    let error = err("limits:\n  budget: {rate: 100/3months, algorithm: fixed_window}\n");
    assert_at(
        &error,
        2,
        18,
        "limits.budget.rate",
        "calendar months take no multiplier; write N/month",
    );

    let config = ok("limits:\n  budget: {rate: [100/months, 10/day], algorithm: fixed_window}\n");
    assert_eq!(rates(&config, "budget"), ["100/month", "10/day"]);
    let budget = config.limits.get("budget").expect("budget");
    assert_eq!(&*budget.windows()[0].counter, "budget:f1mo");
}

#[test]
fn a_limit_without_a_rate_is_an_error() {
    let error = err("limits: {x: {}}\n");
    assert_at(&error, 1, 10, "limits.x", "missing field `rate`");
    let error = err("limits:\n  x:\n  y: {rate: 1/s}\n");
    assert_at(&error, 2, 3, "limits.x", "no settings");
    let error = err("limits:\n  x: {rate: []}\n");
    assert_at(&error, 2, 13, "limits.x.rate", "at least one rate");
}

#[test]
fn wrong_types_are_reported_with_what_was_found() {
    let error = err("storage:\n  max_keys: lots\n");
    assert_at(
        &error,
        2,
        13,
        "storage.max_keys",
        "expected a whole number at least 1, found the string `lots`",
    );
    let error = err("storage:\n  max_keys: \"5000\"\n");
    assert_at(&error, 2, 13, "storage.max_keys", "remove the quotes");
    let error = err("storage:\n  max_keys: 0\n");
    assert_at(
        &error,
        2,
        13,
        "storage.max_keys",
        "must be at least 1, found 0",
    );
    let error = err("storage:\n  sweep_interval_ms: 5\n");
    assert_at(&error, 2, 22, "storage.sweep_interval_ms", "at least 10");
    let error = err("http:\n  max_body_bytes: 99999999\n");
    assert_at(&error, 2, 19, "http.max_body_bytes", "from 64 to 16777216");
    let error = err("limits:\n  x: {rate: 1/s, shadow: yes}\n");
    assert_at(
        &error,
        2,
        26,
        "limits.x.shadow",
        "expected true or false, found the string `yes`",
    );
    let error = err("storage: [memory]\n");
    assert_at(&error, 1, 10, "storage", "expected a mapping");
    let error = err("limits: [a, b]\n");
    assert_at(&error, 1, 9, "limits", "expected a mapping of limit names");
    let error = err("storage:\n  max_keys: -3\n");
    assert_at(
        &error,
        2,
        13,
        "storage.max_keys",
        "must be at least 1, found -3",
    );
}

#[test]
fn unknown_storage_backends_list_the_known_ones() {
    let error = err("storage:\n  backend: mongo\n");
    assert_at(
        &error,
        2,
        12,
        "storage.backend",
        "unknown storage backend `mongo`: use memory",
    );
    let error = err("storage:\n  on_error: ignore\n");
    assert_at(
        &error,
        2,
        13,
        "storage.on_error",
        "expected one of `allow`, `deny`, `local`",
    );
}

#[test]
fn a_bad_listen_address_is_explained() {
    let error = err("listen: 8080\n");
    assert_at(&error, 1, 9, "listen", "a port without an address");
    let error = err("\n\nlisten: example.com\n");
    assert_at(&error, 3, 9, "listen", "not an address to listen on");
}

#[test]
fn an_empty_admin_token_is_an_error() {
    let error = err("admin:\n  token: \"\"\n");
    assert_at(
        &error,
        2,
        10,
        "admin.token",
        "admin.token is empty: set it or remove it",
    );
    // An empty variable is an empty token too, not silently "no token".
    let error = err_with("admin:\n  token: ${TOKEN}\n", &[("TOKEN", "")], &[]);
    assert_at(&error, 2, 10, "admin.token", "admin.token is empty");
    // An explicit null means no token (admin calls disabled).
    assert!(ok("admin:\n  token: ~\n").admin.token.is_none());
}

#[test]
fn yaml_syntax_errors_carry_a_position() {
    let error = err("storage:\n  backend: memory\n    max_keys: 5\n");
    assert_eq!(error.line, Some(3), "{error}");
    assert!(error.message.starts_with("invalid YAML:"), "{error}");
    assert!(error.to_string().starts_with("test.yaml:3:"), "{error}");

    let error = err("limits:\n  x: {rate: [1/s, 2/m}\n");
    assert_eq!(error.line, Some(2), "{error}");
    assert!(error.message.starts_with("invalid YAML:"), "{error}");

    let error = err("storage:\n\tbackend: memory\n");
    assert_eq!(error.line, Some(2), "{error}");
}

#[test]
fn one_document_only_and_only_core_tags() {
    let error = err("listen: 127.0.0.1:1\n---\nlisten: 127.0.0.1:2\n");
    assert_eq!(error.line, Some(2), "{error}");
    assert!(error.message.contains("one YAML document"), "{error}");
    let error = err("storage:\n  prefix: !custom x\n");
    assert_eq!(
        (error.line, error.field.as_deref()),
        (Some(2), Some("storage.prefix")),
        "{error}"
    );
    assert!(error.message.contains("unsupported tag"), "{error}");
    // !!str makes a number a string; !!int checks the value.
    assert_eq!(ok("storage: {prefix: !!str 123}").storage.prefix, "123");
    assert_eq!(ok("storage: {max_keys: !!int 7}").storage.max_keys, 7);
    assert!(
        err("storage: {max_keys: !!int x}")
            .message
            .contains("not a valid")
    );
}

#[test]
fn anchors_and_aliases_work_and_cannot_explode() {
    let config = ok("limits:\n  a: &r {rate: 1/s}\n  b: *r\n");
    assert_eq!(rates(&config, "b"), ["1/second"]);
    let mut bomb = String::from("a: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
    for i in 1..10 {
        let prev = i - 1;
        bomb.push_str(&format!(
            "a{i}: &a{i} [*a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}]\n"
        ));
    }
    let error = err(&bomb);
    assert!(error.message.contains("more than"), "{error}");
}

// ---- interpolation ----

#[test]
fn interpolation_with_defaults_missing_variables_and_dollars() {
    let text = "\
listen: ${HOST:-127.0.0.1}:${PORT:-8080}
storage:
  max_keys: ${MAX:-5000}
  prefix: \"${PREFIX:-app}:$$x:\"
";
    let config = ok(text);
    assert_eq!(config.listen, "127.0.0.1:8080".parse().unwrap());
    assert_eq!(
        config.storage.max_keys, 5000,
        "an interpolated plain value is typed as written there"
    );
    assert_eq!(config.storage.prefix, "app:$x:");

    let config = with(
        text,
        &[("PORT", "9999"), ("MAX", "7"), ("PREFIX", "p")],
        &[],
    )
    .unwrap();
    assert_eq!(config.listen, "127.0.0.1:9999".parse().unwrap());
    assert_eq!(config.storage.max_keys, 7);
    assert_eq!(config.storage.prefix, "p:$x:");

    let error = err("storage:\n  backend: memory\n  prefix: ${NOT_SET}\n");
    assert_at(
        &error,
        3,
        11,
        "storage.prefix",
        "environment variable `NOT_SET` is not set",
    );

    let error = err("storage:\n  prefix: ${BROKEN\n");
    assert_at(&error, 2, 11, "storage.prefix", "without a closing");
}

#[test]
fn interpolated_values_cannot_break_the_structure() {
    let text = "admin:\n  token: ${TOKEN}\nstorage:\n  prefix: ${PREFIX}\n";
    let config = with(
        text,
        &[("TOKEN", "a: b # not a comment"), ("PREFIX", "[x, y]")],
        &[],
    )
    .unwrap();
    assert_eq!(config.admin.token.unwrap().expose(), "a: b # not a comment");
    assert_eq!(config.storage.prefix, "[x, y]");
}

#[test]
fn keys_and_comments_are_not_interpolated() {
    let config = ok("# ${UNSET} in a comment is fine\nlimits:\n  a: {rate: 1/s}\n");
    assert_eq!(config.limits.len(), 1);
    let error = err("limits:\n  ${X}: {rate: 1/s}\n");
    assert!(error.message.contains("is invalid"), "{error}");
}

// ---- SLUICE_* overrides ----

#[test]
fn overrides_set_nested_fields_lists_and_new_entries() {
    let config = with(
        EXAMPLE,
        &[("SLUICE_ADMIN_TOKEN", "from-the-file-0123")],
        &[
            ("SLUICE_LISTEN", "0.0.0.0:9000"),
            ("SLUICE_STORAGE__MAX_KEYS", "5000"),
            ("SLUICE_ADMIN__TOKEN", "from-env: #1 0123456789"),
            ("SLUICE_LIMITS__CHAT_USER__RATE", "[10/minute, 100/hour]"),
            ("SLUICE_LIMITS__CHAT_IP__RATE", "7/minute"),
            ("SLUICE_LIMITS__NEW_ONE__RATE", "1/second"),
            ("SLUICE_HTTP__MAX_BODY_BYTES", "4096"),
        ],
    )
    .unwrap();
    assert_eq!(config.listen, "0.0.0.0:9000".parse().unwrap());
    assert_eq!(config.storage.max_keys, 5000);
    assert_eq!(config.storage.on_error, OnError::Local, "siblings are kept");
    assert_eq!(
        config.admin.token.as_ref().unwrap().expose(),
        "from-env: #1 0123456789"
    );
    assert_eq!(rates(&config, "chat_user"), ["10/minute", "100/hour"]);
    assert_eq!(rates(&config, "chat_ip"), ["7/minute"]);
    assert_eq!(
        config.limits.get("chat_ip").unwrap().algorithm(),
        Algorithm::SlidingWindow,
        "the rest of the limit is kept"
    );
    assert_eq!(rates(&config, "new_one"), ["1/second"]);
    assert_eq!(config.limits.iter().last().unwrap().name(), "new_one");
    assert_eq!(config.http.max_body_bytes, 4096);
}

#[test]
fn overrides_create_missing_sections() {
    let config = with(
        "",
        &[],
        &[
            ("SLUICE_STORAGE__ON_ERROR", "deny"),
            ("SLUICE_LIMITS__A", "{rate: 3/hour}"),
        ],
    )
    .unwrap();
    assert_eq!(config.storage.on_error, OnError::Deny);
    assert_eq!(rates(&config, "a"), ["3/hour"]);
}

#[test]
fn other_sluice_variables_are_ignored() {
    let config = with(
        "listen: 127.0.0.1:1234\n",
        &[],
        &[
            ("SLUICE_LOG", "debug"),
            ("SLUICE_LOG_FORMAT", "json"),
            ("SLUICE_CONFIG", "/etc/sluice.yaml"),
            ("SLUICE_ADMIN_TOKEN", "x"),
            ("HOME", "/root"),
        ],
    )
    .unwrap();
    assert_eq!(config.listen, "127.0.0.1:1234".parse().unwrap());
    assert!(config.admin.token.is_none());
}

#[test]
fn an_override_naming_an_unknown_field_names_the_variable() {
    let error = err_with(
        "storage: {backend: memory}\n",
        &[],
        &[("SLUICE_STORAGE__MAX_KEY", "5")],
    );
    assert!(error.is_env_override());
    assert_eq!(error.source, "SLUICE_STORAGE__MAX_KEY");
    assert_eq!(error.field.as_deref(), Some("storage.max_key"));
    assert_eq!(error.line, None);
    assert_eq!(
        error.to_string(),
        "SLUICE_STORAGE__MAX_KEY (overrides storage.max_key): unknown field `max_key`, expected one of `backend`, `max_keys`, `on_error`, `prefix`, `sweep_interval_ms`, `path`, `sync`, `url`, `timeout_ms`, `cluster`, `tls`, `sentinel`, `local_deny_cache`, `schema`, `pool_size`, `migrate`, `unlogged`"
    );
    let error = err_with("", &[], &[("SLUICE_LIMITS__CHAT_USER__RAT", "5/minute")]);
    assert!(
        error.to_string().starts_with(
            "SLUICE_LIMITS__CHAT_USER__RAT (overrides limits.chat_user.rat): unknown field `rat`"
        ),
        "{error}"
    );
}

#[test]
fn a_bad_override_value_names_the_variable() {
    let error = err_with(
        EXAMPLE,
        &[("SLUICE_ADMIN_TOKEN", "t0123456789abcdef")],
        &[("SLUICE_STORAGE__MAX_KEYS", "many")],
    );
    assert_eq!(
        error.to_string(),
        "SLUICE_STORAGE__MAX_KEYS (overrides storage.max_keys): expected a whole number at least 1, found the string `many`"
    );
    let error = err_with("", &[], &[("SLUICE_LIMITS__X__RATE", "[5/minute, 5/m]")]);
    assert_eq!(
        error.to_string(),
        "SLUICE_LIMITS__X__RATE (overrides limits.x.rate): limits.x.rate[1]: rates 5/minute and 5/minute have the same period; keep one, or put the other in a separate limit"
    );
    let error = err_with("", &[], &[("SLUICE_LIMITS__X__RATE", "[5/minute")]);
    assert!(
        error.message.contains("cannot read the value as YAML"),
        "{error}"
    );
    let error = err_with(
        "listen: 127.0.0.1:1\n",
        &[],
        &[("SLUICE_LISTEN__PORT", "5")],
    );
    assert!(error.message.contains("not a mapping"), "{error}");
    let error = err_with("", &[], &[("SLUICE_STORAGE____MAX_KEYS", "5")]);
    assert!(error.message.contains("empty segment"), "{error}");
    let error = err_with("", &[], &[("SLUICE_ADMIN__TOKEN", "")]);
    assert!(error.message.contains("admin.token is empty"), "{error}");
}

#[test]
fn disk_backend_reads_path_and_sync() {
    let config = ok("storage:\n  backend: disk\n  path: /var/lib/sluice\n");
    assert_eq!(config.storage.backend, Backend::Disk);
    assert_eq!(config.storage.backend.to_string(), "disk");
    assert_eq!(
        config.storage.path.as_deref(),
        Some(std::path::Path::new("/var/lib/sluice"))
    );
    assert!(!config.storage.sync, "sync defaults to false");
    let config = ok("storage: {backend: disk, path: data, sync: true, max_keys: 10}\n");
    assert!(config.storage.sync);
    assert_eq!(config.storage.max_keys, 10);
    assert_eq!(
        config.storage.path.as_deref(),
        Some(std::path::Path::new("data"))
    );
    assert_eq!(ok("listen: 127.0.0.1:1\n").storage.path, None);
}

#[test]
fn disk_backend_errors_name_the_line() {
    let error = err("limits: {}\nstorage:\n  backend: disk\n");
    assert_at(
        &error,
        3,
        12,
        "storage.path",
        "backend disk needs a data directory",
    );
    let error = err("storage:\n  backend: disk\n  path: \"\"\n");
    assert_at(&error, 3, 9, "storage.path", "is empty");
    let error = err("storage:\n  path: /tmp/x\n");
    assert_at(&error, 2, 9, "storage.path", "only applies to backend disk");
    let error = err("storage:\n  backend: memory\n  sync: true\n");
    assert_at(&error, 3, 9, "storage.sync", "only applies to backend disk");
    let error = err("storage:\n  backend: disk\n  path: /tmp/x\n  sync: yes please\n");
    assert_at(&error, 4, 9, "storage.sync", "expected true or false");
    let error = err("storage:\n  backend: mysql\n");
    assert_at(
        &error,
        2,
        12,
        "storage.backend",
        "use memory, disk, redis or postgres",
    );
}

#[test]
fn postgres_backend_reads_its_fields() {
    let config = ok("storage:\n  backend: postgres\n  url: postgres://u:pw@10.0.0.9:5432/rl\n");
    let Backend::Postgres {
        url,
        schema,
        pool_size,
        timeout_ms,
        migrate,
        unlogged,
    } = &config.storage.backend
    else {
        panic!("postgres backend");
    };
    assert_eq!(url.expose(), "postgres://u:pw@10.0.0.9:5432/rl");
    assert_eq!(
        (
            schema.as_str(),
            *pool_size,
            *timeout_ms,
            *migrate,
            *unlogged
        ),
        ("public", 16, 200, true, false)
    );
    assert_eq!(config.storage.backend.to_string(), "postgres");
    let debug = format!("{:?}", config.storage);
    assert!(
        !debug.contains("10.0.0.9") && !debug.contains("pw"),
        "the url (which may hold a password) is not in Debug output: {debug}"
    );
    let config = ok("storage:
  backend: postgres
  url: postgresql://h/db
  schema: rate_limits
  pool_size: 4
  timeout_ms: 50
  migrate: false
  unlogged: true
  prefix: \"a:\"
  on_error: deny
");
    assert_eq!(
        config.storage.backend,
        Backend::Postgres {
            url: sluice_config::Secret::new("postgresql://h/db"),
            schema: "rate_limits".to_string(),
            pool_size: 4,
            timeout_ms: 50,
            migrate: false,
            unlogged: true,
        }
    );
    assert_eq!(config.storage.prefix, "a:");
}

#[test]
fn postgres_backend_errors_name_the_line_and_never_show_the_url() {
    let error = err("storage:\n  backend: postgres\n");
    assert_at(&error, 2, 12, "storage.url", "backend postgres needs a url");
    let error = err("storage:\n  backend: postgres\n  url: mysql://u:hunter2@h/db\n");
    assert_at(&error, 3, 8, "storage.url", "must be a PostgreSQL URL");
    assert!(!error.to_string().contains("hunter2"), "{error}");
    let error = err("storage:\n  backend: postgres\n  url: redis://h\n");
    assert_at(&error, 3, 8, "storage.url", "must be a PostgreSQL URL");
    let error = err("storage:\n  backend: postgres\n  url: postgres://h\n  schema: Rate-Limits\n");
    assert_at(
        &error,
        4,
        11,
        "storage.schema",
        "plain lowercase PostgreSQL identifier",
    );
    let error = err("storage:\n  backend: postgres\n  url: postgres://h\n  pool_size: 0\n");
    assert_at(&error, 4, 14, "storage.pool_size", "");
    let error = err("storage:\n  backend: postgres\n  url: postgres://h\n  migrate: maybe\n");
    assert_at(&error, 4, 12, "storage.migrate", "expected true or false");
    let error = err("storage:\n  backend: postgres\n  url: postgres://h\n  cluster: true\n");
    assert_at(
        &error,
        4,
        12,
        "storage.cluster",
        "only applies to backend redis",
    );
    let error = err("storage:\n  backend: redis\n  url: redis://h\n  unlogged: true\n");
    assert_at(
        &error,
        4,
        13,
        "storage.unlogged",
        "only applies to backend postgres",
    );
    let error = err("storage:\n  schema: sluice\n");
    assert_at(
        &error,
        2,
        11,
        "storage.schema",
        "only applies to backend postgres",
    );
    let error = err("storage:\n  backend: postgres\n  url: postgres://h\n  path: /tmp/x\n");
    assert_at(&error, 4, 9, "storage.path", "only applies to backend disk");
}

#[test]
fn redis_backend_reads_url_timeout_and_cluster() {
    let config = ok("storage:\n  backend: redis\n  url: redis://10.0.0.1:6379/2\n");
    let Backend::Redis {
        url,
        timeout_ms,
        cluster,
        ..
    } = &config.storage.backend
    else {
        panic!("redis backend");
    };
    assert_eq!(url.expose(), "redis://10.0.0.1:6379/2");
    assert_eq!((*timeout_ms, *cluster), (200, false));
    assert!(matches!(
        config.storage.backend,
        Backend::Redis {
            local_deny_cache: true,
            ..
        }
    ));
    let off = ok("storage:\n  backend: redis\n  url: redis://h\n  local_deny_cache: false\n");
    assert!(matches!(
        off.storage.backend,
        Backend::Redis {
            local_deny_cache: false,
            ..
        }
    ));
    assert_eq!(config.storage.backend.to_string(), "redis");
    assert!(
        !format!("{:?}", config.storage).contains("10.0.0.1"),
        "the url (which may hold a password) is not in Debug output"
    );
    let config = ok(
        "storage:\n  backend: redis\n  url: redis://h:1\n  timeout_ms: 50\n  cluster: true\n  prefix: \"a:\"\n",
    );
    assert!(matches!(
        config.storage.backend,
        Backend::Redis {
            timeout_ms: 50,
            cluster: true,
            ..
        }
    ));
    assert_eq!(config.storage.prefix, "a:");
    let config =
        ok("storage:\n  backend: redis\n  cluster: [redis://n1:7000, \"redis://n2:7001\"]\n");
    let Backend::Redis {
        url,
        cluster,
        cluster_seeds,
        ..
    } = &config.storage.backend
    else {
        panic!("redis backend");
    };
    assert!(*cluster, "a list of nodes means a cluster");
    assert_eq!(url.expose(), "redis://n1:7000", "the first node is the url");
    assert_eq!(
        cluster_seeds.iter().map(|s| s.expose()).collect::<Vec<_>>(),
        vec!["redis://n2:7001"]
    );
}

#[test]
fn redis_backend_errors_name_the_line() {
    let error = err("storage:\n  backend: redis\n");
    assert_at(&error, 2, 12, "storage.url", "backend redis needs a url");
    let error = err("storage:\n  backend: redis\n  url: localhost:6379\n");
    assert_at(&error, 3, 8, "storage.url", "must be a Redis URL");
    let error = err("storage:\n  backend: redis\n  url: redis://h\n  timeout_ms: 0\n");
    assert_at(&error, 4, 15, "storage.timeout_ms", "");
    let error = err("storage:\n  url: redis://h\n");
    assert_at(&error, 2, 8, "storage.url", "only applies to backend redis");
    let error = err("storage:\n  backend: disk\n  path: /tmp/x\n  cluster: true\n");
    assert_at(
        &error,
        4,
        12,
        "storage.cluster",
        "only applies to backend redis",
    );
    let error = err("storage:\n  backend: redis\n  cluster: [redis://a:1, b:2]\n");
    assert_at(&error, 3, 26, "storage.cluster[1]", "must be a Redis URL");
    let error = err("storage:\n  backend: redis\n  cluster: []\n");
    assert_at(&error, 3, 12, "storage.cluster", "lists no node");
    let error = err("storage:\n  backend: redis\n  url: redis://h\n  cluster: yes please\n");
    assert_at(&error, 4, 12, "storage.cluster", "true, false or a list");
    let error = err("storage:\n  backend: redis\n  url: redis://h\n  path: /tmp/x\n");
    assert_at(&error, 4, 9, "storage.path", "only applies to backend disk");
    let error = err("storage:\n  local_deny_cache: false\n");
    assert_at(
        &error,
        2,
        21,
        "storage.local_deny_cache",
        "only applies to backend redis",
    );
    let error = err("storage:\n  backend: redis\n  url: redis://h\n  local_deny_cache: maybe\n");
    assert_at(&error, 4, 21, "storage.local_deny_cache", "");
}

/// Every example config in the repository loads (with the secrets it names set).
#[test]
fn every_example_config_loads() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples");
    let mut seen = 0;
    let mut dirs = vec![root];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).expect("examples") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "yaml") {
                continue;
            }
            let text = std::fs::read_to_string(&path).expect("read");
            let env = |name: &str| (name == "JWT_SECRET").then(|| "x".repeat(32));
            sluice_config::load_str(&text, &path.to_string_lossy(), &env, &[])
                .unwrap_or_else(|error| panic!("{}: {error}", path.display()));
            seen += 1;
        }
    }
    assert!(seen >= 3, "the examples were found ({seen})");
}

/// Settings that let a client pick its own plan, or an attacker on the path swap the
/// token keys, load with a warning that says so and what to use instead.
#[test]
fn unsafe_identity_settings_load_with_a_warning() {
    let text = "jwt:\n  algorithms: [RS256]\n  jwks_url: http://id.example.com/jwks.json\n\
                plan_from: \"{header.x-plan}\"\nlimits:\n  a: {rate: 1/second}\n\
                proxy:\n  upstream: http://127.0.0.1:9000\nadmin:\n  listen: 127.0.0.1:8089\n";
    let config = load_str(text, "w.yaml", &|_| None, &[]).expect("loads");
    let warnings = config.warnings().join("\n");
    assert!(
        warnings.contains("plan_from") && warnings.contains("{jwt.plan}"),
        "{warnings}"
    );
    assert!(
        warnings.contains("plain http") && warnings.contains("https"),
        "{warnings}"
    );

    let safe = text
        .replace("http://id.example.com", "https://id.example.com")
        .replace("{header.x-plan}", "{jwt.plan}");
    let config = load_str(&safe, "w.yaml", &|_| None, &[]).expect("loads");
    assert!(config.warnings().is_empty(), "{:?}", config.warnings());
}

#[test]
fn redis_sentinel_and_tls_settings_are_read_and_checked_at_their_place() {
    let config = ok(
        "storage:\n  backend: redis\n  sentinel: {master: mymaster, nodes: [redis://s1:26379, redis://s2:26379]}\n",
    );
    let Backend::Redis {
        url,
        sentinel: Some(sentinel),
        tls: None,
        cluster: false,
        ..
    } = &config.storage.backend
    else {
        panic!("redis through sentinel: {:?}", config.storage.backend);
    };
    assert_eq!(url.expose(), "", "the url is optional with sentinel");
    assert_eq!(sentinel.master, "mymaster");
    assert_eq!(
        sentinel
            .nodes
            .iter()
            .map(|n| n.expose())
            .collect::<Vec<_>>(),
        ["redis://s1:26379", "redis://s2:26379"]
    );
    let error = err("storage:\n  backend: redis\n  sentinel: {nodes: [redis://s1:26379]}\n");
    assert_at(&error, 3, 13, "storage.sentinel", "needs `master`");
    let error = err("storage:\n  backend: redis\n  url: redis://h\n  tls: {ca_file: x.pem}\n");
    assert_at(&error, 4, 8, "storage.tls", "not rediss://");
    let error = err("storage:\n  backend: redis\n  url: rediss://h\n  tls: {}\n");
    assert_at(&error, 4, 8, "storage.tls", "names no file");
    let error = err(
        "storage:\n  backend: redis\n  url: rediss://h\n  tls: {ca_file: /nonexistent/ca.pem}\n",
    );
    assert_at(&error, 4, 18, "storage.tls.ca_file", "cannot read");
    let error = err("storage:\n  backend: postgres\n  url: postgres://h\n  tls: {ca_file: x}\n");
    assert_at(&error, 4, 8, "storage.tls", "only applies to backend redis");
}

/// `jwt.cache_entries` sets how many verified tokens are remembered; a value that is
/// not a whole number in range is refused at its place.
#[test]
fn jwt_cache_entries_is_a_whole_number_in_range() {
    let jwt = |entries: &str| {
        format!(
            "jwt:\n  algorithms: [HS256]\n  secret: a-test-secret-of-at-least-32-bytes!!\n  cache_entries: {entries}\nlimits:\n  a: {{rate: 1/second}}\n"
        )
    };
    ok(&jwt("0"));
    ok(&jwt("50000"));
    let unverified =
        |value: &str| jwt("1").replace("cache_entries: 1", &format!("unverified: {value}"));
    ok(&unverified("refuse"));
    ok(&unverified("anonymous"));
    let error = err(&unverified("allow"));
    assert_eq!(error.field.as_deref(), Some("jwt.unverified"), "{error}");
    assert!(
        error.message.contains("refuse") && error.message.contains("anonymous"),
        "{error}"
    );
    for bad in ["-1", "lots", "20000000", "1.5"] {
        let error = err(&jwt(bad));
        assert_eq!(error.line, Some(4), "{bad}: {error}");
        assert_eq!(
            error.field.as_deref(),
            Some("jwt.cache_entries"),
            "{bad}: {error}"
        );
    }
}
