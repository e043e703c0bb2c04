//! The express lane: `POST /v1/check`, the call a client makes for every request it
//! limits, goes straight to its handler, and so does every request of a reverse proxy
//! whose router has nothing but its fallback to the proxy (`sluice_endpoints: admin`,
//! the default); every other request goes to the router.
//!
//! axum's router would look the path up, clone the route's boxed service, give the
//! request an empty map of path parameters and measure the answer's length once more:
//! about 2,000 instructions of the 25,000 a decision costs (BENCHMARKS.md, "An express
//! lane"). The lane serves the call at exactly the path where the router serves it on
//! that listener (or nowhere), so no answer changes: any other method, a path that
//! differs in a byte (a trailing slash, a percent-encoding) and every other endpoint
//! take the router, as before. The proxy's lane is open only where the router would
//! hand every request to the proxy anyway.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::Router;
use axum::extract::{Request, State};
use axum::http::Method;
use axum::response::{IntoResponse, Response};
use axum::routing::future::RouteFuture;
use sluice_runtime::{AppState, Peer};
use tower_service::Service;

/// A listener's endpoints: the express lane in front of its router.
#[derive(Clone)]
pub struct Express {
    router: Router,
    state: Arc<AppState>,
    lane: Lane,
}

/// Which requests skip the router.
#[derive(Clone)]
pub(crate) enum Lane {
    /// `POST` at exactly this path: the decision API.
    Check(Arc<str>),
    /// Every request: the reverse proxy, when the router has no route but its
    /// fallback to the proxy (`proxy.sluice_endpoints: admin`, the default).
    Proxy,
    /// None: the router answers everything.
    Closed,
}

impl Express {
    /// `router`, with the requests of `lane` taken to their handler first. `lane` must
    /// be what `router` would do with them.
    pub(crate) fn new(router: Router, state: Arc<AppState>, lane: Lane) -> Self {
        Express {
            router,
            state,
            lane,
        }
    }
}

impl Service<Request> for Express {
    type Response = Response;
    type Error = Infallible;
    type Future = Answer;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // The router is always ready, and so are the handlers.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request) -> Answer {
        match &self.lane {
            Lane::Check(path)
                if request.method() == Method::POST && request.uri().path() == &**path =>
            {
                let state = Arc::clone(&self.state);
                Answer::Handler(Box::pin(async move {
                    crate::check::check(State(state), request)
                        .await
                        .into_response()
                }))
            }
            Lane::Proxy => {
                // The serving loop gives every request its connection; without one the
                // router's own extractor answers, as it would have.
                let Some(peer) = Peer::of(request.extensions()) else {
                    return Answer::Router(self.router.call(request));
                };
                let state = Arc::clone(&self.state);
                Answer::Handler(Box::pin(crate::proxy::proxy(State(state), peer, request)))
            }
            _ => Answer::Router(self.router.call(request)),
        }
    }
}

/// The answer of [`Express`]: the decision API's, or the router's.
// The router's future is held as it is, as it was before the lane: boxing it would
// cost every other request an allocation.
#[allow(clippy::large_enum_variant)]
pub enum Answer {
    /// From a handler on the lane.
    Handler(Pin<Box<dyn Future<Output = Response> + Send>>),
    /// From the router.
    Router(RouteFuture<Infallible>),
}

impl Future for Answer {
    type Output = Result<Response, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        // Both variants are Unpin (a box, and axum's boxed route future).
        match self.get_mut() {
            Answer::Handler(answer) => answer.as_mut().poll(cx).map(Ok),
            Answer::Router(answer) => Pin::new(answer).poll(cx),
        }
    }
}
