//! Every event names the request that caused it: its `X-Request-Id` and
//! its user in the event's metadata, carried on Kafka (envelope and
//! headers) and logged by the projector when applied. Bookings placed at
//! once are appended together by group commit, and each keeps its own.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use reqwest::StatusCode;
use serde_json::{json, Value};
use sqlx::Row;
use ticketing_tests::auth::{bearer, token};
use ticketing_tests::http::Answer;
use ticketing_tests::kafka::read_topic;
use ticketing_tests::system::{Service, System, SystemSettings};

const BUYERS: usize = 8;

/// The metadata of every event in the log, by stream id.
async fn metadata_by_stream(system: &System) -> anyhow::Result<BTreeMap<String, Vec<Value>>> {
    let rows = sqlx::query("SELECT aggregate_id, metadata FROM events ORDER BY global_position")
        .fetch_all(system.postgres()?)
        .await?;
    let mut by_stream: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for row in rows {
        by_stream
            .entry(row.try_get("aggregate_id")?)
            .or_default()
            .push(row.try_get("metadata")?);
    }
    Ok(by_stream)
}

#[tokio::test]
async fn each_event_names_its_request_and_user_through_to_the_projector() -> anyhow::Result<()> {
    let system = System::start(SystemSettings {
        hold_secs: 1,
        env: vec![
            ("RUST_LOG", "info,projector::store=debug".to_owned()),
            // One group at a time: bookings arriving while one commits
            // queue up and are appended together.
            ("COMMAND_BATCHES", "1".to_owned()),
        ],
    })
    .await?;
    let show = system.create_show(&[("Floor", &[("A", 20)])]).await?;

    // Buyers at once, each with a token of their own and a request id.
    let buyers: Vec<(uuid::Uuid, String)> = (0..BUYERS)
        .map(|i| {
            (
                uuid::Uuid::new_v4(),
                format!("corr-{i}-{}", uuid::Uuid::new_v4()),
            )
        })
        .collect();
    let plain = reqwest::Client::new();
    let placed = futures::future::join_all(buyers.iter().enumerate().map(|(i, (user, id))| {
        let request = plain
            .post(format!("{}/bookings", system.command_url))
            .header("Authorization", bearer(&token(*user, &[])))
            .header("X-Request-Id", id)
            .json(&json!({"show_id": show, "user_id": user,
                          "seats": [format!("A{}", 2 * i + 1), format!("A{}", 2 * i + 2)]}));
        async move { Answer::of(request.send().await?).await }
    }))
    .await;
    let mut bookings = Vec::new();
    for (answer, (user, id)) in placed.into_iter().zip(&buyers) {
        let answer = answer?;
        ensure!(answer.status == StatusCode::CREATED, "{}", answer.body);
        ensure!(
            answer.header("x-request-id") == id,
            "the answer names its request"
        );
        let booking = answer.body["booking_id"]
            .as_str()
            .context("no booking_id")?;
        bookings.push((booking.to_owned(), *user, id.clone()));
    }
    // A hold the sweeper expires: a pass of its own names those events.
    let held = system.book(&show, &["A20"], true).await?;
    let held_id = held.body["booking_id"].as_str().context("no booking_id")?;
    let started = Instant::now();
    loop {
        let streams = metadata_by_stream(&system).await?;
        if streams.get(held_id).is_some_and(|events| events.len() == 2) {
            ensure!(
                streams[held_id][1]["correlation_id"]
                    .as_str()
                    .is_some_and(|id| id.starts_with("sweep-")),
                "the expiry names its sweep: {}",
                streams[held_id][1]
            );
            ensure!(streams[held_id][1].get("user_id").is_none());
            break;
        }
        ensure!(
            started.elapsed() < Duration::from_secs(15),
            "the hold never expired"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // In the log: each booking's stream and its seats' streams name the
    // request and user that placed it, and nothing else.
    let streams = metadata_by_stream(&system).await?;
    for (i, (booking, user, id)) in bookings.iter().enumerate() {
        let expected = json!({"correlation_id": id, "user_id": user.to_string()});
        let booking_events = streams.get(booking).context("no booking stream")?;
        ensure!(
            booking_events == &vec![expected.clone()],
            "{booking}: {booking_events:?}"
        );
        let seats = [
            format!("{show}:A{}", 2 * i + 1),
            format!("{show}:A{}", 2 * i + 2),
        ];
        for seat in &seats {
            let seat_events = streams.get(seat).context("no seat stream")?;
            ensure!(
                seat_events == &vec![expected.clone()],
                "{seat}: {seat_events:?}"
            );
        }
    }

    // They were placed together: group commit appended several of them in
    // one transaction, on a task of its own, and each kept its own cause.
    let ids: Vec<String> = bookings.iter().map(|(b, _, _)| b.clone()).collect();
    let transactions: i64 =
        sqlx::query_scalar("SELECT count(DISTINCT tx_id) FROM events WHERE aggregate_id = ANY($1)")
            .bind(&ids)
            .fetch_one(system.postgres()?)
            .await?;
    ensure!(
        transactions < i64::try_from(BUYERS)?,
        "{BUYERS} bookings in {transactions} transactions: none was grouped"
    );

    // The show's creation names its request and the operator.
    let created = streams.get(&show).context("no show stream")?;
    ensure!(
        created.len() == 1
            && created[0]["correlation_id"]
                .as_str()
                .is_some_and(|id| !id.is_empty())
            && created[0]["user_id"].as_str().is_some(),
        "{created:?}"
    );

    // On Kafka: the envelope carries the metadata, the headers the request
    // id and a traceparent whose trace is that id.
    let (_, _, first_id) = &bookings[0];
    let received = read_topic(system.topic(), Duration::from_secs(20), |received| {
        received
            .iter()
            .filter(|r| r.event.metadata.get("correlation_id") == Some(first_id))
            .count()
            >= 3
    })
    .await?;
    let carried: Vec<_> = received
        .iter()
        .filter(|r| r.event.metadata.get("correlation_id") == Some(first_id))
        .collect();
    ensure!(
        carried.len() >= 3,
        "the booking's events on Kafka: {}",
        carried.len()
    );
    for message in carried {
        ensure!(message.headers.get("correlation_id") == Some(first_id));
        let traceparent = message
            .headers
            .get("traceparent")
            .context("no traceparent")?;
        let parts: Vec<&str> = traceparent.split('-').collect();
        ensure!(
            parts.len() == 4 && parts[0] == "00" && parts[3] == "01",
            "{traceparent}"
        );
        ensure!(
            parts[1].len() == 32 && parts[2].len() == 16,
            "{traceparent}"
        );
        ensure!(
            parts[2] == format!("{:016x}", message.event.global_position),
            "{traceparent}: the span is the event"
        );
        // The request id is not a UUID: the trace is the UUID derived from it.
        let trace = uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, first_id.as_bytes());
        ensure!(
            parts[1] == trace.simple().to_string(),
            "{traceparent}: the trace is the request"
        );
    }

    // The projector logs each event it applies with its request id.
    let started = Instant::now();
    loop {
        let log = std::fs::read_to_string(system.log_path(Service::Projector))?;
        let applied = log
            .lines()
            .filter(|line| line.contains("event applied") && line.contains(first_id.as_str()))
            .count();
        if applied >= 3 {
            break;
        }
        ensure!(
            started.elapsed() < Duration::from_secs(15),
            "the projector logged {applied} events of {first_id}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // A hold confirmed, then cancelled, each by a request of its own: each
    // event names the request that made it.
    let (buyer, _) = &buyers[0];
    let as_buyer = |id: &str| {
        reqwest::Client::new()
            .post(format!("{}/bookings", system.command_url))
            .header("Authorization", bearer(&token(*buyer, &[])))
            .header("X-Request-Id", id)
    };
    let held = Answer::of(
        as_buyer("hold-1")
            .json(&json!({"show_id": show, "user_id": buyer, "seats": ["A19"], "hold": true}))
            .send()
            .await?,
    )
    .await?;
    ensure!(held.status == StatusCode::CREATED, "{}", held.body);
    let booking = held.body["booking_id"].as_str().context("no id")?;
    let settle = |action: &str, id: &str| {
        reqwest::Client::new()
            .post(format!(
                "{}/bookings/{booking}/{action}",
                system.command_url
            ))
            .header("Authorization", bearer(&token(*buyer, &[])))
            .header("X-Request-Id", id)
            .send()
    };
    ensure!(settle("confirm", "confirm-1").await?.status() == StatusCode::OK);
    ensure!(settle("cancel", "cancel-1").await?.status() == StatusCode::OK);
    let streams = metadata_by_stream(&system).await?;
    let named = |events: &[Value]| -> Vec<String> {
        events
            .iter()
            .map(|m| {
                format!(
                    "{}/{}",
                    m["correlation_id"].as_str().unwrap_or("-"),
                    m["user_id"].as_str().unwrap_or("-")
                )
            })
            .collect()
    };
    let user = buyer.to_string();
    let expected: Vec<String> = ["hold-1", "confirm-1", "cancel-1"]
        .iter()
        .map(|id| format!("{id}/{user}"))
        .collect();
    let booking_events = streams.get(booking).context("no booking stream")?;
    ensure!(named(booking_events) == expected, "{booking_events:?}");
    let seat_events = streams
        .get(&format!("{show}:A19"))
        .context("no seat stream")?;
    ensure!(named(seat_events) == expected, "{seat_events:?}");
    system.stop().await
}
