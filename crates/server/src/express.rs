//! The express lane: `POST /v1/check`, the call a client makes for every request it
//! limits, goes straight to its handler; every other request goes to the router.
//!
//! axum's router would look the path up, clone the route's boxed service, give the
//! request an empty map of path parameters and measure the answer's length once more:
//! about 2,000 instructions of the 25,000 a decision costs (BENCHMARKS.md, "An express
//! lane"). The lane serves the call at exactly the path where the router serves it on
//! that listener (or nowhere), so no answer changes: any other method, a path that
//! differs in a byte (a trailing slash, a percent-encoding) and every other endpoint
//! take the router, as before.

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
use sluice_runtime::AppState;
use tower_service::Service;

/// A listener's endpoints: the express lane in front of its router.
#[derive(Clone)]
pub struct Express {
    router: Router,
    state: Arc<AppState>,
    /// Where this listener's router serves `POST /v1/check`, if it does.
    check_path: Option<Arc<str>>,
}

impl Express {
    /// `router`, with `POST <check_path>` taken to the decision API's handler first.
    /// `check_path` must be where `router` serves that call (`None` if it does not).
    pub(crate) fn new(router: Router, state: Arc<AppState>, check_path: Option<String>) -> Self {
        Express {
            router,
            state,
            check_path: check_path.map(Arc::from),
        }
    }

    fn is_check(&self, request: &Request) -> bool {
        self.check_path
            .as_deref()
            .is_some_and(|path| request.method() == Method::POST && request.uri().path() == path)
    }
}

impl Service<Request> for Express {
    type Response = Response;
    type Error = Infallible;
    type Future = Answer;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // The router is always ready, and so is the handler.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request) -> Answer {
        if self.is_check(&request) {
            let state = Arc::clone(&self.state);
            Answer::Check(Box::pin(async move {
                crate::check::check(State(state), request)
                    .await
                    .into_response()
            }))
        } else {
            Answer::Router(self.router.call(request))
        }
    }
}

/// The answer of [`Express`]: the decision API's, or the router's.
// The router's future is held as it is, as it was before the lane: boxing it would
// cost every other request an allocation.
#[allow(clippy::large_enum_variant)]
pub enum Answer {
    /// From the decision API's handler.
    Check(Pin<Box<dyn Future<Output = Response> + Send>>),
    /// From the router.
    Router(RouteFuture<Infallible>),
}

impl Future for Answer {
    type Output = Result<Response, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        // Both variants are Unpin (a box, and axum's boxed route future).
        match self.get_mut() {
            Answer::Check(answer) => answer.as_mut().poll(cx).map(Ok),
            Answer::Router(answer) => Pin::new(answer).poll(cx),
        }
    }
}
