//! Route matching and the checks a request makes.

use std::sync::Arc;

use http::{HeaderMap, HeaderValue, Method};
use sluice_engine::{Limit, LimitSpec};
use sluice_http::{
    KeyTemplate, PathPattern, RequestFacts, Route, RouteCost, RouteLimit, RouteMatch, Rules,
};

fn limit(name: &str) -> Arc<Limit> {
    Arc::new(Limit::new(name, LimitSpec::new(vec!["5/minute".parse().unwrap()])).unwrap())
}

fn route(path: Option<&str>, methods: &[&str], limits: &[(&Arc<Limit>, &[&str])]) -> Route {
    Route {
        matcher: RouteMatch {
            path: path.map(|p| p.parse::<PathPattern>().unwrap()),
            methods: methods
                .iter()
                .map(|m| m.parse::<Method>().unwrap())
                .collect(),
            header: None,
        },
        default: false,
        limits: limits
            .iter()
            .map(|(l, keys)| RouteLimit {
                limit: Arc::clone(l),
                keys: keys
                    .iter()
                    .map(|k| k.parse::<KeyTemplate>().unwrap())
                    .collect(),
                cost: RouteCost::Fixed(1),
            })
            .collect(),
        usage: None,
    }
}

fn checks(rules: &Rules, method: &str, path: &str, headers: &HeaderMap) -> Vec<(String, String)> {
    let facts = RequestFacts {
        method,
        path,
        literal_path: path,
        query: None,
        headers,
        client_ip: Some("203.0.113.7"),
        session: None,
        claims: None,
        token_refused: false,
        plan_unknown: false,
        plan: None,
    };
    rules
        .checks(&facts)
        .unwrap()
        .iter()
        .map(|c| (c.limit().name().to_string(), c.key().to_string()))
        .collect()
}

fn pairs(expected: &[(&str, &str)]) -> Vec<(String, String)> {
    expected
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

#[test]
fn exact_prefix_and_regex_routes_all_apply_in_one_decision() {
    let (chat, api, versioned) = (limit("chat"), limit("api"), limit("versioned"));
    let rules = Rules::new(vec![
        route(Some("/api/chat"), &["POST"], &[(&chat, &["{client_ip}"])]),
        route(Some("/api/*"), &[], &[(&api, &["{client_ip}"])]),
        route(Some("~^/api/v[0-9]+/"), &[], &[(&versioned, &["all"])]),
    ])
    .unwrap();
    let none = HeaderMap::new();
    assert_eq!(
        checks(&rules, "POST", "/api/chat", &none),
        pairs(&[("chat", "203.0.113.7"), ("api", "203.0.113.7")])
    );
    assert_eq!(
        checks(&rules, "GET", "/api/chat", &none),
        pairs(&[("api", "203.0.113.7")]),
        "method filter"
    );
    assert_eq!(
        checks(&rules, "GET", "/api/v2/x", &none),
        pairs(&[("api", "203.0.113.7"), ("versioned", "all")])
    );
    assert_eq!(
        checks(&rules, "GET", "/api", &none),
        pairs(&[("api", "203.0.113.7")]),
        "a prefix covers itself"
    );
    assert!(
        checks(&rules, "GET", "/apis", &none).is_empty(),
        "prefixes end at a segment boundary"
    );
    assert!(
        checks(&rules, "GET", "/health", &none).is_empty(),
        "no route: not limited"
    );
}

#[test]
fn keys_fall_back_in_order_and_unresolved_limits_are_skipped() {
    let (user, team) = (limit("user"), limit("team"));
    let rules = Rules::new(vec![route(
        Some("/chat"),
        &[],
        &[
            (&user, &["user:{header.x-user-id}", "ip:{client_ip}"]),
            (&team, &["team:{header.x-team}"]),
        ],
    )])
    .unwrap();
    let mut with_user = HeaderMap::new();
    with_user.insert("x-user-id", HeaderValue::from_static("42"));
    assert_eq!(
        checks(&rules, "GET", "/chat", &with_user),
        pairs(&[("user", "user:42")])
    );
    assert_eq!(
        checks(&rules, "GET", "/chat", &HeaderMap::new()),
        pairs(&[("user", "ip:203.0.113.7")])
    );
}

#[test]
fn the_default_route_applies_only_when_nothing_else_matches() {
    let (chat, anon) = (limit("chat"), limit("anon"));
    let mut default = route(None, &[], &[(&anon, &["{client_ip}"])]);
    default.default = true;
    let rules = Rules::new(vec![route(Some("/chat"), &[], &[(&chat, &["x"])]), default]).unwrap();
    assert_eq!(
        checks(&rules, "GET", "/chat", &HeaderMap::new()),
        pairs(&[("chat", "x")])
    );
    assert_eq!(
        checks(&rules, "GET", "/other", &HeaderMap::new()),
        pairs(&[("anon", "203.0.113.7")])
    );
}

#[test]
fn header_presence_and_duplicate_checks() {
    let (keyed, global) = (limit("keyed"), limit("global"));
    let mut needs_key = route(
        Some("/v1/*"),
        &[],
        &[(&keyed, &["{header.x-api-key}"]), (&global, &["all"])],
    );
    needs_key.matcher.header = Some("x-api-key".parse().unwrap());
    let rules = Rules::new(vec![
        needs_key,
        route(Some("/v1/*"), &[], &[(&global, &["all"])]),
    ])
    .unwrap();
    let mut with_key = HeaderMap::new();
    with_key.insert("x-api-key", HeaderValue::from_static("k1"));
    assert_eq!(
        checks(&rules, "GET", "/v1/embed", &with_key),
        pairs(&[("keyed", "k1"), ("global", "all")]),
        "global once"
    );
    assert_eq!(
        checks(&rules, "GET", "/v1/embed", &HeaderMap::new()),
        pairs(&[("global", "all")])
    );
}

#[test]
fn hundreds_of_routes_match_by_lookup() {
    let l = limit("many");
    let mut routes = Vec::new();
    for i in 0..500 {
        routes.push(route(Some(&format!("/exact/{i}")), &[], &[(&l, &["e"])]));
        routes.push(route(Some(&format!("/prefix/{i}/*")), &[], &[(&l, &["p"])]));
    }
    let rules = Rules::new(routes).unwrap();
    assert_eq!(
        checks(&rules, "GET", "/exact/499", &HeaderMap::new()),
        pairs(&[("many", "e")])
    );
    assert_eq!(
        checks(&rules, "GET", "/prefix/250/a/b", &HeaderMap::new()),
        pairs(&[("many", "p")])
    );
    assert!(checks(&rules, "GET", "/exact/500", &HeaderMap::new()).is_empty());
}

#[test]
fn bad_paths_are_rejected() {
    assert!("chat".parse::<PathPattern>().is_err());
    assert!("~(unclosed".parse::<PathPattern>().is_err());
    assert_eq!(
        "/chat/".parse::<PathPattern>().unwrap(),
        PathPattern::Exact("/chat".into())
    );
    assert_eq!(
        "/*".parse::<PathPattern>().unwrap(),
        PathPattern::Prefix(String::new())
    );
}

#[test]
fn a_check_s_key_is_trusted_only_when_its_template_reads_nothing_the_client_writes() {
    let (ip, key, user) = (limit("per_ip"), limit("api_key"), limit("user"));
    let rules = Rules::new(vec![route(
        Some("/api/*"),
        &[],
        &[
            (&ip, &["{client_ip}"]),
            (&key, &["{query.api_key}"]),
            // Falls back from a header (untrusted) to the address (trusted).
            (&user, &["user:{header.x-user-id}", "ip:{client_ip}"]),
        ],
    )])
    .unwrap();
    let trust = |query: Option<&str>, headers: &HeaderMap| {
        let facts = RequestFacts {
            method: "GET",
            path: "/api/x",
            literal_path: "/api/x",
            query,
            headers,
            client_ip: Some("9.9.9.50"),
            session: None,
            claims: None,
            token_refused: false,
            plan_unknown: false,
            plan: None,
        };
        rules
            .checks(&facts)
            .unwrap()
            .iter()
            .map(|c| (c.key().to_string(), c.key_is_trusted()))
            .collect::<Vec<_>>()
    };
    // The finding's request: every value of the repeated parameter is a check of its
    // own, and none of them is trusted, whatever it spells.
    assert_eq!(
        trust(Some("api_key=10.20.30.40&api_key=mine"), &HeaderMap::new()),
        [
            ("9.9.9.50".to_string(), true),
            ("10.20.30.40".to_string(), false),
            ("mine".to_string(), false),
            ("ip:9.9.9.50".to_string(), true),
        ]
    );
    let mut with_user = HeaderMap::new();
    with_user.insert("x-user-id", HeaderValue::from_static("42"));
    assert_eq!(
        trust(None, &with_user),
        [
            ("9.9.9.50".to_string(), true),
            ("user:42".to_string(), false),
        ]
    );
}
