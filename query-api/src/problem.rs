//! Errors of the read side, answered as RFC 9457 problem documents written
//! by [`service_kit::problem`].

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use service_kit::problem::Problem;

/// Why a read was not answered.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// No such show, booking or section (a malformed id names nothing either).
    #[error("{0} not found")]
    NotFound(&'static str),
    /// The `X-Consistency-Token` header is not one command-api issued.
    #[error("{0}")]
    BadToken(String),
    /// A query parameter that cannot be read (a page cursor, a limit).
    #[error("{0}")]
    BadQuery(String),
    /// 403: the caller may not read this booking or user's bookings.
    #[error("{0}")]
    Forbidden(&'static str),
    /// The read models did not reflect the token's write in time.
    #[error("the read models did not reach the write within {0} s; retry")]
    NotYetConsistent(u64),
    /// Too many reads wait for their tokens already.
    #[error("too many reads are waiting for their writes; retry shortly")]
    Busy,
    /// Too many live availability streams are open already.
    #[error("too many live availability streams are open; retry shortly")]
    TooManySubscribers,
    /// MongoDB is unreachable, failing or slow, or the read models are not
    /// there; the service recovers by itself.
    #[error("the read models are unavailable: {0}")]
    Unavailable(String),
}

impl From<mongodb::error::Error> for QueryError {
    fn from(error: mongodb::error::Error) -> Self {
        Self::Unavailable(error.to_string())
    }
}

/// A path whose id is not even text names nothing, like any malformed id.
impl From<axum::extract::rejection::PathRejection> for QueryError {
    fn from(_: axum::extract::rejection::PathRejection) -> Self {
        Self::NotFound("resource")
    }
}

/// A query string that does not parse (`?limit=abc`) is a problem like
/// any other bad parameter, not axum's plain-text answer.
impl From<axum::extract::rejection::QueryRejection> for QueryError {
    fn from(rejection: axum::extract::rejection::QueryRejection) -> Self {
        Self::BadQuery(rejection.body_text())
    }
}

impl QueryError {
    fn status(&self) -> StatusCode {
        match self {
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::BadToken(_) | Self::BadQuery(_) => StatusCode::BAD_REQUEST,
            Self::NotYetConsistent(_) => StatusCode::GATEWAY_TIMEOUT,
            Self::Busy | Self::TooManySubscribers | Self::Unavailable(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Self::NotFound(_) => "not-found",
            Self::Forbidden(_) => "forbidden",
            Self::BadToken(_) => "bad-consistency-token",
            Self::BadQuery(_) => "bad-query",
            Self::NotYetConsistent(_) => "not-yet-consistent",
            Self::Busy => "busy",
            Self::TooManySubscribers => "too-many-subscribers",
            Self::Unavailable(_) => "unavailable",
        }
    }

    fn title(&self) -> &'static str {
        match self {
            Self::NotFound(_) => "Not found",
            Self::Forbidden(_) => "Forbidden",
            Self::BadToken(_) => "Malformed consistency token",
            Self::BadQuery(_) => "Malformed query parameter",
            Self::NotYetConsistent(_) => "Read models not yet consistent",
            Self::Busy => "Too many waiting reads",
            Self::TooManySubscribers => "Too many live streams",
            Self::Unavailable(_) => "Service unavailable",
        }
    }
}

impl IntoResponse for QueryError {
    fn into_response(self) -> Response {
        if let Self::Unavailable(error) = &self {
            tracing::warn!(%error, "mongodb unavailable");
        }
        let detail = match &self {
            // The driver's message names hosts; the log has it.
            Self::Unavailable(_) => "the read models cannot be reached; retry shortly".to_owned(),
            other => other.to_string(),
        };
        let problem = Problem::new(self.status(), self.kind(), self.title(), detail);
        match self {
            Self::Unavailable(_)
            | Self::NotYetConsistent(_)
            | Self::Busy
            | Self::TooManySubscribers => problem.retry_after(1).into_response(),
            _ => problem.into_response(),
        }
    }
}
