//! Route matching with 10 and with 1000 exact and prefix routes: the cost of finding the
//! checks for one request must not grow with the number of routes.
//!
//! Run: `cargo bench -p sluice-http --bench rules`

use std::hint::black_box;
use std::sync::Arc;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use http::HeaderMap;
use sluice_engine::{Limit, LimitSpec};
use sluice_http::{
    KeyTemplate, PathPattern, RequestFacts, Route, RouteCost, RouteLimit, RouteMatch, Rules,
};

fn rules(count: usize, regexes: usize) -> Rules {
    let limit =
        Arc::new(Limit::new("l", LimitSpec::new(vec!["5/minute".parse().unwrap()])).unwrap());
    let route = |path: String| Route {
        matcher: RouteMatch {
            path: Some(path.parse::<PathPattern>().unwrap()),
            methods: Vec::new(),
            header: None,
        },
        default: false,
        limits: vec![RouteLimit {
            limit: Arc::clone(&limit),
            keys: vec![
                "user:{header.x-user-id}".parse::<KeyTemplate>().unwrap(),
                "ip:{client_ip}".parse().unwrap(),
            ],
            cost: RouteCost::Fixed(1),
        }],
        usage: None,
    };
    let mut routes = Vec::new();
    for i in 0..count {
        routes.push(route(format!("/api/v1/exact/{i}")));
        routes.push(route(format!("/api/v1/prefix/{i}/*")));
    }
    for i in 0..regexes {
        routes.push(route(format!("~^/re/{i}/[0-9]+$")));
    }
    Rules::new(routes).unwrap()
}

fn bench(c: &mut Criterion) {
    let mut headers = HeaderMap::new();
    headers.insert("x-user-id", "42".parse().unwrap());
    let mut group = c.benchmark_group("route_checks");
    for (count, regexes) in [(10, 0), (1000, 0), (1000, 20)] {
        let rules = rules(count, regexes);
        for (name, path) in [
            ("exact", format!("/api/v1/exact/{}", count / 2)),
            ("prefix", format!("/api/v1/prefix/{}/a/b", count / 2)),
        ] {
            let facts = RequestFacts {
                method: "POST",
                path: &path,
                literal_path: &path,
                query: None,
                headers: &headers,
                client_ip: Some("203.0.113.7"),
                session: None,
                claims: None,
                token_refused: false,
                plan_unknown: false,
                plan: None,
            };
            let id = BenchmarkId::new(
                name,
                format!("{}_routes_{regexes}_regex", 2 * count + regexes),
            );
            group.bench_function(id, |b| b.iter(|| rules.checks(black_box(&facts))));
        }
    }
    group.finish();
}

criterion_group! {
    name = rules_bench;
    config = Criterion::default().measurement_time(std::time::Duration::from_secs(3)).warm_up_time(std::time::Duration::from_secs(1)).sample_size(30);
    targets = bench
}
criterion_main!(rules_bench);
