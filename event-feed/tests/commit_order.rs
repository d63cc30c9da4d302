//! The log read in commit order against a real Postgres whose transaction
//! ids cross a change in their number of digits (9,999,999,999 to
//! 10,000,000,000, past the 32-bit wraparound): every event once, in
//! `(tx_id, global_position)` order, whatever the page size.

use std::time::Duration;

use anyhow::{ensure, Context};
use event_feed::{read_after, read_all, read_pages, Cursor, TxId};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use serde_json::{json, Value};
use sqlx::{PgConnection, PgPool};
use ticketing_tests::cluster::{burn_tx_ids_until, next_tx_id, PrivateCluster};
use ticketing_tests::log_order::{commit_order, read_as_text, straddles, Place};
use ticketing_tests::TestDatabase;
use uuid::Uuid;

/// 10^10: ten digits below, eleven from here on; in the third epoch.
const BOUNDARY: u64 = 10_000_000_000;

/// Page sizes the readers are checked with: the smallest, small ones that
/// put the boundary inside and between pages, and the relay's and replay's
/// defaults.
const PAGES: [i64; 5] = [1, 2, 7, 1000, 5000];

fn show_created(show_id: Uuid) -> Value {
    json!({"ShowCreated": {
        "show_id": show_id, "name": "Digits", "venue": "Hall", "starts_at": "2027-03-01T20:00:00Z",
        "seat_map": [{"name": "All", "price_cents": 1000, "rows": [{"row": "A", "seats": 2}]}]
    }})
}

/// Appends `count` events (each a show of its own) on `conn`, in whatever
/// transaction it is in.
async fn append(conn: &mut PgConnection, count: usize) -> anyhow::Result<()> {
    for _ in 0..count {
        let show_id = Uuid::new_v4();
        sqlx::query(
            "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
             VALUES ('Show', $1, 1, 'ShowCreated', '1.0', $2, '{}')",
        )
        .bind(show_id.to_string())
        .bind(show_created(show_id))
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

async fn commit_events(pool: &PgPool, count: usize) -> anyhow::Result<()> {
    let mut tx = pool.begin().await?;
    append(&mut tx, count).await?;
    tx.commit().await?;
    Ok(())
}

fn streams(log: &[Place]) -> Vec<(String, u64)> {
    log.iter()
        .map(|p| (p.aggregate_id.clone(), p.sequence))
        .collect()
}

async fn cluster_near_boundary() -> anyhow::Result<(PrivateCluster, TestDatabase)> {
    let cluster = PrivateCluster::start_near(BOUNDARY - 30_000).await?;
    let db = TestDatabase::create_on(&cluster.url()).await?;
    Ok((cluster, db))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_crossing_a_change_of_digit_count_is_read_whole_and_in_commit_order(
) -> anyhow::Result<()> {
    let (_cluster, db) = cluster_near_boundary().await?;
    let pool = &db.pool;
    burn_tx_ids_until(pool, BOUNDARY - 12).await?;
    // Transactions of one to three events, across the boundary; one takes
    // its id before three others commit and writes after them (a lower id,
    // later positions), and one stays open across a read.
    let mut early = pool.begin().await?;
    let early_id: u64 = sqlx::query_scalar::<_, String>("SELECT pg_current_xact_id()::text")
        .fetch_one(&mut *early)
        .await?
        .parse()?;
    for n in 0..3 {
        commit_events(pool, 1 + n % 3).await?;
    }
    append(&mut early, 2).await?;
    early.commit().await?;
    for n in 0..10 {
        commit_events(pool, 1 + n % 3).await?;
    }
    let mut open = pool.begin().await?;
    append(&mut open, 2).await?;
    let open_id: u64 = sqlx::query_scalar::<_, String>("SELECT pg_current_xact_id()::text")
        .fetch_one(&mut *open)
        .await?
        .parse()?;
    for n in 0..8 {
        commit_events(pool, 1 + n % 3).await?;
    }

    // While `open` is open, nothing at or after it is read.
    let committed = commit_order(pool).await?;
    let before_open: Vec<_> = committed
        .iter()
        .filter(|p| p.tx_id < open_id)
        .cloned()
        .collect();
    let mut conn = pool.acquire().await?;
    let read = read_all(&mut conn, 7).await?;
    ensure!(
        read.iter()
            .map(|e| (e.aggregate_id.clone(), e.sequence))
            .collect::<Vec<_>>()
            == streams(&before_open),
        "a read while {open_id} was open went past it"
    );
    open.commit().await?;
    for n in 0..4 {
        commit_events(pool, 1 + n % 3).await?;
    }

    let log = commit_order(pool).await?;
    straddles(&log, BOUNDARY, 12)?;
    ensure!(
        log.iter().any(|p| p.tx_id == early_id),
        "the early transaction wrote nothing"
    );
    // The log would have caught the text-ordered reader.
    let (as_text, _) = read_as_text(pool, 7).await?;
    ensure!(
        as_text.len() < log.len(),
        "reading as text delivered {} of {} events: the log does not exercise the bug",
        as_text.len(),
        log.len()
    );
    for page in PAGES {
        let read = read_all(&mut conn, page).await?;
        let got: Vec<_> = read
            .iter()
            .map(|e| (e.aggregate_id.clone(), e.sequence))
            .collect();
        ensure!(
            got == streams(&log),
            "pages of {page}: {} events read of {}, or out of commit order",
            got.len(),
            log.len()
        );
        let positions: Vec<i64> = read.iter().map(|e| e.global_position).collect();
        let expected: Vec<i64> = log.iter().map(|p| p.global_position).collect();
        ensure!(positions == expected, "pages of {page}: positions differ");
    }
    drop(conn);
    db.drop_database().await
}

/// Inserts events at chosen places, as the property test needs: `tx_id`
/// is written, not taken from the transaction, and so is the position.
async fn insert_at(conn: &mut PgConnection, places: &[(u64, i64)]) -> anyhow::Result<()> {
    for (tx_id, position) in places {
        let show_id = Uuid::new_v4();
        sqlx::query(
            "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version,
                                 payload, metadata, global_position, tx_id)
             OVERRIDING SYSTEM VALUE
             VALUES ('Show', $1, 1, 'ShowCreated', '1.0', $2, '{}', $3, $4)",
        )
        .bind(show_id.to_string())
        .bind(show_created(show_id))
        .bind(position)
        .bind(TxId::new(*tx_id))
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reading_that_passed_an_event_over_fails_instead_of_reporting_success(
) -> anyhow::Result<()> {
    let (_cluster, db) = cluster_near_boundary().await?;
    for _ in 0..12 {
        commit_events(&db.pool, 2).await?;
    }
    let mut conn = db.pool.acquire().await?;
    let pool = db.pool.clone();
    let mut pages = 0;
    // After the first page, an event appears behind the cursor, as every
    // event the text-ordered reader passed over lay behind its cursor: each
    // later page is whole, but the reading as a whole is not.
    let outcome = read_pages(&mut conn, Cursor::START, None, 5, async |_| {
        pages += 1;
        if pages == 1 {
            let mut conn = pool.acquire().await?;
            insert_at(&mut conn, &[(3, 1_000_000)]).await?;
        }
        Ok(())
    })
    .await;
    drop(conn);
    db.drop_database().await?;
    let error = outcome.err().context("the reading reported success")?;
    ensure!(
        error.to_string().contains("the log holds 25 events")
            && error.to_string().contains("but 24 were read"),
        "{error:#}"
    );
    Ok(())
}

/// One case: events at `places` (transaction id, position), read after
/// the `from`th and through the `until`th of them in commit order, `page`
/// at a time.
#[derive(Debug, Clone)]
struct Case {
    places: Vec<(u64, i64)>,
    page: i64,
    from: Option<prop::sample::Index>,
    until: Option<prop::sample::Index>,
}

/// Transaction ids next to every change of digit count below 10^10, and
/// anywhere in between; positions unrelated to them (positions are handed
/// out at insert, ids at a transaction's first write).
fn cases(below: u64) -> impl Strategy<Value = Case> {
    let near_boundary = (1..10_u32, 0..20_u64, any::<bool>()).prop_map(|(digits, d, up)| {
        let boundary = 10_u64.pow(digits);
        if up {
            boundary + d
        } else {
            boundary - 1 - d.min(boundary - 4)
        }
    });
    let tx_id = prop_oneof![near_boundary, 3..below];
    // A few ids shared by several events: transactions of many events.
    let ids = prop::collection::vec(tx_id, 1..12);
    (ids, 1..40_usize)
        .prop_flat_map(|(ids, events)| {
            let places =
                prop::collection::vec((prop::sample::select(ids), 1..1_000_000_i64), events);
            let page = prop_oneof![1..12_i64, Just(1000_i64)];
            (
                places,
                page,
                prop::option::of(any::<prop::sample::Index>()),
                prop::option::of(any::<prop::sample::Index>()),
            )
        })
        .prop_map(|(mut places, page, from, until)| {
            places.sort_by_key(|p| p.1);
            places.dedup_by_key(|p| p.1);
            Case {
                places,
                page,
                from,
                until,
            }
        })
}

/// Reads one case inside a transaction that is then rolled back, and
/// compares with the places sorted here.
async fn check(pool: &PgPool, case: &Case) -> anyhow::Result<()> {
    let mut tx = pool.begin().await?;
    insert_at(&mut tx, &case.places).await?;
    let mut sorted: Vec<Cursor> = case
        .places
        .iter()
        .map(|(tx_id, global_position)| Cursor {
            tx_id: TxId::new(*tx_id),
            global_position: *global_position,
        })
        .collect();
    sorted.sort_by_key(|c| (c.tx_id.get(), c.global_position));
    let from = case.from.map_or(Cursor::START, |i| *i.get(&sorted));
    let until = case.until.map(|i| *i.get(&sorted));
    let expected: Vec<Cursor> = sorted
        .iter()
        .copied()
        .filter(|c| *c > from && until.is_none_or(|u| *c <= u))
        .collect();
    let mut got = Vec::new();
    let reading = read_pages(&mut tx, from, until, case.page, async |page| {
        got.extend(page.iter().map(|c| c.cursor));
        Ok(())
    })
    .await?;
    // The relay's way: a page at a time, the cursor moved to its end.
    let mut relayed = Vec::new();
    let mut cursor = from;
    loop {
        let page = read_after(&mut tx, &cursor, case.page).await?;
        let Some(last) = page.last() else { break };
        cursor = last.cursor;
        relayed.extend(page.iter().map(|c| c.cursor));
    }
    tx.rollback().await?;
    let to_until: Vec<Cursor> = relayed
        .into_iter()
        .filter(|c| until.is_none_or(|u| *c <= u))
        .collect();
    ensure!(
        to_until == expected,
        "page by page: read {to_until:?}, expected {expected:?}"
    );
    ensure!(got == expected, "read {got:?}, expected {expected:?}");
    ensure!(reading.events == expected.len() as u64, "{reading:?}");
    ensure!(
        reading.through == expected.last().copied().unwrap_or(from),
        "{reading:?}"
    );
    Ok(())
}

#[test]
fn any_ids_read_at_any_page_size_come_back_whole_and_in_commit_order() -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new()?;
    let (cluster, db) = runtime.block_on(cluster_near_boundary())?;
    // Every id below the oldest open transaction is readable.
    let below = runtime.block_on(next_tx_id(&db.pool))? - 1_000;
    let mut runner = TestRunner::new(Config {
        cases: 96,
        failure_persistence: None,
        ..Config::default()
    });
    let outcome = runner.run(&cases(below), |case| {
        runtime
            .block_on(async {
                tokio::time::timeout(Duration::from_secs(30), check(&db.pool, &case)).await
            })
            .map_err(|_| TestCaseError::fail("timed out"))?
            .map_err(|e| TestCaseError::fail(format!("{e:#}")))
    });
    runtime.block_on(db.drop_database())?;
    drop(cluster);
    outcome.map_err(|e| anyhow::anyhow!("{e}"))
}
