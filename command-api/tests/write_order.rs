//! The write transaction under contention, against a real server and a real
//! Postgres: the log's commit order never puts a stream backwards, a
//! confirm that loses its lapsed hold to another buyer meanwhile is a 409,
//! and the sweeper neither waits for buyers nor trips over them.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Context};
use command_api::event_log::{self, LockWait};
use command_api::relay::Relay;
use command_api::sales::{Order, Sales};
use command_api::sweeper;
use common::{booking, check_log, relay_settings, TestApp};
use domain::{BookingId, SeatLabel, ShowId, UserId};
use serde_json::{json, Value};
use ticketing_tests::kafka::{check_against_log, distinct_events, events_in_log, read_topic};
use ticketing_tests::{kafka_brokers, unique_name};
use tokio_util::sync::CancellationToken;

/// Streams whose sequences, in the log's commit order `(tx_id,
/// global_position)`, are not 1, 2, 3, ...: the order the relay publishes
/// and replay applies.
async fn streams_out_of_order(pool: &sqlx::PgPool) -> anyhow::Result<Vec<(String, i64, i64)>> {
    Ok(sqlx::query_as(
        "SELECT aggregate_id, sequence, prev FROM (
             SELECT aggregate_id, sequence,
                    coalesce(lag(sequence) OVER (PARTITION BY aggregate_type, aggregate_id
                                                 ORDER BY tx_id, global_position), 0) AS prev
               FROM events) AS s
          WHERE sequence <> prev + 1
          LIMIT 20",
    )
    .fetch_all(pool)
    .await?)
}

async fn small_show(app: &TestApp, seats: u32) -> anyhow::Result<String> {
    let (status, body) = app
        .post(
            "/shows",
            &json!({"name": "Contended", "venue": "Club", "starts_at": "2027-05-01T19:00:00Z",
                    "sections": [{"name": "All", "price_cents": 2500,
                                  "rows": [{"row": "A", "seats": seats}]}]}),
        )
        .await?;
    ensure!(status == 201, "{body}");
    Ok(body["show_id"].as_str().context("show_id")?.to_owned())
}

/// Buyers with keys on a few seats, each request sent twice at once under
/// the same key, holds that lapse (one second) and are taken over with
/// their other seats, confirms and cancels: every kind of write, all of
/// them contending.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyed_contended_writes_never_put_a_stream_backwards_in_commit_order() -> anyhow::Result<()>
{
    let app = TestApp::spawn_with(1).await?;
    let show_id = small_show(&app, 8).await?;
    let running = Arc::new(AtomicBool::new(true));
    let answered = Arc::new(AtomicUsize::new(0));
    let mut buyers = Vec::new();
    for buyer in 0..16_u64 {
        let (client, base, show_id) = (app.client.clone(), app.base.clone(), show_id.clone());
        let (running, answered) = (Arc::clone(&running), Arc::clone(&answered));
        buyers.push(tokio::spawn(async move {
            let mut state = 0x9e37_79b9_7f4a_7c15 ^ (buyer + 1);
            let mut next = move || {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state
            };
            let mut server_errors = Vec::new();
            let mut n = 0;
            while running.load(Ordering::Relaxed) {
                n += 1;
                let first = 1 + next() % 8;
                let seats: Vec<String> = if next() % 2 == 0 {
                    vec![format!("A{first}")]
                } else {
                    vec![format!("A{first}"), format!("A{}", 1 + first % 8)]
                };
                let body = json!({"show_id": show_id, "user_id": uuid::Uuid::new_v4().to_string(),
                                  "seats": seats, "hold": next() % 2 == 0});
                let key = format!("buyer-{buyer}-{n}");
                // The same keyed request twice at once: a client's retry.
                let send = || {
                    client
                        .post(format!("{base}/bookings"))
                        .header("Idempotency-Key", &key)
                        .json(&body)
                        .send()
                };
                let (a, b) = tokio::join!(send(), send());
                for answer in [a, b] {
                    let Ok(answer) = answer else { continue };
                    let status = answer.status().as_u16();
                    let value: Value = answer.json().await.unwrap_or(Value::Null);
                    answered.fetch_add(1, Ordering::Relaxed);
                    if status >= 500 {
                        server_errors.push(format!("{status} {value}"));
                    }
                    if status != 201 {
                        continue;
                    }
                    let Some(id) = value["booking_id"].as_str() else {
                        continue;
                    };
                    // Seats churn: half the holds are left to lapse, the
                    // other half confirmed; most bookings are cancelled.
                    let held = value["status"] == "held";
                    let mut actions = Vec::new();
                    if held && next() % 2 == 0 {
                        actions.push("confirm");
                    }
                    if !(held && actions.is_empty()) && next() % 4 != 0 {
                        actions.push("cancel");
                    }
                    for action in actions {
                        if let Ok(settled) = client
                            .post(format!("{base}/bookings/{id}/{action}"))
                            .send()
                            .await
                        {
                            if settled.status().as_u16() >= 500 {
                                server_errors.push(format!("{action}: {}", settled.status()));
                            }
                        }
                    }
                    break;
                }
            }
            server_errors
        }));
    }
    tokio::time::sleep(Duration::from_secs(6)).await;
    running.store(false, Ordering::Relaxed);
    let mut server_errors = Vec::new();
    for buyer in buyers {
        server_errors.extend(buyer.await?);
    }
    ensure!(server_errors.is_empty(), "server errors: {server_errors:?}");
    ensure!(
        answered.load(Ordering::Relaxed) > 100,
        "only {} answers",
        answered.load(Ordering::Relaxed)
    );
    // Let the sweeper record the last lapses too.
    tokio::time::sleep(Duration::from_secs(2)).await;

    let backwards = streams_out_of_order(&app.db.pool).await?;
    ensure!(
        backwards.is_empty(),
        "streams out of sequence in commit order (id, sequence, previous): {backwards:?}"
    );
    let summary = check_log(&app.db.pool).await?;
    let expired = summary
        .bookings
        .values()
        .filter(|b| b.status() == Some(domain::BookingStatus::Expired))
        .count();
    ensure!(expired > 0, "no hold lapsed: the test missed a path");

    // The relay's order and replay's order are that same order.
    let topic = unique_name("write_order");
    let stop = CancellationToken::new();
    let relay = tokio::spawn(
        Relay::new(
            app.db.pool.clone(),
            relay_settings(&topic, &kafka_brokers()),
        )?
        .run(stop.clone()),
    );
    let expected = events_in_log(&app.db.pool).await?;
    let received = read_topic(&topic, Duration::from_secs(60), |r| {
        distinct_events(r) >= expected
    })
    .await?;
    check_against_log(&app.db.pool, &received).await?;
    stop.cancel();
    relay.await?;
    let mut conn = app.db.pool.acquire().await?;
    let mut last: std::collections::BTreeMap<(String, String), u64> = Default::default();
    for event in event_feed::read_all(&mut conn, 100).await? {
        let stream = (event.aggregate_type.clone(), event.aggregate_id.clone());
        let previous = last.insert(stream.clone(), event.sequence).unwrap_or(0);
        ensure!(
            event.sequence == previous + 1,
            "replay reads {stream:?} #{} after #{previous}",
            event.sequence
        );
    }
    drop(conn);
    eprintln!(
        "{} answers, {} events, {expired} lapsed holds",
        answered.load(Ordering::Relaxed),
        summary.events
    );
    app.stop().await
}

/// A confirm that loaded its held booking while another buyer was taking
/// over the lapsed hold decides from the booking as it is once it holds
/// the locks: 409 `expired`, not a 500.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_confirm_that_loses_its_lapsed_hold_meanwhile_is_a_409_expired() -> anyhow::Result<()> {
    let app = TestApp::spawn_with(1).await?;
    let show_id = small_show(&app, 4).await?;
    let (status, held) = app
        .post("/bookings", &booking(&show_id, &["A1", "A2"], true))
        .await?;
    ensure!(status == 201, "{held}");
    let held_id = held["booking_id"]
        .as_str()
        .context("booking_id")?
        .to_owned();
    tokio::time::sleep(Duration::from_millis(1300)).await;

    // Another buyer takes A1 over, in a transaction left open a moment...
    let wait = Duration::from_millis(250);
    let sales = Sales::new(app.db.pool.clone(), Duration::from_secs(1), 8, wait);
    let show = sales.show(show_id.parse::<ShowId>()?).await?;
    let mut taker = app.db.pool.begin().await?;
    Sales::place(
        &mut taker,
        &show,
        Order {
            booking_id: BookingId::from_uuid(uuid::Uuid::new_v4()),
            show_id: show_id.parse()?,
            user_id: UserId::from_uuid(uuid::Uuid::new_v4()),
            seats: vec!["A1".parse::<SeatLabel>()?],
            hold_for: None,
        },
        wait,
        false,
    )
    .await?;
    // ...while the holder confirms, reading its booking as still held.
    let confirm = {
        let (client, base, id) = (app.client.clone(), app.base.clone(), held_id.clone());
        tokio::spawn(async move {
            let response = client
                .post(format!("{base}/bookings/{id}/confirm"))
                .send()
                .await?;
            let status = response.status().as_u16();
            anyhow::Ok((status, response.json::<Value>().await?))
        })
    };
    tokio::time::sleep(Duration::from_millis(400)).await;
    taker.commit().await?;
    let (status, body) = confirm.await??;
    ensure!(
        status == 409 && body["booking_status"] == "expired",
        "{status} {body}"
    );
    check_log(&app.db.pool).await?;
    ensure!(streams_out_of_order(&app.db.pool).await?.is_empty());
    app.stop().await
}

/// The sweeper leaves a lapsed hold whose streams a buyer holds to that
/// buyer and expires the rest; two sweepers at once expire each hold once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sweepers_skip_holds_in_use_and_share_the_rest() -> anyhow::Result<()> {
    let app = TestApp::spawn_with_settings(|s| {
        s.hold_secs = 1;
        // This test sweeps by hand.
        s.sweep_every_secs = 3600;
    })
    .await?;
    let show_id = small_show(&app, 40).await?;
    let mut ids = Vec::new();
    for n in 1..=40 {
        let (status, body) = app
            .post("/bookings", &booking(&show_id, &[&format!("A{n}")], true))
            .await?;
        ensure!(status == 201, "{body}");
        ids.push(
            body["booking_id"]
                .as_str()
                .context("booking_id")?
                .to_owned(),
        );
    }
    tokio::time::sleep(Duration::from_millis(1300)).await;
    // A lock wait far beyond the bound below: a sweeper that waited for the
    // buyer at all would blow it.
    let wait = Duration::from_secs(30);
    let sales = Sales::new(app.db.pool.clone(), Duration::from_secs(1), 8, wait);

    // A buyer is working on the first hold's seat.
    let busy: BookingId = ids[0].parse()?;
    let mut buyer = app.db.pool.begin().await?;
    let locked = event_log::lock_and_load(
        &mut buyer,
        show_id.parse()?,
        &["A1".parse::<SeatLabel>()?],
        &[busy],
        None,
        LockWait::Never,
    )
    .await?;
    ensure!(locked.locked);
    // Two sweepers at once, neither waiting for the buyer.
    let started = std::time::Instant::now();
    let (a, b) = tokio::join!(
        sweeper::expire_lapsed(&sales),
        sweeper::expire_lapsed(&sales)
    );
    let (a, b) = (a?, b?);
    ensure!(
        started.elapsed() < Duration::from_secs(5),
        "the sweepers waited"
    );
    ensure!(a + b == 39, "expired {a} + {b}, not the 39 free holds");
    buyer.rollback().await?;
    ensure!(sweeper::expire_lapsed(&sales).await? == 1, "the last hold");
    let expirations: i64 =
        sqlx::query_scalar("SELECT count(*) FROM events WHERE event_type = 'BookingExpired'")
            .fetch_one(&app.db.pool)
            .await?;
    ensure!(expirations == 40, "{expirations} expirations of 40 holds");
    check_log(&app.db.pool).await?;
    app.stop().await
}

/// One show's seat held up by a stuck lock (another process' command that
/// does not finish), 200 buyers piling onto it: they wait without holding
/// the pool, their answer comes within the bound (503 with `Retry-After`),
/// and another show's buyers book meanwhile at their usual latency.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hot_seat_neither_holds_the_pool_nor_slows_another_shows_buyers() -> anyhow::Result<()> {
    let app = TestApp::spawn().await?;
    let hot = small_show(&app, 4).await?;
    let cold = small_show(&app, 40).await?;
    let mut stuck = app.db.pool.begin().await?;
    let locked = event_log::lock_and_load(
        &mut stuck,
        hot.parse()?,
        &["A1".parse::<SeatLabel>()?],
        &[],
        None,
        LockWait::Never,
    )
    .await?;
    ensure!(locked.locked);
    let piling: Vec<_> = (0..200)
        .map(|n| {
            let (client, base) = (app.client.clone(), app.base.clone());
            let body = booking(&hot, &["A1"], false);
            tokio::spawn(async move {
                let started = std::time::Instant::now();
                let answer = client
                    .post(format!("{base}/bookings"))
                    .header("Idempotency-Key", format!("hot-{n}"))
                    .json(&body)
                    .send()
                    .await?;
                let retry_after = answer.headers().contains_key("retry-after");
                anyhow::Ok((answer.status().as_u16(), retry_after, started.elapsed()))
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut latencies = Vec::new();
    for n in 1..=30 {
        let started = std::time::Instant::now();
        let (status, body) = app
            .post("/bookings", &booking(&cold, &[&format!("A{n}")], false))
            .await?;
        latencies.push(started.elapsed());
        ensure!(status == 201, "{status} {body}");
    }
    latencies.sort();
    let slowest = latencies[latencies.len() - 1];
    ensure!(
        slowest < Duration::from_millis(500),
        "the other show's buyers waited up to {slowest:?} (median {:?})",
        latencies[latencies.len() / 2]
    );
    let mut answers = Vec::new();
    for task in piling {
        answers.push(task.await??);
    }
    stuck.rollback().await?;
    for (status, retry_after, took) in &answers {
        ensure!(
            *status == 503 && *retry_after,
            "a buyer of the stuck seat got {status} after {took:?}"
        );
        ensure!(
            *took < Duration::from_secs(5),
            "a buyer of the stuck seat waited {took:?}"
        );
    }
    // Once the lock is gone, the seat sells.
    let (status, body) = app
        .post("/bookings", &booking(&hot, &["A1"], false))
        .await?;
    ensure!(status == 201, "{status} {body}");
    eprintln!(
        "other show: median {:?}, slowest {slowest:?}",
        latencies[latencies.len() / 2]
    );
    app.stop().await
}

/// Buyers racing with keys for one seat: the losers, refused from a
/// snapshot or while they waited without any lock, keep their 409 for
/// their keys, so a retry gets it again even once the seat is free; the
/// winner's retry gets its 201.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_without_a_lock_are_kept_for_their_keys() -> anyhow::Result<()> {
    let app = TestApp::spawn().await?;
    let show_id = small_show(&app, 2).await?;
    let bodies: Vec<Value> = (0..60).map(|_| booking(&show_id, &["A1"], false)).collect();
    let race = bodies.iter().enumerate().map(|(n, body)| {
        let key = format!("race-{n}");
        let app = &app;
        async move { app.post_with("/bookings", body, Some(&key)).await }
    });
    let answers = futures::future::join_all(race).await;
    let mut winner = None;
    for (n, answer) in answers.iter().enumerate() {
        let (status, body) = answer.as_ref().map_err(|e| anyhow::anyhow!("{e:#}"))?;
        match status {
            201 => {
                ensure!(winner.is_none(), "two winners");
                winner = Some((n, body["booking_id"].as_str().context("id")?.to_owned()));
            }
            409 => ensure!(body["unavailable_seats"] == json!(["A1"]), "{body}"),
            other => anyhow::bail!("{other} {body}"),
        }
    }
    let (won, booking_id) = winner.context("nobody won")?;
    let (status, _) = app
        .post(&format!("/bookings/{booking_id}/cancel"), &json!({}))
        .await?;
    ensure!(status == 200);
    for (n, body) in bodies.iter().enumerate() {
        let (status, again) = app
            .post_with("/bookings", body, Some(&format!("race-{n}")))
            .await?;
        if n == won {
            ensure!(
                status == 201 && again["booking_id"] == booking_id.as_str(),
                "{again}"
            );
        } else {
            ensure!(
                status == 409,
                "loser {n} got {status} on its retry: {again}"
            );
        }
    }
    check_log(&app.db.pool).await?;
    app.stop().await
}

/// A buyer of one seat of a lapsed two-seat hold while another buyer is
/// deciding on the other seat: the first takes its own seat, then finds the
/// other seat (which expiring the hold releases) locked. Starting over the
/// same way would find it so again, every attempt, until 503; a later
/// attempt waits for all the locks in order instead, and gets the seat.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_buyer_of_a_seat_of_a_lapsed_hold_waits_for_the_other_seats_buyer() -> anyhow::Result<()>
{
    let app = TestApp::spawn_with(1).await?;
    let show_id = small_show(&app, 2).await?;
    let (status, body) = app
        .post("/bookings", &booking(&show_id, &["A1", "A2"], true))
        .await?;
    ensure!(status == 201, "{body}");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    // The other buyer, deciding on A2 for a while.
    let mut other = app.db.pool.begin().await?;
    let locked = event_log::lock_and_load(
        &mut other,
        show_id.parse()?,
        &["A2".parse::<SeatLabel>()?],
        &[],
        None,
        LockWait::Never,
    )
    .await?;
    ensure!(locked.locked);
    let buyer = {
        let (client, base) = (app.client.clone(), app.base.clone());
        let body = booking(&show_id, &["A1"], false);
        tokio::spawn(async move {
            let answer = client
                .post(format!("{base}/bookings"))
                .json(&body)
                .send()
                .await?;
            let status = answer.status().as_u16();
            anyhow::Ok((status, answer.json::<Value>().await?))
        })
    };
    tokio::time::sleep(Duration::from_millis(150)).await;
    other.rollback().await?;
    let (status, answer) = buyer.await??;
    ensure!(status == 201, "the buyer of A1 got {status} {answer}");
    let (status, body) = app
        .post("/bookings", &booking(&show_id, &["A2"], false))
        .await?;
    ensure!(
        status == 201,
        "the seat the hold had besides: {status} {body}"
    );
    check_log(&app.db.pool).await?;
    ensure!(streams_out_of_order(&app.db.pool).await?.is_empty());
    app.stop().await
}

/// A keyed retry whose first answer was a 201 replays it; that is no news
/// of the seat being taken now (the booking was cancelled since), so a
/// buyer waiting for the seat meanwhile still gets it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_answer_does_not_make_waiting_buyers_think_the_seat_was_just_taken(
) -> anyhow::Result<()> {
    let app = TestApp::spawn().await?;
    let show_id = small_show(&app, 2).await?;
    let body = booking(&show_id, &["A1"], false);
    let (status, first) = app.post_with("/bookings", &body, Some("replayed")).await?;
    ensure!(status == 201, "{first}");
    let id = first["booking_id"]
        .as_str()
        .context("booking_id")?
        .to_owned();
    let (status, _) = app
        .post(&format!("/bookings/{id}/cancel"), &json!({}))
        .await?;
    ensure!(status == 200);
    // Hold the key's lock, so that the retry waits with the seat's pass.
    let mut headers = axum::http::HeaderMap::new();
    headers.insert(
        "idempotency-key",
        axum::http::HeaderValue::from_static("replayed"),
    );
    let parsed: command_api::routes::NewBooking = serde_json::from_value(body.clone())?;
    let keyed = command_api::idempotency::Keyed::from_headers(
        &headers,
        "POST /bookings",
        // The key is the client's operator's.
        &service_kit::auth::Caller::User {
            id: app.staff,
            roles: Default::default(),
        },
        &parsed,
    )?
    .context("a key")?;
    let (high, low) = keyed.lock_key();
    let mut holder = app.db.pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1, $2)")
        .bind(high)
        .bind(low)
        .execute(&mut *holder)
        .await?;
    let retry = {
        let (client, base, body) = (app.client.clone(), app.base.clone(), body.clone());
        tokio::spawn(async move {
            let answer = client
                .post(format!("{base}/bookings"))
                .header("Idempotency-Key", "replayed")
                .json(&body)
                .send()
                .await?;
            anyhow::Ok(answer.status().as_u16())
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let buyer = {
        let (client, base, body) = (
            app.client.clone(),
            app.base.clone(),
            booking(&show_id, &["A1"], false),
        );
        tokio::spawn(async move {
            let answer = client
                .post(format!("{base}/bookings"))
                .json(&body)
                .send()
                .await?;
            let status = answer.status().as_u16();
            anyhow::Ok((status, answer.json::<Value>().await?))
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    holder.commit().await?;
    ensure!(retry.await?? == 201, "the retry replays its first answer");
    let (status, answer) = buyer.await??;
    ensure!(status == 201, "the waiting buyer got {status} {answer}");
    check_log(&app.db.pool).await?;
    app.stop().await
}

/// A key whose first answer was a 422 decided before any lock keeps it: the
/// same key with another body is 422 for the key, not a booking.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keys_first_answer_is_kept_even_when_it_is_an_early_422() -> anyhow::Result<()> {
    let app = TestApp::spawn().await?;
    let show_id = small_show(&app, 4).await?;
    let twice = booking(&show_id, &["A1", "A1"], false);
    let (status, first) = app.post_with("/bookings", &twice, Some("early")).await?;
    ensure!(status == 422, "{first}");
    let (status, again) = app.post_with("/bookings", &twice, Some("early")).await?;
    ensure!(status == 422 && again == first, "{again}");
    let other = booking(&show_id, &["A2"], false);
    let (status, body) = app.post_with("/bookings", &other, Some("early")).await?;
    ensure!(
        status == 422 && body["type"] == "/problems/idempotency-key-reused",
        "{status} {body}"
    );
    let summary = check_log(&app.db.pool).await?;
    ensure!(summary.bookings.is_empty());
    app.stop().await
}
