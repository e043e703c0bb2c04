//! An axum app whose `POST /chat/message` is protected by sluice's layer, with the
//! routes and limits of `examples/quickstart.yaml` (per user 5/minute + 60/hour, per IP,
//! a global breaker), counted in the in-process memory store.
//!
//! Run:  cargo run -p sluice-tower --example axum_chat [-- CONFIG [ADDR]]
//! Try:  for i in $(seq 6); do curl -si -X POST localhost:3000/chat/message -H 'x-user-id: 42' | head -1; done

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::routing::{get, post};
use sluice_store_memory::{MemoryStore, MemoryStoreConfig};
use sluice_tower::RateLimitLayer;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let config_path = args.next().unwrap_or_else(|| {
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../examples/quickstart.yaml"
        )
        .to_string()
    });
    let addr: SocketAddr = args
        .next()
        .unwrap_or_else(|| "127.0.0.1:3000".to_string())
        .parse()?;
    let config = sluice_config::load(std::path::Path::new(&config_path))?;
    let store = Arc::new(MemoryStore::new(MemoryStoreConfig {
        max_keys: config.storage.max_keys,
        ..Default::default()
    }));
    let app = Router::new()
        .route("/chat/message", post(|| async { "the model says hello\n" }))
        .route("/health", get(|| async { "ok\n" }))
        .layer(RateLimitLayer::from_config(&config, store));
    let listener = tokio::net::TcpListener::bind(addr).await?;
    println!("listening on http://{addr} with the limits of {config_path}");
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .await?;
    Ok(())
}
