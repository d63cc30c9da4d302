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
        .route("/metrics", get(metrics))
        .fallback(service_kit::problem::no_such_route)
        .method_not_allowed_fallback(service_kit::problem::no_such_method);
    let router = service_kit::http::observed(router).with_state(Health { store, status });
    service_kit::http::with_request_ids(router)
}

/// `GET /metrics`, with the events parked in the generation being written.
async fn metrics(State(health): State<Health>) -> axum::response::Response {
    match health
        .store
        .parked_count(health.status.report().generation)
        .await
    {
        #[allow(clippy::cast_precision_loss)] // a count of events
        Ok(parked) => metrics::gauge!(PARKED).set(parked as f64),
        Err(error) => tracing::warn!(%error, "cannot count the parked events"),
    }
    service_kit::metrics::render().await
}

/// Events kept aside in the generation being written, counted when
/// scraped.
pub const PARKED: &str = "projector_parked_events";

/// 200 while MongoDB answers, 503 otherwise; the body shows the
/// projection's role (active or standby), generation, progress, last error
/// and the shows whose events are parked (not current on the read side)
/// either way.
async fn readyz(State(health): State<Health>) -> (StatusCode, Json<Value>) {
    let projection = health.status.report();
    match health.store.ping().await {
        Ok(()) => {
            let parked = health.store.parked_count(projection.generation).await.ok();
            (
                StatusCode::OK,
                Json(json!({ "mongodb": "up", "projection": projection, "parked_events": parked })),
            )
        }
        Err(error) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(
                json!({ "mongodb": "down", "error": error.to_string(), "projection": projection }),
            ),
        ),
    }
}
