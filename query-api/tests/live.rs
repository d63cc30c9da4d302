//! A subscriber that stops reading its stream, against a real MongoDB: it
//! is dropped rather than slow anyone, and resumes without loss. In
//! process, so that the test decides when the answer's body is polled (over
//! a socket, the kernels' buffers would take megabytes first); the other
//! subscriber reads over HTTP.

mod common;

use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use axum::body::Body;
use axum::http::{Request, StatusCode};
use domain::read_model::{self, BlockDoc, ShowDoc, BLOCKS, SHOWS, TALLIES};
use domain::SeatStatus;
use http_body_util::BodyExt;
use mongodb::bson::doc;
use serde_json::json;
use ticketing_tests::sse::{events_of, EventStream, SeatMap};
use ticketing_tests::{mongodb_uri, unique_name};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

const WAIT: Duration = Duration::from_secs(10);

#[tokio::test]
async fn a_subscriber_that_stops_reading_is_dropped_and_resumes_without_loss() -> anyhow::Result<()>
{
    let database = unique_name("query_live");
    let mongodb = mongodb::Client::with_uri_str(mongodb_uri()).await?;
    let db = mongodb.database(&database);
    let show_id = uuid::Uuid::new_v4().to_string();
    let show: ShowDoc = serde_json::from_value(json!({
        "_id": show_id, "name": "Lag", "venue": "Hall", "starts_at": "2027-01-01T19:00:00Z",
        "starts_order": 0,
        "sections": [{"name": "Stalls", "price_cents": 100, "rows": [{"row": "A", "seats": 20}],
                      "total": 20, "blocks": 1}]
    }))?;
    let blocks = db.collection::<BlockDoc>(&read_model::collection_name(1, BLOCKS));
    let tallies = db.collection::<BlockDoc>(&read_model::collection_name(1, TALLIES));
    db.collection::<ShowDoc>(&read_model::collection_name(1, SHOWS))
        .insert_one(&show)
        .await?;
    let mut block = show.blocks().remove(0);
    blocks.insert_one(&block).await?;
    tallies.insert_one(block.tally()).await?;

    let app = query_api::startup::App::build(query_api::startup::Settings {
        consistency_wait_ms: 2_000,
        live: query_api::live::LiveSettings {
            poll_ms: 20,
            lag_events: 2,
            ..query_api::live::LiveSettings::default()
        },
        ..common::settings(database)
    })
    .await?;
    let url = format!("http://{}/shows/{show_id}/availability/stream", app.addr()?);
    let router = app.router();
    let stop = CancellationToken::new();
    tokio::spawn(app.run_until(stop.clone()));

    // The stalled subscriber: its answer's body is not read for now.
    let answer = router
        .oneshot(Request::get(format!("/shows/{show_id}/availability/stream")).body(Body::empty())?)
        .await?;
    ensure!(
        answer.status() == StatusCode::OK,
        "the stream answered {}",
        answer.status()
    );
    let mut stalled = answer.into_body();

    let mut reader = EventStream::must_open(&reqwest::Client::new(), &url, None).await?;
    let mut seen = SeatMap::default();
    seen.apply(&reader.must_next(WAIT).await?)?;
    for n in 1..=10 {
        // As the projector writes: the block, then its tally.
        let label = format!("A{n}");
        let seat = block.seats.get_mut(&label).context("no such seat")?;
        seat.status = SeatStatus::Booked;
        seat.sequence = 1;
        block.counts.available -= 1;
        block.counts.booked += 1;
        block.writes += 1;
        blocks
            .replace_one(doc! { "_id": &block.block_id }, &block)
            .await?;
        tallies
            .replace_one(doc! { "_id": &block.block_id }, block.tally())
            .await?;
        // The reader keeps up while the other reads nothing.
        let started = Instant::now();
        while seen.seats.get(&label).is_none_or(|s| s != "booked") {
            ensure!(started.elapsed() < WAIT, "{label} never reached the reader");
            seen.apply(&reader.must_next(WAIT).await?)?;
        }
    }

    // The stalled one reads at last: its snapshot, then the end of its
    // stream, not ten changes it fell behind on.
    let mut body = Vec::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let frame = tokio::time::timeout_at(deadline, stalled.frame())
            .await
            .context("the stalled stream was not ended")?;
        match frame {
            Some(frame) => {
                if let Ok(data) = frame?.into_data() {
                    body.extend_from_slice(&data);
                }
            }
            None => break,
        }
    }
    let events = events_of(&String::from_utf8(body)?);
    ensure!(
        events.first().is_some_and(|e| e.event == "snapshot"),
        "the stalled stream began with {events:?}"
    );
    // Two changes of lag at most: it was ten behind, so its first wait for
    // a change found it had fallen behind, and its stream ended there.
    ensure!(
        events.len() == 1,
        "the stalled subscriber was not dropped: {events:?}"
    );
    let mut behind = SeatMap::default();
    for event in &events {
        behind.apply(event)?;
    }

    // It resumes from its last id: every change it missed, no snapshot.
    let last = behind.last_id.clone().context("no id")?;
    let mut resumed = EventStream::must_open(&reqwest::Client::new(), &url, Some(&last)).await?;
    let started = Instant::now();
    while behind.seats != seen.seats {
        ensure!(
            started.elapsed() < WAIT,
            "the resumed stream never caught up: {:?}",
            behind.seats
        );
        let event = resumed.must_next(WAIT).await?;
        ensure!(
            event.event == "change",
            "a resume from a kept id sent {event:?}"
        );
        behind.apply(&event)?;
    }
    stop.cancel();
    Ok(())
}
