//! The projector's own small HTTP surface: `/healthz` and `/readyz`.

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};

use crate::live::Status;
use crate::store::ReadStore;

#[derive(Clone)]
struct Health {
    store: ReadStore,
    status: Status,
}

/// The routes.
pub fn router(store: ReadStore, status: Status) -> Router {
    let router = Router::new()
        .route("/healthz", get(|| async { StatusCode::OK }))
        .route("/readyz", get(readyz))
        .fallback(service_kit::problem::no_such_route)
        .method_not_allowed_fallback(service_kit::problem::no_such_method)
        .layer(
            tower_http::trace::TraceLayer::new_for_http()
                .make_span_with(service_kit::http::request_span),
        )
        .with_state(Health { store, status });
    service_kit::http::with_request_ids(router)
}

/// 200 while MongoDB answers, 503 otherwise; the body shows the
/// projection's role (active or standby), generation, progress, last error
/// and the shows whose events are parked (not current on the read side)
/// either way.
async fn readyz(State(health): State<Health>) -> (StatusCode, Json<Value>) {
    let projection = health.status.report();
    match health.store.ping().await {
        Ok(()) => (
            StatusCode::OK,
            Json(json!({ "mongodb": "up", "projection": projection })),
        ),
        Err(error) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(
                json!({ "mongodb": "down", "error": error.to_string(), "projection": projection }),
            ),
        ),
    }
}
