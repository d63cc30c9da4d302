//! The relay against the real Postgres and the real (Tansu) broker: late
//! commits, killed relays, two relays, a stopped broker. Each test has its
//! own database and topic.

mod common;

use std::collections::BTreeMap;
use std::process::Stdio;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Context};
use command_api::relay::Relay;
use command_api::republish::{Progress, Rewound};
use command_api::sales::{Order, Sales};
use common::{relay_settings, TestApp};

use domain::{BookingId, SeatLabel, ShowId, UserId};
use serde_json::{json, Value};
use sqlx::Connection;
use ticketing_tests::cluster::PrivateCluster;
use ticketing_tests::kafka::{
    check_against_log, check_commit_order, distinct_events, events_in_log, read_topic,
};
use ticketing_tests::log_order::{bookings_across, Place};
use ticketing_tests::{kafka_brokers, unique_name};
use tokio::process::{Child, Command};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// `command-api relay` as a process of its own, so that it can be killed.
fn start_relay(database_url: &str, topic: &str) -> anyhow::Result<Child> {
    Ok(Command::new(env!("CARGO_BIN_EXE_command-api"))
        .arg("relay")
        .env("DATABASE_URL", database_url)
        .env("KAFKA_BROKERS", kafka_brokers())
        .env("RELAY_TOPIC", topic)
        .env("RELAY_PARTITIONS", "3")
        .env("RELAY_BATCH", "20")
        .env("RELAY_POLL_MS", "100")
        .env("RELAY_STANDBY_POLL_MS", "300")
        .env("RUST_LOG", "error")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()?)
}

/// Reads the topic until every event of the log is there (or 60 s), then
/// checks it against the log; returns the number of repeats.
async fn everything_arrives(app: &TestApp, topic: &str) -> anyhow::Result<usize> {
    let expected = events_in_log(&app.db.pool).await?;
    let received = read_topic(topic, Duration::from_secs(60), |r| {
        distinct_events(r) >= expected
    })
    .await?;
    check_against_log(&app.db.pool, &received).await
}

/// Buyers booking and cancelling over HTTP until `running` is cleared.
fn buyers(app: &TestApp, show_id: &str, running: &Arc<AtomicBool>) -> JoinSet<usize> {
    let mut buyers = JoinSet::new();
    for buyer in 0..4u32 {
        let (client, base) = (app.client.clone(), app.base.clone());
        let (show_id, running) = (show_id.to_owned(), Arc::clone(running));
        buyers.spawn(async move {
            let mut placed = 0;
            let mut n = buyer;
            while running.load(Ordering::Relaxed) {
                // A steady load, not a flood: the broker on this machine is
                // Tansu on SQLite, and the point is concurrency, not volume.
                tokio::time::sleep(Duration::from_millis(100)).await;
                n = n.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                let seat = format!("{}{}", ['A', 'B', 'C'][(n % 3) as usize], n / 3 % 20 + 1);
                let body = json!({"show_id": show_id, "user_id": uuid::Uuid::new_v4().to_string(),
                                  "seats": [seat], "hold": false});
                let Ok(response) = client
                    .post(format!("{base}/bookings"))
                    .json(&body)
                    .send()
                    .await
                else {
                    continue;
                };
                let Ok(answer) = response.json::<Value>().await else {
                    continue;
                };
                if let Some(id) = answer["booking_id"].as_str() {
                    placed += 1;
                    let _ = client
                        .post(format!("{base}/bookings/{id}/cancel"))
                        .send()
                        .await;
                }
            }
            placed
        });
    }
    buyers
}

async fn three_row_show(app: &TestApp) -> anyhow::Result<String> {
    let rows: Vec<Value> = ["A", "B", "C"]
        .iter()
        .map(|r| json!({"row": r, "seats": 20}))
        .collect();
    let (status, body) = app
        .post(
            "/shows",
            &json!({"name": "Relay Night", "venue": "Hall", "starts_at": "2027-06-01T19:00:00Z",
                    "sections": [{"name": "All", "price_cents": 1000, "rows": rows}]}),
        )
        .await?;
    ensure!(status == 201, "creating the show: {status} {body}");
    Ok(body["show_id"].as_str().context("show_id")?.to_owned())
}

async fn placed(set: &mut JoinSet<usize>) -> usize {
    let mut total = 0;
    while let Some(done) = set.join_next().await {
        total += done.unwrap_or(0);
    }
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_that_commits_late_is_published_after_the_earlier_commit_and_not_skipped(
) -> anyhow::Result<()> {
    let app = TestApp::spawn().await?;
    let topic = unique_name("relay_gap");
    let relay = Relay::new(
        app.db.pool.clone(),
        relay_settings(&topic, &kafka_brokers()),
    )?;
    let stop = CancellationToken::new();
    let relay = tokio::spawn(relay.run(stop.clone()));
    let show_id = three_row_show(&app).await?;
    // The show is out before A begins, so that below "only the show" means
    // "held back", not "the relay had not started yet" (it can be slow to
    // start on a loaded machine).
    let shown = read_topic(&topic, Duration::from_secs(30), |r| !r.is_empty()).await?;
    ensure!(!shown.is_empty(), "the relay never published the show");

    // A takes the earlier global positions but stays open...
    let wait = Duration::from_millis(250);
    let sales = Sales::new(app.db.pool.clone(), Duration::from_secs(600), 8, wait);
    let show = sales.show(show_id.parse::<ShowId>()?).await?;
    let mut late = app.db.pool.begin().await?;
    let late_booking = BookingId::from_uuid(uuid::Uuid::new_v4());
    Sales::place(
        &mut late,
        &show,
        Order {
            booking_id: late_booking,
            show_id: show_id.parse()?,
            user_id: UserId::from_uuid(uuid::Uuid::new_v4()),
            seats: vec!["A1".parse::<SeatLabel>()?],
            hold_for: None,
        },
        wait,
        false,
    )
    .await?;
    // ...while B, later in every respect, commits first.
    let (status, body) = app
        .post("/bookings", &common::booking(&show_id, &["B1"], false))
        .await?;
    ensure!(status == 201, "{status} {body}");
    let positions: Vec<i64> =
        sqlx::query_scalar("SELECT global_position FROM events ORDER BY global_position")
            .fetch_all(&app.db.pool)
            .await?;
    ensure!(positions.len() == 3, "show and B only: {positions:?}");

    // B is committed, but must wait for A: publishing it now and moving the
    // cursor past A's positions is exactly how A would be lost.
    let early = read_topic(&topic, Duration::from_secs(3), |_| false).await?;
    ensure!(
        early.len() == 1 && early[0].event.event_type == "ShowCreated",
        "published while A was open: {:?}",
        early
            .iter()
            .map(|r| &r.event.event_type)
            .collect::<Vec<_>>()
    );
    late.commit().await?;
    let late_position: i64 =
        sqlx::query_scalar("SELECT min(global_position) FROM events WHERE aggregate_id = $1")
            .bind(late_booking.to_string())
            .fetch_one(&app.db.pool)
            .await?;
    ensure!(
        late_position < positions[1],
        "A was meant to hold the earlier position"
    );

    let repeats = everything_arrives(&app, &topic).await?;
    ensure!(repeats == 0, "{repeats} repeats without any crash");
    let received = read_topic(&topic, Duration::from_secs(10), |r| r.len() >= 5).await?;
    let first_a = received
        .iter()
        .position(|r| r.event.aggregate_id == late_booking.to_string());
    let first_b = received
        .iter()
        .position(|r| r.event.aggregate_id.ends_with(":B1"));
    ensure!(
        first_a.is_some() && first_b.is_some(),
        "both bookings reach Kafka"
    );
    let headers = &received[0].headers;
    for name in ["ce_type", "ce_id", "ce_source", "ce_time", "ce_specversion"] {
        ensure!(headers.contains_key(name), "no {name} header: {headers:?}");
    }
    ensure!(headers["ce_type"] == "ShowCreated", "{headers:?}");
    stop.cancel();
    relay.await?;
    app.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_killed_mid_batch_again_and_again_loses_nothing_and_keeps_order(
) -> anyhow::Result<()> {
    let app = TestApp::spawn().await?;
    let topic = unique_name("relay_kill");
    let show_id = three_row_show(&app).await?;
    let running = Arc::new(AtomicBool::new(true));
    let mut load = buyers(&app, &show_id, &running);

    let mut kills = 0;
    let mut published = 0;
    for round in 0..8u64 {
        let mut relay = start_relay(&app.db.url(), &topic)?;
        // Killed only once it is publishing, at different moments of its
        // batches.
        published = wait_for_progress(&app, &topic, published).await?;
        tokio::time::sleep(Duration::from_millis(13 * round)).await;
        relay.start_kill()?;
        relay.wait().await?;
        kills += 1;
    }
    running.store(false, Ordering::Relaxed);
    let bookings = placed(&mut load).await;
    ensure!(bookings > 20, "the load barely ran: {bookings} bookings");

    let mut last = start_relay(&app.db.url(), &topic)?;
    let repeats = everything_arrives(&app, &topic).await?;
    let published_before_end: i64 =
        sqlx::query_scalar("SELECT count(*) FROM relay_checkpoints WHERE topic = $1")
            .bind(&topic)
            .fetch_one(&app.db.pool)
            .await?;
    ensure!(published_before_end == 1, "no checkpoint was ever written");
    eprintln!("{kills} kills, {bookings} bookings, {repeats} repeats");
    last.start_kill()?;
    last.wait().await?;
    app.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn of_two_relays_one_publishes_and_the_other_takes_over_when_it_dies() -> anyhow::Result<()> {
    let app = TestApp::spawn().await?;
    let topic = unique_name("relay_pair");
    let show_id = three_row_show(&app).await?;
    let mut first = start_relay(&app.db.url(), &topic)?;
    let owner = wait_for_checkpoint(&app, &topic, None).await?;
    let mut second = start_relay(&app.db.url(), &topic)?;
    tokio::time::sleep(Duration::from_millis(500)).await;

    for seat in ["A1", "A2", "A3", "A4"] {
        let (status, body) = app
            .post("/bookings", &common::booking(&show_id, &[seat], false))
            .await?;
        ensure!(status == 201, "{status} {body}");
    }
    let repeats = everything_arrives(&app, &topic).await?;
    // Had both published, every event after the second started would be here twice.
    ensure!(repeats == 0, "two relays published: {repeats} repeats");
    let writer: String = sqlx::query_scalar("SELECT relay FROM relay_checkpoints WHERE topic = $1")
        .bind(&topic)
        .fetch_one(&app.db.pool)
        .await?;
    ensure!(writer == owner, "the checkpoint moved to {writer}");

    first.start_kill()?;
    first.wait().await?;
    let (status, body) = app
        .post("/bookings", &common::booking(&show_id, &["B1"], false))
        .await?;
    ensure!(status == 201, "{status} {body}");
    let taken_over = wait_for_checkpoint(&app, &topic, Some(&owner)).await?;
    ensure!(taken_over != owner, "nobody took over");
    everything_arrives(&app, &topic).await?;
    second.start_kill()?;
    second.wait().await?;
    app.stop().await
}

/// Waits (up to 30 s) until the checkpoint of `topic` is past `after`;
/// returns where it is.
async fn wait_for_progress(app: &TestApp, topic: &str, after: i64) -> anyhow::Result<i64> {
    for _ in 0..300 {
        let at: Option<i64> =
            sqlx::query_scalar("SELECT global_position FROM relay_checkpoints WHERE topic = $1")
                .bind(topic)
                .fetch_optional(&app.db.pool)
                .await?;
        if let Some(at) = at.filter(|at| *at > after) {
            return Ok(at);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    anyhow::bail!("the relay of {topic} made no progress past {after} within 6 s")
}

/// Waits (up to 30 s) until the checkpoint of `topic` was written by a relay
/// other than `not`; returns its name.
async fn wait_for_checkpoint(
    app: &TestApp,
    topic: &str,
    not: Option<&str>,
) -> anyhow::Result<String> {
    for _ in 0..300 {
        let writer: Option<String> =
            sqlx::query_scalar("SELECT relay FROM relay_checkpoints WHERE topic = $1")
                .bind(topic)
                .fetch_optional(&app.db.pool)
                .await?;
        if let Some(writer) = writer {
            if Some(writer.as_str()) != not {
                return Ok(writer);
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("no relay checkpointed {topic} within 30 s")
}

/// A broker of this test's own (the shared one stays up for the others),
/// stopped and started at will.
struct PrivateBroker {
    dir: std::path::PathBuf,
    port: u16,
    process: Option<Child>,
}

impl PrivateBroker {
    fn new() -> anyhow::Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let dir = std::env::temp_dir().join(unique_name("tansu"));
        std::fs::create_dir_all(&dir)?;
        Ok(Self {
            dir,
            port,
            process: None,
        })
    }

    fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    async fn start(&mut self) -> anyhow::Result<()> {
        let url = format!("tcp://{}", self.address());
        let child = Command::new("tansu")
            .args(["broker", "--storage-engine", "sqlite://tansu.db"])
            .args(["--listener-url", &url, "--advertised-listener-url", &url])
            .current_dir(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("starting tansu (installed by `make up`)")?;
        self.process = Some(child);
        for _ in 0..300 {
            if tokio::net::TcpStream::connect(self.address()).await.is_ok() {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        anyhow::bail!("the private tansu did not answer on {}", self.address())
    }

    async fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.process.take() {
            child.start_kill()?;
            child.wait().await?;
        }
        Ok(())
    }
}

impl Drop for PrivateBroker {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_down_under_load_loses_nothing_once_it_is_back() -> anyhow::Result<()> {
    let mut broker = PrivateBroker::new()?;
    broker.start().await?;
    let topic = unique_name("relay_outage");
    let app = TestApp::spawn_relaying(&topic, &broker.address()).await?;
    let show_id = three_row_show(&app).await?;
    let running = Arc::new(AtomicBool::new(true));
    let mut load = buyers(&app, &show_id, &running);

    tokio::time::sleep(Duration::from_secs(1)).await;
    broker.stop().await?;
    let before = events_in_log(&app.db.pool).await?;
    // Commands keep being taken, and /readyz shows the relay failing with a
    // backlog.
    let mut relay_seen = Value::Null;
    for _ in 0..150 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let ready = app
            .client
            .get(format!("{}/readyz", app.base))
            .send()
            .await?;
        ensure!(ready.status() == 200, "not ready while only Kafka is down");
        relay_seen = ready.json::<Value>().await?["relay"].clone();
        if failing_with_backlog(&relay_seen) {
            break;
        }
    }
    ensure!(
        failing_with_backlog(&relay_seen),
        "/readyz did not show the relay failing with a backlog: {relay_seen}"
    );
    let during = events_in_log(&app.db.pool).await?;
    ensure!(
        during > before,
        "bookings stopped while Kafka was down ({before} events, then {during})"
    );
    broker.start().await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    running.store(false, Ordering::Relaxed);
    placed(&mut load).await;

    let expected = events_in_log(&app.db.pool).await?;
    let brokers = broker.address();
    let received = read_topic_at(&brokers, &topic, expected).await?;
    check_against_log(&app.db.pool, &received).await?;
    broker.stop().await?;
    app.stop().await
}

fn failing_with_backlog(relay: &Value) -> bool {
    relay["last_error"].is_string() && relay["lag_events"].as_i64() > Some(0)
}

async fn read_topic_at(
    brokers: &str,
    topic: &str,
    expected: usize,
) -> anyhow::Result<Vec<ticketing_tests::kafka::Received>> {
    ticketing_tests::kafka::read_topic_from(brokers, topic, Duration::from_secs(60), |r| {
        distinct_events(r) >= expected
    })
    .await
}

/// 10^10: ids of ten digits below, eleven from here on (in the third epoch).
const BOUNDARY: u64 = 10_000_000_000;

/// A command-api over a private cluster whose transaction ids cross
/// [`BOUNDARY`] while it takes bookings and cancellations.
async fn log_across_the_boundary() -> anyhow::Result<(PrivateCluster, TestApp, Vec<Place>)> {
    let cluster = PrivateCluster::start_near(BOUNDARY - 30_000).await?;
    let app = TestApp::spawn_on(&cluster.url(), |_| {}).await?;
    let log = bookings_across(&app.base, &app.db.pool, BOUNDARY).await?;
    Ok((cluster, app, log))
}

/// Per partition, the offset of its last message in `received`.
fn ends(received: &[ticketing_tests::kafka::Received]) -> BTreeMap<i32, i64> {
    let mut ends = BTreeMap::new();
    for r in received {
        let end = ends.entry(r.partition).or_insert(r.offset);
        *end = (*end).max(r.offset);
    }
    ends
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_crossing_a_change_of_digit_count_is_published_whole_and_in_commit_order_at_any_batch_size(
) -> anyhow::Result<()> {
    let (_cluster, app, log) = log_across_the_boundary().await?;
    let stop = CancellationToken::new();
    let mut relays = Vec::new();
    for batch in [1, 2, 7, 1000] {
        let topic = unique_name(&format!("relay_digits_{batch}"));
        let mut settings = relay_settings(&topic, &kafka_brokers());
        settings.relay_batch = batch;
        let relay = Relay::new(app.db.pool.clone(), settings)?;
        relays.push((batch, topic, tokio::spawn(relay.run(stop.clone()))));
    }
    for (batch, topic, _) in &relays {
        let received = read_topic(topic, Duration::from_secs(60), |r| {
            distinct_events(r) >= log.len()
        })
        .await?;
        check_commit_order(&log, &received)
            .with_context(|| format!("the relay with batches of {batch}"))?;
        // The checkpoint follows the acknowledgements.
        let end = log.last().map(|p| (p.tx_id.to_string(), p.global_position));
        let mut checkpoint = None;
        for _ in 0..100 {
            checkpoint = sqlx::query_as::<_, (String, i64)>(
                "SELECT tx_id::text, global_position FROM relay_checkpoints WHERE topic = $1",
            )
            .bind(topic)
            .fetch_optional(&app.db.pool)
            .await?;
            if checkpoint == end {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        ensure!(
            checkpoint == end,
            "batches of {batch}: checkpoint at {checkpoint:?}, the log ends at {end:?}"
        );
    }
    stop.cancel();
    for (_, _, relay) in relays {
        relay.await?;
    }
    app.stop().await
}

/// Runs `command-api republish` with `args` on the database and topic.
async fn republish(
    database_url: &str,
    topic: &str,
    args: &[&str],
) -> anyhow::Result<(bool, Value, String)> {
    let output = Command::new(env!("CARGO_BIN_EXE_command-api"))
        .arg("republish")
        .args(args)
        .env("DATABASE_URL", database_url)
        .env("KAFKA_BROKERS", kafka_brokers())
        .env("RELAY_TOPIC", topic)
        .env("RUST_LOG", "warn")
        .output()
        .await?;
    let printed = serde_json::from_slice(&output.stdout).unwrap_or(Value::Null);
    let errors = String::from_utf8_lossy(&output.stderr).into_owned();
    Ok((output.status.success(), printed, errors))
}

/// The messages of `received` past the offsets of `before`, per partition.
fn after(
    received: &[ticketing_tests::kafka::Received],
    before: &[ticketing_tests::kafka::Received],
) -> Vec<ticketing_tests::kafka::Received> {
    let ends = ends(before);
    received
        .iter()
        .filter(|r| ends.get(&r.partition).is_none_or(|end| r.offset > *end))
        .cloned()
        .collect()
}

/// What a topic lacked gets there again: `command-api republish` has the
/// running relay publish again, in commit order, everything from the start
/// or from a given event; with no relay running, the rewind waits in the
/// checkpoint for the next relay to start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn republish_has_the_relay_send_again_what_it_passed_in_commit_order() -> anyhow::Result<()> {
    let (_cluster, app, log) = log_across_the_boundary().await?;
    let topic = unique_name("relay_republish");
    let start_relay = || -> anyhow::Result<(CancellationToken, tokio::task::JoinHandle<()>)> {
        let stop = CancellationToken::new();
        let relay = Relay::new(
            app.db.pool.clone(),
            relay_settings(&topic, &kafka_brokers()),
        )?;
        Ok((stop.clone(), tokio::spawn(relay.run(stop))))
    };
    let (stop, relay) = start_relay()?;
    let published = read_topic(&topic, Duration::from_secs(60), |r| {
        distinct_events(r) >= log.len()
    })
    .await?;
    check_commit_order(&log, &published)?;

    // From the event a third of the way through the log in commit order,
    // the relay idle meanwhile.
    let start = log.len() / 3;
    let position = log[start].global_position.to_string();
    let (ok, printed, errors) =
        republish(&app.db.url(), &topic, &["--from-position", &position]).await?;
    ensure!(ok, "republish failed: {errors}");
    ensure!(
        printed["events"] == log.len() - start && printed["progress"] == "republished",
        "{printed} for {} events from the {start}th",
        log.len()
    );
    let wanted = log.len() + (log.len() - start);
    let received = read_topic(&topic, Duration::from_secs(60), |r| r.len() >= wanted).await?;
    check_commit_order(&log[start..], &after(&received, &published))
        .context("published again from a position")?;

    // With no relay running, the rewind stays in the checkpoint...
    stop.cancel();
    relay.await?;
    let (ok, printed, errors) = republish(&app.db.url(), &topic, &["--wait-secs", "1"]).await?;
    ensure!(
        !ok && printed["progress"] == "pending" && printed["events"] == log.len(),
        "{printed} {errors}"
    );
    ensure!(errors.contains("is one running?"), "{errors}");
    // ...and the next relay to start publishes the whole log again.
    let (stop, relay) = start_relay()?;
    let more = read_topic(&topic, Duration::from_secs(60), |r| {
        r.len() >= wanted + log.len()
    })
    .await?;
    check_commit_order(&log, &after(&more, &received)).context("published again from the start")?;
    let stored: (String, i64, i64) = sqlx::query_as(
        "SELECT tx_id::text, global_position, rewinds FROM relay_checkpoints WHERE topic = $1",
    )
    .bind(&topic)
    .fetch_one(&app.db.pool)
    .await?;
    let end = log.last().context("an empty log")?;
    ensure!(
        stored == (end.tx_id.to_string(), end.global_position, 2),
        "checkpoint {stored:?}"
    );

    // No such event, or no position at all: a clear refusal, nothing moved.
    let (ok, _, errors) = republish(&app.db.url(), &topic, &["--from-position", "999999"]).await?;
    ensure!(
        !ok && errors.contains("no event at global position 999999"),
        "{errors}"
    );
    let (ok, _, errors) = republish(&app.db.url(), &topic, &["--from-position", "0"]).await?;
    ensure!(!ok && errors.contains("--from-position"), "{errors}");
    let (ok, printed, _) = republish(&app.db.url(), "never_published", &[]).await?;
    ensure!(
        ok && printed["events"] == 0 && printed["progress"] == "no_checkpoint",
        "{printed}"
    );
    // A relay of an earlier build would save over the rewind: refused.
    let old_relay = sqlx::postgres::PgConnectOptions::from_str(&app.db.url())?
        .application_name("relay-4242-0a0b0c0d");
    let old_relay = sqlx::PgConnection::connect_with(&old_relay).await?;
    let (ok, _, errors) = republish(&app.db.url(), &topic, &[]).await?;
    ensure!(
        !ok && errors.contains("relays of an earlier build are connected (relay-4242-0a0b0c0d)"),
        "{errors}"
    );
    old_relay.close().await?;
    // Not waiting: the rewind is in place, and the relay gets there.
    let (ok, printed, errors) = republish(&app.db.url(), &topic, &["--wait-secs", "0"]).await?;
    ensure!(ok && printed["progress"] == "pending", "{printed} {errors}");
    read_topic(&topic, Duration::from_secs(60), |r| {
        r.len() >= wanted + 2 * log.len()
    })
    .await?;
    let (ok, _, errors) = republish(&app.db.url(), &topic, &["--wait-secs", "100000"]).await?;
    ensure!(!ok && errors.contains("--wait-secs"), "{errors}");
    stop.cancel();
    relay.await?;
    app.stop().await
}

/// A rewind while buyers book and the relay publishes: the relay sends
/// everything it had passed again and goes on with the new events; nothing
/// is lost and every stream still arrives in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn republish_while_buyers_book_sends_everything_again_and_loses_nothing() -> anyhow::Result<()>
{
    let topic = unique_name("relay_rewind_busy");
    let app = TestApp::spawn_relaying(&topic, &kafka_brokers()).await?;
    let show_id = three_row_show(&app).await?;
    let running = Arc::new(AtomicBool::new(true));
    let mut load = buyers(&app, &show_id, &running);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let Rewound::Rewound(rewind) =
        command_api::republish::rewind(&app.db.pool, &topic, None).await?
    else {
        anyhow::bail!("the relay had published nothing");
    };
    let progress =
        command_api::republish::wait_for(&app.db.pool, &rewind, Duration::from_secs(60)).await;
    ensure!(progress == Progress::Republished, "{progress:?}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    running.store(false, Ordering::Relaxed);
    let bookings = placed(&mut load).await;
    ensure!(bookings > 5, "the load barely ran: {bookings} bookings");

    let expected = events_in_log(&app.db.pool).await?;
    let again = usize::try_from(rewind.events)?;
    let received = read_topic(&topic, Duration::from_secs(60), |r| {
        distinct_events(r) >= expected && r.len() >= expected + again
    })
    .await?;
    let repeats = check_against_log(&app.db.pool, &received).await?;
    ensure!(
        repeats >= again,
        "{repeats} repeats, but {again} events were to be published again"
    );
    app.stop().await
}
