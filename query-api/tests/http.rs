//! query-api's HTTP contract for what goes wrong, against a real MongoDB
//! (SecantusDB, or whatever `MONGODB_URI` names): every refusal is a problem
//! document of the status its OpenAPI document lists, and nothing reaches
//! the read models.

mod common;

use reqwest::StatusCode;
use serde_json::Value;
use ticketing_tests::http::Answer;
use ticketing_tests::unique_name;
use tokio_util::sync::CancellationToken;

async fn start() -> anyhow::Result<(String, CancellationToken)> {
    let settings = common::settings(unique_name("query_http"));
    let app = query_api::startup::App::build(settings).await?;
    let base = format!("http://{}", app.addr()?);
    let stop = CancellationToken::new();
    tokio::spawn(app.run_until(stop.clone()));
    Ok((base, stop))
}

/// A request that must be refused, and how.
struct Case {
    method: &'static str,
    path: String,
    /// Its route in the OpenAPI document, when it has one.
    route: Option<&'static str>,
    header: Option<(&'static str, &'static str)>,
    status: StatusCode,
    /// The problem's `type`, after `/problems/`.
    kind: &'static str,
}

#[tokio::test]
async fn every_refusal_is_a_problem_its_document_lists() -> anyhow::Result<()> {
    let (base, stop) = start().await?;
    let http = ticketing_tests::auth::staff_client().expect("an HTTP client");
    let show = uuid::Uuid::new_v4();
    let case = |method, path: &str, route, header, status, kind| Case {
        method,
        path: path.to_owned(),
        route,
        header,
        status,
        kind,
    };
    let cases = [
        case(
            "GET",
            "/no/such/thing",
            None,
            None,
            StatusCode::NOT_FOUND,
            "not-found",
        ),
        case(
            "POST",
            "/shows",
            None,
            None,
            StatusCode::METHOD_NOT_ALLOWED,
            "method-not-allowed",
        ),
        case(
            "GET",
            "/shows?limit=abc",
            Some("/shows"),
            None,
            StatusCode::BAD_REQUEST,
            "bad-query",
        ),
        case(
            "GET",
            "/shows?limit=0",
            Some("/shows"),
            None,
            StatusCode::BAD_REQUEST,
            "bad-query",
        ),
        case(
            "GET",
            "/shows?after=nonsense",
            Some("/shows"),
            None,
            StatusCode::BAD_REQUEST,
            "bad-query",
        ),
        case(
            "GET",
            &format!("/shows/{show}"),
            Some("/shows/{id}"),
            Some(("x-consistency-token", "garbage")),
            StatusCode::BAD_REQUEST,
            "bad-consistency-token",
        ),
        case(
            "GET",
            "/bookings/%FF",
            Some("/bookings/{id}"),
            None,
            StatusCode::NOT_FOUND,
            "not-found",
        ),
        case(
            "GET",
            "/users/not-a-uuid/bookings",
            Some("/users/{id}/bookings"),
            None,
            StatusCode::NOT_FOUND,
            "not-found",
        ),
    ];
    let doc: Value = http
        .get(format!("{base}/openapi.json"))
        .send()
        .await?
        .json()
        .await?;
    for Case {
        method,
        path,
        route,
        header,
        status,
        kind,
    } in &cases
    {
        let mut request = http.request(method.parse()?, format!("{base}{path}"));
        if let Some((name, value)) = header {
            request = request.header(*name, *value);
        }
        let answer = Answer::of(request.send().await?).await?;
        answer
            .is_problem(*status, kind)
            .map_err(|e| anyhow::anyhow!("{method} {path}: {e}"))?;
        if let Some(route) = route {
            let listed = &doc["paths"][route]["get"]["responses"][status.as_str()];
            assert!(
                listed["content"]["application/problem+json"].is_object(),
                "{route} does not list {status} as a problem document"
            );
        }
    }
    stop.cancel();
    Ok(())
}

#[tokio::test]
async fn every_answer_carries_a_request_id() -> anyhow::Result<()> {
    let (base, stop) = start().await?;
    let http = reqwest::Client::new();
    let id_of = |answer: &reqwest::Response| {
        answer
            .headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    // None sent: a new one, on an answer and on a refusal alike.
    for path in ["/healthz", "/shows/not-a-show", "/no/such/path"] {
        let answer = http.get(format!("{base}{path}")).send().await?;
        let id = id_of(&answer).ok_or_else(|| anyhow::anyhow!("{path}: no X-Request-Id"))?;
        anyhow::ensure!(
            uuid::Uuid::parse_str(&id).is_ok(),
            "{path}: {id} is not a UUID"
        );
    }
    // The client's own, when it is usable.
    let answer = http
        .get(format!("{base}/healthz"))
        .header("X-Request-Id", "checkout-42.a:b_c")
        .send()
        .await?;
    anyhow::ensure!(
        id_of(&answer).as_deref() == Some("checkout-42.a:b_c"),
        "not echoed"
    );
    // Too long, or with characters a log line should not hold: replaced.
    for unusable in [
        "x".repeat(129),
        "two words".to_owned(),
        "semi;colon".to_owned(),
    ] {
        let answer = http
            .get(format!("{base}/healthz"))
            .header("X-Request-Id", &unusable)
            .send()
            .await?;
        let id = id_of(&answer).unwrap_or_default();
        anyhow::ensure!(
            uuid::Uuid::parse_str(&id).is_ok(),
            "{unusable:?} was kept as {id:?}"
        );
    }
    stop.cancel();
    Ok(())
}
