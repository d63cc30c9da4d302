//! The relay's throughput (events/s) and its latency from commit to "Kafka
//! acknowledged it and the cursor moved past it", next to the raw producer
//! throughput of the same broker measured in the same run.
//!
//! ```sh
//! make up
//! cargo run --release -p command-api --example bench_relay -- --events 20000 --rounds 3
//! ```
//!
//! Each round: (1) the raw producer sends `--events` messages exactly like
//! the relay's (body, key, the six CloudEvents headers) with every message
//! in flight at once and waits for all acks: the broker's ceiling for this
//! work; (2) the relay publishes a backlog of `--events` committed events,
//! with `--in-flight` batches in flight and with one; (3) a writer commits
//! one event per transaction at `--rate` per second for `--seconds` while
//! the relay runs, woken by each commit as in command-api, and each commit's
//! latency is taken when the relay's cursor passes it. Medians over rounds
//! are printed.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use clap::Parser;
use command_api::event_log::{self, Append, Versions};
use command_api::relay::{self, Relay, RelaySettings, RelayStatus};
use domain::{Show, ShowCommand, ShowDetails, ShowEvent, ShowId};
use rdkafka::producer::FutureRecord;
use serde_json::json;
use ticketing_tests::{kafka_brokers, unique_name, TestDatabase};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Parser)]
struct Args {
    /// Events per throughput measurement.
    #[arg(long, default_value_t = 20_000)]
    events: usize,
    /// Commits per second in the latency measurement.
    #[arg(long, default_value_t = 200)]
    rate: u64,
    /// Seconds of the latency measurement.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Rounds.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// The relay's batch size.
    #[arg(long, default_value_t = 1000)]
    batch: i64,
    /// Batches the relay keeps in flight (`RELAY_IN_FLIGHT`); each round
    /// also measures 1, the relay that waited for every batch's
    /// acknowledgement before it read the next.
    #[arg(long, default_value_t = 8)]
    in_flight: u64,
}

fn details() -> anyhow::Result<ShowDetails> {
    let event: ShowEvent = serde_json::from_value(json!({"ShowCreated": {
        "show_id": uuid::Uuid::new_v4(), "name": "Bench Night", "venue": "Hall",
        "starts_at": "2027-03-01T20:00:00Z",
        "seat_map": [{"name": "All", "price_cents": 1000, "rows": [{"row": "A", "seats": 20}]}]
    }}))?;
    match event {
        ShowEvent::ShowCreated(details) => Ok(details),
    }
}

/// Commits `count` show creations, `per_tx` to a transaction; returns the
/// highest global position.
async fn commit_shows(pool: &sqlx::PgPool, count: usize, per_tx: usize) -> anyhow::Result<i64> {
    let mut last = 0;
    let mut left = count;
    while left > 0 {
        let n = left.min(per_tx);
        let mut shows = BTreeMap::<ShowId, Vec<ShowEvent>>::new();
        for _ in 0..n {
            let details = details()?;
            let events = Show::default().decide(ShowCommand::CreateShow(details.clone()))?;
            shows.insert(details.show_id, events);
        }
        let mut tx = pool.begin().await?;
        let append = Append {
            shows,
            ..Append::default()
        };
        last = event_log::append(&mut tx, &append, &Versions::default()).await?;
        tx.commit().await?;
        left -= n;
    }
    Ok(last)
}

fn settings(topic: &str, batch: i64, in_flight: u64) -> RelaySettings {
    RelaySettings {
        kafka_brokers: kafka_brokers(),
        relay_topic: topic.to_owned(),
        relay_partitions: 6,
        relay_batch: batch,
        relay_poll_ms: 20,
        relay_standby_poll_ms: 1000,
        relay_ack_timeout_ms: 30_000,
        relay_in_flight: in_flight,
    }
}

fn cursor_at(status: &RelayStatus) -> i64 {
    status
        .report()
        .and_then(|r| r.published_through)
        .map_or(0, |c| c.global_position)
}

/// One envelope as the relay would send it, for the raw producer: its body,
/// key and headers.
async fn sample_body(
    db: &TestDatabase,
) -> anyhow::Result<(Vec<u8>, String, rdkafka::message::OwnedHeaders)> {
    commit_shows(&db.pool, 1, 1).await?;
    let mut conn = db.pool.acquire().await?;
    let batch = event_feed::read_after(&mut conn, &relay::Cursor::START, 1).await?;
    let event = &batch.first().context("no event")?.event;
    Ok((
        serde_json::to_vec(event)?,
        event.key(),
        relay::headers_of(event),
    ))
}

/// The same messages as the relay sends (body, key pattern, the six
/// CloudEvents headers), all in flight at once: the broker's ceiling for
/// the relay's work.
async fn raw_producer(
    events: usize,
    body: &[u8],
    key: &str,
    headers: &rdkafka::message::OwnedHeaders,
) -> anyhow::Result<f64> {
    let topic = unique_name("bench_raw");
    // The relay creates its topic; the raw producer gets one the same way.
    relay::ensure_topic(&settings(&topic, 1, 1)).await?;
    let producer = relay::producer(&kafka_brokers(), Duration::from_secs(60))?;
    let started = Instant::now();
    let mut acks = Vec::with_capacity(events);
    for n in 0..events {
        // Different keys spread the load over partitions as shows do.
        let key = format!("{key}{n}");
        let record = FutureRecord::to(&topic)
            .key(&key)
            .payload(body)
            .headers(headers.clone());
        acks.push(producer.send_result(record).map_err(|(e, _)| e)?);
    }
    for ack in acks {
        ack.await?.map_err(|(e, _)| e)?;
    }
    Ok(events as f64 / started.elapsed().as_secs_f64())
}

async fn relay_backlog(args: &Args, in_flight: u64) -> anyhow::Result<f64> {
    let db = TestDatabase::create().await?;
    let last = commit_shows(&db.pool, args.events, 1000).await?;
    let relay = Relay::new(
        db.pool.clone(),
        settings(&unique_name("bench_relay"), args.batch, in_flight),
    )?;
    let status = relay.status();
    let stop = CancellationToken::new();
    let started = Instant::now();
    let task = tokio::spawn(relay.run(stop.clone()));
    while cursor_at(&status) < last {
        ensure!(
            started.elapsed() < Duration::from_secs(600),
            "the relay stalled"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let per_second = args.events as f64 / started.elapsed().as_secs_f64();
    stop.cancel();
    task.await?;
    db.drop_database().await?;
    Ok(per_second)
}

async fn relay_latency(args: &Args) -> anyhow::Result<(f64, f64)> {
    let db = TestDatabase::create().await?;
    // Woken by the commits, as the relay inside command-api is by its
    // process' own.
    let commits_made = std::sync::Arc::new(tokio::sync::Notify::new());
    let relay = Relay::new(
        db.pool.clone(),
        settings(&unique_name("bench_lat"), args.batch, args.in_flight),
    )?
    .woken_by(std::sync::Arc::clone(&commits_made));
    let status = relay.status();
    let stop = CancellationToken::new();
    let task = tokio::spawn(relay.run(stop.clone()));
    // Warm up: the relay is active and the topic exists.
    let first = commit_shows(&db.pool, 1, 1).await?;
    while cursor_at(&status) < first {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let watcher = {
        let status = status.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            // (position, when the cursor was first seen at or past it)
            let mut seen = Vec::new();
            let mut at = 0;
            while !stop.is_cancelled() {
                let now = cursor_at(&status);
                if now > at {
                    at = now;
                    seen.push((at, Instant::now()));
                }
                tokio::time::sleep(Duration::from_micros(200)).await;
            }
            seen
        })
    };
    let mut commits = Vec::new();
    let gap = Duration::from_secs_f64(1.0 / args.rate as f64);
    let until = Instant::now() + Duration::from_secs(args.seconds);
    let mut next = Instant::now();
    while Instant::now() < until {
        let position = commit_shows(&db.pool, 1, 1).await?;
        commits.push((position, Instant::now()));
        commits_made.notify_one();
        next += gap;
        tokio::time::sleep_until(next.into()).await;
    }
    let last = commits.last().map_or(0, |c| c.0);
    while cursor_at(&status) < last {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    tokio::time::sleep(Duration::from_millis(5)).await;
    stop.cancel();
    let seen = watcher.await?;
    task.await?;
    let mut latencies: Vec<f64> = commits
        .iter()
        .filter_map(|(position, committed)| {
            let i = seen.partition_point(|(at, _)| at < position);
            seen.get(i)
                .map(|(_, when)| when.saturating_duration_since(*committed).as_secs_f64() * 1e3)
        })
        .collect();
    latencies.sort_by(f64::total_cmp);
    db.drop_database().await?;
    Ok((quantile(&latencies, 0.5), quantile(&latencies, 0.99)))
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    sorted
        .get(((sorted.len() as f64 - 1.0) * q).round() as usize)
        .copied()
        .unwrap_or(f64::NAN)
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    quantile(&values, 0.5)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let sample_db = TestDatabase::create().await?;
    let (body, key, headers) = sample_body(&sample_db).await?;
    sample_db.drop_database().await?;
    let (mut raw, mut relayed, mut one, mut p50s, mut p99s) =
        (vec![], vec![], vec![], vec![], vec![]);
    for round in 1..=args.rounds {
        let r = raw_producer(args.events, &body, &key, &headers).await?;
        let t = relay_backlog(&args, args.in_flight).await?;
        let o = relay_backlog(&args, 1).await?;
        let (p50, p99) = relay_latency(&args).await?;
        println!(
            "round {round}: raw producer {r:.0} msg/s | relay {t:.0} events/s ({:.2} of raw) | one batch in flight {o:.0} events/s ({:.2}) | commit->ack p50 {p50:.1} ms p99 {p99:.1} ms",
            t / r,
            o / r
        );
        raw.push(r);
        relayed.push(t);
        one.push(o);
        p50s.push(p50);
        p99s.push(p99);
    }
    let (r, t, o) = (median(raw), median(relayed), median(one));
    println!(
        "median of {} rounds, {} events of {} bytes, batch {}, {} in flight: raw producer {r:.0} msg/s, relay {t:.0} events/s, ratio {:.2} (one batch in flight: {o:.0} events/s, {:.2}); at {}/s commits: p50 {:.1} ms, p99 {:.1} ms",
        args.rounds,
        args.events,
        body.len(),
        args.batch,
        args.in_flight,
        t / r,
        o / r,
        args.rate,
        median(p50s),
        median(p99s)
    );
    Ok(())
}
