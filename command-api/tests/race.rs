//! Many buyers racing for the same few seats, against a real server and a
//! real Postgres: nobody gets a seat twice, winners get every seat they asked
//! for, losers get 409, nobody gets a 5xx.

mod common;

use std::collections::BTreeSet;

use anyhow::{ensure, Context};
use common::{booking, check_log, TestApp};
use serde_json::{json, Value};

const CLIENTS: usize = 200;
const ROUNDS: usize = 3;
const SEATS: [&str; 10] = ["A1", "A2", "A3", "A4", "A5", "A6", "A7", "A8", "A9", "A10"];

/// Deterministic per-client choice of 1 to 4 distinct seats (xorshift).
fn pick(mut state: u64) -> Vec<&'static str> {
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let count = 1 + (next() % 4) as usize;
    let mut seats = BTreeSet::new();
    while seats.len() < count {
        seats.insert(SEATS[(next() % 10) as usize]);
    }
    seats.into_iter().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_buyers_race_for_ten_seats() -> anyhow::Result<()> {
    let app = TestApp::spawn().await?;
    for round in 0..ROUNDS {
        let (status, body) = app
            .post(
                "/shows",
                &json!({"name": format!("Round {round}"), "venue": "Arena", "starts_at": "2027-05-01T19:00:00Z",
                        "sections": [{"name": "Front", "price_cents": 5000, "rows": [{"row": "A", "seats": 10}]}]}),
            )
            .await?;
        ensure!(status == 201, "{body}");
        let show_id = body["show_id"].as_str().context("show_id")?.to_owned();

        let attempts = (0..CLIENTS).map(|client| {
            let seats = pick(0x9e37_79b9_7f4a_7c15 ^ ((round * CLIENTS + client) as u64 + 1));
            let request = booking(&show_id, &seats, client % 3 == 0);
            let app = &app;
            async move { (seats, app.post("/bookings", &request).await) }
        });
        let answers = futures::future::join_all(attempts).await;

        let summary = check_log(&app.db.pool).await?;
        let mut winners = 0;
        let mut taken = BTreeSet::new();
        let mut refusals: Vec<Vec<String>> = Vec::new();
        for (seats, answer) in answers {
            let (status, body): (u16, Value) = answer?;
            match status {
                201 => {
                    winners += 1;
                    let id = body["booking_id"].as_str().context("booking_id")?.parse()?;
                    let owned = summary.owned_by(id);
                    let asked: BTreeSet<String> = seats.iter().map(ToString::to_string).collect();
                    ensure!(
                        owned == asked,
                        "booking {id} asked {asked:?} but owns {owned:?}"
                    );
                    for seat in seats {
                        ensure!(taken.insert(seat), "seat {seat} sold twice");
                    }
                }
                409 => {
                    let unavailable = body["unavailable_seats"]
                        .as_array()
                        .context("unavailable_seats")?;
                    ensure!(!unavailable.is_empty(), "a 409 named no seat: {body}");
                    let named = unavailable
                        .iter()
                        .map(|s| s.as_str().map(str::to_owned).context("a label"))
                        .collect::<anyhow::Result<Vec<String>>>()?;
                    for seat in &named {
                        ensure!(
                            seats.contains(&seat.as_str()),
                            "409 named {seat}, not asked for"
                        );
                    }
                    refusals.push(named);
                }
                other => anyhow::bail!("round {round}: status {other}: {body}"),
            }
        }
        ensure!(winners >= 1, "round {round}: nobody won");
        // Every 409 was justified: each loser was refused a seat a winner got
        // (nobody cancels here, so what a winner got stays taken).
        for named in refusals {
            ensure!(
                named.iter().any(|seat| taken.contains(seat.as_str())),
                "a 409 named only seats no winner has: {named:?}"
            );
        }
    }
    app.stop().await
}
