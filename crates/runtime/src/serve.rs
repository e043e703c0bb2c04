//! Serving a listener with hyper directly, so that no client can hold a connection, a
//! serving slot or a shutdown forever (`axum::serve` exposes none of these bounds):
//!
//! - a **header-read timeout**: a new connection must deliver a complete request head
//!   within `http.header_read_timeout_ms` of being accepted, and on a kept-alive HTTP/1
//!   connection the next head must be complete that long after its first byte;
//! - an **idle timeout**: a connection with no request in flight is closed after
//!   `http.idle_timeout_ms` without a new request (HTTP/2 gets a GOAWAY first);
//! - a **connection cap**: at most `http.max_connections` connections per listener, over
//!   all its threads. At the cap, each thread holds the one connection it accepted last
//!   unserved and stops accepting, so further connections wait in the kernel's listen
//!   backlog (and are refused by the kernel once that is full); they are served as soon
//!   as a connection closes. Nothing is dropped by sluice and nothing fails;
//! - a **shutdown deadline**: when shutdown starts, the listener closes, connections with
//!   no request in flight are closed at once (a request not yet fully received was not
//!   processed, so a client may retry it elsewhere), requests in flight get
//!   `http.shutdown_timeout_ms` to finish, and then every remaining connection is closed;
//! - an **answer deadline** (HTTP/2 only, the Envoy listener): a call still in flight
//!   `http.body_read_timeout_ms + http.header_read_timeout_ms` after it began closes its
//!   connection. The front door answers every call within the first (the Envoy call
//!   deadline); an answer still unsent long after that means the peer does not read its
//!   answers (a zero flow-control window holds an answer's DATA back indefinitely), and
//!   the call would otherwise keep the connection open for good.
//!
//! Requests in flight are counted per connection from the moment hyper hands a request
//! to the router until its response body has been sent (or dropped), so a long streamed
//! proxy response is never cut by the idle timeout.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{FromRequestParts, Request};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::Response;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use sluice_config::HttpConfig;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tower_service::Service;

/// The HTTP version a listener speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// HTTP/1.1 and 1.0 with upgrades (WebSockets through the proxy): the main and
    /// admin listeners.
    Http1,
    /// HTTP/2 with prior knowledge, as gRPC clients speak it: the Envoy listener.
    Http2,
}

/// The bounds of one listener. Clones share its connection cap, so every thread serving
/// the listener takes from the same `max_connections`.
#[derive(Debug, Clone)]
pub struct Limits {
    header_read_timeout: Duration,
    idle_timeout: Duration,
    shutdown_timeout: Duration,
    /// HTTP/2 only: how long a call may stay in flight (see the module docs).
    answer_deadline: Duration,
    max_connections: usize,
    slots: Arc<Semaphore>,
}

impl Limits {
    /// The bounds `http:` configures, with a connection cap of its own.
    pub fn new(http: &HttpConfig) -> Self {
        Limits {
            header_read_timeout: Duration::from_millis(http.header_read_timeout_ms),
            idle_timeout: Duration::from_millis(http.idle_timeout_ms),
            shutdown_timeout: Duration::from_millis(http.shutdown_timeout_ms),
            answer_deadline: Duration::from_millis(
                http.body_read_timeout_ms
                    .saturating_add(http.header_read_timeout_ms),
            ),
            max_connections: http.max_connections,
            slots: Arc::new(Semaphore::new(http.max_connections)),
        }
    }
}

/// Serves `router` on `listener` until `shutdown` resolves, then closes the listener and
/// winds connections down within the shutdown deadline (see the module docs).
pub async fn serve_listener(
    listener: TcpListener,
    router: impl Endpoints,
    protocol: Protocol,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let (stop, stopping) = watch::channel(false);
    let mut connections = JoinSet::new();
    let mut shutdown = pin!(shutdown);
    loop {
        // Finished connections' results are not needed: collect them as we go.
        while connections.try_join_next().is_some() {}
        let (tcp, peer, slot) = tokio::select! {
            () = &mut shutdown => break,
            accepted = accept(&listener, &limits) => accepted,
        };
        // Answers are small: send them now rather than wait to coalesce.
        let _ = tcp.set_nodelay(true);
        connections.spawn(connection(
            tcp,
            peer,
            slot,
            router.clone(),
            protocol,
            limits.clone(),
            stopping.clone(),
        ));
    }
    // New connections are refused from here (every thread's listener closes).
    drop(listener);
    let _ = stop.send(true);
    let drained = tokio::time::timeout(limits.shutdown_timeout, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            connections = connections.len(),
            shutdown_timeout_ms = limits.shutdown_timeout.as_millis() as u64,
            "shutdown deadline passed: closing connections whose requests have not finished"
        );
    }
    connections.shutdown().await;
    Ok(())
}

/// What a listener serves: a service from requests to responses that never fails. An
/// axum [`Router`](axum::Router) is one; a front door may put its own service in front
/// of its router (the HTTP front door's express lane for `POST /v1/check`).
pub trait Endpoints:
    Service<Request, Response = Response, Error = Infallible, Future: Send + 'static>
    + Clone
    + Send
    + Sync
    + 'static
{
}

impl<S> Endpoints for S
where
    S: Service<Request, Response = Response, Error = Infallible> + Clone + Send + Sync + 'static,
    S::Future: Send + 'static,
{
}

/// A connection's slot under `http.max_connections`. The slot is free again when the
/// last clone is dropped: a front door that takes the connection over (an upgrade)
/// keeps a clone while it uses it.
#[derive(Debug, Clone)]
pub struct ConnectionSlot(#[allow(dead_code)] Arc<OwnedSemaphorePermit>);

/// The connection a request arrived on, in every request's extensions: its socket peer
/// and its slot. One extension rather than two, since each costs an allocation and a
/// map insert per request. Handlers read the peer with the [`Peer`] extractor.
#[derive(Debug, Clone)]
pub struct Connection {
    /// The socket peer (front doors resolve the client's address from it).
    pub peer: SocketAddr,
    /// The connection's slot under `http.max_connections`.
    pub slot: ConnectionSlot,
}

/// Extracts the socket peer of the request's [`Connection`].
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub SocketAddr);

impl Peer {
    /// The peer of the [`Connection`] in `extensions`; `None` for a request that did
    /// not come through the serving loop.
    pub fn of(extensions: &axum::http::Extensions) -> Option<Peer> {
        extensions
            .get::<Connection>()
            .map(|connection| Peer(connection.peer))
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Peer {
    type Rejection = (StatusCode, &'static str);

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Peer::of(&parts.extensions).ok_or((
            StatusCode::INTERNAL_SERVER_ERROR,
            "the request did not come through sluice's serving loop",
        ))
    }
}

/// The next connection and its slot under the cap. The slot is taken after the accept,
/// so a thread never sits on a slot while waiting for a connection the kernel may give
/// another thread's listener.
async fn accept(
    listener: &TcpListener,
    limits: &Limits,
) -> (TcpStream, SocketAddr, OwnedSemaphorePermit) {
    loop {
        match listener.accept().await {
            Ok((tcp, peer)) => {
                if limits.slots.available_permits() == 0 {
                    tracing::debug!(
                        max_connections = limits.max_connections,
                        "connection cap reached: waiting for a connection to close"
                    );
                }
                // The semaphore is never closed, so this only waits.
                if let Ok(slot) = Arc::clone(&limits.slots).acquire_owned().await {
                    return (tcp, peer, slot);
                }
            }
            // The peer gave up before we accepted: nothing to do.
            Err(error)
                if matches!(
                    error.kind(),
                    std::io::ErrorKind::ConnectionAborted | std::io::ErrorKind::ConnectionReset
                ) => {}
            Err(error) => {
                // Usually the open-file limit. Accepting again at once would spin.
                tracing::warn!(
                    %error,
                    "cannot accept a connection; retrying in 100 ms (at the open-file limit, raise `ulimit -n` or lower http.max_connections)"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// The most calls one HTTP/2 connection may have open at once (hyper's default is 200).
/// Envoy opens another connection when it needs more, so this bounds what one client
/// connection can hold (each call's message is also capped and read within a deadline
/// by the front door) without limiting a busy Envoy.
pub const MAX_CONCURRENT_STREAMS: u32 = 100;

/// Serves one connection until it ends, times out, or shutdown closes it.
async fn connection(
    tcp: TcpStream,
    peer: SocketAddr,
    slot: OwnedSemaphorePermit,
    router: impl Endpoints,
    protocol: Protocol,
    limits: Limits,
    stopping: watch::Receiver<bool>,
) {
    // Shared with the requests: a connection taken over by an upgrade (a WebSocket
    // through the proxy) keeps its slot for as long as its bytes are copied.
    let connection = Connection {
        peer,
        slot: ConnectionSlot(Arc::new(slot)),
    };
    let tracker = Arc::new(Tracker::new(protocol));
    let io = TokioIo::new(Watched {
        io: tcp,
        tracker: Arc::clone(&tracker),
    });
    let requests = Arc::clone(&tracker);
    let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
        let in_flight = InFlight::begin(&requests);
        request.extensions_mut().insert(connection.clone());
        let mut router = router.clone();
        async move {
            let response = router.call(request.map(Body::new)).await?;
            // The request stays in flight until its body is sent (or dropped).
            Ok::<_, Infallible>(response.map(|body| Tracked {
                body,
                _in_flight: in_flight,
            }))
        }
    });
    match protocol {
        Protocol::Http1 => {
            // The header timeout is ours (hyper's would also run while idle).
            let conn = hyper::server::conn::http1::Builder::new()
                .header_read_timeout(None)
                .serve_connection(io, service)
                .with_upgrades();
            guard(
                conn,
                |conn| conn.graceful_shutdown(),
                &tracker,
                &limits,
                stopping,
            )
            .await;
        }
        Protocol::Http2 => {
            let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
                .serve_connection(io, service);
            guard(
                conn,
                |conn| conn.graceful_shutdown(),
                &tracker,
                &limits,
                stopping,
            )
            .await;
        }
    }
}

/// Drives `conn` and closes it (by dropping it) when its deadline passes or, at
/// shutdown, once no request is in flight.
///
/// A connection's phase changes twice per request, and waking the guard for each change
/// would cost a task wake-up and a new timer per request. Instead the guard looks at the
/// phase when its timer fires and sets the timer again to the phase's deadline, or to
/// `recheck` from now if that is sooner. No change made after a look can set a deadline
/// sooner than `recheck` after it (a head that begins after the look is due a header
/// timeout after its first byte, an idle connection an idle timeout after its last
/// response, an HTTP/2 call an answer deadline, longer than a header timeout, after it
/// began), so no deadline is ever checked late.
async fn guard<C>(
    conn: C,
    graceful_shutdown: impl Fn(Pin<&mut C>),
    tracker: &Tracker,
    limits: &Limits,
    mut stopping: watch::Receiver<bool>,
) where
    C: Future<Output = Result<(), hyper::Error>>,
{
    let mut conn = pin!(conn);
    let mut stop = *stopping.borrow();
    // Made once: a fresh `changed()` per wake-up would register and unregister a waiter
    // on the watch channel for every request the connection serves.
    let mut stop_signal = pin!(stopping.changed());
    let recheck = limits.header_read_timeout.min(limits.idle_timeout);
    let opened = Instant::now();
    let first = tracker.deadline(limits).unwrap_or(opened + recheck);
    let mut timer = pin!(tokio::time::sleep_until(first.min(opened + recheck)));
    // Set once an idle HTTP/2 connection was sent a GOAWAY: when it is closed regardless.
    let mut goaway_sent = false;
    let own = Arc::new(OwnWake::new());
    let own_waker = Waker::from(Arc::clone(&own));
    loop {
        if stop && tracker.is_quiet() {
            return;
        }
        let event = std::future::poll_fn(|cx| {
            if let Poll::Ready(result) = conn.as_mut().poll(cx) {
                return Poll::Ready(Event::Ended(result));
            }
            // The timer and the shutdown signal are polled only when one of them woke
            // the task, not each time the connection made progress.
            if !own.take(cx.waker()) {
                return Poll::Pending;
            }
            let mut own_cx = Context::from_waker(&own_waker);
            if timer.as_mut().poll(&mut own_cx).is_ready() {
                return Poll::Ready(Event::Timer);
            }
            if !stop && let Poll::Ready(changed) = stop_signal.as_mut().poll(&mut own_cx) {
                return Poll::Ready(Event::Stop(changed.is_ok()));
            }
            Poll::Pending
        })
        .await;
        // Whatever fired is polled again (re-armed) on the next turn.
        own.rearm();
        match event {
            Event::Ended(result) => {
                if let Err(error) = result {
                    tracing::debug!(%error, "connection ended with an error");
                }
                return;
            }
            Event::Timer => {
                if goaway_sent {
                    return;
                }
                let now = Instant::now();
                match tracker.expired(limits, now) {
                    Expired::No => {
                        let next = now + recheck;
                        let next = tracker.deadline(limits).map_or(next, |due| due.min(next));
                        timer.as_mut().reset(next);
                    }
                    Expired::IdleHttp2 => {
                        graceful_shutdown(conn.as_mut());
                        goaway_sent = true;
                        timer.as_mut().reset(now + limits.header_read_timeout);
                    }
                    Expired::Yes => return,
                }
            }
            Event::Stop(sent) => {
                stop = true;
                if sent && !tracker.is_quiet() {
                    // Finish the requests in flight, then close (HTTP/1 stops keep-alive,
                    // HTTP/2 sends GOAWAY): the connection ends by itself once they are
                    // done, within the listener's shutdown deadline.
                    graceful_shutdown(conn.as_mut());
                }
            }
        }
    }
}

/// What woke a connection's guard.
enum Event {
    /// The connection ended.
    Ended(Result<(), hyper::Error>),
    /// The guard's timer fired.
    Timer,
    /// Shutdown began (`false`: the signal's sender is gone, which also means stop).
    Stop(bool),
}

/// The waker a guard polls its own timer and shutdown signal with: it notes that one of
/// them woke the task, then wakes the task. A connection makes progress twice per
/// request, and polling the timer and the signal each time cost about 450 instructions
/// per request; the guard polls them only after this was woken.
struct OwnWake {
    woken: std::sync::atomic::AtomicBool,
    task: Mutex<Option<Waker>>,
}

impl OwnWake {
    /// Due a first poll, which registers the futures' wake-ups.
    fn new() -> Self {
        OwnWake {
            woken: std::sync::atomic::AtomicBool::new(true),
            task: Mutex::new(None),
        }
    }

    /// Whether the guard's own futures are due a poll (clearing the note); keeps the
    /// task's waker, `task`, to pass their wake-ups on to.
    fn take(&self, task: &Waker) -> bool {
        if !self.woken.swap(false, std::sync::atomic::Ordering::AcqRel) {
            return false;
        }
        let mut held = self.task.lock().unwrap_or_else(PoisonError::into_inner);
        if !held.as_ref().is_some_and(|held| held.will_wake(task)) {
            *held = Some(task.clone());
        }
        true
    }

    /// Makes the next look poll the guard's own futures.
    fn rearm(&self) {
        self.woken.store(true, std::sync::atomic::Ordering::Release);
    }
}

impl std::task::Wake for OwnWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.rearm();
        let task = self.task.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(task) = task.as_ref() {
            task.wake_by_ref();
        }
    }
}

/// Where a connection is between requests.
#[derive(Debug, Clone, Copy)]
enum Phase {
    /// Accepted; the first request head is due a header timeout after this.
    Opened(Instant),
    /// A response was sent at this instant; nothing of the next request has arrived.
    Idle(Instant),
    /// The first byte of the next HTTP/1 request head arrived at this instant.
    Head(Instant),
    /// This many requests in flight.
    Busy(usize),
}

/// Whether a connection's deadline has passed.
enum Expired {
    No,
    /// An idle HTTP/2 connection: send GOAWAY so a client does not race the close.
    IdleHttp2,
    Yes,
}

/// A connection's phase, shared by its reads, its requests and its guard.
struct Tracker {
    phase: Mutex<Phase>,
    protocol: Protocol,
    /// HTTP/2 only: the calls in flight, oldest first, for the answer deadline. Its own
    /// lock, never taken while `phase` is held (nor the reverse), and never on HTTP/1.
    calls: Mutex<Calls>,
}

/// The calls in flight on an HTTP/2 connection: an id and start for each, oldest first.
/// At most `MAX_CONCURRENT_STREAMS` of them, so a linear search is cheap.
#[derive(Default)]
struct Calls {
    next: u64,
    started: std::collections::VecDeque<(u64, Instant)>,
}

impl Tracker {
    fn new(protocol: Protocol) -> Self {
        Tracker {
            phase: Mutex::new(Phase::Opened(Instant::now())),
            protocol,
            calls: Mutex::new(Calls::default()),
        }
    }

    fn calls(&self) -> MutexGuard<'_, Calls> {
        // As for `phase`: the critical sections cannot panic.
        self.calls.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn phase(&self) -> MutexGuard<'_, Phase> {
        // The critical sections cannot panic; if one did, the phase is still usable.
        self.phase.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Bytes arrived. On an idle HTTP/1 connection they start the next head (HTTP/2
    /// traffic between requests, pings and settings, does not).
    fn read(&self) {
        if self.protocol != Protocol::Http1 {
            return;
        }
        let mut phase = self.phase();
        if let Phase::Idle(_) = *phase {
            *phase = Phase::Head(Instant::now());
        }
    }

    /// No request in flight.
    fn is_quiet(&self) -> bool {
        !matches!(*self.phase(), Phase::Busy(_))
    }

    fn deadline(&self, limits: &Limits) -> Option<Instant> {
        let phase = *self.phase();
        match phase {
            Phase::Opened(since) | Phase::Head(since) => Some(since + limits.header_read_timeout),
            Phase::Idle(since) => Some(since + limits.idle_timeout),
            // An HTTP/1 request may stream for as long as it likes (a proxied download);
            // an HTTP/2 call must be answered (see the module docs).
            Phase::Busy(_) if self.protocol == Protocol::Http2 => self
                .calls()
                .started
                .front()
                .map(|&(_, since)| since + limits.answer_deadline),
            Phase::Busy(_) => None,
        }
    }

    fn expired(&self, limits: &Limits, now: Instant) -> Expired {
        let phase = *self.phase();
        let Some(deadline) = self.deadline(limits) else {
            return Expired::No;
        };
        if deadline > now {
            Expired::No
        } else if matches!(phase, Phase::Idle(_)) && self.protocol == Protocol::Http2 {
            Expired::IdleHttp2
        } else {
            if matches!(phase, Phase::Busy(_)) {
                // Debug only: a client can cause this at will, and must not flood the log.
                tracing::debug!(
                    answer_deadline_ms = limits.answer_deadline.as_millis() as u64,
                    "an HTTP/2 call was not answered by the answer deadline (the peer does not read its answers): closing the connection"
                );
            }
            Expired::Yes
        }
    }
}

/// One request in flight on a connection, from the router's call to the end of its
/// response body; on HTTP/2, with its id in the tracker's [`Calls`].
struct InFlight(Arc<Tracker>, Option<u64>);

impl InFlight {
    fn begin(tracker: &Arc<Tracker>) -> Self {
        let mut phase = tracker.phase();
        *phase = match *phase {
            Phase::Busy(n) => Phase::Busy(n + 1),
            _ => Phase::Busy(1),
        };
        drop(phase);
        let id = (tracker.protocol == Protocol::Http2).then(|| {
            let mut calls = tracker.calls();
            let id = calls.next;
            calls.next += 1;
            calls.started.push_back((id, Instant::now()));
            id
        });
        InFlight(Arc::clone(tracker), id)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut phase = self.0.phase();
        *phase = match *phase {
            Phase::Busy(n) if n > 1 => Phase::Busy(n - 1),
            _ => Phase::Idle(Instant::now()),
        };
        drop(phase);
        if let Some(id) = self.1 {
            let mut calls = self.0.calls();
            if let Some(at) = calls.started.iter().position(|&(call, _)| call == id) {
                calls.started.remove(at);
            }
        }
    }
}

/// A response body that keeps its request in flight until it has been sent or dropped.
/// (A named type rather than a mapped, boxed body: no allocation per response.)
struct Tracked {
    body: Body,
    _in_flight: InFlight,
}

impl http_body::Body for Tracked {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// A TCP stream that tells its connection's [`Tracker`] when bytes arrive.
struct Watched {
    io: TcpStream,
    tracker: Arc<Tracker>,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.tracker.read();
        }
        result
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Binds `count` listeners on `listen` with `SO_REUSEPORT`, one per serving thread.
/// Must be called inside a Tokio runtime.
pub fn bind_listeners(
    listen: std::net::SocketAddr,
    count: usize,
) -> std::io::Result<Vec<std::net::TcpListener>> {
    // SO_REUSEPORT would let a second process bind the same port and quietly take half
    // the traffic. A plain bind first fails if anything holds the address, and turns
    // port 0 into one concrete port for every listener.
    let listen = std::net::TcpListener::bind(listen)?.local_addr()?;
    (0..count.max(1))
        .map(|_| {
            let socket = if listen.is_ipv4() {
                tokio::net::TcpSocket::new_v4()?
            } else {
                tokio::net::TcpSocket::new_v6()?
            };
            socket.set_reuseaddr(true)?;
            socket.set_reuseport(true)?;
            socket.bind(listen)?;
            socket.listen(1024)?.into_std()
        })
        .collect()
}

/// Serves `router` with one single-threaded runtime per listener: the kernel spreads
/// connections over the `SO_REUSEPORT` listeners and no thread ever wakes another, the
/// way nginx runs one event loop per worker. Every thread shares `limits` (one
/// connection cap for the listener). Blocks until every thread has wound down its
/// connections after `shutdown` turns true (within `limits`' shutdown deadline).
pub fn serve_per_thread(
    listeners: Vec<std::net::TcpListener>,
    router: impl Endpoints,
    protocol: Protocol,
    limits: &Limits,
    shutdown: tokio::sync::watch::Receiver<bool>,
) -> std::io::Result<()> {
    let kind = match protocol {
        Protocol::Http1 => "http",
        Protocol::Http2 => "grpc",
    };
    let handles: Vec<_> = listeners
        .into_iter()
        .enumerate()
        .map(|(i, listener)| {
            let router = router.clone();
            let limits = limits.clone();
            let mut shutdown = shutdown.clone();
            std::thread::Builder::new()
                .name(format!("sluice-{kind}-{i}"))
                .spawn(move || {
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()?;
                    runtime.block_on(async move {
                        let listener = tokio::net::TcpListener::from_std(listener)?;
                        let stop = async move {
                            let _ = shutdown.wait_for(|stop| *stop).await;
                        };
                        serve_listener(listener, router, protocol, limits, stop).await
                    })
                })
        })
        .collect::<std::io::Result<_>>()?;
    for handle in handles {
        handle
            .join()
            .map_err(|_| std::io::Error::other(format!("a {kind} serving thread panicked")))??;
    }
    Ok(())
}

/// Serves `router` (HTTP/1) on `listener` until `shutdown` resolves, then winds its
/// connections down within `limits`' shutdown deadline.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: impl Endpoints,
    limits: Limits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_listener(listener, router, Protocol::Http1, limits, shutdown).await
}
