//! What the HTTP services log of each request, alike in both.

use axum::extract::MatchedPath;
use axum::http::Request;
use tracing::Span;

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
