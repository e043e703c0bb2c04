//! sluice's HTTP front door: the JSON decision API (`POST /v1/check`), forward-auth,
//! the reverse proxy, the limits listing, admin calls, health, readiness and metrics.
//! What it shares with the other front doors (state, live config, decider, metrics,
//! the serving loop) is in `sluice-runtime`.
//!
//! - [`app`]: the routers of the main and admin listeners, and the small endpoints.
//! - [`check`]: `POST /v1/check`.
//! - [`express`]: `POST /v1/check` served ahead of the router, which it would slow.
//! - [`reserve`]: `POST /v1/reserve`, `/v1/settle`, `/v1/release`: estimates charged before a call, settled after.
//! - [`answer`]: the decision API's JSON answer (also the admin state read's).
//! - [`forward_auth`]: `/v1/forward-auth` for nginx, Traefik and Envoy.
//! - [`proxy`]: the reverse proxy and its quota endpoint.
//! - [`admin`]: calls behind the bearer token.
//! - [`dashboard`]: the admin dashboard page (embedded HTML, JS, CSS) and its data.
//! - [`request`]: reading JSON bodies, costs, limit names and keys.
//! - [`error`]: the `{"error": ..., "message": ...}` answers.

pub mod admin;
pub mod answer;
pub mod app;
pub mod check;
pub mod dashboard;
pub mod entries;
pub mod error;
pub mod express;
pub mod forward_auth;
pub mod proxy;
pub mod request;
pub mod reserve;

pub use app::{admin_router, router};
pub use error::ApiError;
pub use express::Express;
