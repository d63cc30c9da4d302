//! Every command endpoint's success and error paths, black-box over HTTP
//! against a real server and a real Postgres.

mod common;

use anyhow::ensure;
use common::{booking, check_log, jazz_night, TestApp};
use serde_json::{json, Value};

fn assert_problem(status: u16, body: &Value, expected: u16) -> anyhow::Result<()> {
    ensure!(
        status == expected,
        "expected {expected}, got {status}: {body}"
    );
    ensure!(body["status"] == expected, "problem status member: {body}");
    ensure!(
        body["type"].is_string() && body["title"].is_string() && body["detail"].is_string(),
        "{body}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shows_are_created_and_bad_seat_maps_refused() -> anyhow::Result<()> {
    let app = TestApp::spawn().await?;
    let response = app
        .client
        .post(format!("{}/shows", app.base))
        .json(&jazz_night())
        .send()
        .await?;
    ensure!(response.status() == 201);
    let location = response.headers()["location"].to_str()?.to_owned();
    let body: Value = response.json().await?;
    ensure!(body["seats"] == 50, "{body}");
    ensure!(location == format!("/shows/{}", body["show_id"].as_str().unwrap_or_default()));

    let mut bad = Vec::new();
    let mut with = |f: &dyn Fn(&mut Value)| {
        let mut show = jazz_night();
        f(&mut show);
        bad.push(show);
    };
    with(&|s| s["name"] = json!("  "));
    with(&|s| s["sections"] = json!([]));
    with(&|s| s["sections"][0]["rows"][0]["seats"] = json!(0));
    with(&|s| s["sections"][1]["rows"][1]["row"] = json!("A"));
    with(&|s| s["sections"][0]["rows"][0]["seats"] = json!(100_001));
    with(&|s| s["sections"][0]["price_cents"] = json!(-1));
    for show in bad {
        let (status, body) = app.post("/shows", &show).await?;
        assert_problem(status, &body, 422)?;
    }
    let summary = check_log(&app.db.pool).await?;
    ensure!(
        summary.events == 1,
        "a refused show wrote events: {}",
        summary.events
    );
    app.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_bodies_get_problems_and_change_nothing() -> anyhow::Result<()> {
    let app = TestApp::spawn().await?;
    let show_id = app.jazz_night().await?;
    let url = format!("{}/bookings", app.base);
    let send = |body: String, content_type: &'static str| {
        app.client
            .post(&url)
            .header("content-type", content_type)
            .body(body)
            .send()
    };
    let cases = [
        (send("{not json".into(), "application/json").await?, 400),
        (
            send(r#"{"show_id": 5}"#.into(), "application/json").await?,
            422,
        ),
        (
            send(
                booking(&show_id, &["A1"], false)
                    .to_string()
                    .replace("\"hold\"", "\"extra\":1,\"hold\""),
                "application/json",
            )
            .await?,
            422,
        ),
        (
            send(booking(&show_id, &["A1"], false).to_string(), "text/plain").await?,
            415,
        ),
        (
            send(
                format!(r#"{{"padding": "{}"}}"#, "x".repeat(70_000)),
                "application/json",
            )
            .await?,
            413,
        ),
    ];
    for (response, expected) in cases {
        let status = response.status().as_u16();
        let content_type = response
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap_or("").to_owned());
        let body: Value = response.json().await.unwrap_or(Value::Null);
        assert_problem(status, &body, expected)?;
        ensure!(
            content_type.as_deref() == Some("application/problem+json"),
            "{content_type:?}"
        );
    }
    ensure!(
        check_log(&app.db.pool).await?.events == 1,
        "a malformed request wrote events"
    );
    // Still serving.
    let (status, _) = app
        .post("/bookings", &booking(&show_id, &["A1"], false))
        .await?;
    ensure!(status == 201);
    app.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bookings_take_all_their_seats_or_none() -> anyhow::Result<()> {
    let app = TestApp::spawn().await?;
    let show_id = app.jazz_night().await?;

    let (status, body) = app
        .post("/bookings", &booking(&show_id, &["A1", "B2"], false))
        .await?;
    ensure!(status == 201, "{body}");
    ensure!(
        body["status"] == "confirmed" && body["total_cents"] == 22_500 + 9_000,
        "{body}"
    );
    ensure!(
        body["seats"] == json!(["A1", "B2"]) && body.get("expires_at").is_none(),
        "{body}"
    );

    let (status, body) = app
        .post("/bookings", &booking(&show_id, &["B1", "B2", "A1"], true))
        .await?;
    assert_problem(status, &body, 409)?;
    ensure!(body["unavailable_seats"] == json!(["B2", "A1"]), "{body}");

    let (status, body) = app
        .post("/bookings", &booking(&show_id, &["B1"], true))
        .await?;
    ensure!(
        status == 201 && body["status"] == "held" && body["expires_at"].is_string(),
        "{body}"
    );

    for (seats, member) in [
        (
            vec!["A1", "Z9", "A11", "??"],
            Some(json!(["??", "Z9", "A11"])),
        ),
        (vec![], None),
        (vec!["C1", "C1"], None),
        (
            vec![
                "C1", "C2", "C3", "C4", "C5", "C6", "C7", "C8", "C9", "C10", "C11",
            ],
            None,
        ),
    ] {
        let (status, body) = app
            .post("/bookings", &booking(&show_id, &seats, false))
            .await?;
        assert_problem(status, &body, 422)?;
        if let Some(member) = member {
            ensure!(body["unknown_seats"] == member, "{body}");
        }
    }
    let (status, body) = app
        .post(
            "/bookings",
            &booking(&uuid::Uuid::new_v4().to_string(), &["A1"], false),
        )
        .await?;
    assert_problem(status, &body, 404)?;
    let (status, body) = app
        .post("/bookings", &booking("not-a-uuid", &["A1"], false))
        .await?;
    assert_problem(status, &body, 422)?;

    let summary = check_log(&app.db.pool).await?;
    ensure!(summary.bookings.len() == 2, "refused bookings wrote events");
    app.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_bookings_confirm_and_cancel_idempotently() -> anyhow::Result<()> {
    let app = TestApp::spawn().await?;
    let show_id = app.jazz_night().await?;
    let (_, held) = app
        .post("/bookings", &booking(&show_id, &["C1", "C2"], true))
        .await?;
    let id = held["booking_id"].as_str().unwrap_or_default().to_owned();

    for _ in 0..2 {
        let (status, body) = app
            .post(&format!("/bookings/{id}/confirm"), &json!({}))
            .await?;
        ensure!(
            status == 200 && body["status"] == "confirmed" && body.get("expires_at").is_none(),
            "{body}"
        );
    }
    for _ in 0..2 {
        let (status, body) = app
            .post(&format!("/bookings/{id}/cancel"), &json!({}))
            .await?;
        ensure!(status == 200 && body["status"] == "cancelled", "{body}");
    }
    let (status, body) = app
        .post(&format!("/bookings/{id}/confirm"), &json!({}))
        .await?;
    assert_problem(status, &body, 409)?;
    ensure!(body["booking_status"] == "cancelled", "{body}");

    // The seats are free again, in the same step as the cancellation.
    let (status, _) = app
        .post("/bookings", &booking(&show_id, &["C1", "C2"], false))
        .await?;
    ensure!(status == 201);

    for path in [
        format!("/bookings/{}/confirm", uuid::Uuid::new_v4()),
        "/bookings/42/cancel".to_owned(),
    ] {
        let (status, body) = app.post(&path, &json!({})).await?;
        assert_problem(status, &body, 404)?;
    }
    check_log(&app.db.pool).await?;
    app.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lapsed_holds_expire_and_free_their_seats() -> anyhow::Result<()> {
    let app = TestApp::spawn_with(1).await?;
    let show_id = app.jazz_night().await?;
    let (_, first) = app
        .post("/bookings", &booking(&show_id, &["A1", "A2"], true))
        .await?;
    let (_, second) = app
        .post("/bookings", &booking(&show_id, &["A3"], true))
        .await?;
    tokio::time::sleep(std::time::Duration::from_millis(1_200)).await;

    let id = first["booking_id"].as_str().unwrap_or_default();
    let (status, body) = app
        .post(&format!("/bookings/{id}/confirm"), &json!({}))
        .await?;
    assert_problem(status, &body, 409)?;
    ensure!(body["booking_status"] == "expired", "{body}");
    let (status, body) = app
        .post(&format!("/bookings/{id}/cancel"), &json!({}))
        .await?;
    assert_problem(status, &body, 409)?;

    // Someone else takes a seat of the other lapsed hold at once.
    let (status, body) = app
        .post("/bookings", &booking(&show_id, &["A3", "A1"], false))
        .await?;
    ensure!(status == 201, "{body}");

    // And the sweeper records every lapse in the log.
    let second_id: domain::BookingId = second["booking_id"].as_str().unwrap_or_default().parse()?;
    for _ in 0..50 {
        let summary = check_log(&app.db.pool).await?;
        if summary
            .bookings
            .values()
            .filter(|b| b.status() == Some(domain::BookingStatus::Expired))
            .count()
            == 2
        {
            ensure!(summary.owned_by(second_id).is_empty());
            return app.stop().await;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    anyhow::bail!("the sweeper did not expire the lapsed holds")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_keys_replay_the_first_answer() -> anyhow::Result<()> {
    let app = TestApp::spawn().await?;
    let show_id = app.jazz_night().await?;
    let request = booking(&show_id, &["B5"], false);

    let (first_status, first) = app.post_with("/bookings", &request, Some("key-1")).await?;
    let (again_status, again) = app.post_with("/bookings", &request, Some("key-1")).await?;
    ensure!(
        first_status == 201 && again_status == 201,
        "{first} {again}"
    );
    ensure!(
        first == again,
        "a retry got a different answer: {first} vs {again}"
    );

    let (status, body) = app
        .post_with(
            "/bookings",
            &booking(&show_id, &["B6"], false),
            Some("key-1"),
        )
        .await?;
    assert_problem(status, &body, 422)?;

    // A refusal is an answer too: remembered, and replayed even after the seat frees up.
    let taken = booking(&show_id, &["B5"], false);
    let (status, _) = app.post_with("/bookings", &taken, Some("key-2")).await?;
    ensure!(status == 409);
    let id = first["booking_id"].as_str().unwrap_or_default();
    app.post(&format!("/bookings/{id}/cancel"), &json!({}))
        .await?;
    let (status, _) = app.post_with("/bookings", &taken, Some("key-2")).await?;
    ensure!(status == 409, "the remembered refusal was not replayed");

    // Concurrent retries of one request book once.
    let request = booking(&show_id, &["C9", "C10"], true);
    let tries = (0..8).map(|_| app.post_with("/bookings", &request, Some("key-3")));
    let answers = futures::future::join_all(tries).await;
    let ids: std::collections::BTreeSet<String> = answers
        .into_iter()
        .filter_map(Result::ok)
        .filter(|(status, _)| *status == 201)
        .map(|(_, body)| body["booking_id"].as_str().unwrap_or_default().to_owned())
        .collect();
    ensure!(ids.len() == 1, "concurrent retries made bookings {ids:?}");

    let (status, body) = app
        .post_with("/bookings", &request, Some(&"k".repeat(256)))
        .await?;
    assert_problem(status, &body, 422)?;
    let summary = check_log(&app.db.pool).await?;
    ensure!(
        summary.bookings.len() == 2,
        "expected 2 bookings, log has {}",
        summary.bookings.len()
    );
    app.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_readiness_and_openapi_answer() -> anyhow::Result<()> {
    let app = TestApp::spawn().await?;
    for path in ["/healthz", "/readyz"] {
        let status = app
            .client
            .get(format!("{}{path}", app.base))
            .send()
            .await?
            .status();
        ensure!(status == 200, "{path}: {status}");
    }
    let doc: Value = app
        .client
        .get(format!("{}/openapi.json", app.base))
        .send()
        .await?
        .json()
        .await?;
    for path in [
        "/shows",
        "/bookings",
        "/bookings/{id}/confirm",
        "/bookings/{id}/cancel",
    ] {
        ensure!(
            doc["paths"][path]["post"].is_object(),
            "openapi lacks {path}"
        );
    }
    let problems = ticketing_tests::openapi::parameter_problems(&doc);
    ensure!(problems.is_empty(), "{problems:?}");
    app.stop().await
}

/// Where autovacuum is off, `events` is never analyzed and a generic plan
/// cached while it was small would stay a sequential scan: every connection
/// plans each query for the table as it is.
#[tokio::test]
async fn every_connection_plans_for_the_table_as_it_is() -> anyhow::Result<()> {
    let db = ticketing_tests::TestDatabase::create().await?;
    let pool = command_api::startup::connect(&common::settings(db.url(), 600)).await?;
    let mode: String = sqlx::query_scalar("SHOW plan_cache_mode")
        .fetch_one(&pool)
        .await?;
    assert_eq!(mode, "force_custom_plan");
    pool.close().await;
    db.drop_database().await
}

/// What no route takes is a problem document too: an unknown path, a
/// method a path does not take, a booking id that is not even text.
#[tokio::test]
async fn paths_and_methods_no_route_takes_are_problems() -> anyhow::Result<()> {
    use reqwest::StatusCode;
    use ticketing_tests::http::Answer;
    let app = TestApp::spawn().await?;
    let cases = [
        ("POST", "/no/such/thing", StatusCode::NOT_FOUND, "not-found"),
        (
            "GET",
            "/bookings",
            StatusCode::METHOD_NOT_ALLOWED,
            "method-not-allowed",
        ),
        (
            "POST",
            "/bookings/%FF/confirm",
            StatusCode::NOT_FOUND,
            "not-found",
        ),
        (
            "POST",
            "/bookings/7f1d3c3e8a4b4f7e9d592d3c1b0a9e11/cancel",
            StatusCode::NOT_FOUND,
            "not-found",
        ),
    ];
    for (method, path, status, kind) in cases {
        let request = app
            .client
            .request(method.parse()?, format!("{}{path}", app.base));
        Answer::of(request.send().await?)
            .await?
            .is_problem(status, kind)
            .map_err(|e| anyhow::anyhow!("{method} {path}: {e}"))?;
    }
    ensure!(
        check_log(&app.db.pool).await?.events == 0,
        "a refused request wrote an event"
    );
    app.stop().await
}
