//! The floor under `POST /v1/check`: a server that answers every request with a fixed
//! JSON body and decides nothing, served two ways, so `bench/http-floor.sh` can say how
//! much of a request's cost is the HTTP stack before sluice does any work.
//!
//! ```sh
//! cargo run --release -p sluice-runtime --example fixed_answer -- PORT [loop|hyper] [SPIN_NS]
//! ```
//!
//! - `loop`: sluice's own serving loop (`serve_per_thread`: one single-threaded runtime
//!   per core on `SO_REUSEPORT`, the header and idle timers, the connection cap) and an
//!   axum router with one route that reads the body, as `/v1/check` does;
//! - `hyper`: the same threads and listeners with hyper's HTTP/1 connection and nothing
//!   else: no timers, no router, no in-flight tracking. `SPIN_NS` makes it spin that
//!   long per request: the same server with a little more CPU per request, which is
//!   what moves the p99 of a saturating `wrk` run on this 2-core box (BENCHMARKS.md).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::routing::post;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use sluice_runtime::serve::{Limits, Protocol, bind_listeners, serve_per_thread};

// The allocator the sluice binary runs with, so the floor is measured as it serves.
#[global_allocator]
static ALLOCATOR: sluice_alloc::Mimalloc = sluice_alloc::Mimalloc;

const ANSWER: &str = r#"{"allowed":true,"retry_after_ms":0,"degraded":false,"results":[]}"#;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let port: u16 = args.next().as_deref().unwrap_or("8080").parse()?;
    let mode = args.next().unwrap_or_else(|| "loop".to_owned());
    let spin = Duration::from_nanos(args.next().as_deref().unwrap_or("0").parse()?);
    let address = SocketAddr::from(([127, 0, 0, 1], port));
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let listeners = {
        // bind_listeners needs a runtime to create tokio sockets in.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        runtime.block_on(async { bind_listeners(address, threads) })?
    };
    match mode.as_str() {
        "loop" => {
            let router = Router::new().route(
                "/v1/check",
                post(|body: Bytes| async move {
                    std::hint::black_box(body);
                    ([("content-type", "application/json")], ANSWER)
                }),
            );
            let (_stop, shutdown) = tokio::sync::watch::channel(false);
            let http = sluice_config::HttpConfig::default();
            serve_per_thread(
                listeners,
                router,
                Protocol::Http1,
                &Limits::new(&http),
                shutdown,
            )?;
        }
        "hyper" => {
            let threads: Vec<_> = listeners
                .into_iter()
                .map(|listener| std::thread::spawn(move || hyper_only(listener, spin)))
                .collect();
            for thread in threads {
                thread.join().map_err(|_| "a serving thread panicked")??;
            }
        }
        other => return Err(format!("unknown mode {other:?}: use loop or hyper").into()),
    }
    Ok(())
}

fn hyper_only(listener: std::net::TcpListener, spin: Duration) -> std::io::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, async move {
        let listener = tokio::net::TcpListener::from_std(listener)?;
        loop {
            let (tcp, _) = listener.accept().await?;
            let _ = tcp.set_nodelay(true);
            tokio::task::spawn_local(async move {
                let service = hyper::service::service_fn(
                    |request: hyper::Request<hyper::body::Incoming>| async move {
                        let body = request.into_body().collect().await;
                        std::hint::black_box(body.is_ok());
                        if !spin.is_zero() {
                            let started = Instant::now();
                            while started.elapsed() < spin {
                                std::hint::spin_loop();
                            }
                        }
                        let mut response =
                            hyper::Response::new(Full::new(Bytes::from_static(ANSWER.as_bytes())));
                        response.headers_mut().insert(
                            hyper::header::CONTENT_TYPE,
                            hyper::header::HeaderValue::from_static("application/json"),
                        );
                        Ok::<_, Infallible>(response)
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    })
}
