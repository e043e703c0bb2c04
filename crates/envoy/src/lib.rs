//! sluice's gRPC front door: Envoy's rate limit service
//! (`envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit`) with the descriptor
//! configuration of envoyproxy/ratelimit, so an existing deployment switches by pointing
//! Envoy's `rate_limit_service` at sluice.
//!
//! - [`proto`]: the Rust types generated from the vendored, trimmed Envoy protos.
//! - [`matcher`]: which configured rule a request descriptor hits, and the counter key.
//! - [`metadata`]: the answer's `dynamic_metadata`, shaped as envoyproxy/ratelimit's.
//! - [`service`]: one call end to end: match every descriptor, decide them all in one
//!   atomic [`sluice_engine::DecisionRequest`], answer per-descriptor statuses.
//! - [`router`]: the service as a router, served by `sluice_runtime::serve_per_thread`
//!   like the HTTP front door, over HTTP/2, each call answered within the client's
//!   `grpc-timeout`, at most `http.body_read_timeout_ms` ([`deadline`]), its message at
//!   most [`MAX_MESSAGE_BYTES`].
//!
//! Semantics follow envoyproxy/ratelimit: the most specific descriptor wins (a value
//! beats a value prefix beats the key alone, level by level), a descriptor with no rule is
//! OK with no limit, an unknown domain is OK for every descriptor, `hits_addend` is the
//! cost (a descriptor's own `hits_addend` first, else the request's, 0 meaning 1), the
//! overall code is OVER_LIMIT when any descriptor is, and a `shadow_mode` rule reports
//! OK while it is counted. One difference: the decision is atomic, so when any
//! descriptor is over its limit no counter is charged (envoyproxy/ratelimit charges
//! every matched counter on every call unless `STOP_CACHE_KEY_INCREMENT_WHEN_OVERLIMIT`).

pub mod deadline;
pub mod matcher;
pub mod metadata;
pub mod service;

use std::sync::Arc;

use sluice_runtime::AppState;

/// The types generated from the vendored Envoy protos (`proto/`), in their packages.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod proto {
    /// `envoy.*`
    pub mod envoy {
        /// `envoy.service.*`
        pub mod service {
            /// `envoy.service.ratelimit.*`
            pub mod ratelimit {
                /// `envoy.service.ratelimit.v3`: the service, request and response.
                pub mod v3 {
                    tonic::include_proto!("envoy.service.ratelimit.v3");
                }
            }
        }
        /// `envoy.extensions.*`
        pub mod extensions {
            /// `envoy.extensions.common.*`
            pub mod common {
                /// `envoy.extensions.common.ratelimit.*`
                pub mod ratelimit {
                    /// `envoy.extensions.common.ratelimit.v3`: the descriptor.
                    pub mod v3 {
                        tonic::include_proto!("envoy.extensions.common.ratelimit.v3");
                    }
                }
            }
        }
        /// `envoy.config.*`
        pub mod config {
            /// `envoy.config.core.*`
            pub mod core {
                /// `envoy.config.core.v3`: `HeaderValue`.
                pub mod v3 {
                    tonic::include_proto!("envoy.config.core.v3");
                }
            }
        }
        /// `envoy.type.*`
        pub mod r#type {
            /// `envoy.type.v3`: `RateLimitUnit`.
            pub mod v3 {
                tonic::include_proto!("envoy.r#type.v3");
            }
        }
    }
}

pub use proto::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
pub use service::RateLimitService;

/// The rate limit service as a router for [`sluice_runtime::serve_per_thread`] with
/// [`sluice_runtime::Protocol::Http2`]: served like the HTTP front door (one runtime per
/// thread over `SO_REUSEPORT` listeners), with the same header-read and idle timeouts,
/// connection cap and shutdown deadline (`http:`). Other gRPC methods answer
/// `UNIMPLEMENTED`. Registers the service's call counter in `state.metrics`: call it once.
pub fn router(state: Arc<AppState>) -> axum::Router {
    let calls = service::Calls::register(&state.metrics);
    let server = RateLimitService::new(Arc::clone(&state), calls)
        .into_server()
        .max_decoding_message_size(MAX_MESSAGE_BYTES);
    tonic::service::Routes::new(server)
        .into_axum_router()
        .layer(axum::middleware::from_fn_with_state(
            state,
            with_call_deadline,
        ))
}

/// The largest request message accepted: 64 descriptors of 32 entries with keys and
/// values of a few hundred bytes fit many times over. tonic's default (4 MiB) let one
/// connection hold 200 streams of 4 MiB each; a larger message is `OUT_OF_RANGE` as
/// soon as its length prefix arrives.
pub const MAX_MESSAGE_BYTES: usize = 256 * 1024;

/// Runs the call under its deadline (see [`deadline`]). The bound is read per call, so
/// a reload of `http.body_read_timeout_ms` applies to the next call.
async fn with_call_deadline(
    axum::extract::State(state): axum::extract::State<Arc<AppState>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let bound = state.live().body_read_timeout;
    let timeout = deadline::call_timeout(request.headers(), bound);
    deadline::within(timeout, bound, next.run(request)).await
}
