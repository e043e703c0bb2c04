//! The layer inside an axum router: the same routes, keys, client-IP rules and answers
//! as the sluice server.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::Router;
use axum::body::Body;
use axum::extract::connect_info::MockConnectInfo;
use axum::routing::{get, post};
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use sluice_engine::{DecisionRequest, Limit, Outcomes, Store, StoreError, StoreFuture, StoreStats};
use sluice_store_memory::MemoryStore;
use sluice_tower::RateLimitLayer;
use tower::ServiceExt;

const CONFIG: &str = r#"
client_ip: {trusted_proxies: [10.0.0.0/8]}
limits:
  chat_user: {rate: 3/minute}
  chat_ip: {rate: 100/minute}
  anon: {rate: 2/minute}
routes:
  - match: {path: /chat/message, methods: [POST]}
    limits:
      - {limit: chat_user, key: ["user:{header.x-user-id}", "ip:{client_ip}"]}
      - {limit: chat_ip, key: "{client_ip}"}
  - match: {path: /anon}
    limits:
      - {limit: anon, key: "{client_ip}"}
"#;

fn layer(store: Arc<dyn Store>) -> RateLimitLayer {
    let config = sluice_config::load_str(CONFIG, "test.yaml", &|_| None, &[]).expect("config");
    RateLimitLayer::from_config(&config, store)
}

fn app(layer: RateLimitLayer, calls: Arc<AtomicUsize>, peer: &str) -> Router {
    let counted = move || {
        let calls = Arc::clone(&calls);
        async move {
            calls.fetch_add(1, Ordering::SeqCst);
            "answered"
        }
    };
    Router::new()
        .route("/chat/message", post(counted.clone()))
        .route("/anon", get(counted.clone()))
        .route("/health", get(counted))
        .layer(layer)
        .layer(MockConnectInfo(peer.parse::<SocketAddr>().unwrap()))
}

async fn send(
    app: &Router,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (StatusCode, http::HeaderMap, String) {
    let mut request = Request::builder().method(method).uri(path);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = app
        .clone()
        .oneshot(request.body(Body::empty()).unwrap())
        .await
        .unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, headers, String::from_utf8(body.to_vec()).unwrap())
}

fn memory() -> Arc<dyn Store> {
    Arc::new(MemoryStore::new(Default::default()))
}

#[tokio::test]
async fn the_fourth_message_in_a_minute_is_answered_by_the_layer() {
    let calls = Arc::new(AtomicUsize::new(0));
    let app = app(layer(memory()), Arc::clone(&calls), "203.0.113.7:5000");
    for remaining in [2, 1, 0] {
        let (status, headers, body) =
            send(&app, "POST", "/chat/message", &[("x-user-id", "42")]).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body, "answered");
        let ratelimit = headers["ratelimit"].to_str().unwrap();
        assert!(
            ratelimit.starts_with(&format!("\"chat_user\";r={remaining};")),
            "{ratelimit}"
        );
        assert_eq!(
            headers["x-ratelimit-remaining"],
            remaining.to_string().as_str()
        );
    }
    let (status, headers, body) = send(&app, "POST", "/chat/message", &[("x-user-id", "42")]).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    let retry: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=20).contains(&retry), "retry-after {retry}");
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["error"], "rate_limited");
    assert_eq!(json["limit"], "chat_user");
    assert_eq!(json["retry_after_seconds"], retry);
    assert_eq!(
        calls.load(Ordering::SeqCst),
        3,
        "the handler never saw the denied request"
    );

    let (status, _, _) = send(&app, "POST", "/chat/message", &[("x-user-id", "43")]).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "another user has a bucket of their own"
    );
    let (status, headers, _) = send(&app, "GET", "/health", &[]).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        headers.get("ratelimit").is_none(),
        "unmatched paths are not limited"
    );
    let (status, _, _) = send(&app, "GET", "/chat/message", &[]).await;
    assert_eq!(
        status,
        StatusCode::METHOD_NOT_ALLOWED,
        "the route's method filter leaves GET to the app"
    );
}

#[tokio::test]
async fn anonymous_callers_are_counted_by_ip_and_spoofed_headers_are_ignored() {
    let app = app(
        layer(memory()),
        Arc::new(AtomicUsize::new(0)),
        "198.51.100.9:4000",
    );
    for spoof in ["1.1.1.1", "2.2.2.2"] {
        let (status, _, _) = send(&app, "GET", "/anon", &[("x-forwarded-for", spoof)]).await;
        assert_eq!(status, StatusCode::OK);
    }
    let (status, _, _) = send(&app, "GET", "/anon", &[("x-forwarded-for", "3.3.3.3")]).await;
    assert_eq!(
        status,
        StatusCode::TOO_MANY_REQUESTS,
        "an untrusted peer cannot pick its bucket"
    );
}

#[tokio::test]
async fn behind_a_trusted_proxy_ipv6_clients_are_grouped_by_64() {
    let app = app(
        layer(memory()),
        Arc::new(AtomicUsize::new(0)),
        "10.0.0.5:4000",
    );
    for client in ["2001:db8:1:2::a", "2001:db8:1:2::b"] {
        let (status, _, _) = send(
            &app,
            "GET",
            "/anon",
            &[("x-forwarded-for", &format!("6.6.6.6, {client}"))],
        )
        .await;
        assert_eq!(status, StatusCode::OK);
    }
    let (status, _, _) = send(
        &app,
        "GET",
        "/anon",
        &[("x-forwarded-for", "2001:db8:1:2::c")],
    )
    .await;
    assert_eq!(
        status,
        StatusCode::TOO_MANY_REQUESTS,
        "a third address in the same /64 shares the bucket"
    );
    let (status, _, _) = send(
        &app,
        "GET",
        "/anon",
        &[("x-forwarded-for", "2001:db8:1:3::a")],
    )
    .await;
    assert_eq!(status, StatusCode::OK, "the next /64 is someone else");
}

#[tokio::test]
async fn two_app_instances_on_one_store_count_together() {
    let store = memory();
    let first = app(
        layer(Arc::clone(&store)),
        Arc::new(AtomicUsize::new(0)),
        "203.0.113.7:1",
    );
    let second = app(layer(store), Arc::new(AtomicUsize::new(0)), "203.0.113.7:2");
    assert_eq!(send(&first, "GET", "/anon", &[]).await.0, StatusCode::OK);
    assert_eq!(send(&second, "GET", "/anon", &[]).await.0, StatusCode::OK);
    assert_eq!(
        send(&first, "GET", "/anon", &[]).await.0,
        StatusCode::TOO_MANY_REQUESTS
    );
}

#[tokio::test]
async fn without_the_peer_address_client_ip_limits_are_skipped_not_merged() {
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = move || {
        let calls = Arc::clone(&calls);
        async move {
            calls.fetch_add(1, Ordering::SeqCst);
            "answered"
        }
    };
    // No ConnectInfo: {client_ip} does not resolve, so `anon` never applies...
    let app = Router::new()
        .route("/anon", get(counted.clone()))
        .route("/chat/message", post(counted))
        .layer(layer(memory()));
    for _ in 0..5 {
        assert_eq!(send(&app, "GET", "/anon", &[]).await.0, StatusCode::OK);
    }
    // ...while user-keyed limits still do.
    for _ in 0..3 {
        assert_eq!(
            send(&app, "POST", "/chat/message", &[("x-user-id", "7")])
                .await
                .0,
            StatusCode::OK
        );
    }
    assert_eq!(
        send(&app, "POST", "/chat/message", &[("x-user-id", "7")])
            .await
            .0,
        StatusCode::TOO_MANY_REQUESTS
    );
}

struct BrokenStore;

impl Store for BrokenStore {
    fn decide<'a>(&'a self, _: &'a DecisionRequest) -> StoreFuture<'a, Outcomes> {
        Box::pin(async { Err(StoreError::Unavailable("connection refused".into())) })
    }
    fn reset<'a>(&'a self, _: &'a Limit, _: &'a str) -> StoreFuture<'a, ()> {
        Box::pin(async { Ok(()) })
    }
    fn ping(&self) -> StoreFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }
    fn stats(&self) -> StoreStats {
        StoreStats::default()
    }
    fn backend(&self) -> &'static str {
        "broken"
    }
}

#[tokio::test]
async fn a_failing_store_is_a_503_with_a_json_body_never_a_panic() {
    let app = app(
        layer(Arc::new(BrokenStore)),
        Arc::new(AtomicUsize::new(0)),
        "203.0.113.7:1",
    );
    let (status, headers, body) = send(&app, "GET", "/anon", &[]).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(headers["content-type"], "application/json");
    assert!(body.contains("store_unavailable"));
}

#[tokio::test]
async fn nested_routers_are_matched_on_the_full_path() {
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = move || {
        let calls = Arc::clone(&calls);
        async move {
            calls.fetch_add(1, Ordering::SeqCst);
            "answered"
        }
    };
    let inner = Router::new()
        .route("/message", post(counted))
        .layer(layer(memory()));
    let app = Router::new().nest("/chat", inner).layer(MockConnectInfo(
        "203.0.113.7:1".parse::<SocketAddr>().unwrap(),
    ));
    for _ in 0..3 {
        assert_eq!(
            send(&app, "POST", "/chat/message", &[("x-user-id", "9")])
                .await
                .0,
            StatusCode::OK
        );
    }
    assert_eq!(
        send(&app, "POST", "/chat/message", &[("x-user-id", "9")])
            .await
            .0,
        StatusCode::TOO_MANY_REQUESTS
    );
}

/// Inside the app too, a path the app could read in more than one way is refused,
/// never passed to a handler unlimited; other spellings of a route are charged.
#[tokio::test]
async fn ambiguous_paths_are_refused_and_other_spellings_charged() {
    let calls = Arc::new(AtomicUsize::new(0));
    let app = app(layer(memory()), Arc::clone(&calls), "203.0.113.7:4000");
    // The limit is 2 a minute: `/ANON` is charged (axum answers 404, routing with
    // case), so `/an%6Fn` is the third request and denied.
    assert_eq!(send(&app, "GET", "/anon", &[]).await.0, StatusCode::OK);
    assert_eq!(
        send(&app, "GET", "/ANON", &[]).await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        send(&app, "GET", "/an%6Fn", &[]).await.0,
        StatusCode::TOO_MANY_REQUESTS
    );
    let before = calls.load(Ordering::SeqCst);
    for path in ["/anon%2F", "/anon;x", "/x/../anon", "/anon%00"] {
        let (status, _, body) = send(&app, "GET", path, &[]).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path}: {body}");
        assert!(body.contains("invalid_path"), "{path}: {body}");
    }
    assert_eq!(calls.load(Ordering::SeqCst), before, "no handler ran");
}

/// `api` at 2/minute, 5/minute on the `pro` plan, keyed by `x-user-id`.
const PLANS: &str = r#"
plan_from: "{header.x-plan}"
limits:
  api:
    rate: 2/minute
    plans: {pro: {rate: 5/minute}}
routes:
  - match: {path: /anon}
    limits:
      - {limit: api, key: "user:{header.x-user-id}"}
"#;

/// The statuses of six `GET /anon` with `headers`; every allowed one must name the
/// `pro` plan's rates in `RateLimit-Policy`.
async fn six_on_pro(app: &Router, headers: &[(&str, &str)]) -> Vec<u16> {
    let mut statuses = Vec::new();
    for _ in 0..6 {
        let (status, headers, _) = send(app, "GET", "/anon", headers).await;
        statuses.push(status.as_u16());
        if status == StatusCode::OK {
            let policy = headers["ratelimit-policy"].to_str().unwrap();
            assert!(policy.contains("q=5;w=60;plan=\"pro\""), "{policy}");
        }
    }
    statuses
}

/// Inside an app, the plan can come from a header the app's own auth middleware sets
/// (here, the test plays that middleware): the pro plan's rates apply, and the headers
/// name it.
#[tokio::test]
async fn a_plan_set_by_the_apps_auth_layer_picks_the_rates() {
    let config = sluice_config::load_str(PLANS, "test.yaml", &|_| None, &[]).expect("config");
    let layer = RateLimitLayer::from_config(&config, memory());
    let app = app(layer, Arc::new(AtomicUsize::new(0)), "203.0.113.7:5000");
    let statuses = six_on_pro(&app, &[("x-user-id", "9"), ("x-plan", "pro")]).await;
    assert_eq!(statuses, [200, 200, 200, 200, 200, 429]);
    let free: Vec<u16> = {
        let mut v = Vec::new();
        for _ in 0..3 {
            v.push(
                send(&app, "GET", "/anon", &[("x-user-id", "10")])
                    .await
                    .0
                    .as_u16(),
            );
        }
        v
    };
    assert_eq!(free, [200, 200, 429], "no plan header: the default rates");
}

/// Writes a runtime entry into `store` as `sluice admin` would (checked, then stored).
async fn put_entry(
    store: &Arc<dyn Store>,
    limits: &sluice_engine::LimitSet,
    entry: serde_json::Value,
) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let entry: sluice_access::Entry = serde_json::from_value(entry).unwrap();
    let entry = entry.checked(limits, now).expect("a valid entry");
    let record = sluice_engine::Record {
        id: entry.id(),
        body: entry.body(),
    };
    store.put_record(&record).await.expect("stored");
}

#[tokio::test]
async fn runtime_entries_in_the_store_block_and_re_plan_inside_the_app() {
    let config = sluice_config::load_str(PLANS, "test.yaml", &|_| None, &[]).expect("config");
    let store = memory();
    // Written before the app's first request, as a sluice server's admin API would.
    put_entry(
        &store,
        &config.limits,
        serde_json::json!({"kind": "block", "subject": "user:7", "reason": "abuse"}),
    )
    .await;
    put_entry(
        &store,
        &config.limits,
        serde_json::json!({"kind": "plan", "subject": "user:8", "plan": "pro"}),
    )
    .await;
    put_entry(
        &store,
        &config.limits,
        serde_json::json!({"kind": "block", "ip": "203.0.113.0/24", "reason": "scraper"}),
    )
    .await;
    let layer = RateLimitLayer::from_config(&config, Arc::clone(&store));
    let calls = Arc::new(AtomicUsize::new(0));
    let blocked_net = app(layer.clone(), Arc::clone(&calls), "203.0.113.7:5000");
    let elsewhere = app(layer, Arc::clone(&calls), "198.51.100.1:5000");

    // The first request is decided with the entries: a blocked address is refused on
    // every path, a limited one or not, and the app never sees it.
    let (status, headers, body) = send(&blocked_net, "GET", "/health", &[]).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(headers["content-type"], "application/json");
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["error"], "blocked");
    assert_eq!(body["reason"], "scraper");
    let (status, _, body) = send(&elsewhere, "GET", "/anon", &[("x-user-id", "7")]).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(body.contains("abuse"), "{body}");
    assert_eq!(
        calls.load(Ordering::SeqCst),
        0,
        "blocked requests never reach the app"
    );

    // A subject on a plan gets the plan's rates, and the headers say so.
    let statuses = six_on_pro(&elsewhere, &[("x-user-id", "8")]).await;
    assert_eq!(statuses, [200, 200, 200, 200, 200, 429]);
    let mut others = Vec::new();
    for _ in 0..3 {
        others.push(
            send(&elsewhere, "GET", "/anon", &[("x-user-id", "9")])
                .await
                .0
                .as_u16(),
        );
    }
    assert_eq!(others, [200, 200, 429], "no entry: the default rates");

    // A change in the store is enforced without a restart, within a poll.
    let unblock = sluice_access::Entry {
        kind: sluice_access::Kind::Block,
        subject: Some("user:7".into()),
        ip: None,
        plan: None,
        limit: None,
        rate: None,
        expires_at_ms: None,
        ttl_ms: None,
        reason: None,
        created_at_ms: 0,
    };
    assert!(store.remove_record(&unblock.id()).await.unwrap());
    let started = std::time::Instant::now();
    loop {
        let (status, _, _) = send(&elsewhere, "GET", "/anon", &[("x-user-id", "7")]).await;
        if status == StatusCode::OK {
            break;
        }
        assert_eq!(status, StatusCode::FORBIDDEN);
        assert!(
            started.elapsed() < std::time::Duration::from_secs(2),
            "the removed block still applies after 2 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// A JWT the layer cannot verify is refused before the handler runs: the app's own auth
/// might accept a spelling sluice does not read, and know a user sluice would have
/// counted as a stranger.
#[tokio::test]
async fn a_token_that_does_not_verify_never_reaches_the_handler() {
    const SECRET: &str = "tower-test-secret-of-at-least-32-bytes";
    let config = format!(
        "jwt: {{algorithms: [HS256], secret: {SECRET}}}\nlimits:\n  api: {{rate: 2/minute}}\nroutes:\n  - match: {{path: /anon}}\n    limits:\n      - {{limit: api, key: \"user:{{jwt.sub}}\"}}\n"
    );
    let config = sluice_config::load_str(&config, "test.yaml", &|_| None, &[]).expect("config");
    let calls = Arc::new(AtomicUsize::new(0));
    let app = app(
        RateLimitLayer::from_config(&config, memory()),
        Arc::clone(&calls),
        "203.0.113.7:4000",
    );
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &serde_json::json!({"sub": "alice", "exp": exp}),
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    let good = format!("Bearer {token}");
    assert_eq!(
        send(&app, "GET", "/anon", &[("authorization", &good)])
            .await
            .0,
        StatusCode::OK
    );
    let padded = format!("{good}=");
    for headers in [
        vec![("authorization", padded.as_str())],
        vec![
            ("authorization", good.as_str()),
            ("authorization", "Bearer x"),
        ],
    ] {
        let (status, answer, body) = send(&app, "GET", "/anon", &headers).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{headers:?}: {body}");
        assert!(body.contains("invalid_token"), "{body}");
        assert_eq!(
            answer.get("www-authenticate").and_then(|v| v.to_str().ok()),
            Some(r#"Bearer error="invalid_token""#)
        );
    }
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "only the verified call ran"
    );
}
