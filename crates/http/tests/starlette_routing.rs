//! For any path a client can send, the route sluice charges is the route a
//! percent-decoding framework dispatches to, or sluice refuses the path.
//!
//! The framework is modelled on Starlette behind uvicorn: uvicorn percent-decodes the
//! raw path (`urllib.parse.unquote`: `%XX` escapes become bytes, a `%` that starts no
//! escape stays, the bytes are read as UTF-8 with U+FFFD for what is not), and
//! Starlette matches routes against that string, case and every slash kept:
//! `Route("/chat/message")`, `Route("/café")`, `Mount("/api")` (which matches
//! `/api/...`), and a catch-all `Route("/{rest:path}")` last. sluice's routes are
//! the same three plus `match: default`, which must be charged whenever the app would
//! run its catch-all.

use http::HeaderMap;
use proptest::prelude::*;
use sluice_engine::{Limit, LimitSpec};
use sluice_http::{
    KeyTemplate, PathPattern, RequestFacts, RequestPath, Route, RouteCost, RouteLimit, RouteMatch,
    Rules,
};
use std::sync::Arc;

fn route(path: Option<&str>, name: &str) -> Route {
    Route {
        matcher: RouteMatch {
            path: path.map(|p| p.parse::<PathPattern>().expect("pattern")),
            ..RouteMatch::default()
        },
        default: path.is_none(),
        limits: vec![RouteLimit {
            limit: Arc::new(
                Limit::new(
                    name,
                    LimitSpec::new(vec!["1/second".parse().expect("rate")]),
                )
                .expect("limit"),
            ),
            keys: vec!["k".parse::<KeyTemplate>().expect("template")],
            cost: RouteCost::Fixed(1),
        }],
        usage: None,
    }
}

fn rules() -> Rules {
    Rules::new(vec![
        route(Some("/chat/message"), "chat"),
        route(Some("/café"), "cafe"),
        route(Some("/api/*"), "api"),
        route(None, "default"),
    ])
    .expect("rules")
}

/// What uvicorn hands Starlette: `unquote(raw_path)`.
fn unquote(raw: &str) -> String {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("zz");
            if let Ok(byte) = u8::from_str_radix(hex, 16)
                && hex.chars().all(|c| c.is_ascii_hexdigit())
            {
                out.push(byte);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The limit Starlette's router picks for a decoded path.
fn starlette(path: &str) -> &'static str {
    if path == "/chat/message" {
        "chat"
    } else if path == "/café" {
        "cafe"
    } else if path.starts_with("/api/") {
        "api"
    } else {
        "default"
    }
}

const TOKENS: &[&str] = &[
    "/", "//", "chat", "CHAT", "message", "Message", "api", "caf", "%C3%A9", "%c3%a9", "é", "%2F",
    "%2f", "%5C", "\\", ";x", "%3B", "%00", "%0a", ".", "..", "%2E", "%2e%2e", "%63", "%68at",
    "%61pi", "%41", "%", "%2", "%25", "%FF", "x", "?q=1",
];

proptest! {
    #![proptest_config(ProptestConfig { cases: 4000, ..ProptestConfig::default() })]

    #[test]
    fn sluice_charges_the_route_starlette_runs_or_refuses_the_path(
        tokens in prop::collection::vec(prop::sample::select(TOKENS), 1..8)
    ) {
        let raw = format!("/{}", tokens.concat());
        // The query is not part of the path, for uvicorn either.
        let raw_path = raw.split('?').next().unwrap_or("");
        let runs = starlette(&unquote(raw_path));
        match RequestPath::parse(&raw) {
            Err(_) => {} // refused with a 400: the app never sees it
            Ok(path) => {
                let headers = HeaderMap::new();
                let rules = rules();
                let facts = RequestFacts {
                    method: "POST",
                    path: &path.canonical,
                    literal_path: &path.literal,
                    query: None,
                    headers: &headers,
                    client_ip: None,
                    session: None,
                    claims: None,
                    token_refused: false,
                    plan_unknown: false,
                    plan: None,
                };
                let charged: Vec<&str> = rules
                    .matching(&facts)
                    .iter()
                    .flat_map(|r| r.limits.iter().map(|l| l.limit.name()))
                    .collect();
                prop_assert!(
                    charged.contains(&runs),
                    "{raw:?}: Starlette runs {runs}, sluice charged {charged:?} ({path:?})"
                );
            }
        }
    }
}
