//! Group commit against a real Postgres: commands for one seat in one group
//! are decided in arrival order, a group whose write fails changes nothing
//! and its commands are run again on their own, a key's answer is replayed
//! from within a group.

mod common;

use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Context};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use command_api::group_commit::{Grouping, ReplyOf};
use command_api::idempotency::Keyed;
use command_api::reply::Reply;
use command_api::sales::{Decided, Order, Sales};
use common::{check_log, TestApp};
use domain::{BookingId, SeatLabel, ShowId, UserId};
use serde_json::json;

/// How many transactions wrote the bookings' events.
async fn transactions(app: &TestApp) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar(
        "SELECT count(DISTINCT tx_id::text) FROM events WHERE aggregate_type = 'Booking'",
    )
    .fetch_one(&app.db.pool)
    .await?)
}

/// Sales over `app`'s database whose groups wait `window` for more, even
/// when no other group is in flight, two groups at once (the default).
fn grouped(app: &TestApp, window: Duration) -> Sales {
    Sales::new(
        app.db.pool.clone(),
        Duration::from_secs(600),
        8,
        Duration::from_millis(250),
    )
    .grouped(Grouping {
        max: 64,
        window,
        concurrent: 2,
        wait_when_idle: true,
    })
}

fn order(show_id: ShowId, seats: &[&str]) -> anyhow::Result<Order> {
    Ok(Order {
        booking_id: BookingId::from_uuid(uuid::Uuid::new_v4()),
        show_id,
        user_id: UserId::from_uuid(uuid::Uuid::new_v4()),
        seats: seats
            .iter()
            .map(|s| s.parse::<SeatLabel>())
            .collect::<Result<_, _>>()?,
        hold_for: None,
    })
}

/// The answer a booking gets: its id in the body.
fn reply_of() -> ReplyOf {
    Arc::new(|decided: &Decided| {
        let id = decided
            .booking
            .details()
            .map(|d| d.booking_id.to_string())
            .unwrap_or_default();
        Ok(Reply::json(
            StatusCode::CREATED,
            &json!({ "booking_id": id }),
        ))
    })
}

async fn new_show(app: &TestApp, seats: u32) -> anyhow::Result<ShowId> {
    let (status, body) = app
        .post(
            "/shows",
            &json!({"name": "Grouped", "venue": "Hall", "starts_at": "2027-05-01T19:00:00Z",
                    "sections": [{"name": "All", "price_cents": 1000,
                                  "rows": [{"row": "A", "seats": seats}]}]}),
        )
        .await?;
    ensure!(status == 201, "{body}");
    Ok(body["show_id"].as_str().context("show_id")?.parse()?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_for_one_seat_in_one_group_are_decided_in_arrival_order() -> anyhow::Result<()> {
    let app = TestApp::spawn().await?;
    let show_id = new_show(&app, 4).await?;
    let sales = grouped(&app, Duration::from_millis(100));
    let show = sales.show(show_id).await?;
    let (first, second, other) = (
        order(show_id, &["A1", "A2"])?,
        order(show_id, &["A2", "A3"])?,
        order(show_id, &["A4"])?,
    );
    let first_id = first.booking_id;
    // All three within one window: the second shares A2 with the first.
    let (a, b, c) = tokio::join!(
        sales.book(None, Arc::clone(&show), first, reply_of()),
        async {
            tokio::time::sleep(Duration::from_millis(5)).await;
            sales
                .book(None, Arc::clone(&show), second, reply_of())
                .await
        },
        async {
            tokio::time::sleep(Duration::from_millis(10)).await;
            sales.book(None, Arc::clone(&show), other, reply_of()).await
        },
    );
    let (a, b, c) = (a?, b?, c?);
    ensure!(a.status == StatusCode::CREATED, "first: {a:?}");
    ensure!(b.status == StatusCode::CONFLICT, "second: {b:?}");
    ensure!(c.status == StatusCode::CREATED, "other: {c:?}");
    let summary = check_log(&app.db.pool).await?;
    ensure!(
        summary.owned_by(first_id) == ["A1", "A2"].map(String::from).into(),
        "{:?}",
        summary.owned_by(first_id)
    );
    ensure!(
        transactions(&app).await? == 1,
        "the two bookings were meant to commit together"
    );
    app.stop().await
}

/// A chain across a group: the second command shares a seat with the
/// first, the third only with the second. The first is refused (a seat of
/// it was sold before), so the second wins its seats, and the third, which
/// arrived after the second, must lose to it rather than overtake it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_deferred_in_a_group_is_not_overtaken_by_a_later_one() -> anyhow::Result<()> {
    let app = TestApp::spawn().await?;
    let show_id = new_show(&app, 4).await?;
    let sales = grouped(&app, Duration::from_millis(100));
    let show = sales.show(show_id).await?;
    let sold = sales
        .book(
            None,
            Arc::clone(&show),
            order(show_id, &["A2"])?,
            reply_of(),
        )
        .await?;
    ensure!(sold.status == StatusCode::CREATED, "{sold:?}");
    let (first, second, third) = (
        order(show_id, &["A1", "A2"])?,
        order(show_id, &["A1", "A3"])?,
        order(show_id, &["A3"])?,
    );
    let second_id = second.booking_id;
    let (a, b, c) = tokio::join!(
        sales.book(None, Arc::clone(&show), first, reply_of()),
        async {
            tokio::time::sleep(Duration::from_millis(5)).await;
            sales
                .book(None, Arc::clone(&show), second, reply_of())
                .await
        },
        async {
            tokio::time::sleep(Duration::from_millis(10)).await;
            sales.book(None, Arc::clone(&show), third, reply_of()).await
        },
    );
    let (a, b, c) = (a?, b?, c?);
    ensure!(a.status == StatusCode::CONFLICT, "first: {a:?}");
    ensure!(b.status == StatusCode::CREATED, "second: {b:?}");
    ensure!(c.status == StatusCode::CONFLICT, "third: {c:?}");
    let summary = check_log(&app.db.pool).await?;
    ensure!(
        summary.owned_by(second_id) == ["A1", "A3"].map(String::from).into(),
        "{:?}",
        summary.owned_by(second_id)
    );
    app.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_whose_write_fails_changes_nothing_and_its_commands_run_on_their_own(
) -> anyhow::Result<()> {
    let app = TestApp::spawn().await?;
    let show_id = new_show(&app, 10).await?;
    // One buyer's bookings are refused by the database itself.
    let refused = UserId::from_uuid(uuid::Uuid::new_v4());
    sqlx::raw_sql(&format!(
        "CREATE FUNCTION refuse_one_buyer() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN RAISE EXCEPTION 'this buyer is refused'; END $$;
         CREATE TRIGGER refuse_one_buyer BEFORE INSERT ON events FOR EACH ROW
           WHEN (NEW.payload::text LIKE '%{refused}%') EXECUTE FUNCTION refuse_one_buyer();"
    ))
    .execute(&app.db.pool)
    .await?;
    let sales = grouped(&app, Duration::from_millis(100));
    let show = sales.show(show_id).await?;
    let mut orders = Vec::new();
    for n in 1..=5 {
        let mut order = order(show_id, &[&format!("A{n}")])?;
        if n == 3 {
            order.user_id = refused;
        }
        orders.push(order);
    }
    let answers = futures::future::join_all(
        orders
            .iter()
            .map(|order| sales.book(None, Arc::clone(&show), order.clone(), reply_of())),
    )
    .await;
    for (n, answer) in answers.iter().enumerate() {
        if n == 2 {
            ensure!(answer.is_err(), "the refused buyer's booking: {answer:?}");
        } else {
            let reply = answer.as_ref().map_err(|e| anyhow::anyhow!("{e}"))?;
            ensure!(reply.status == StatusCode::CREATED, "{n}: {reply:?}");
        }
    }
    let summary = check_log(&app.db.pool).await?;
    ensure!(
        summary.bookings.len() == 4,
        "{} bookings",
        summary.bookings.len()
    );
    ensure!(summary.owned_by(orders[2].booking_id).is_empty());
    ensure!(
        transactions(&app).await? == 4,
        "after the group failed, each booking was meant to commit on its own"
    );
    app.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keys_first_answer_is_replayed_from_within_a_group() -> anyhow::Result<()> {
    let app = TestApp::spawn().await?;
    let show_id = new_show(&app, 4).await?;
    let sales = grouped(&app, Duration::from_millis(2));
    let show = sales.show(show_id).await?;
    let mut headers = HeaderMap::new();
    headers.insert("idempotency-key", HeaderValue::from_static("grouped-1"));
    let body = json!({"seats": ["A1"]});
    let keyed = Keyed::from_headers(
        &headers,
        "POST /bookings",
        &service_kit::auth::Caller::Unchecked,
        &body,
    )?
    .context("a key")?;
    let first = sales
        .book(
            Some(&keyed),
            Arc::clone(&show),
            order(show_id, &["A1"])?,
            reply_of(),
        )
        .await?;
    ensure!(first.status == StatusCode::CREATED, "{first:?}");
    // The retry carries a new booking id, as a new request would; the key
    // gives it the first answer and books nothing.
    let retry = sales
        .book(
            Some(&keyed),
            Arc::clone(&show),
            order(show_id, &["A1"])?,
            reply_of(),
        )
        .await?;
    ensure!(retry.body == first.body, "{retry:?} after {first:?}");
    let summary = check_log(&app.db.pool).await?;
    ensure!(summary.bookings.len() == 1);
    app.stop().await
}

/// A booking run again after its group's commit reported an error that took
/// effect (the same booking id) is answered as it stands, not placed twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_booking_run_again_after_it_committed_is_not_placed_twice() -> anyhow::Result<()> {
    let app = TestApp::spawn().await?;
    let show_id = new_show(&app, 4).await?;
    let sales = grouped(&app, Duration::from_millis(1));
    let show = sales.show(show_id).await?;
    let placed = order(show_id, &["A1", "A2"])?;
    let wait = Duration::from_millis(250);
    let mut answers = Vec::new();
    for _ in 0..2 {
        let mut tx = app.db.pool.begin().await?;
        let decided = Sales::place(&mut tx, &show, placed.clone(), wait, false).await?;
        tx.commit().await?;
        answers.push(decided);
    }
    ensure!(
        answers[0].booking == answers[1].booking,
        "{:?} then {:?}",
        answers[0].booking,
        answers[1].booking
    );
    let placements: i64 =
        sqlx::query_scalar("SELECT count(*) FROM events WHERE event_type = 'BookingPlaced'")
            .fetch_one(&app.db.pool)
            .await?;
    ensure!(placements == 1, "{placements} placements of one booking");
    check_log(&app.db.pool).await?;
    app.stop().await
}
