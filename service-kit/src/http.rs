//! What the HTTP services log of each request, alike in both.

use axum::extract::MatchedPath;
use axum::http::{HeaderName, Request};
use axum::Router;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;
use tracing::Span;

/// The header that names a request in the logs, and in its answer.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Longest request id a client may choose; a longer one (or one with
/// characters outside `A-Za-z0-9._:-`) is replaced by a new one.
pub const MAX_REQUEST_ID: usize = 128;

/// Gives every request an `X-Request-Id`, the client's own when it sent a
/// usable one and a new UUID otherwise, and every answer the same header.
/// Layered outside the request span, which records it.
pub fn with_request_ids<S: Clone + Send + Sync + 'static>(router: Router<S>) -> Router<S> {
    router
        .layer(PropagateRequestIdLayer::new(REQUEST_ID))
        .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestUuid))
        .layer(axum::middleware::from_fn(drop_unusable_request_id))
}

/// Removes a client's request id that is too long or holds characters no
/// log line should, so that a new one is made.
async fn drop_unusable_request_id(
    mut request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let usable = request.headers().get(&REQUEST_ID).is_none_or(|id| {
        id.len() <= MAX_REQUEST_ID
            && !id.is_empty()
            && id
                .as_bytes()
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(b))
    });
    if !usable {
        request.headers_mut().remove(&REQUEST_ID);
    }
    next.run(request).await
}

/// Logs, counts and times every request of `router` (its routes so far and
/// its fallback): the request span, and the request in
/// [`crate::metrics::HTTP_REQUESTS`] and [`crate::metrics::HTTP_DURATION`].
/// Layered after the time limit and the auth guard, so that their refusals
/// are logged and counted too.
pub fn observed<S: Clone + Send + Sync + 'static>(router: Router<S>) -> Router<S> {
    // Installed before the first request, so that nothing counted is lost.
    crate::metrics::handle();
    router
        .layer(axum::middleware::from_fn(crate::metrics::track))
        .layer(TraceLayer::new_for_http().make_span_with(request_span))
}

/// The span of one request: method and matched route (`/bookings/{id}`,
/// never the raw path, so that requests of one route group together), with
/// the path kept apart for finding one request.
pub fn request_span<B>(request: &Request<B>) -> Span {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("(no route)", MatchedPath::as_str);
    tracing::info_span!(
        "request",
        method = %request.method(),
        route,
        path = request.uri().path(),
        request_id = request
            .headers()
            .get(&REQUEST_ID)
            .and_then(|id| id.to_str().ok())
            .unwrap_or_default(),
        // Filled in by the auth guard once the token is verified.
        user_id = tracing::field::Empty,
    )
}

/// Bounds a request to `limit`: one that takes longer is answered 503 with
/// `Retry-After`, as a problem document like every other error.
/// `axum::middleware::from_fn(move |r, n| within(limit, r, n))`.
pub async fn within(
    limit: std::time::Duration,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    match tokio::time::timeout(limit, next.run(request)).await {
        Ok(response) => response,
        Err(_) => {
            tracing::warn!(limit_ms = limit.as_millis(), "request timed out");
            crate::problem::Problem::new(
                axum::http::StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "Service unavailable",
                format!(
                    "the request took longer than {} ms; retry",
                    limit.as_millis()
                ),
            )
            .retry_after(1)
            .into_response()
        }
    }
}
