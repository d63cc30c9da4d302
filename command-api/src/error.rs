//! Every error answer of the command API, as an RFC 9457 problem document
//! written by [`service_kit::problem`].

use axum::extract::rejection::JsonRejection;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use domain::{BookingError, BoxOfficeError, IdError, SeatLabel, ShowError};
use serde_json::{json, Map, Value};
use service_kit::problem::Problem;

use crate::event_log::LogError;
use crate::reply::Reply;

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400, 413, 415 or 422: the body is not the JSON the route takes.
    #[error("{0}")]
    Body(#[from] JsonRejection),
    /// 422: the body is JSON of the right shape but breaks a rule.
    #[error("{detail}")]
    Invalid {
        /// What is wrong, for a person.
        detail: String,
        /// Extra problem members, such as `unknown_seats`.
        members: Map<String, Value>,
    },
    /// 404: no such show or booking.
    #[error("{0} not found")]
    NotFound(&'static str),
    /// 409: seats someone else has; nothing changed.
    #[error("seats not available")]
    Unavailable {
        /// The seats someone else has.
        seats: Vec<SeatLabel>,
    },
    /// 409: the buyer would go over the show's per-buyer seat limit.
    #[error("{detail}")]
    SeatLimit {
        /// What is wrong, for a person.
        detail: String,
        /// The show's limit.
        limit: u32,
        /// The buyer's live seats in the show.
        current: u32,
    },
    /// 409: no row of the section has the adjacent seats asked for.
    #[error("no row of the section has {count} adjacent free seats")]
    NoAdjacentSeats {
        /// Seats asked for.
        count: u32,
    },
    /// 403: the caller may not act on this booking or user, or create shows.
    #[error("{0}")]
    Forbidden(&'static str),
    /// 409: the booking is `expired` or `cancelled`.
    #[error("the booking is {status}")]
    BookingClosed {
        /// Its status.
        status: &'static str,
    },
    /// 422: an `Idempotency-Key` reused with another request.
    #[error("this Idempotency-Key was used with a different request")]
    IdempotencyMismatch,
    /// 409: the first request with this `Idempotency-Key` is still running.
    #[error("a request with this Idempotency-Key is still in progress")]
    InProgress,
    /// 503 with `Retry-After`: Postgres is unreachable or overloaded, or the
    /// command kept meeting concurrent writers.
    #[error("the event store is unavailable")]
    StoreUnavailable(#[source] Option<LogError>),
    /// 500: a bug or an unexpected failure; the cause goes to the log only.
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

impl ApiError {
    /// A 422 with extra problem members.
    pub fn invalid(detail: impl Into<String>, members: Map<String, Value>) -> Self {
        Self::Invalid {
            detail: detail.into(),
            members,
        }
    }

    /// Whether the answer is a 5xx, which is never remembered for an
    /// `Idempotency-Key`.
    pub fn is_server_error(&self) -> bool {
        matches!(self, Self::StoreUnavailable(_) | Self::Internal(_))
    }

    /// Whether running the command again from a fresh load may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::StoreUnavailable(Some(e)) if e.is_retryable())
    }

    fn status(&self) -> StatusCode {
        match self {
            Self::Body(rejection) => match rejection {
                JsonRejection::JsonSyntaxError(_) => StatusCode::BAD_REQUEST,
                other => match other.status() {
                    StatusCode::BAD_REQUEST => StatusCode::UNPROCESSABLE_ENTITY,
                    status => status,
                },
            },
            Self::Invalid { .. } | Self::IdempotencyMismatch => StatusCode::UNPROCESSABLE_ENTITY,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::Unavailable { .. }
            | Self::BookingClosed { .. }
            | Self::InProgress
            | Self::SeatLimit { .. }
            | Self::NoAdjacentSeats { .. } => StatusCode::CONFLICT,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::StoreUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The problem's type: the last part of its `type` URI, and the
    /// outcome `bookings_total` counts a refused booking under.
    pub fn kind(&self) -> &'static str {
        self.kind_and_title().0
    }

    fn kind_and_title(&self) -> (&'static str, &'static str) {
        match self {
            Self::Body(_) => ("bad-body", "The request body is not valid"),
            Self::Invalid { .. } => ("invalid-request", "The request breaks a rule"),
            Self::NotFound(_) => ("not-found", "Not found"),
            Self::Unavailable { .. } => ("seats-unavailable", "Seats are not available"),
            Self::BookingClosed { .. } => ("booking-closed", "The booking cannot change"),
            Self::SeatLimit { .. } => ("seat-limit", "Over the show's seat limit per buyer"),
            Self::NoAdjacentSeats { .. } => ("no-adjacent-seats", "No adjacent seats"),
            Self::Forbidden(_) => ("forbidden", "Forbidden"),
            Self::IdempotencyMismatch => ("idempotency-key-reused", "Idempotency-Key reused"),
            Self::InProgress => ("in-progress", "Request in progress"),
            Self::StoreUnavailable(_) => ("unavailable", "Service unavailable"),
            Self::Internal(_) => ("internal", "Internal server error"),
        }
    }

    /// The problem document, as a reply that can also be stored and replayed.
    pub fn to_reply(&self) -> Reply {
        let status = self.status();
        let (kind, title) = self.kind_and_title();
        let detail = match self {
            // Never show internals to the client: the log has the cause chain.
            Self::Internal(_) => "an unexpected error occurred".to_owned(),
            Self::StoreUnavailable(_) => "the event store is unavailable; retry later".to_owned(),
            other => other.to_string(),
        };
        let problem = Problem::new(status, kind, title, detail);
        let problem = match self {
            Self::Invalid { members, .. } => problem.with_all(members.clone()),
            Self::Unavailable { seats } => problem.with("unavailable_seats", labels(seats)),
            Self::BookingClosed { status } => problem.with("booking_status", json!(status)),
            Self::SeatLimit { limit, current, .. } => problem
                .with("limit", json!(limit))
                .with("current", json!(current)),
            Self::NoAdjacentSeats { count } => problem.with("count", json!(count)),
            Self::InProgress => problem.with("in_progress", json!(true)).retry_after(1),
            Self::StoreUnavailable(_) => problem.retry_after(1),
            _ => problem,
        };
        Reply::problem(&problem)
    }
}

fn labels(seats: &[SeatLabel]) -> Value {
    seats.iter().map(ToString::to_string).collect()
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        match &self {
            Self::Internal(error) => {
                tracing::error!(error = %format_args!("{error:#}"), "internal error")
            }
            Self::StoreUnavailable(Some(error)) => {
                tracing::warn!(error = %format_args!("{error:#}"), "event store unavailable");
            }
            _ => {}
        }
        self.to_reply().into_response()
    }
}

impl From<axum::extract::rejection::PathRejection> for ApiError {
    fn from(_: axum::extract::rejection::PathRejection) -> Self {
        Self::NotFound("booking")
    }
}

impl From<LogError> for ApiError {
    fn from(error: LogError) -> Self {
        match &error {
            LogError::Conflict | LogError::LockTimeout | LogError::Unreachable(_) => {
                Self::StoreUnavailable(Some(error))
            }
            LogError::Database(db) if is_unavailable(db) || error.is_retryable() => {
                Self::StoreUnavailable(Some(error))
            }
            _ => Self::Internal(anyhow::Error::new(error)),
        }
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(error: sqlx::Error) -> Self {
        LogError::Database(error).into()
    }
}

/// Errors that mean "Postgres is not there right now", not "the statement is wrong".
fn is_unavailable(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        // 08: connection exception; 57P: operator intervention (shutdown);
        // 53: insufficient resources.
        sqlx::Error::Database(e) => e
            .code()
            .is_some_and(|c| c.starts_with("08") || c.starts_with("57P") || c.starts_with("53")),
        _ => false,
    }
}

impl From<BoxOfficeError> for ApiError {
    fn from(error: BoxOfficeError) -> Self {
        match error {
            BoxOfficeError::ShowNotFound => Self::NotFound("show"),
            BoxOfficeError::Unavailable { labels } => Self::Unavailable { seats: labels },
            BoxOfficeError::UnknownSeats { labels: unknown } => {
                let detail = BoxOfficeError::UnknownSeats {
                    labels: unknown.clone(),
                }
                .to_string();
                Self::invalid(detail, member("unknown_seats", labels(&unknown)))
            }
            e @ (BoxOfficeError::NoSeats
            | BoxOfficeError::TooManySeats { .. }
            | BoxOfficeError::DuplicateSeat { .. }) => Self::invalid(e.to_string(), Map::new()),
            BoxOfficeError::Booking(e) => e.into(),
            e @ BoxOfficeError::SeatLimit { limit, current, .. } => Self::SeatLimit {
                detail: e.to_string(),
                limit,
                current,
            },
            e @ BoxOfficeError::Inconsistent(_) => Self::Internal(anyhow::Error::new(e)),
        }
    }
}

impl From<BookingError> for ApiError {
    fn from(error: BookingError) -> Self {
        match error {
            BookingError::NotFound => Self::NotFound("booking"),
            BookingError::Expired => Self::BookingClosed { status: "expired" },
            BookingError::Cancelled => Self::BookingClosed {
                status: "cancelled",
            },
            e @ (BookingError::AlreadyExists | BookingError::NotExpirable { .. }) => {
                Self::Internal(anyhow::Error::new(e))
            }
        }
    }
}

impl From<ShowError> for ApiError {
    fn from(error: ShowError) -> Self {
        Self::invalid(error.to_string(), Map::new())
    }
}

impl From<IdError> for ApiError {
    fn from(error: IdError) -> Self {
        Self::invalid(error.to_string(), Map::new())
    }
}

/// A one-member map, for [`ApiError::invalid`].
pub fn member(name: &str, value: Value) -> Map<String, Value> {
    Map::from_iter([(name.to_owned(), value)])
}
