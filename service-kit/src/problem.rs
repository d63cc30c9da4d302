//! RFC 9457 problem documents, the one shape every error answer of the
//! services takes, written in one place so that their members, content type
//! and `Retry-After` never drift apart between services.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::{Map, Value};
use utoipa::ToSchema;

/// The content type of every problem document.
pub const CONTENT_TYPE: &str = "application/problem+json";

/// A problem document: `type`, `title`, `status`, `detail`, and members of
/// its own (`unavailable_seats`, `booking_status`, ...).
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct Problem {
    /// `/problems/{kind}`, such as `/problems/seats-unavailable`.
    #[serde(rename = "type")]
    pub kind: String,
    /// A short summary that names the kind of problem.
    pub title: String,
    /// The HTTP status, repeated.
    #[schema(value_type = u16)]
    pub status: u16,
    /// What went wrong with this request.
    pub detail: String,
    /// Members of this kind of problem.
    #[serde(flatten)]
    #[schema(value_type = Object)]
    pub members: Map<String, Value>,
    /// Seconds after which a retry may succeed, sent as `Retry-After`.
    #[serde(skip)]
    pub retry_after: Option<u32>,
    /// Other headers of the answer, such as `WWW-Authenticate`.
    #[serde(skip)]
    pub extra_headers: Vec<(header::HeaderName, HeaderValue)>,
}

impl Problem {
    /// A problem of `kind` (the last part of its `type`).
    pub fn new(status: StatusCode, kind: &str, title: &str, detail: impl Into<String>) -> Self {
        Self {
            kind: format!("/problems/{kind}"),
            title: title.to_owned(),
            status: status.as_u16(),
            detail: detail.into(),
            members: Map::new(),
            retry_after: None,
            extra_headers: Vec::new(),
        }
    }

    /// Adds a member of its own.
    #[must_use]
    pub fn with(mut self, name: &str, value: Value) -> Self {
        self.members.insert(name.to_owned(), value);
        self
    }

    /// Adds every member of `members`.
    #[must_use]
    pub fn with_all(mut self, members: Map<String, Value>) -> Self {
        self.members.extend(members);
        self
    }

    /// Tells the client when to retry.
    #[must_use]
    pub fn retry_after(mut self, seconds: u32) -> Self {
        self.retry_after = Some(seconds);
        self
    }

    /// Sends a header with it.
    #[must_use]
    pub fn with_header(mut self, name: header::HeaderName, value: HeaderValue) -> Self {
        self.extra_headers.push((name, value));
        self
    }

    /// The status as an HTTP status.
    pub fn status_code(&self) -> StatusCode {
        StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }

    /// The document's body.
    pub fn body(&self) -> Vec<u8> {
        // A map of strings to JSON values always serializes.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// The headers that go with it: the content type, and `Retry-After`.
    pub fn headers(&self) -> Vec<(header::HeaderName, HeaderValue)> {
        let mut headers = vec![(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE))];
        if let Some(seconds) = self.retry_after {
            headers.push((header::RETRY_AFTER, HeaderValue::from(seconds)));
        }
        headers.extend(self.extra_headers.iter().cloned());
        headers
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let mut response = (self.status_code(), self.body()).into_response();
        for (name, value) in self.headers() {
            response.headers_mut().insert(name, value);
        }
        response
    }
}

/// The answer to a path no route serves.
pub async fn no_such_route() -> Problem {
    Problem::new(
        StatusCode::NOT_FOUND,
        "not-found",
        "Not found",
        "no such resource",
    )
}

/// The answer to a method a route does not take.
pub async fn no_such_method() -> Problem {
    Problem::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method-not-allowed",
        "Method not allowed",
        "this resource does not take that method",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_problem_carries_its_members_and_retry_after() {
        let problem = Problem::new(
            StatusCode::CONFLICT,
            "in-progress",
            "Request in progress",
            "wait",
        )
        .with("in_progress", Value::Bool(true))
        .retry_after(1);
        let body: Value = serde_json::from_slice(&problem.body()).expect("JSON");
        assert_eq!(
            body,
            serde_json::json!({ "type": "/problems/in-progress", "title": "Request in progress",
                "status": 409, "detail": "wait", "in_progress": true })
        );
        let response = problem.into_response();
        assert_eq!(response.status(), StatusCode::CONFLICT);
        assert_eq!(response.headers()[header::CONTENT_TYPE], CONTENT_TYPE);
        assert_eq!(response.headers()[header::RETRY_AFTER], "1");
    }
}
