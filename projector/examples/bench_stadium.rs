//! The stadium on-sale, read side: each figure next to its baseline of the
//! same run.
//!
//! 1. A 50,000-seat show (5 sections of 100 rows of 100): how long it takes
//!    to be created and then readable whole.
//! 2. One booking of 4 seats at a time: from its 201 to the seats showing
//!    as booked in `GET /shows/{id}/availability?section=S0` (one probe,
//!    polling every 2 ms).
//! 3. `GET .../availability?section=S1` (10,000 seats) one at a time, next
//!    to bare driver `find`s of the same documents (its blocks and the
//!    other sections' tallies, at once), alternated.
//! 4. A projector draining a backlog of bookings from the topic into an
//!    empty database, next to the same MongoDB taking the same writes
//!    straight from the driver (the show, its blocks and their tallies
//!    inserted, then per 500 events one `bulkWrite` of the booking writes
//!    and per changed block one targeted update and its tally), with
//!    none of the projector's reads or offsets.
//!
//! ```sh
//! make up
//! cargo run --release -p projector --example bench_stadium
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use clap::Parser;
use domain::read_model::{self, BlockDoc, Models, SeatChange, ShowDoc};
use domain::PublishedEvent;
use futures::TryStreamExt;
use mongodb::bson::{doc, Document};
use projector::live::{ConsumerSettings, Goal, Projection};
use projector::store::ReadStore;
use serde_json::{json, Value};
use ticketing_tests::{kafka_brokers, mongodb_uri, unique_name, TestDatabase};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Parser)]
struct Args {
    /// Bookings made one at a time, each timed from 201 to visible.
    #[arg(long, default_value_t = 50)]
    bookings: usize,
    /// Section GETs timed (and as many bare driver finds).
    #[arg(long, default_value_t = 100)]
    gets: usize,
    /// Bookings of 4 seats in the backlog the projector drains.
    #[arg(long, default_value_t = 2_000)]
    backlog: usize,
    /// Concurrent writers of the backlog.
    #[arg(long, default_value_t = 8)]
    writers: usize,
}

fn stadium() -> Value {
    let sections: Vec<Value> = (0..5u8)
        .map(|s| {
            let rows: Vec<Value> = (0..100u8)
                .map(|r| {
                    json!({"row": format!("{}{}{}", char::from(b'A' + s), char::from(b'A' + r / 26),
                                          char::from(b'A' + r % 26)),
                           "seats": 100})
                })
                .collect();
            json!({"name": format!("S{s}"), "price_cents": 5000, "rows": rows})
        })
        .collect();
    json!({"name": "Cup Final", "venue": "Stadium", "starts_at": "2027-07-01T18:00:00Z",
           "sections": sections})
}

/// The label of seat `number` of row `row` of section `section`.
fn label(section: u8, row: u8, number: u32) -> String {
    format!(
        "{}{}{}{number}",
        char::from(b'A' + section),
        char::from(b'A' + row / 26),
        char::from(b'A' + row % 26)
    )
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

fn quantile(values: &mut [f64], q: f64) -> f64 {
    values.sort_by(f64::total_cmp);
    values
        .get(((values.len() as f64 - 1.0) * q).round() as usize)
        .copied()
        .unwrap_or(f64::NAN)
}

fn command_settings(db: &TestDatabase, topic: &str) -> command_api::settings::Settings {
    command_api::settings::Settings {
        database_url: db.url(),
        addr: "127.0.0.1:0".parse().expect("an address"),
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
            kafka_brokers: kafka_brokers(),
            relay_topic: topic.to_owned(),
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
    }
}

fn consumer(topic: &str) -> ConsumerSettings {
    ConsumerSettings {
        kafka_brokers: kafka_brokers(),
        topic: topic.to_owned(),
        group: unique_name("bench_stadium"),
        batch: 500,
        linger_ms: 20,
        fetch_wait_ms: 20,
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // Warnings only, unless RUST_LOG asks for more (the projector's batch
    // timings: RUST_LOG=projector::live=debug).
    if std::env::var_os("RUST_LOG").is_none() {
        std::env::set_var("RUST_LOG", "warn");
    }
    service_kit::init_tracing(false);
    let db = TestDatabase::create().await?;
    let topic = unique_name("bench_stadium");
    let app = command_api::startup::App::build(command_settings(&db, &topic)).await?;
    let command = format!("http://{}", app.addr()?);
    let stop = CancellationToken::new();
    let command_task = tokio::spawn(app.run_until(stop.clone()));
    let live_db = unique_name("bench_stadium_live");
    let store = ReadStore::connect(&mongodb_uri(), &live_db, Duration::from_secs(10)).await?;
    let projection = Projection::new(consumer(&topic), store.clone());
    // Stopped before the drain is measured, which it would compete with.
    let live_stop = stop.child_token();
    let projector_task = {
        let (projection, stop) = (projection.clone(), live_stop.clone());
        tokio::spawn(async move { projection.run(stop).await })
    };
    let query_app = query_api::startup::App::build(query_api::startup::Settings {
        mongodb_uri: mongodb_uri(),
        mongodb_database: live_db.clone(),
        addr: "127.0.0.1:0".parse()?,
        startup_timeout_secs: 10,
        mongodb_timeout_ms: 5000,
        consistency_wait_ms: 10_000,
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
    let client = ticketing_tests::auth::staff_client().expect("an HTTP client");

    // 1. The show.
    let started = Instant::now();
    let created = client
        .post(format!("{command}/shows"))
        .json(&stadium())
        .send()
        .await?;
    ensure!(
        created.status() == 201,
        "creating the show: {}",
        created.status()
    );
    let created_in = started.elapsed();
    let token = created
        .headers()
        .get("x-consistency-token")
        .context("a token")?
        .to_str()?
        .to_owned();
    let created: Value = created.json().await?;
    let show = created["show_id"].as_str().context("show_id")?.to_owned();
    let whole = client
        .get(format!("{query}/shows/{show}/availability"))
        .header("X-Consistency-Token", &token)
        .send()
        .await?;
    ensure!(
        whole.status() == 200,
        "reading the show: {}",
        whole.status()
    );
    let whole_bytes = whole.bytes().await?.len();
    let readable_in = started.elapsed();
    println!(
        "50,000-seat show: created (201) in {:.0} ms, readable whole in {:.0} ms after the POST; \
         the whole availability is {:.2} MB",
        ms(created_in),
        ms(readable_in),
        whole_bytes as f64 / 1e6
    );

    // 2. One booking at a time, 201 to visible in its section.
    let mut visible = Vec::new();
    let user = uuid::Uuid::new_v4().to_string();
    for n in 0..args.bookings {
        let row = u8::try_from(n % 100)?;
        let first = 1 + 4 * u32::try_from(n / 100)?;
        let seats: Vec<String> = (first..first + 4).map(|s| label(0, row, s)).collect();
        let answer = client
            .post(format!("{command}/bookings"))
            .json(&json!({"show_id": show, "user_id": user, "seats": seats}))
            .send()
            .await?;
        ensure!(answer.status() == 201, "booking: {}", answer.status());
        let booked = Instant::now();
        loop {
            let section: Value = client
                .get(format!("{query}/shows/{show}/availability?section=S0"))
                .send()
                .await?
                .json()
                .await?;
            if seats.iter().all(|s| section["seats"][s] == "booked") {
                break;
            }
            ensure!(booked.elapsed() < Duration::from_secs(30), "never visible");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        visible.push(ms(booked.elapsed()));
    }
    println!(
        "one booking of 4 seats at a time ({}): 201 to visible in ?section=S0 p50 {:.1} ms, p99 {:.1} ms",
        visible.len(),
        quantile(&mut visible, 0.5),
        quantile(&mut visible, 0.99)
    );

    // 3. One 10,000-seat section, query-api next to the bare driver.
    let generation = store.pointer().await?.current;
    let blocks = store.blocks(generation).clone_with_type::<Document>();
    let tallies = store.tallies(generation).clone_with_type::<Document>();
    let section_blocks = 10_000_usize.div_ceil(domain::read_model::BLOCK_SEATS as usize);
    let (mut api, mut bare) = (Vec::new(), Vec::new());
    for _ in 0..args.gets {
        let t = Instant::now();
        let answer = client
            .get(format!("{query}/shows/{show}/availability?section=S1"))
            .send()
            .await?;
        ensure!(answer.status() == 200);
        let _ = answer.bytes().await?;
        api.push(ms(t.elapsed()));
        let t = Instant::now();
        let order = doc! { "show_id": 1, "section": 1, "block": 1 };
        let (found, counted): (Vec<Document>, Vec<Document>) = tokio::try_join!(
            async {
                blocks
                    .find(doc! { "show_id": &show, "section": 1_i64 })
                    .sort(order.clone())
                    .await?
                    .try_collect()
                    .await
            },
            async {
                tallies
                    .find(doc! { "show_id": &show, "section": { "$ne": 1_i64 } })
                    .sort(order.clone())
                    .await?
                    .try_collect()
                    .await
            },
        )?;
        ensure!(found.len() == section_blocks, "{} blocks", found.len());
        ensure!(
            counted.len() == 4 * section_blocks,
            "{} tallies",
            counted.len()
        );
        bare.push(ms(t.elapsed()));
    }
    let (api50, bare50) = (quantile(&mut api, 0.5), quantile(&mut bare, 0.5));
    println!(
        "GET ?section=S1 (10,000 seats): p50 {api50:.1} ms, p99 {:.1} ms; bare driver finds of its \
         {section_blocks} blocks and {} tallies: p50 {bare50:.1} ms, p99 {:.1} ms (ratio of p50s {:.2})",
        quantile(&mut api, 0.99),
        4 * section_blocks,
        quantile(&mut bare, 0.99),
        bare50 / api50
    );

    // 4. The backlog: bookings written while the live projector runs, then
    // drained again from the topic into an empty database.
    let mut writers = Vec::new();
    for writer in 0..args.writers {
        let (client, command, show) = (client.clone(), command.clone(), show.clone());
        let per_writer = args.backlog / args.writers.max(1);
        writers.push(tokio::spawn(async move {
            for n in 0..per_writer {
                // Sections 1 to 4, each writer on rows of its own.
                let section = u8::try_from(1 + n % 4)?;
                let row = u8::try_from((writer * 12 + n / 100) % 100)?;
                let first = 1 + 4 * u32::try_from((n / 4) % 25)?;
                let seats: Vec<String> =
                    (first..first + 4).map(|s| label(section, row, s)).collect();
                let answer = client
                    .post(format!("{command}/bookings"))
                    .json(
                        &json!({"show_id": show, "user_id": uuid::Uuid::new_v4().to_string(),
                                  "seats": seats}),
                    )
                    .send()
                    .await?;
                if answer.status() != 201 && answer.status() != 409 {
                    anyhow::bail!("booking: {}", answer.status());
                }
            }
            anyhow::Ok(())
        }));
    }
    for writer in writers {
        writer.await??;
    }
    let mut conn = db.pool.acquire().await?;
    let log = event_feed::read_all(&mut conn, 10_000).await?;
    drop(conn);
    // Published whole: the topic holds at least as many events as the log.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let published: i64 = projection.topic_end().await?.values().sum();
        if published >= i64::try_from(log.len())? {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "the relay did not publish the log"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let end = projection.topic_end().await?;
    live_stop.cancel();
    let drain_db = unique_name("bench_stadium_drain");
    let drain = ReadStore::connect(&mongodb_uri(), &drain_db, Duration::from_secs(10)).await?;
    drain.prepare(1).await?;
    let draining = Projection::new(consumer(&topic), drain.clone());
    let t = Instant::now();
    draining
        .project(1, None, 0, Goal::Reach(end), &CancellationToken::new())
        .await?;
    let projector_secs = t.elapsed().as_secs_f64();
    let bare_db = unique_name("bench_stadium_bare");
    let bare_store = ReadStore::connect(&mongodb_uri(), &bare_db, Duration::from_secs(10)).await?;
    bare_store.prepare(1).await?;
    let t = Instant::now();
    let writes = bare_writes(&bare_store, &log).await?;
    let bare_secs = t.elapsed().as_secs_f64();
    let events = log.len() as f64;
    println!(
        "projector draining {} events (1 show of 50,000 seats, {} bookings): {:.0} events/s ({:.1} s); \
         the same writes from the bare driver ({writes} operations): {:.0} events/s ({:.1} s); ratio {:.2}",
        log.len(),
        log.iter().filter(|e| e.event_type == "BookingPlaced").count(),
        events / projector_secs,
        projector_secs,
        events / bare_secs,
        bare_secs,
        bare_secs / projector_secs
    );

    stop.cancel();
    command_task.await??;
    projector_task.await??;
    query_task.await??;
    for name in [live_db, drain_db, bare_db] {
        store.database().client().database(&name).drop().await?;
    }
    db.drop_database().await
}

/// The projector's writes for `log`, in batches of 500 events, straight
/// from the driver: the documents and targeted updates the fold gives,
/// without reading anything. How many operations.
async fn bare_writes(store: &ReadStore, log: &[PublishedEvent]) -> anyhow::Result<usize> {
    let mut models = Models::default();
    let mut operations = 0;
    let client = store.database().client().clone();
    for batch in log.chunks(500) {
        let mut changed: BTreeMap<String, BTreeMap<String, SeatChange>> = BTreeMap::new();
        let mut new_shows = BTreeSet::new();
        let mut bookings = BTreeSet::new();
        let counts_before: BTreeMap<String, domain::read_model::Counts> = models
            .blocks
            .iter()
            .filter_map(|(id, b)| Some((id.clone(), b.as_ref()?.counts)))
            .collect();
        for event in batch {
            match models.apply_seat_aware(event)? {
                Some(Some((block, change))) => {
                    changed
                        .entry(block)
                        .or_default()
                        .entry(change.label.clone())
                        .or_insert(change);
                }
                Some(None) if event.event_type == "ShowCreated" => {
                    new_shows.insert(event.show_id.to_string());
                }
                Some(None) => {
                    bookings.insert(event.aggregate_id.clone());
                }
                None => {}
            }
        }
        let mut writes: Vec<mongodb::options::WriteModel> = Vec::new();
        let blocks = store.blocks(1);
        let tallies = store.tallies(1);
        for show in &new_shows {
            for block in models
                .blocks
                .values()
                .flatten()
                .filter(|b| &b.show_id == show)
            {
                writes.push(blocks.insert_one_model(block)?.into());
                writes.push(tallies.insert_one_model(block.tally())?.into());
            }
        }
        for (id, seats) in &changed {
            let Some(block): Option<&BlockDoc> = models.blocks.get(id).and_then(Option::as_ref)
            else {
                continue;
            };
            if new_shows.contains(&block.show_id) {
                continue;
            }
            let before = counts_before.get(id).copied().unwrap_or_default();
            let mut set = Document::new();
            for label in seats.keys() {
                set.insert(
                    read_model::paths::seat(label),
                    mongodb::bson::to_bson(&block.seats[label])?,
                );
                if let Some(expires_at) = block.holds.get(label) {
                    set.insert(read_model::paths::hold(label), expires_at.clone());
                }
            }
            writes.push(
                mongodb::options::ReplaceOneModel::builder()
                    .namespace(tallies.namespace())
                    .filter(doc! { "_id": id })
                    .replacement(mongodb::bson::to_document(&block.tally())?)
                    .build()
                    .into(),
            );
            let update = doc! { "$set": set, "$inc": {
            "counts.available": block.counts.available - before.available,
            "counts.held": block.counts.held - before.held,
            "counts.booked": block.counts.booked - before.booked, "w": 1_i64 } };
            writes.push(
                mongodb::options::UpdateOneModel::builder()
                    .namespace(blocks.namespace())
                    .filter(doc! { "_id": id })
                    .update(update)
                    .build()
                    .into(),
            );
        }
        let booking_docs = store.bookings(1);
        for id in &bookings {
            if let Some(Some(booking)) = models.bookings.get(id) {
                writes.push(
                    mongodb::options::ReplaceOneModel::builder()
                        .namespace(booking_docs.namespace())
                        .filter(doc! { "_id": id })
                        .replacement(mongodb::bson::to_document(booking)?)
                        .upsert(true)
                        .build()
                        .into(),
                );
            }
        }
        operations += writes.len();
        if !writes.is_empty() {
            client.bulk_write(writes).ordered(false).await?;
        }
        let shows = store.shows(1);
        for show in &new_shows {
            if let Some(Some(doc)) = models.shows.get(show) {
                let doc: &ShowDoc = doc;
                shows.insert_one(doc).await?;
                operations += 1;
            }
        }
    }
    Ok(operations)
}
