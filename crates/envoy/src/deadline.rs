//! A deadline on reading a call's request message.
//!
//! hyper hands an HTTP/2 request to tonic as soon as its HEADERS arrive, and tonic then
//! waits for the message with no limit of its own; the serving loop's header and idle
//! deadlines stand aside while a request is in flight. A client could open every stream
//! a connection allows, announce a large message on each, send part of it and never
//! finish, holding what it sent and the connection for as long as it liked (found by
//! review). [`DeadlineBody`] ends the body with `DEADLINE_EXCEEDED` once
//! `http.body_read_timeout_ms` has passed since the call began: the deadline is fixed,
//! not reset by each frame, so trickling does not extend it. tonic answers the call with
//! that status and drops the body, which frees what it had buffered and tells the client
//! to stop sending.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use http_body::{Frame, SizeHint};
use tokio::time::Sleep;

/// A request body that fails with `DEADLINE_EXCEEDED` when it has not ended by its
/// deadline (see the module docs).
pub struct DeadlineBody {
    inner: Body,
    deadline: Pin<Box<Sleep>>,
    timeout: Duration,
    /// The body ended (or failed): the deadline no longer applies.
    done: bool,
}

impl DeadlineBody {
    /// `inner`, which must end within `timeout` from now.
    pub fn new(inner: Body, timeout: Duration) -> Self {
        DeadlineBody {
            inner,
            deadline: Box::pin(tokio::time::sleep(timeout)),
            timeout,
            done: false,
        }
    }
}

impl http_body::Body for DeadlineBody {
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(None);
        }
        // What has arrived is read first: a message complete within the deadline is
        // never refused because the deadline is checked before it.
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(None) => {
                this.done = true;
                return Poll::Ready(None);
            }
            Poll::Ready(Some(frame)) => {
                if frame.is_err() {
                    this.done = true;
                }
                return Poll::Ready(Some(frame.map_err(Into::into)));
            }
            Poll::Pending => {}
        }
        if this.deadline.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        this.done = true;
        let status = tonic::Status::deadline_exceeded(format!(
            "the request message did not arrive within {} ms (http.body_read_timeout_ms): send the whole message at once",
            this.timeout.as_millis()
        ));
        Poll::Ready(Some(Err(Box::new(status))))
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test(start_paused = true)]
    async fn a_body_that_ends_in_time_passes_unchanged() {
        let body = DeadlineBody::new(Body::from("message"), Duration::from_millis(100));
        let bytes = body.collect().await.expect("in time").to_bytes();
        assert_eq!(&bytes[..], b"message");
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_trickles_past_its_deadline_fails_with_deadline_exceeded() {
        let (sender, frames) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(4);
        let inner = Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(frames));
        let started = tokio::time::Instant::now();
        let reader = tokio::spawn(async move {
            DeadlineBody::new(inner, Duration::from_millis(500))
                .collect()
                .await
                .map(|_| ())
        });
        // A frame every 200 ms, each well inside the deadline: trickling does not
        // extend it.
        for _ in 0..10 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if sender.send(Ok(Bytes::from_static(b"x"))).await.is_err() {
                break;
            }
        }
        let error = reader
            .await
            .expect("joined")
            .expect_err("past its deadline");
        let status = error
            .downcast_ref::<tonic::Status>()
            .expect("a gRPC status");
        assert_eq!(status.code(), tonic::Code::DeadlineExceeded);
        assert!(status.message().contains("500 ms"), "{}", status.message());
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(500) && took < Duration::from_millis(700),
            "{took:?}"
        );
    }
}
