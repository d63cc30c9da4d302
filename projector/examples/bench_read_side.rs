//! The read side's speed, each figure next to a baseline of the same server
//! measured in the same run:
//!
//! 1. projector events/s draining a topic backlog, next to raw `bulkWrite`
//!    inserts of as many documents into the same MongoDB;
//! 2. replay events/s rebuilding from the Postgres log;
//! 3. query-api `GET /shows/{id}/availability` requests/s and p99, next to a
//!    bare driver `find_one` of the same document;
//! 4. time from a 201 on a booking to the booking visible on the query side.
//!
//! ```sh
//! make up
//! cargo run -p projector --example bench_read_side -- --cycles 34000
//! ```
//!
//! The log is made through command-api over HTTP: each cycle buys two seats
//! and cancels them (six events), on `--shows` shows of 100 seats.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use domain::read_model::ShowDoc;
use mongodb::bson::doc;
use projector::live::{ConsumerSettings, Goal, Projection};
use projector::replay::{self, ReplaySettings};
use projector::store::ReadStore;
use serde_json::{json, Value};
use ticketing_tests::TestDatabase;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Parser)]
struct Args {
    /// Buy-and-cancel cycles written (six events each).
    #[arg(long, default_value_t = 34_000)]
    cycles: usize,
    /// Concurrent writers and readers.
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// Seconds per read measurement.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Shows of 100 seats the cycles are spread over.
    #[arg(long, default_value_t = 400)]
    shows: usize,
    /// Bookings timed from 201 to visible.
    #[arg(long, default_value_t = 200)]
    visible: usize,
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)].as_secs_f64() * 1000.0
}

fn show_body(n: usize) -> Value {
    json!({ "name": format!("Bench {n}"), "venue": "Hall", "starts_at": "2027-03-01T20:00:00Z",
        "sections": [ { "name": "Floor", "price_cents": 5000,
            "rows": [ { "row": "A", "seats": 50 }, { "row": "B", "seats": 50 } ] } ] })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let db = TestDatabase::create().await?;
    let topic = ticketing_tests::unique_name("bench_read");
    let mut command_settings = command_api::settings::Settings {
        database_url: db.url(),
        addr: "127.0.0.1:0".parse()?,
        max_connections: 16,
        acquire_timeout_secs: 10,
        startup_timeout_secs: 5,
        hold_secs: 600,
        sweep_every_secs: 60,
        idempotency_keep_hours: 24,
        command_attempts: 8,
        command_lock_wait_ms: 250,
        command_batch_max: 64,
        command_batch_window_us: 1000,
        command_batches: 2,
        relay_enabled: true,
        relay: command_api::relay::RelaySettings {
            kafka_brokers: ticketing_tests::kafka_brokers(),
            relay_topic: topic.clone(),
            relay_partitions: 6,
            relay_batch: 1000,
            relay_poll_ms: 20,
            relay_standby_poll_ms: 300,
            relay_ack_timeout_ms: 15_000,
            relay_in_flight: 8,
        },
        consistency_key: domain::consistency::DEVELOPMENT_KEY.to_owned(),
        auth: service_kit::auth::AuthSettings {
            jwt_secret: Some(ticketing_tests::auth::SECRET.to_owned()),
            ..service_kit::auth::AuthSettings::default()
        },
        rates: service_kit::rate_limit::RateSettings::off(),
        cors_allowed_origins: Vec::new(),
        log_json: false,
    };
    command_settings.max_connections = 16;
    let app = command_api::startup::App::build(command_settings).await?;
    let command = format!("http://{}", app.addr()?);
    let stop = CancellationToken::new();
    let command_task = tokio::spawn(app.run_until(stop.clone()));
    let client = ticketing_tests::auth::staff_client().expect("an HTTP client");

    // The log.
    let mut shows = Vec::new();
    for n in 0..args.shows {
        let created: Value = client
            .post(format!("{command}/shows"))
            .json(&show_body(n))
            .send()
            .await?
            .json()
            .await?;
        shows.push(created["show_id"].as_str().context("show_id")?.to_owned());
    }
    let started = Instant::now();
    let done = Arc::new(AtomicUsize::new(0));
    let mut writers = Vec::new();
    for writer in 0..args.clients {
        let (client, command, shows, done) = (
            client.clone(),
            command.clone(),
            shows.clone(),
            Arc::clone(&done),
        );
        let cycles = args.cycles;
        writers.push(tokio::spawn(async move {
            let mut i = writer;
            while done.fetch_add(1, Ordering::Relaxed) < cycles {
                // Each writer keeps to its own seats, so nothing conflicts.
                let show = &shows[i % shows.len()];
                let seats = [format!("A{}", 1 + writer % 50), format!("B{}", 1 + writer % 50)];
                i += 1;
                let body = json!({ "show_id": show, "user_id": uuid::Uuid::new_v4().to_string(), "seats": seats });
                let placed: Value = client.post(format!("{command}/bookings")).json(&body).send().await?.json().await?;
                let id = placed["booking_id"].as_str().context("a booking")?.to_owned();
                client.post(format!("{command}/bookings/{id}/cancel")).send().await?;
            }
            anyhow::Ok(())
        }));
    }
    for writer in writers {
        writer.await??;
    }
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&db.pool)
        .await?;
    println!(
        "log: {events} events from {} cycles in {:.1} s",
        args.cycles,
        started.elapsed().as_secs_f64()
    );

    // 1. Projector draining the backlog vs raw bulk inserts.
    let database = ticketing_tests::unique_name("bench_read_models");
    let store = ReadStore::connect(
        &ticketing_tests::mongodb_uri(),
        &database,
        Duration::from_secs(10),
    )
    .await?;
    let consumer = ConsumerSettings {
        kafka_brokers: ticketing_tests::kafka_brokers(),
        topic: topic.clone(),
        group: ticketing_tests::unique_name("bench"),
        batch: 500,
        linger_ms: 20,
        fetch_wait_ms: 20,
    };
    // Wait until the relay has published the whole log.
    let last_position: i64 = sqlx::query_scalar("SELECT max(global_position) FROM events")
        .fetch_one(&db.pool)
        .await?;
    wait_published(&command, last_position).await?;
    let generation = store.pointer().await?.current;
    store.prepare(generation).await?;
    let projection = Projection::new(consumer.clone(), store.clone());
    let end = projection.topic_end().await?;
    let began = Instant::now();
    projection
        .project(
            generation,
            None,
            0,
            Goal::Reach(end),
            &CancellationToken::new(),
        )
        .await?;
    let projector_secs = began.elapsed().as_secs_f64();
    let exact = matches_log(&store, generation, &db.pool).await?;
    let documents = store.shows(generation).count_documents(doc! {}).await?
        + store.bookings(generation).count_documents(doc! {}).await?;
    let raw = store
        .database()
        .collection::<mongodb::bson::Document>("raw_writes");
    let sample = store
        .bookings(generation)
        .clone_with_type::<mongodb::bson::Document>()
        .find_one(doc! {})
        .await?
        .context("a booking document")?;
    let began = Instant::now();
    let mut batch = Vec::new();
    for n in 0..documents {
        let mut document = sample.clone();
        document.insert("_id", format!("raw-{n}"));
        batch.push(raw.insert_one_model(document)?);
        if batch.len() == 500 {
            store
                .database()
                .client()
                .bulk_write(std::mem::take(&mut batch))
                .await?;
        }
    }
    if !batch.is_empty() {
        store.database().client().bulk_write(batch).await?;
    }
    let raw_secs = began.elapsed().as_secs_f64();
    println!(
        "projector: {events} events -> {documents} documents in {projector_secs:.1} s = {:.0} events/s; \
         raw bulkWrite of {documents} documents in {raw_secs:.1} s = {:.0} docs/s, {:.0} events/s at the same \
         events per document; ratio {:.2}; documents equal the fold of the log: {exact}",
        events as f64 / projector_secs,
        documents as f64 / raw_secs,
        events as f64 / raw_secs,
        raw_secs / projector_secs
    );

    // 2. Replay.
    let replay_store = ReadStore::connect(
        &ticketing_tests::mongodb_uri(),
        &ticketing_tests::unique_name("bench_replay"),
        Duration::from_secs(10),
    )
    .await?;
    let mut replay_consumer = consumer.clone();
    replay_consumer.group = ticketing_tests::unique_name("bench_replay");
    let report = replay::replay(
        &replay_store,
        &db.pool,
        &replay_consumer,
        &ReplaySettings {
            database_url: db.url(),
            replay_batch: 5000,
            grace_secs: 0,
            switch_wait_secs: 120,
        },
        &CancellationToken::new(),
    )
    .await?;
    println!(
        "replay: {} events from the log in {:.1} s = {:.0} events/s ({:.1} s to the switch)",
        report.events,
        report.log_secs,
        report.events as f64 / report.log_secs,
        report.total_secs
    );
    replay_store.database().drop().await?;

    // 3. GET availability vs bare find_one.
    let query_app = query_api::startup::App::build(query_api::startup::Settings {
        mongodb_uri: ticketing_tests::mongodb_uri(),
        mongodb_database: database.clone(),
        addr: "127.0.0.1:0".parse()?,
        startup_timeout_secs: 5,
        mongodb_timeout_ms: 2000,
        consistency_wait_ms: 5000,
        consistency_max_waiters: 10_000,
        consistency_key: domain::consistency::DEVELOPMENT_KEY.to_owned(),
        auth: service_kit::auth::AuthSettings {
            jwt_secret: Some(ticketing_tests::auth::SECRET.to_owned()),
            ..service_kit::auth::AuthSettings::default()
        },
        rates: service_kit::rate_limit::RateSettings::off(),
        command_api_url: "http://127.0.0.1:8081".to_owned(),
        live: query_api::live::LiveSettings::default(),
        log_json: false,
    })
    .await?;
    let query = format!("http://{}", query_app.addr()?);
    let query_task = tokio::spawn(query_app.run_until(stop.clone()));
    let show = shows[0].clone();
    let seconds = Duration::from_secs(args.seconds);
    let bare = measure(args.clients, seconds, {
        let collection = store.shows(generation);
        let show = show.clone();
        move || {
            let (collection, show) = (collection.clone(), show.clone());
            async move {
                let found: Option<ShowDoc> = collection.find_one(doc! { "_id": show }).await?;
                anyhow::ensure!(found.is_some());
                Ok(())
            }
        }
    })
    .await?;
    let served = measure(args.clients, seconds, {
        let (client, url) = (client.clone(), format!("{query}/shows/{show}/availability"));
        move || {
            let (client, url) = (client.clone(), url.clone());
            async move {
                let response = client.get(&url).send().await?;
                anyhow::ensure!(response.status() == 200);
                response.bytes().await?;
                Ok(())
            }
        }
    })
    .await?;
    println!(
        "reads ({} clients): bare find_one {:.0}/s p50 {:.2} ms p99 {:.2} ms; \
         GET /shows/{{id}}/availability {:.0}/s p50 {:.2} ms p99 {:.2} ms; ratio {:.2}",
        args.clients,
        bare.0,
        bare.1,
        bare.2,
        served.0,
        served.1,
        served.2,
        served.0 / bare.0
    );

    // 4. 201 to visible, with the live projector running.
    let live = Projection::new(consumer.clone(), store.clone());
    let live_stop = CancellationToken::new();
    let live_task = tokio::spawn({
        let live_stop = live_stop.clone();
        async move { live.run(live_stop).await }
    });
    let mut lags = Vec::new();
    for n in 0..args.visible {
        let body = json!({ "show_id": shows[n % shows.len()], "user_id": uuid::Uuid::new_v4().to_string(),
            "seats": [format!("A{}", 1 + n % 50)] });
        let placed: Value = client
            .post(format!("{command}/bookings"))
            .json(&body)
            .send()
            .await?
            .json()
            .await?;
        let acknowledged = Instant::now();
        let id = placed["booking_id"]
            .as_str()
            .context("a booking")?
            .to_owned();
        loop {
            let response = client.get(format!("{query}/bookings/{id}")).send().await?;
            if response.status() == 200 {
                break;
            }
            anyhow::ensure!(
                acknowledged.elapsed() < Duration::from_secs(30),
                "booking never visible"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        lags.push(acknowledged.elapsed());
        client
            .post(format!("{command}/bookings/{id}/cancel"))
            .send()
            .await?;
    }
    lags.sort();
    println!(
        "201 to visible on the query side ({} bookings, one at a time): p50 {:.1} ms p99 {:.1} ms",
        lags.len(),
        percentile(&lags, 0.5),
        percentile(&lags, 0.99)
    );

    live_stop.cancel();
    live_task.await??;
    stop.cancel();
    query_task.await??;
    command_task.await??;
    store.database().drop().await?;
    db.drop_database().await
}

async fn wait_published(command: &str, last_position: i64) -> anyhow::Result<()> {
    let client = ticketing_tests::auth::staff_client().expect("an HTTP client");
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let ready: Value = client
            .get(format!("{command}/readyz"))
            .send()
            .await?
            .json()
            .await?;
        let through = ready["relay"]["published_through"]["global_position"]
            .as_i64()
            .unwrap_or(0);
        if ready["relay"]["lag_events"].as_i64() == Some(0) && through >= last_position {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the relay never caught up: {ready}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Requests/s, p50 and p99 in ms of `clients` loops of `call` for `seconds`.
async fn measure<F, Fut>(
    clients: usize,
    seconds: Duration,
    call: F,
) -> anyhow::Result<(f64, f64, f64)>
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send,
{
    let deadline = Instant::now() + seconds;
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let call = call.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            while Instant::now() < deadline {
                let began = Instant::now();
                call().await?;
                latencies.push(began.elapsed());
            }
            anyhow::Ok(latencies)
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await??);
    }
    all.sort();
    Ok((
        all.len() as f64 / seconds.as_secs_f64(),
        percentile(&all, 0.5),
        percentile(&all, 0.99),
    ))
}

/// Whether every document of `generation` equals the fold of the whole log
/// (so the numbers above are of a projection that lost nothing).
async fn matches_log(
    store: &ReadStore,
    generation: u32,
    pool: &sqlx::PgPool,
) -> anyhow::Result<bool> {
    let mut conn = pool.acquire().await?;
    let mut models = domain::read_model::Models::default();
    for event in event_feed::read_all(&mut conn, 10_000).await? {
        models.apply(&event)?;
    }
    let shows: Vec<ShowDoc> = ticketing_tests::all_documents(&store.shows(generation)).await?;
    let blocks: Vec<domain::read_model::BlockDoc> =
        ticketing_tests::all_documents(&store.blocks(generation)).await?;
    let tallies: Vec<domain::read_model::BlockDoc> =
        ticketing_tests::all_documents(&store.tallies(generation)).await?;
    let bookings: Vec<domain::read_model::BookingDoc> =
        ticketing_tests::all_documents(&store.bookings(generation)).await?;
    let shows_match = shows.len() == models.shows.len()
        && shows
            .into_iter()
            .all(|show| models.shows.get(&show.show_id) == Some(&Some(show)))
        && blocks.len() == models.blocks.len()
        && blocks.into_iter().all(|mut block| {
            block.writes = 0;
            models.blocks.get(&block.block_id) == Some(&Some(block))
        })
        && tallies.len() == models.blocks.len()
        && tallies.into_iter().all(|mut tally| {
            tally.writes = 0;
            models
                .blocks
                .get(&tally.block_id)
                .and_then(Option::as_ref)
                .is_some_and(|block| block.tally() == tally)
        });
    let bookings_match = bookings.len() == models.bookings.len()
        && bookings.into_iter().all(|mut booking| {
            booking.v = 0;
            models.bookings.get(&booking.booking_id) == Some(&Some(booking))
        });
    Ok(shows_match && bookings_match)
}
