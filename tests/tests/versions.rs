//! An event's shape changed (`BookingCancelled` version 2 records who
//! cancelled), and the log still holds version 1 forever. Rows of the old
//! version, written as raw SQL as the first release wrote them, are
//! loaded by the command side, projected, and replayed, each through the
//! upcaster; new cancellations are written as version 2.

use anyhow::{ensure, Context};
use reqwest::StatusCode;
use serde_json::{json, Value};
use ticketing_tests::auth::{bearer, token};
use ticketing_tests::http::Answer;
use ticketing_tests::system::{Service, System, SystemSettings};

/// A booking of seat `label`, placed and then cancelled, as the first
/// release wrote it: `BookingCancelled` without `cancelled_by`, version 1.
async fn write_old_cancelled_booking(
    system: &System,
    show: &str,
    label: &str,
) -> anyhow::Result<String> {
    let booking = uuid::Uuid::new_v4().to_string();
    let user = uuid::Uuid::new_v4().to_string();
    let seat = format!("{show}:{label}");
    let rows = [
        (
            "Booking",
            booking.as_str(),
            1,
            "BookingPlaced",
            json!({"BookingPlaced": {"booking_id": booking, "show_id": show, "user_id": user,
             "seats": [{"label": label, "price_cents": 5000}], "total_cents": 5000,
             "placed_at": "2026-11-01T18:00:00Z"}}),
        ),
        (
            "Seat",
            seat.as_str(),
            1,
            "SeatBooked",
            json!({"SeatBooked": {"show_id": show, "label": label, "booking_id": booking}}),
        ),
        (
            "Booking",
            booking.as_str(),
            2,
            "BookingCancelled",
            json!({"BookingCancelled": {"booking_id": booking, "show_id": show,
             "cancelled_at": "2026-11-01T18:05:00Z"}}),
        ),
        (
            "Seat",
            seat.as_str(),
            2,
            "SeatReleased",
            json!({"SeatReleased": {"show_id": show, "label": label, "booking_id": booking,
             "reason": "cancelled"}}),
        ),
    ];
    let mut tx = system.postgres()?.begin().await?;
    for (aggregate_type, aggregate_id, sequence, event_type, payload) in rows {
        sqlx::query(
            "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type,
                                 event_version, payload, metadata)
             VALUES ($1, $2, $3, $4, '1', $5, '{}')",
        )
        .bind(aggregate_type)
        .bind(aggregate_id)
        .bind(sequence)
        .bind(event_type)
        .bind(payload)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(booking)
}

/// `GET /bookings/{id}` on query-api once `done` holds of it.
async fn read_booking_until(
    system: &System,
    booking: &str,
    what: &str,
    done: impl Fn(&Value) -> bool,
) -> anyhow::Result<Value> {
    system
        .read_until(&format!("/bookings/{booking}"), what, done)
        .await
}

async fn post(system: &System, client: &reqwest::Client, path: &str) -> anyhow::Result<Answer> {
    Answer::of(
        client
            .post(format!("{}{path}", system.command_url))
            .send()
            .await?,
    )
    .await
}

#[tokio::test]
async fn old_cancellations_load_project_and_replay_beside_new_ones() -> anyhow::Result<()> {
    let system = System::start(SystemSettings::default()).await?;
    let show = system.create_show(&[("Floor", &[("A", 10)])]).await?;
    let old = write_old_cancelled_booking(&system, &show, "A3").await?;

    // Projected: the old cancellation reads as cancelled by someone
    // unrecorded.
    let read = read_booking_until(&system, &old, "the old booking projected", |b| {
        b["status"] == "cancelled"
    })
    .await?;
    ensure!(read["cancelled_by"] == "unrecorded", "{read}");

    // Loaded by the command side: cancelled (cancelling again changes
    // nothing), not to be confirmed, its seat free.
    let again = post(&system, &system.http, &format!("/bookings/{old}/cancel")).await?;
    ensure!(
        again.status == StatusCode::OK && again.body["status"] == "cancelled",
        "{} {}",
        again.status,
        again.body
    );
    let confirm = post(&system, &system.http, &format!("/bookings/{old}/confirm")).await?;
    confirm.is_problem(StatusCode::CONFLICT, "booking-closed")?;
    ensure!(
        confirm.body["booking_status"] == "cancelled",
        "{}",
        confirm.body
    );
    system.book(&show, &["A3"], false).await?;

    // New cancellations are version 2, and say who.
    let buyer = uuid::Uuid::new_v4();
    let as_buyer = reqwest::Client::builder()
        .default_headers(
            [(
                reqwest::header::AUTHORIZATION,
                bearer(&token(buyer, &[])).parse()?,
            )]
            .into_iter()
            .collect(),
        )
        .build()?;
    let placed = Answer::of(
        as_buyer
            .post(format!("{}/bookings", system.command_url))
            .json(&json!({"show_id": show, "user_id": buyer, "seats": ["A4"]}))
            .send()
            .await?,
    )
    .await?;
    ensure!(placed.status == StatusCode::CREATED, "{}", placed.body);
    let by_buyer = placed.body["booking_id"]
        .as_str()
        .context("no id")?
        .to_owned();
    let cancelled = post(&system, &as_buyer, &format!("/bookings/{by_buyer}/cancel")).await?;
    ensure!(cancelled.status == StatusCode::OK, "{}", cancelled.body);
    let by_staff = system.book(&show, &["A5"], false).await?.body["booking_id"]
        .as_str()
        .context("no id")?
        .to_owned();
    let cancelled = post(
        &system,
        &system.http,
        &format!("/bookings/{by_staff}/cancel"),
    )
    .await?;
    ensure!(cancelled.status == StatusCode::OK, "{}", cancelled.body);
    let versions: Vec<(String, String)> = sqlx::query_as(
        "SELECT aggregate_id, event_version FROM events
          WHERE event_type = 'BookingCancelled' ORDER BY global_position",
    )
    .fetch_all(system.postgres()?)
    .await?;
    ensure!(
        versions
            == vec![
                (old.clone(), "1".to_owned()),
                (by_buyer.clone(), "2".to_owned()),
                (by_staff.clone(), "2".to_owned())
            ],
        "{versions:?}"
    );
    for (booking, who) in [(&by_buyer, "buyer"), (&by_staff, "staff")] {
        read_booking_until(&system, booking, "a new cancellation projected", |b| {
            b["status"] == "cancelled" && b["cancelled_by"] == who
        })
        .await?;
    }

    // Replayed from the log into a new generation: the same answers.
    system.replay().await?;
    for (booking, who) in [
        (&old, "unrecorded"),
        (&by_buyer, "buyer"),
        (&by_staff, "staff"),
    ] {
        read_booking_until(&system, booking, "replayed", |b| {
            b["status"] == "cancelled" && b["cancelled_by"] == who
        })
        .await?;
    }
    let generation = system.readyz(Service::QueryApi).await?;
    ensure!(
        generation["generation"] == 2,
        "the replay switched: {generation}"
    );
    system.stop().await
}
