//! The HTTP pieces every sluice front door shares (forward-auth, the reverse proxy,
//! the tower layer), written once:
//!
//! - [`client_ip`]: the client's address behind trusted proxies, grouped and hashed.
//! - [`path`]: the request path as the application will route it, and what is refused.
//! - [`template`]: key templates (`user:{header.x-user-id}`) and the request facts they read.
//! - [`rules`]: routes that map a request to the checks of one atomic decision.
//! - [`metered`]: checks charged from the answer (`cost: usage`, concurrency limits):
//!   what a request reserves, and what it settles.
//! - [`policy`]: the bundle of the three that front doors hold.
//! - [`response`]: deny status, `Retry-After`, body template and rate-limit headers.
//! - [`session`]: signed session cookies for `{session}` keys.

pub mod client_ip;
pub mod metered;
pub mod path;
pub mod policy;
pub mod response;
pub mod rules;
pub mod session;
pub mod template;

pub use client_ip::{ClientIpConfig, ClientIpResolver, ForwardedHeader};
pub use metered::{EstimateSource, RequestPlan, RouteCost, RouteUsage};
pub use path::{PathError, RequestPath, normalize_path};
pub use policy::{HttpPolicy, IncomingRequest, RequestError};
pub use response::{BodyTemplate, Denial, HeaderStyles, ResponseConfig};
pub use rules::{PathPattern, Route, RouteLimit, RouteMatch, RuleError, Rules};
pub use session::{Session, SessionCookie, SessionError, Sessions};
pub use template::{KeyError, KeyTemplate, RequestFacts, TemplateError};

/// Lower-case hex of `bytes`, for digests in keys and logs.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        // Writing into a String cannot fail.
        let _ = write!(out, "{byte:02x}");
    }
    out
}
