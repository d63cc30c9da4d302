//! The log's commit order as the tests establish it for themselves, and the
//! reader that once got it wrong, to show that a test's log would catch it.

use anyhow::{ensure, Context};
use serde_json::{json, Value};
use sqlx::{PgPool, Row};

use crate::cluster::burn_tx_ids_until;

/// One event's place and stream in the log.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Place {
    /// Its transaction id (`xid8`), as a number.
    pub tx_id: u64,
    /// Its global position.
    pub global_position: i64,
    /// Its stream's aggregate type.
    pub aggregate_type: String,
    /// Its stream's aggregate id.
    pub aggregate_id: String,
    /// Its sequence in the stream.
    pub sequence: u64,
}

/// Every event of the log, in commit order: sorted here, by number, from
/// the ids as Postgres spells them, so that no query of the code under test
/// (nor Postgres' own ordering) decides what "in order" means.
///
/// # Errors
/// Store errors.
pub async fn commit_order(pool: &PgPool) -> anyhow::Result<Vec<Place>> {
    let rows = sqlx::query(
        "SELECT tx_id::text AS tx_text, global_position, aggregate_type, aggregate_id, sequence
           FROM events",
    )
    .fetch_all(pool)
    .await?;
    let mut places = rows
        .into_iter()
        .map(|row| {
            Ok(Place {
                tx_id: row.try_get::<String, _>("tx_text")?.parse()?,
                global_position: row.try_get("global_position")?,
                aggregate_type: row.try_get("aggregate_type")?,
                aggregate_id: row.try_get("aggregate_id")?,
                sequence: u64::try_from(row.try_get::<i64, _>("sequence")?)?,
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    places.sort();
    Ok(places)
}

/// What the reader that sorted transaction ids as text (the query the
/// relay and replay ran until the ids were read as `xid8`) would have
/// delivered from this log, reading `page` at a time: the global positions
/// in the order it delivered them, and where its cursor ended.
///
/// # Errors
/// Store errors.
pub async fn read_as_text(pool: &PgPool, page: i64) -> anyhow::Result<(Vec<i64>, (String, i64))> {
    let mut cursor = ("0".to_owned(), 0_i64);
    let mut delivered = Vec::new();
    loop {
        let rows = sqlx::query(
            "SELECT tx_id::text AS tx_id, global_position FROM events
              WHERE (tx_id, global_position) > ($1::text::xid8, $2)
                AND tx_id < pg_snapshot_xmin(pg_current_snapshot())
              ORDER BY tx_id, global_position
              LIMIT $3",
        )
        .bind(&cursor.0)
        .bind(cursor.1)
        .bind(page)
        .fetch_all(pool)
        .await?;
        let Some(last) = rows.last() else {
            return Ok((delivered, cursor));
        };
        cursor = (last.try_get("tx_id")?, last.try_get("global_position")?);
        for row in &rows {
            delivered.push(row.try_get("global_position")?);
        }
        if i64::try_from(rows.len())? < page {
            return Ok((delivered, cursor));
        }
    }
}

/// Checks that `log` (in commit order) straddles `boundary`: at least
/// `each_side` events below it and as many at or above it.
///
/// # Errors
/// When it does not: the test's log would not exercise what it means to.
pub fn straddles(log: &[Place], boundary: u64, each_side: usize) -> anyhow::Result<()> {
    let below = log.iter().filter(|p| p.tx_id < boundary).count();
    let above = log.len() - below;
    ensure!(
        below >= each_side && above >= each_side,
        "the log has {below} events below transaction {boundary} and {above} above: \
         it was meant to straddle it"
    );
    Ok(())
}

/// Builds a log across `boundary` through the command-api at `base`, whose
/// database `pool` is on a cluster whose next transaction id is below
/// `boundary` (see [`crate::cluster::PrivateCluster::start_near`]): two
/// shows, then forty bookings (some held) and a cancellation of every third,
/// about twenty transactions on either side of it. Returns the log in
/// commit order, after checking that it straddles `boundary` and that the
/// text-ordered reader, in pages of 7, would have lost events of it.
///
/// # Errors
/// A refused write, or a log that does not serve its purpose.
pub async fn bookings_across(
    base: &str,
    pool: &PgPool,
    boundary: u64,
) -> anyhow::Result<Vec<Place>> {
    let client = crate::auth::staff_client().expect("an HTTP client");
    let post = |path: String, body: Value| {
        let request = client.post(format!("{base}{path}")).json(&body);
        async move {
            let response = request.send().await?;
            let status = response.status().as_u16();
            let body: Value = response.json().await.unwrap_or(Value::Null);
            anyhow::Ok((status, body))
        }
    };
    let rows: Vec<Value> = ["A", "B", "C"]
        .iter()
        .map(|r| json!({"row": r, "seats": 20}))
        .collect();
    let show = json!({"name": "Digits", "venue": "Hall", "starts_at": "2027-06-01T19:00:00Z",
                      "sections": [{"name": "All", "price_cents": 1000, "rows": rows}]});
    let mut shows = Vec::new();
    for _ in 0..2 {
        let (status, body) = post("/shows".to_owned(), show.clone()).await?;
        ensure!(status == 201, "creating a show: {status} {body}");
        shows.push(body["show_id"].as_str().context("show_id")?.to_owned());
    }
    burn_tx_ids_until(pool, boundary - 20).await?;
    for n in 0..40_usize {
        let seat = format!("{}{}", ["A", "B"][n / 2 % 2], n / 4 + 1);
        let booking = json!({"show_id": shows[n % 2], "user_id": uuid::Uuid::new_v4().to_string(),
                             "seats": [seat], "hold": n % 5 == 0});
        let (status, body) = post("/bookings".to_owned(), booking).await?;
        ensure!(status == 201, "booking {n}: {status} {body}");
        if n % 3 == 0 {
            let id = body["booking_id"].as_str().context("booking_id")?;
            let (status, body) = post(format!("/bookings/{id}/cancel"), json!({})).await?;
            ensure!(status == 200, "cancelling {id}: {status} {body}");
        }
    }
    let log = commit_order(pool).await?;
    straddles(&log, boundary, 20)?;
    let (as_text, _) = read_as_text(pool, 7).await?;
    ensure!(
        as_text.len() < log.len(),
        "reading as text delivered all {} events: the log does not exercise the bug",
        log.len()
    );
    Ok(log)
}
