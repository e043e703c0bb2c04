//! sluice's HTTP front door: the JSON decision API (`POST /v1/check`), the limits
//! listing, admin calls, health, readiness, Prometheus metrics and the reverse proxy.
//!
//! - [`app`]: the shared state and the routers.
//! - [`live`]: the reloadable configuration snapshot and the reload.
//! - [`decider`]: turns a decision request into a decision and records its metrics;
//!   every front door goes through it.
//! - [`check`]: `POST /v1/check` — request parsing, validation and the response shape.
//! - [`forward_auth`]: `/v1/forward-auth` for nginx, Traefik and Envoy.
//! - [`proxy`]: the reverse proxy and its quota endpoint.
//! - [`admin`]: calls behind the bearer token.
//! - [`metrics`]: the Prometheus registry.
//! - [`serve`]: connections: header-read and idle timeouts, the connection cap, the
//!   shutdown deadline.
//! - [`error`]: the `{"error": ..., "message": ...}` answers.

pub mod admin;
pub mod app;
pub mod check;
pub mod decider;
pub mod error;
pub mod forward_auth;
pub mod live;
pub mod metrics;
pub mod proxy;
pub mod serve;

pub use app::{AppState, admin_router, bind_listeners, router, serve, serve_per_thread};
pub use decider::Decider;
pub use error::ApiError;
pub use live::{Live, LiveConfig, ReloadError};
pub use metrics::Metrics;
pub use serve::{Limits, Protocol};
