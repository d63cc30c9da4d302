//! A finished answer: status, headers and body bytes. Kept as plain data so
//! that the first answer to an `Idempotency-Key` can be stored and replayed
//! exactly.

use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// An answer to a write.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    /// HTTP status.
    pub status: StatusCode,
    /// Headers beyond the content type.
    pub headers: HeaderMap,
    /// JSON body.
    pub body: Vec<u8>,
    /// A stored first answer given again (an `Idempotency-Key` retry), not
    /// a decision just made.
    pub replayed: bool,
}

impl Reply {
    /// A JSON answer.
    pub fn json(status: StatusCode, body: &impl Serialize) -> Self {
        Self::with_content_type(status, body, "application/json")
    }

    /// A problem document, with its headers.
    pub fn problem(problem: &service_kit::problem::Problem) -> Self {
        let mut reply = Self::with_content_type(
            problem.status_code(),
            problem,
            service_kit::problem::CONTENT_TYPE,
        );
        for (name, value) in problem.headers() {
            reply.header(name, value);
        }
        reply
    }

    fn with_content_type(
        status: StatusCode,
        body: &impl Serialize,
        content_type: &'static str,
    ) -> Self {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
        Self {
            status,
            headers,
            // Serializing our own response types cannot fail (no maps with
            // non-string keys); an empty body would still be a valid answer.
            body: serde_json::to_vec(body).unwrap_or_default(),
            replayed: false,
        }
    }

    /// The kind of the problem this answer is (`seat-limit` of
    /// `/problems/seat-limit`), if it is one.
    pub fn problem_kind(&self) -> Option<String> {
        #[derive(serde::Deserialize)]
        struct Typed {
            r#type: String,
        }
        let content_type = self.headers.get(header::CONTENT_TYPE)?;
        if content_type != service_kit::problem::CONTENT_TYPE {
            return None;
        }
        let typed: Typed = serde_json::from_slice(&self.body).ok()?;
        Some(typed.r#type.strip_prefix("/problems/")?.to_owned())
    }

    /// Adds a header.
    pub fn header(&mut self, name: HeaderName, value: HeaderValue) -> &mut Self {
        self.headers.insert(name, value);
        self
    }

    /// Headers as stored: name to value, text only.
    pub fn stored_headers(&self) -> serde_json::Value {
        self.headers
            .iter()
            .filter_map(|(name, value)| {
                Some((name.as_str().to_owned(), value.to_str().ok()?.into()))
            })
            .collect::<serde_json::Map<String, serde_json::Value>>()
            .into()
    }

    /// Rebuilds a stored answer.
    pub fn from_stored(status: u16, headers: &serde_json::Value, body: Vec<u8>) -> Option<Self> {
        let mut map = HeaderMap::new();
        for (name, value) in headers.as_object()? {
            map.insert(
                HeaderName::from_bytes(name.as_bytes()).ok()?,
                HeaderValue::from_str(value.as_str()?).ok()?,
            );
        }
        Some(Self {
            status: StatusCode::from_u16(status).ok()?,
            headers: map,
            body,
            replayed: true,
        })
    }
}

impl IntoResponse for Reply {
    fn into_response(self) -> Response {
        (self.status, self.headers, self.body).into_response()
    }
}
