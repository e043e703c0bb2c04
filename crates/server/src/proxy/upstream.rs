//! Connections to the upstream: HTTP/1.1 over hyper's client connection, kept alive in
//! a pool of idle connections per serving thread.
//!
//! Why not hyper-util's pooled `Client`, which this replaces: it is built for many hosts
//! and any executor, and a proxy to one upstream paid for that on every request (a key
//! hashed per checkout and a task spawned per response to notice the connection is idle
//! again: about 18,000 of the proxy's 60,000 instructions per request). Here each
//! serving thread runs its own event loop and keeps a stack of its idle connections to
//! the one upstream; a connection goes back on it when its response body has been read
//! to the end, so it is ready for the next request at once.
//!
//! A connection the upstream closed while idle (its keep-alive timeout) is found out
//! when a request is sent on it: hyper gives the request back unsent, and it is sent
//! again on a new connection, so the client never sees the upstream's housekeeping.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Request, Response, StatusCode, Uri};
use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// How long an idle connection is kept (hyper-util's default, which sluice used before).
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// The most idle connections one serving thread keeps; more are closed when they
/// become idle (a burst's connections are not all worth keeping).
const MAX_IDLE_PER_THREAD: usize = 256;

thread_local! {
    /// This serving thread's idle connections, the most recently used last.
    static IDLE: RefCell<VecDeque<Idle>> = const { RefCell::new(VecDeque::new()) };
}

/// A kept-alive connection and when it became idle.
struct Idle {
    sender: SendRequest<Body>,
    since: Instant,
    /// Which upstream it is connected to (a reload may change it).
    authority: String,
}

/// Why no response came from the upstream.
#[derive(Debug, thiserror::Error)]
pub(super) enum UpstreamError {
    /// No connection could be made: the request never left sluice.
    #[error("cannot connect: {0}")]
    Connect(#[source] std::io::Error),
    /// Connecting took longer than the connect timeout: the request never left sluice.
    #[error("connecting timed out")]
    ConnectTimeout,
    /// The connection failed; `sent` says whether the request may have reached the
    /// upstream (hyper gives an unsent request back).
    #[error("the connection failed: {error}")]
    Failed {
        /// What hyper said.
        #[source]
        error: hyper::Error,
        /// Whether any of the request may have been written.
        sent: bool,
    },
}

impl UpstreamError {
    /// Whether the upstream may have received the request.
    pub(super) fn request_sent(&self) -> bool {
        matches!(self, UpstreamError::Failed { sent: true, .. })
    }
}

/// Sends `request` (origin-form target, `Host` set) to `upstream` on an idle connection
/// of this thread, or a new one, and returns the response head; its body streams, and
/// the connection returns to the pool when the body has been read to the end.
pub(super) async fn send(
    upstream: &Uri,
    connect_timeout: Duration,
    mut request: Request<Body>,
) -> Result<Response<Body>, UpstreamError> {
    let authority = upstream.authority().map_or("", |a| a.as_str());
    // An idle connection may have been closed by the upstream since: hyper hands the
    // request back unsent, and it goes on the next idle connection or a new one.
    while let Some(sender) = checkout(authority) {
        match try_send(sender, request, authority).await {
            Ok(response) => return Ok(response),
            Err(Unsent::Back(unsent, _)) => request = unsent,
            Err(Unsent::Failed(error)) => return Err(error),
        }
    }
    let sender = connect(upstream, connect_timeout).await?;
    match try_send(sender, request, authority).await {
        Ok(response) => Ok(response),
        // A new connection that fails before the request is written: nothing was sent.
        Err(Unsent::Back(_, error)) => Err(UpstreamError::Failed { error, sent: false }),
        Err(Unsent::Failed(error)) => Err(error),
    }
}

/// A request that did not get a response: handed back unsent (with why), or failed.
enum Unsent {
    Back(Request<Body>, hyper::Error),
    Failed(UpstreamError),
}

/// Sends `request` on `sender` once it is ready.
async fn try_send(
    mut sender: SendRequest<Body>,
    request: Request<Body>,
    authority: &str,
) -> Result<Response<Body>, Unsent> {
    if let Err(error) = sender.ready().await {
        return Err(Unsent::Back(request, error));
    }
    match sender.try_send_request(request).await {
        Ok(response) => Ok(pooled(response, sender, authority)),
        Err(mut failed) => match failed.take_message() {
            Some(unsent) => Err(Unsent::Back(unsent, failed.into_error())),
            None => Err(Unsent::Failed(UpstreamError::Failed {
                error: failed.into_error(),
                sent: true,
            })),
        },
    }
}

/// The most recently idle connection of this thread to `authority` that is still open.
fn checkout(authority: &str) -> Option<SendRequest<Body>> {
    IDLE.with(|idle| {
        let mut idle = idle.borrow_mut();
        while let Some(conn) = idle.pop_back() {
            if conn.authority == authority
                && !conn.sender.is_closed()
                && conn.since.elapsed() < IDLE_TIMEOUT
            {
                return Some(conn.sender);
            }
        }
        None
    })
}

/// Puts a connection whose response has ended back in this thread's pool.
fn checkin(sender: SendRequest<Body>, authority: String) {
    if sender.is_closed() {
        return;
    }
    IDLE.with(|idle| {
        let mut idle = idle.borrow_mut();
        // The oldest are at the front: drop those past their time, and one more when full.
        while idle
            .front()
            .is_some_and(|conn| conn.since.elapsed() >= IDLE_TIMEOUT || conn.sender.is_closed())
        {
            idle.pop_front();
        }
        if idle.len() >= MAX_IDLE_PER_THREAD {
            idle.pop_front();
        }
        idle.push_back(Idle {
            sender,
            since: Instant::now(),
            authority,
        });
    });
}

/// A new connection to `upstream`, its I/O driven by a task on this thread's loop.
async fn connect(upstream: &Uri, timeout: Duration) -> Result<SendRequest<Body>, UpstreamError> {
    // An IPv6 literal comes bracketed in a URI and bare to the resolver.
    let host = upstream
        .host()
        .unwrap_or_default()
        .trim_start_matches('[')
        .trim_end_matches(']');
    let port = upstream.port_u16().unwrap_or(80);
    let stream = match tokio::time::timeout(timeout, TcpStream::connect((host, port))).await {
        Err(_) => return Err(UpstreamError::ConnectTimeout),
        Ok(Err(error)) => return Err(UpstreamError::Connect(error)),
        Ok(Ok(stream)) => stream,
    };
    // Small requests and answers go out at once rather than wait for an ACK.
    let _ = stream.set_nodelay(true);
    let (sender, connection) = http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|error| UpstreamError::Connect(std::io::Error::other(error)))?;
    tokio::spawn(async move {
        // Ends when either side closes; a WebSocket answer hands the connection over.
        if let Err(error) = connection.with_upgrades().await {
            tracing::debug!(%error, "upstream connection ended");
        }
    });
    Ok(sender)
}

/// The response with a body that returns `sender` to the pool once read to the end.
fn pooled(
    response: Response<Incoming>,
    sender: SendRequest<Body>,
    authority: &str,
) -> Response<Body> {
    let (parts, body) = response.into_parts();
    // A `101` hands the connection over to the upgrade: it never serves another request.
    let reusable = parts.status != StatusCode::SWITCHING_PROTOCOLS;
    let mut body = PooledBody {
        body,
        connection: reusable.then(|| (sender, authority.to_string())),
    };
    if body.body.is_end_stream() {
        // No body to read (a 204, a HEAD): nothing else will poll it.
        body.release();
    }
    Response::from_parts(parts, Body::new(body))
}

/// An upstream response body that gives its connection back when it ends. Dropped
/// before its end (the client left), it closes the connection instead: the rest of
/// the answer would still be in it.
struct PooledBody {
    body: Incoming,
    connection: Option<(SendRequest<Body>, String)>,
}

impl PooledBody {
    fn release(&mut self) {
        if let Some((sender, authority)) = self.connection.take() {
            checkin(sender, authority);
        }
    }
}

impl HttpBody for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => self.release(),
            Poll::Ready(Some(Ok(_))) if self.body.is_end_stream() => self.release(),
            Poll::Ready(Some(Err(_))) => self.connection = None,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
