//! Metered routes (`usage:`, `cost: usage`, `weights`) and concurrency limits on routes:
//! values, defaults, and the errors (placed at their line and field) for settings that
//! would be silently half-applied.

use std::time::Duration;

use sluice_config::{Config, ConfigError, load_str};
use sluice_http::{EstimateSource, RequestPlan, RouteCost};
use sluice_usage::{CostWeights, UsageFormat};

fn load(text: &str) -> Result<Config, ConfigError> {
    load_str(text, "test.yaml", &|_| None, &[])
}

fn error(text: &str) -> ConfigError {
    load(text).expect_err("the config should be rejected")
}

fn assert_at(error: &ConfigError, line: usize, field: &str, message: &str) {
    assert_eq!(error.line, Some(line), "{error}");
    assert_eq!(error.field.as_deref(), Some(field), "{error}");
    assert!(error.message.contains(message), "{error}");
}

const LIMITS: &str = "limits:
  tokens: {rate: 1000/day}
  dollars: {rate: 50000/day}
  flight: {concurrency: 4}
";
const PROXY: &str = "proxy: {upstream: 'http://127.0.0.1:9000'}\n";

/// `LIMITS`, `PROXY` and one route (lines 6 on) with `body` under it.
fn with_route(body: &str) -> String {
    format!("{LIMITS}{PROXY}routes:\n  - match: {{path: /v1/chat/completions}}\n{body}")
}

/// What a POST to the route makes of the config's routes.
fn plan(config: &Config) -> RequestPlan {
    let facts = sluice_http::RequestFacts {
        method: "POST",
        path: "/v1/chat/completions",
        literal_path: "/v1/chat/completions",
        query: None,
        headers: &http::HeaderMap::new(),
        client_ip: None,
        session: None,
        claims: None,
        token_refused: false,
        plan_unknown: false,
        plan: None,
    };
    config.routes.plan(&facts, false).expect("plan")
}

#[test]
fn a_metered_route_is_read_with_its_weights_and_settings() {
    let config = load(&with_route(
        "    usage:
      format: anthropic
      estimate: request
      default_output_tokens: 256
      ttl_ms: 120000
      max_request_bytes: 1048576
    limits:
      - {limit: tokens, key: u, cost: usage}
      - {limit: dollars, key: u, cost: usage, weights: {input: 3, output: 15, cached_input: 1, divisor: 2}}
      - {limit: flight, key: u}
",
    ))
    .expect("valid");
    assert!(config.routes.needs_reservations());
    let plan = plan(&config);
    assert_eq!(plan.costs[0], RouteCost::Usage(CostWeights::default()));
    let RouteCost::Usage(money) = plan.costs[1] else {
        panic!("dollars is metered: {:?}", plan.costs);
    };
    assert_eq!(
        (
            money.input,
            money.output,
            money.cached_input,
            money.divisor.get()
        ),
        (3, 15, Some(1), 2)
    );
    assert_eq!(plan.costs[2], RouteCost::Fixed(1));
    assert!(plan.needs_reservation() && plan.holds_slots());
    let usage = plan.usage.expect("usage settings");
    assert_eq!(usage.format, UsageFormat::Anthropic);
    let EstimateSource::Request(estimate) = usage.estimate else {
        panic!("{:?}", usage.estimate);
    };
    assert_eq!(estimate.default_output_tokens, 256);
    assert_eq!(usage.ttl, Some(Duration::from_secs(120)));
    assert_eq!(usage.max_request_bytes, 1 << 20);
}

#[test]
fn defaults_auto_format_and_an_estimate_read_from_the_request() {
    let config = load(&with_route(
        "    usage: {}\n    limits: [{limit: tokens, key: u, cost: usage}]\n",
    ))
    .expect("valid");
    let usage = plan(&config).usage.expect("usage");
    assert_eq!(usage.format, UsageFormat::Auto);
    assert!(usage.reads_request());
    assert_eq!(usage.ttl, None, "the proxy's timeout and a margin");
    assert_eq!(usage.max_request_bytes, 4 << 20);

    let fixed = load(&with_route(
        "    usage: {format: /usage/total, estimate: 2000}\n    limits: [{limit: tokens, key: u, cost: usage}]\n",
    ))
    .expect("valid");
    let usage = plan(&fixed).usage.expect("usage");
    assert_eq!(usage.estimate, EstimateSource::Tokens(2000));
    assert_eq!(usage.format.as_str(), "/usage/total");
}

#[test]
fn half_configured_metering_is_refused_where_it_is_written() {
    // cost: usage on a route that does not say how answers report usage.
    let e = error(&with_route(
        "    limits:\n      - {limit: tokens, key: u, cost: usage}\n",
    ));
    assert_at(
        &e,
        9,
        "routes[0].limits[0].cost",
        "add `usage: {format: openai}`",
    );
    // usage: that no limit is charged from.
    let e = error(&with_route(
        "    usage: {format: openai}\n    limits:\n      - {limit: tokens, key: u}\n",
    ));
    assert_at(&e, 8, "routes[0].usage", "add `cost: usage`");
    // weights without cost: usage.
    let e = error(&with_route(
        "    limits:\n      - {limit: tokens, key: u, cost: 2, weights: {input: 3}}\n",
    ));
    assert_at(
        &e,
        9,
        "routes[0].limits[0].weights",
        "only with `cost: usage`",
    );
    // A concurrency limit holds one slot per call.
    let e = error(&with_route(
        "    limits:\n      - {limit: flight, key: u, cost: 2}\n",
    ));
    assert_at(
        &e,
        9,
        "routes[0].limits[0].cost",
        "each call holds one slot",
    );
    let e = error(&with_route(
        "    usage: {}\n    limits:\n      - {limit: flight, key: u, cost: usage}\n",
    ));
    assert_at(
        &e,
        10,
        "routes[0].limits[0].cost",
        "each call holds one slot",
    );
}

#[test]
fn bad_values_say_what_to_write() {
    let e = error(&with_route(
        "    usage: {format: openia}\n    limits: [{limit: tokens, key: u, cost: usage}]\n",
    ));
    assert_at(
        &e,
        8,
        "routes[0].usage.format",
        "unknown usage format \"openia\"",
    );
    let e = error(&with_route(
        "    usage: {estimate: lots}\n    limits: [{limit: tokens, key: u, cost: usage}]\n",
    ));
    assert_at(
        &e,
        8,
        "routes[0].usage.estimate",
        "`request` or a number of tokens",
    );
    let e = error(&with_route(
        "    usage: {estimate: 0}\n    limits: [{limit: tokens, key: u, cost: usage}]\n",
    ));
    assert_at(&e, 8, "routes[0].usage.estimate", "from 1 to");
    let e = error(&with_route(
        "    usage: {max_request_bytes: 10}\n    limits: [{limit: tokens, key: u, cost: usage}]\n",
    ));
    assert_at(&e, 8, "routes[0].usage.max_request_bytes", "from 1024");
    let e = error(&with_route(
        "    usage: {}\n    limits: [{limit: tokens, key: u, cost: useage}]\n",
    ));
    assert_at(
        &e,
        9,
        "routes[0].limits[0].cost",
        "a whole number or `usage`",
    );
    let e = error(&with_route(
        "    usage: {}\n    limits: [{limit: tokens, key: u, cost: usage, weights: {input: 0, output: 0}}]\n",
    ));
    assert_at(&e, 9, "routes[0].limits[0].weights", "would cost nothing");
    let e = error(&with_route(
        "    usage: {}\n    limits: [{limit: tokens, key: u, cost: usage, weights: {ouput: 15}}]\n",
    ));
    assert_at(
        &e,
        9,
        "routes[0].limits[0].weights.ouput",
        "unknown field `ouput`",
    );
}

#[test]
fn front_doors_that_never_see_the_answer_cannot_have_metered_routes() {
    let no_proxy =
        |body: &str| format!("{LIMITS}routes:\n  - match: {{path: /v1/chat/completions}}\n{body}");
    let e = error(&no_proxy(
        "    usage: {format: openai}\n    limits: [{limit: tokens, key: u, cost: usage}]\n",
    ));
    assert_at(&e, 7, "routes[0].usage", "only the reverse proxy sees");
    assert!(
        e.to_string().starts_with("test.yaml:7:"),
        "file and line: {e}"
    );
    let e = error(&no_proxy("    limits: [{limit: flight, key: u}]\n"));
    assert_at(&e, 7, "routes[0].limits[0].limit", "counts calls in flight");
    // Limits not named by a route are /v1/reserve's business, and fine.
    load(LIMITS).expect("valid");
}

#[test]
fn metered_routes_work_on_every_store() {
    let config = load(&format!(
        "storage: {{backend: redis, url: 'redis://127.0.0.1:6379'}}\n{}",
        with_route("    usage: {}\n    limits: [{limit: tokens, key: u, cost: usage}]\n")
    ))
    .expect("every store keeps reservations");
    assert!(config.routes.needs_reservations());
}
