//! What every sluice front door shares, written once: the HTTP API and reverse proxy
//! (`sluice-server`), the Envoy rate limit service (`sluice-envoy`) and the binary
//! that wires them all hold one [`AppState`] and are served by one loop.
//!
//! - [`state`]: [`AppState`], handed to every handler.
//! - [`live`]: the reloadable configuration snapshot ([`Live`]) and the reload.
//! - [`access`]: the runtime entries (plans, overrides, block and allow lists) this
//!   instance enforces, polled from the store (`sluice_access::Access`, which the tower
//!   layer uses too).
//! - [`decider`]: the one path from a decision request to a decision; it records
//!   metrics and the (rate-limited) denial log.
//! - [`metrics`]: the Prometheus registry; front doors register their own series.
//! - [`reservation`]: the tickets of reservations: the token a client settles with.
//! - [`serve`]: the per-thread serving loop with header-read and idle timeouts, a
//!   connection cap and a shutdown deadline, for HTTP/1 and HTTP/2 (gRPC) alike.

/// The runtime entries this instance enforces: [`sluice_access::Access`], shared with
/// the tower layer.
pub mod access {
    pub use sluice_access::{Access, POLL_INTERVAL, now_ms};
}
pub mod decider;
pub mod live;
pub mod metrics;
pub mod reservation;
pub mod serve;
pub mod state;

pub use decider::{Decider, ReserveError};
pub use live::{Live, LiveConfig, ReloadError};
pub use metrics::{LimitCountersByName, Metrics};
pub use reservation::{Ticket, TicketError};
pub use serve::{
    Connection, ConnectionSlot, Endpoints, Limits, Peer, Protocol, bind_listeners, serve,
    serve_per_thread,
};
pub use state::AppState;

/// The most checks one decision makes: `/v1/check`'s `checks`, Envoy's descriptors per
/// call. Bounds the work one request can ask for.
pub const MAX_CHECKS: usize = 64;
