//! Prometheus metrics: one recorder per process, every HTTP request
//! counted and timed by its route template, and `GET /metrics` to scrape.
//!
//! The recorder is global (the `metrics` facade's), so a process that runs
//! several services (the tests do) shares one set of series.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use axum::extract::MatchedPath;
use axum::http::{header, HeaderValue, Method};
use axum::response::{IntoResponse, Response};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Requests counted, by `method`, `route` and `status`.
pub const HTTP_REQUESTS: &str = "http_requests_total";
/// Time from a request's arrival to its answer's head, by the same labels.
pub const HTTP_DURATION: &str = "http_request_duration_seconds";
/// The route label of a request no route matched: raw paths would make a
/// series per path a scanner tries.
pub const NO_ROUTE: &str = "(no route)";

/// Bucket bounds of [`HTTP_DURATION`] in seconds: from a read served from
/// memory to the request time limit, finer where bookings fall.
const DURATION_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// How often histograms are drained when nothing scrapes, so that their
/// memory stays bounded.
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// The process's recorder, installed on first use.
pub fn handle() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(install)
}

fn install() -> PrometheusHandle {
    let builder = match PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(HTTP_DURATION.to_owned()), &DURATION_BUCKETS)
    {
        Ok(builder) => builder,
        // Only for empty buckets, which these are not.
        Err(error) => {
            tracing::warn!(%error, "request durations fall back to summaries");
            PrometheusBuilder::new()
        }
    };
    let recorder = builder.build_recorder();
    let handle = recorder.handle();
    if let Err(error) = metrics::set_global_recorder(recorder) {
        tracing::warn!(%error, "another metrics recorder is installed; /metrics shows nothing");
    }
    let upkeep = handle.clone();
    let spawned = std::thread::Builder::new()
        .name("metrics-upkeep".to_owned())
        .spawn(move || loop {
            std::thread::sleep(UPKEEP_EVERY);
            upkeep.run_upkeep();
        });
    if let Err(error) = spawned {
        tracing::warn!(%error, "no metrics upkeep thread: histograms drain only when scraped");
    }
    handle
}

/// `GET /metrics`: every series of the process, in Prometheus's text format.
pub async fn render() -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        handle().render(),
    )
        .into_response()
}

/// Counts and times a request under its route template (`/bookings/{id}`,
/// never the raw path). Layered outside time limits and the auth guard,
/// so that their refusals are counted too.
/// `axum::middleware::from_fn(track)`.
pub async fn track(request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or(NO_ROUTE, MatchedPath::as_str)
        .to_owned();
    let method = method_label(request.method());
    let started = Instant::now();
    let response = next.run(request).await;
    let labels = [
        ("method", method.to_owned()),
        ("route", route),
        ("status", response.status().as_u16().to_string()),
    ];
    metrics::counter!(HTTP_REQUESTS, &labels).increment(1);
    metrics::histogram!(HTTP_DURATION, &labels).record(started.elapsed().as_secs_f64());
    response
}

/// The method as a label, with any method outside HTTP's own as `OTHER`:
/// a label's values must be few.
fn method_label(method: &Method) -> &'static str {
    const KNOWN: [(Method, &str); 9] = [
        (Method::GET, "GET"),
        (Method::HEAD, "HEAD"),
        (Method::POST, "POST"),
        (Method::PUT, "PUT"),
        (Method::DELETE, "DELETE"),
        (Method::PATCH, "PATCH"),
        (Method::OPTIONS, "OPTIONS"),
        (Method::TRACE, "TRACE"),
        (Method::CONNECT, "CONNECT"),
    ];
    KNOWN
        .iter()
        .find(|(known, _)| known == method)
        .map_or("OTHER", |(_, name)| name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_outside_http_share_one_label() {
        assert_eq!(method_label(&Method::POST), "POST");
        assert_eq!(method_label(&Method::OPTIONS), "OPTIONS");
        let made_up = Method::from_bytes(b"BREW").unwrap_or(Method::GET);
        assert_eq!(method_label(&made_up), "OTHER");
    }
}
