//! Error answers: a status and `{"error": "<code>", "message": "<what and how to fix it>"}`.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// An error answer. Client mistakes are 400s whose message says how to fix the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// A stable machine-readable code such as `invalid_cost`.
    pub code: &'static str,
    /// What is wrong and how to fix it.
    pub message: String,
    /// The request body was not read to its end, so the connection cannot be reused:
    /// say `Connection: close` rather than let a pooled client write into a dead socket.
    pub close_connection: bool,
}

impl ApiError {
    /// A 400 with `code` and `message`.
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, code, message)
    }

    /// An answer with any status.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            close_connection: false,
        }
    }

    /// `503 store_unavailable`: the store could not answer `what`. The store's own error
    /// (hosts, DSNs) was logged by the decider and stays out of the answer.
    pub fn store_unavailable(what: &str) -> Self {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "store_unavailable",
            format!("{what} failed: the counter store could not answer; see sluice's log"),
        )
    }

    /// Marks the answer as closing the connection when the body was left unread.
    pub fn closing_unless(mut self, body_read: bool) -> Self {
        self.close_connection = !body_read;
        self
    }
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
    message: &'a str,
}

/// Serialises `value` as a JSON response with `status`.
pub fn json_response(status: StatusCode, value: &impl Serialize) -> Response {
    match serde_json::to_vec(value) {
        Ok(body) => (
            status,
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            body,
        )
            .into_response(),
        // Our own response types always serialise; should one ever not, still answer JSON.
        Err(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            r#"{"error": "internal", "message": "the answer could not be encoded"}"#,
        )
            .into_response(),
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = json_response(
            self.status,
            &ErrorBody {
                error: self.code,
                message: &self.message,
            },
        );
        if self.close_connection {
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        // A 401 names the scheme it wants (RFC 9110), and a bearer token that was
        // refused says so (RFC 6750), so clients know to get a new one.
        if self.status == StatusCode::UNAUTHORIZED {
            let challenge = if self.code == "invalid_token" {
                r#"Bearer error="invalid_token""#
            } else {
                "Bearer"
            };
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(challenge),
            );
        }
        response
    }
}

impl From<sluice_http::RequestError> for ApiError {
    /// A request sluice refuses to guess about (an ambiguous path or key): a 400 that
    /// says what to send instead; a route this front door cannot decide: a 500 that says
    /// which limit and why.
    fn from(error: sluice_http::RequestError) -> Self {
        ApiError::new(error.status(), error.code(), error.to_string())
    }
}
