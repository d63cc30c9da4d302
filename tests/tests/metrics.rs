//! What an operator sees in `GET /metrics` of the three release binaries
//! during a small sale: requests by route template, bookings by outcome,
//! the relay's and the projector's progress, live subscribers.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use reqwest::StatusCode;
use serde_json::json;
use ticketing_tests::http::Answer;
use ticketing_tests::metrics::Scrape;
use ticketing_tests::sse::EventStream;
use ticketing_tests::system::{Service, System, SystemSettings};

const WAIT: Duration = Duration::from_secs(15);

/// Scrapes `service` until `done` holds of the scrape.
async fn scrape_until(
    system: &System,
    service: Service,
    what: &str,
    done: impl Fn(&Scrape) -> bool,
) -> anyhow::Result<Scrape> {
    let started = Instant::now();
    loop {
        let scrape = system.metrics(service).await?;
        if done(&scrape) {
            return Ok(scrape);
        }
        ensure!(
            started.elapsed() < WAIT,
            "{what}: not within {WAIT:?}; last scrape:\n{}",
            scrape.text
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn an_operator_sees_the_sale_by_route_outcome_and_lag() -> anyhow::Result<()> {
    let system = System::start(SystemSettings::default()).await?;
    let show = system.create_show(&[("Floor", &[("A", 10)])]).await?;

    // One of each outcome: booked, held, refused for a seat taken, for a
    // body that is not the route's, for a body that breaks a rule, and a
    // keyed retry answered with its first answer.
    let booked = system.book(&show, &["A1", "A2"], false).await?;
    let held = system.book(&show, &["A3"], true).await?;
    let taken = system
        .post(
            "/bookings",
            &json!({"show_id": show, "user_id": uuid::Uuid::new_v4(), "seats": ["A1"]}),
            None,
        )
        .await?;
    ensure!(taken.status == StatusCode::CONFLICT, "{}", taken.body);
    let bad = system
        .post(
            "/bookings",
            &json!({"show_id": show, "seats": ["A9"], "colour": "red"}),
            None,
        )
        .await?;
    bad.is_problem(StatusCode::UNPROCESSABLE_ENTITY, "bad-body")?;
    let invalid = system
        .post("/bookings", &json!({"show_id": show}), None)
        .await?;
    invalid.is_problem(StatusCode::UNPROCESSABLE_ENTITY, "invalid-request")?;
    let keyed = json!({"show_id": show, "user_id": uuid::Uuid::new_v4(), "seats": ["A5"]});
    for _ in 0..2 {
        let answer = system
            .post("/bookings", &keyed, Some("metrics-retry"))
            .await?;
        ensure!(answer.status == StatusCode::CREATED, "{}", answer.body);
    }
    // A keyed refusal is kept as the key's answer, and counted by its
    // problem's type; its retry is a replay.
    let keyed_taken = json!({"show_id": show, "user_id": uuid::Uuid::new_v4(), "seats": ["A2"]});
    for _ in 0..2 {
        let answer = system
            .post("/bookings", &keyed_taken, Some("metrics-taken"))
            .await?;
        answer.is_problem(StatusCode::CONFLICT, "seats-unavailable")?;
    }
    // A method the route lacks is counted under the route's template.
    let wrong_method = system
        .http
        .get(format!("{}/bookings", system.command_url))
        .send()
        .await?;
    ensure!(wrong_method.status() == StatusCode::METHOD_NOT_ALLOWED);
    let held_id = held.body["booking_id"].as_str().context("no booking_id")?;
    let confirmed = Answer::of(
        system
            .http
            .post(format!("{}/bookings/{held_id}/confirm", system.command_url))
            .send()
            .await?,
    )
    .await?;
    ensure!(confirmed.status == StatusCode::OK, "{}", confirmed.body);

    let command = system.metrics(Service::CommandApi).await?;
    for (outcome, count) in [
        ("booked", 2.0),
        ("held", 1.0),
        ("replayed", 2.0),
        ("seats-unavailable", 2.0),
        ("bad-body", 1.0),
        ("invalid-request", 1.0),
    ] {
        assert_eq!(
            command.sum("bookings_total", &[("outcome", outcome)]),
            count,
            "bookings_total{{outcome={outcome}}}:\n{}",
            command.text
        );
    }
    assert_eq!(
        command.sum(
            "http_requests_total",
            &[
                ("method", "POST"),
                ("route", "/bookings"),
                ("status", "201")
            ]
        ),
        4.0
    );
    assert_eq!(
        command.sum(
            "http_requests_total",
            &[("route", "/bookings/{id}/confirm"), ("status", "200")]
        ),
        1.0
    );
    assert_eq!(
        command.sum(
            "http_requests_total",
            &[("method", "GET"), ("route", "/bookings"), ("status", "405")]
        ),
        1.0
    );
    assert!(command.has(
        "http_request_duration_seconds_bucket",
        &[("route", "/bookings"), ("status", "409"), ("le", "0.005")]
    ));
    // Route templates only: no id is ever a label.
    assert!(!command.text.contains(held_id), "{}", command.text);

    // The relay publishes every committed event, and its backlog empties.
    let committed: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(system.postgres()?)
        .await?;
    #[allow(clippy::cast_precision_loss)]
    let committed = committed as f64;
    scrape_until(&system, Service::CommandApi, "relay caught up", |s| {
        s.sum("relay_published_total", &[]) >= committed
            && s.has("relay_lag_events", &[])
            && s.sum("relay_lag_events", &[]) == 0.0
            && s.has("relay_lag_seconds", &[])
    })
    .await?;

    // The projector applies them all and measures no lag; nothing parked.
    scrape_until(&system, Service::Projector, "projector caught up", |s| {
        s.sum("projector_events_applied_total", &[]) >= committed
            && s.has("projector_lag_events", &[])
            && s.sum("projector_lag_events", &[]) == 0.0
            && s.has("projector_parked_events", &[])
            && s.sum("projector_parked_events", &[]) == 0.0
    })
    .await?;

    // query-api: reads by template, a path no route has under one label,
    // and the live streams open now.
    let booking_id = booked.body["booking_id"]
        .as_str()
        .context("no booking_id")?;
    let read = system
        .http
        .get(format!("{}/bookings/{booking_id}", system.query_url))
        .send()
        .await?;
    ensure!(read.status() == StatusCode::OK, "{}", read.status());
    let unknown = system
        .http
        .get(format!("{}/no/such/place", system.query_url))
        .send()
        .await?;
    ensure!(unknown.status() == StatusCode::NOT_FOUND);
    let stream = EventStream::open(
        &reqwest::Client::new(),
        &format!("{}/shows/{show}/availability/stream", system.query_url),
        None,
    )
    .await?
    .ok()
    .context("the stream was refused")?;
    let query = system.metrics(Service::QueryApi).await?;
    assert_eq!(
        query.sum(
            "http_requests_total",
            &[("route", "/bookings/{id}"), ("status", "200")]
        ),
        1.0
    );
    assert_eq!(
        query.sum(
            "http_requests_total",
            &[("route", "(no route)"), ("status", "404")]
        ),
        1.0
    );
    assert_eq!(query.sum("sse_subscribers", &[]), 1.0);
    for route in query.label_values("http_requests_total", "route") {
        assert!(
            route == "(no route)" || route.starts_with('/') && !route.contains(booking_id),
            "a raw path as a route label: {route}"
        );
    }
    drop(stream);
    scrape_until(&system, Service::QueryApi, "subscriber gone", |s| {
        s.sum("sse_subscribers", &[]) == 0.0
    })
    .await?;
    system.stop().await
}
