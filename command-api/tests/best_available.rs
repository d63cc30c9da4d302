//! Best available against a real Postgres: a rush of pickers gets adjacent
//! seats from the front without a 409 while seats remain, pickers mixed
//! with explicit bookings and cancels never put a seat in two bookings, and
//! `taken_seats` stays what the log says.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Context};
use common::{check_log, TestApp};
use rand::Rng;
use serde_json::{json, Value};

/// A show with section "Floor" of `rows` rows of `seats` seats (rows A, B,
/// ... from the stage back) and a "Box" of one row of 4.
async fn arena(app: &TestApp, rows: usize, seats: u32) -> anyhow::Result<String> {
    let floor: Vec<Value> = (0..rows)
        .map(|i| json!({"row": row_name(i), "seats": seats}))
        .collect();
    let (status, body) = app
        .post(
            "/shows",
            &json!({"name": "Arena", "venue": "Arena", "starts_at": "2027-05-01T19:00:00Z",
                "sections": [{"name": "Floor", "price_cents": 5000, "rows": floor},
                             {"name": "Box", "price_cents": 9000, "rows": [{"row": "ZZ", "seats": 4}]}]}),
        )
        .await?;
    ensure!(status == 201, "{body}");
    Ok(body["show_id"].as_str().context("show_id")?.to_owned())
}

fn row_name(i: usize) -> String {
    char::from(b'A' + u8::try_from(i).unwrap_or(0)).to_string()
}

fn best(show: &str, count: u32, hold: bool) -> Value {
    json!({"show_id": show, "user_id": uuid::Uuid::new_v4(),
           "best_available": {"count": count, "section": "Floor"}, "hold": hold})
}

/// (row, number) of a label such as `B12`.
fn split(label: &str) -> anyhow::Result<(String, u32)> {
    let at = label
        .find(|c: char| c.is_ascii_digit())
        .context("a label with a number")?;
    Ok((label[..at].to_owned(), label[at..].parse()?))
}

/// The seats of a 201, checked to be `count` adjacent seats of one row.
fn adjacent_seats(body: &Value, count: usize) -> anyhow::Result<Vec<(String, u32)>> {
    let seats: Vec<(String, u32)> = body["seats"]
        .as_array()
        .context("seats")?
        .iter()
        .map(|s| split(s.as_str().unwrap_or_default()))
        .collect::<anyhow::Result<_>>()?;
    ensure!(seats.len() == count, "{body}");
    for pair in seats.windows(2) {
        ensure!(
            pair[0].0 == pair[1].0 && pair[1].1 == pair[0].1 + 1,
            "not adjacent: {body}"
        );
    }
    Ok(seats)
}

/// `taken_seats`, as the commands kept it and as the log says it must be.
async fn taken_seats_agree_with_the_log(app: &TestApp) -> anyhow::Result<usize> {
    type Row = (
        uuid::Uuid,
        String,
        i32,
        uuid::Uuid,
        Option<chrono::DateTime<chrono::Utc>>,
    );
    let order = "ORDER BY show_id, row_name, number";
    let kept: Vec<Row> = sqlx::query_as(&format!(
        "SELECT show_id, row_name, number, booking_id, expires_at FROM taken_seats {order}"
    ))
    .fetch_all(&app.db.pool)
    .await?;
    let rebuilt: Vec<Row> =
        sqlx::query_as(&format!("SELECT * FROM taken_seats_from_log() {order}"))
            .fetch_all(&app.db.pool)
            .await?;
    ensure!(
        kept == rebuilt,
        "taken_seats {kept:?}\nbut the log says {rebuilt:?}"
    );
    Ok(kept.len())
}

/// `n` best-available requests for pairs, all at once.
async fn rush(app: &Arc<TestApp>, show: &str, n: usize) -> anyhow::Result<Vec<(u16, Value)>> {
    let requests = (0..n).map(|_| {
        let (app, body) = (Arc::clone(app), best(show, 2, false));
        tokio::spawn(async move { app.post("/bookings", &body).await })
    });
    let mut answers = Vec::new();
    for answer in futures::future::join_all(requests).await {
        answers.push(answer??);
    }
    Ok(answers)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rush_of_pickers_fills_the_section_from_the_front_and_no_one_is_refused(
) -> anyhow::Result<()> {
    let app = Arc::new(TestApp::spawn().await?);
    let show = arena(&app, 20, 20).await?;
    // Pairs go from the middle of a row of 20 outwards ([10,11], [8,9],
    // [12,13], ...), which leaves seats 1 and 20 alone: 9 pairs a row, 180
    // in the section. 100 pickers at once, then the other 80.
    let mut all = BTreeSet::new();
    for (wave, pickers, rows_filled) in [(0, 100, 11), (1, 80, 20)] {
        let answers = rush(&app, &show, pickers).await?;
        for (status, body) in &answers {
            ensure!(*status == 201, "wave {wave}: {status} {body}");
            for seat in adjacent_seats(body, 2)? {
                ensure!(all.insert(seat.clone()), "{seat:?} sold twice");
            }
        }
        let mut rows = BTreeMap::<String, usize>::new();
        for (row, number) in &all {
            ensure!(
                (2..=19).contains(number),
                "{row}{number} taken before a pair"
            );
            *rows.entry(row.clone()).or_default() += 1;
        }
        // Filled from the front: whole rows (18 seats), then what is left
        // in the next one.
        let counts: Vec<usize> = (0..20)
            .map(|i| rows.get(&row_name(i)).copied().unwrap_or(0))
            .collect();
        let expected: Vec<usize> = (0..20)
            .map(|i| {
                let before = i * 18;
                (all.len().saturating_sub(before)).min(18)
            })
            .collect();
        ensure!(counts == expected, "wave {wave}: rows took {counts:?}");
        ensure!(
            counts.iter().filter(|c| **c == 18).count() == rows_filled,
            "wave {wave}: {counts:?}"
        );
    }
    ensure!(all.len() == 360, "{} seats", all.len());
    // Only lone seats are left (1 and 20 of every row): no pair.
    let (status, body) = app.post("/bookings", &best(&show, 2, false)).await?;
    ensure!(status == 409, "{status} {body}");
    ensure!(body["type"] == "/problems/no-adjacent-seats", "{body}");
    ensure!(body["count"] == 2, "{body}");
    // The box section still has seats: another section is another matter.
    let mut in_box = best(&show, 4, false);
    in_box["best_available"]["section"] = json!("Box");
    let (status, body) = app.post("/bookings", &in_box).await?;
    ensure!(status == 201, "{status} {body}");
    check_log(&app.db.pool).await?;
    ensure!(taken_seats_agree_with_the_log(&app).await? == 364);
    Arc::into_inner(app).context("one owner")?.stop().await
}

/// Two command-apis share the log but not their pickers' claims: each
/// picks from snapshots the other's commits make stale at once. A block
/// taken by the other process must send the picker to pick again, never
/// come back as the buyer's 409, and no seat may be sold twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pickers_on_two_replicas_are_never_refused_while_pairs_remain() -> anyhow::Result<()> {
    let app = TestApp::spawn().await?;
    let replica = app.replica().await?;
    let show = arena(&app, 20, 20).await?;
    // 180 pairs in the section (see the rush above): 90 asked of each
    // process, all at once.
    let requests = (0..180).map(|i| {
        let base = if i % 2 == 0 { &app.base } else { &replica.base };
        let request = app
            .client
            .post(format!("{base}/bookings"))
            .json(&best(&show, 2, false));
        async move {
            let response = request.send().await?;
            let status = response.status().as_u16();
            let body: Value = response.json().await.unwrap_or(Value::Null);
            anyhow::Ok((status, body))
        }
    });
    let mut all = BTreeSet::new();
    for answer in futures::future::join_all(requests).await {
        let (status, body) = answer?;
        ensure!(status == 201, "{status} {body}");
        for seat in adjacent_seats(&body, 2)? {
            ensure!(all.insert(seat.clone()), "{seat:?} sold twice");
        }
    }
    ensure!(all.len() == 360, "{} seats", all.len());
    let (status, body) = app.post("/bookings", &best(&show, 2, false)).await?;
    ensure!(
        status == 409 && body["type"] == "/problems/no-adjacent-seats",
        "{status} {body}"
    );
    check_log(&app.db.pool).await?;
    ensure!(taken_seats_agree_with_the_log(&app).await? == 360);
    replica.stop().await?;
    app.stop().await
}

/// A block whose seat another transaction has locked (a booking of
/// another process in flight) is passed over for the next best, rather
/// than waited for or refused.
#[tokio::test]
async fn a_block_locked_elsewhere_is_passed_over_for_the_next() -> anyhow::Result<()> {
    let app = TestApp::spawn().await?;
    let show = arena(&app, 1, 6).await?;
    let show_id: domain::ShowId = show.parse()?;
    let seat = |label: &str| -> anyhow::Result<i64> {
        Ok(command_api::event_log::seat_key(show_id, &label.parse()?))
    };
    // Another transaction holds A3: the best pair, A3+A4, is busy.
    let mut elsewhere = app.db.pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(seat("A3")?)
        .execute(&mut *elsewhere)
        .await?;
    let (status, body) = app.post("/bookings", &best(&show, 2, false)).await?;
    ensure!(
        status == 201 && body["seats"] == json!(["A1", "A2"]),
        "{status} {body}"
    );
    // A4 was only tried: it is anyone's while A3 is still held elsewhere.
    let (status, body) = app
        .post("/bookings", &common::booking(&show, &["A4"], false))
        .await?;
    ensure!(status == 201, "{status} {body}");
    elsewhere.rollback().await?;
    let (status, body) = app.post("/bookings", &best(&show, 2, false)).await?;
    ensure!(
        status == 201 && body["seats"] == json!(["A5", "A6"]),
        "{status} {body}"
    );
    check_log(&app.db.pool).await?;
    taken_seats_agree_with_the_log(&app).await?;
    app.stop().await
}

#[tokio::test]
async fn bad_best_available_requests_are_422_and_write_nothing() -> anyhow::Result<()> {
    let app = TestApp::spawn().await?;
    let show = arena(&app, 2, 5).await?;
    let events = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM events")
            .fetch_one(&app.db.pool)
            .await
    };
    let before = events().await?;
    let user = uuid::Uuid::new_v4();
    for (what, body) in [
        (
            "count 0",
            json!({"show_id": show, "user_id": user, "best_available": {"count": 0, "section": "Floor"}}),
        ),
        (
            "count 11",
            json!({"show_id": show, "user_id": user, "best_available": {"count": 11, "section": "Floor"}}),
        ),
        (
            "unknown section",
            json!({"show_id": show, "user_id": user, "best_available": {"count": 2, "section": "Roof"}}),
        ),
        (
            "both",
            json!({"show_id": show, "user_id": user, "seats": ["A1"], "best_available": {"count": 1, "section": "Floor"}}),
        ),
        ("neither", json!({"show_id": show, "user_id": user})),
        (
            "count not a number",
            json!({"show_id": show, "user_id": user, "best_available": {"count": "2", "section": "Floor"}}),
        ),
    ] {
        let (status, answer) = app
            .post_with("/bookings", &body, Some(&format!("bad-{what}")))
            .await?;
        ensure!(status == 422, "{what}: {status} {answer}");
        let kind = if what == "count not a number" {
            "/problems/bad-body"
        } else {
            "/problems/invalid-request"
        };
        ensure!(
            answer["status"] == 422 && answer["type"] == kind,
            "{what}: {answer}"
        );
    }
    // More than a row holds: no row has them, nothing taken.
    let (status, body) = app.post("/bookings", &best(&show, 6, false)).await?;
    ensure!(
        status == 409 && body["type"] == "/problems/no-adjacent-seats",
        "{status} {body}"
    );
    ensure!(events().await? == before, "a refused request wrote events");
    ensure!(
        taken_seats_agree_with_the_log(&app).await? == 0,
        "seats taken"
    );
    app.stop().await
}

#[tokio::test]
async fn holds_keys_and_lapses_work_as_for_any_booking() -> anyhow::Result<()> {
    // The sweeper off: the lapse is found by the next picker, in its own
    // transaction (`pick_and_place`), not recorded beforehand.
    let app = TestApp::spawn_with_settings(|s| {
        s.hold_secs = 1;
        s.sweep_every_secs = 3600;
    })
    .await?;
    let show = arena(&app, 1, 4).await?;
    // A key's retry gets the same seats, and books nothing more.
    let body = best(&show, 2, true);
    let (status, first) = app.post_with("/bookings", &body, Some("pick-1")).await?;
    ensure!(
        status == 201 && first["status"] == "held",
        "{status} {first}"
    );
    ensure!(first["expires_at"].is_string(), "{first}");
    let (status, again) = app.post_with("/bookings", &body, Some("pick-1")).await?;
    ensure!(status == 201 && again == first, "{again} after {first}");
    ensure!(
        first["seats"] == json!(["A2", "A3"]),
        "the middle first: {first}"
    );
    // The rest of the row, then nothing; once the hold lapses its seats
    // are the best again.
    let (status, ends) = app.post("/bookings", &best(&show, 1, false)).await?;
    ensure!(
        status == 201 && ends["seats"] == json!(["A1"]),
        "{status} {ends}"
    );
    let (status, _) = app.post("/bookings", &best(&show, 2, false)).await?;
    ensure!(status == 409);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let (status, taken) = app.post("/bookings", &best(&show, 2, false)).await?;
    ensure!(
        status == 201 && taken["seats"] == first["seats"],
        "{status} {taken}"
    );
    check_log(&app.db.pool).await?;
    taken_seats_agree_with_the_log(&app).await?;
    app.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pickers_mixed_with_explicit_bookings_and_cancels_never_sell_a_seat_twice(
) -> anyhow::Result<()> {
    let app = Arc::new(TestApp::spawn().await?);
    let show = arena(&app, 6, 10).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(4);
    let buyers = (0..24).map(|buyer| {
        let (app, show) = (Arc::clone(&app), show.clone());
        tokio::spawn(async move {
            let mut mine: Vec<String> = Vec::new();
            let mut created = 0_u32;
            while tokio::time::Instant::now() < deadline {
                let (kind, cancel) = {
                    let mut rng = rand::rng();
                    (rng.random_range(0..3), rng.random_bool(0.3))
                };
                let body = if kind == 0 {
                    let seats: Vec<String> = {
                        let mut rng = rand::rng();
                        let row = row_name(rng.random_range(0..6));
                        let first = rng.random_range(1..=8);
                        (first..first + rng.random_range(1..=3)).map(|n| format!("{row}{n}")).collect()
                    };
                    json!({"show_id": show, "user_id": uuid::Uuid::new_v4(), "seats": seats, "hold": buyer % 2 == 0})
                } else {
                    best(&show, rand::rng().random_range(1..=4), buyer % 2 == 1)
                };
                let (status, answer) = app.post("/bookings", &body).await?;
                ensure!(matches!(status, 201 | 409), "{status} {answer}");
                // A picker is refused only for want of a block, never for
                // seats someone took while it picked them.
                ensure!(
                    kind == 0 || status == 201 || answer["type"] == "/problems/no-adjacent-seats",
                    "{answer}"
                );
                if status == 201 {
                    created += 1;
                    if kind != 0 {
                        adjacent_seats(&answer, answer["seats"].as_array().map_or(0, Vec::len))?;
                    }
                    mine.push(answer["booking_id"].as_str().context("id")?.to_owned());
                }
                if cancel {
                    if let Some(id) = mine.pop() {
                        let (status, answer) =
                            app.post(&format!("/bookings/{id}/cancel"), &json!({})).await?;
                        ensure!(status == 200, "{status} {answer}");
                    }
                }
            }
            anyhow::Ok(created)
        })
    });
    let mut created = 0;
    for buyer in futures::future::join_all(buyers).await {
        created += buyer??;
    }
    ensure!(created > 20, "only {created} bookings were made");
    check_log(&app.db.pool).await?;
    taken_seats_agree_with_the_log(&app).await?;
    Arc::into_inner(app).context("one owner")?.stop().await
}
