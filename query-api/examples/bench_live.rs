//! How long live availability takes to bring a change to its subscribers,
//! apart from the rest of the pipeline: seats are written into the read
//! models as the projector writes them (the block, then its tally), and
//! the time from each write's acknowledgement to its `change` at every
//! subscriber is measured. The baseline is the bare driver: another MongoDB
//! client reading the same block by `_id` in a loop, which sees the write
//! as soon as anything can.
//!
//! `cargo run --release -p query-api --example bench_live -- --subscribers 1000`
//! (SecantusDB or MongoDB at `MONGODB_URI`; `make up` starts one).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use clap::Parser;
use domain::read_model::{self, BlockDoc, ShowDoc, BLOCKS, SHOWS, TALLIES};
use domain::SeatStatus;
use mongodb::bson::doc;
use serde_json::json;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Parser)]
struct Options {
    /// Subscribers of the show's stream.
    #[arg(long, default_value_t = 1000)]
    subscribers: usize,
    /// Seats written, one at a time.
    #[arg(long, default_value_t = 100)]
    changes: usize,
    /// Pause between two writes, in ms.
    #[arg(long, default_value_t = 50)]
    interval_ms: u64,
    /// Rows of 100 seats in the show's one section (1,000 for a stadium of
    /// 100,000 seats).
    #[arg(long, default_value_t = 20)]
    rows: u32,
    /// MongoDB.
    #[arg(long, env = "MONGODB_URI", default_value = "mongodb://127.0.0.1:27017")]
    mongodb_uri: String,
}

/// When each seat's `booked` reached each subscriber.
type Arrivals = Arc<Mutex<Vec<BTreeMap<String, Instant>>>>;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let options = Options::parse();
    let seats = options.rows * 100;
    ensure!(
        options.changes <= seats as usize,
        "at most one change per seat"
    );
    let database = format!("bench_live_{}", uuid::Uuid::new_v4().simple());
    let mongodb = mongodb::Client::with_uri_str(&options.mongodb_uri).await?;
    let db = mongodb.database(&database);
    let show_id = uuid::Uuid::new_v4().to_string();
    let rows: Vec<_> = (0..options.rows)
        .map(|r| json!({"row": row_name(r), "seats": 100}))
        .collect();
    let show: ShowDoc = serde_json::from_value(json!({
        "_id": show_id, "name": "Bench", "venue": "Hall", "starts_at": "2027-01-01T19:00:00Z",
        "starts_order": 0,
        "sections": [{"name": "Floor", "price_cents": 100, "rows": rows, "total": seats,
                      "blocks": seats.div_ceil(read_model::BLOCK_SEATS)}]
    }))?;
    let blocks = db.collection::<BlockDoc>(&read_model::collection_name(1, BLOCKS));
    let tallies = db.collection::<BlockDoc>(&read_model::collection_name(1, TALLIES));
    db.collection::<ShowDoc>(&read_model::collection_name(1, SHOWS))
        .insert_one(&show)
        .await?;
    let mut all = show.blocks();
    for block in &all {
        blocks.insert_one(block).await?;
        tallies.insert_one(block.tally()).await?;
    }

    let app = query_api::startup::App::build(query_api::startup::Settings {
        mongodb_uri: options.mongodb_uri.clone(),
        mongodb_database: database.clone(),
        addr: "127.0.0.1:0".parse()?,
        startup_timeout_secs: 10,
        mongodb_timeout_ms: 2_000,
        consistency_wait_ms: 5_000,
        consistency_max_waiters: 100,
        consistency_key: domain::consistency::DEVELOPMENT_KEY.to_owned(),
        // Streams need no token; a secret only lets the service start.
        auth: service_kit::auth::AuthSettings {
            jwt_secret: Some("bench-live-secret-of-at-least-32-bytes".to_owned()),
            ..service_kit::auth::AuthSettings::default()
        },
        rates: service_kit::rate_limit::RateSettings::off(),
        live: query_api::live::LiveSettings::default(),
        command_api_url: "http://127.0.0.1:8081".to_owned(),
        log_json: false,
    })
    .await?;
    let url = format!("http://{}/shows/{show_id}/availability/stream", app.addr()?);
    let stop = CancellationToken::new();
    let server = tokio::spawn(app.run_until(stop.clone()));

    let arrivals: Arrivals = Arc::new(Mutex::new(vec![BTreeMap::new(); options.subscribers]));
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()?;
    let mut readers = Vec::new();
    let ready = Arc::new(tokio::sync::Semaphore::new(0));
    for index in 0..options.subscribers {
        let (http, url, arrivals, ready) = (
            http.clone(),
            url.clone(),
            Arc::clone(&arrivals),
            Arc::clone(&ready),
        );
        readers.push(tokio::spawn(async move {
            let mut response = http.get(&url).send().await?;
            ensure!(
                response.status().is_success(),
                "the stream answered {}",
                response.status()
            );
            let mut buffer = String::new();
            while let Some(chunk) = response.chunk().await? {
                let now = Instant::now();
                buffer.push_str(&String::from_utf8_lossy(&chunk));
                while let Some(end) = buffer.find("\n\n") {
                    let block: String = buffer.drain(..end + 2).collect();
                    if block.contains("event: snapshot") {
                        ready.add_permits(1);
                        continue;
                    }
                    let Some(data) = block.lines().find_map(|l| l.strip_prefix("data: ")) else {
                        continue;
                    };
                    let body: serde_json::Value = serde_json::from_str(data)?;
                    let seats = body["seats"].as_object().context("no seats")?;
                    let mut arrivals = arrivals.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
                    for (label, status) in seats {
                        if status == "booked" {
                            arrivals[index].entry(label.clone()).or_insert(now);
                        }
                    }
                }
            }
            anyhow::Ok(())
        }));
    }
    let count = u32::try_from(options.subscribers)?;
    let opening = Instant::now();
    tokio::time::timeout(Duration::from_secs(300), ready.acquire_many(count))
        .await
        .context("the subscribers did not all get a snapshot")??
        .forget();
    let opened = opening.elapsed();

    // The baseline: the bare driver reading the block being written.
    let probe_blocks = mongodb::Client::with_uri_str(&options.mongodb_uri)
        .await?
        .database(&database)
        .collection::<BlockDoc>(&read_model::collection_name(1, BLOCKS));
    let mut written = Vec::new();
    let mut probed = Vec::new();
    let labels: Vec<String> = all
        .iter()
        .flat_map(|block| block.seats.keys().cloned().collect::<Vec<_>>())
        .collect();
    for label in labels.iter().take(options.changes) {
        let block = all
            .iter_mut()
            .find(|block| block.seats.contains_key(label))
            .context("no block")?;
        let seat = block.seats.get_mut(label).context("no seat")?;
        seat.status = SeatStatus::Booked;
        seat.sequence = 1;
        block.counts.available -= 1;
        block.counts.booked += 1;
        block.writes += 1;
        let block_id = block.block_id.clone();
        let probe = tokio::spawn({
            let (probe_blocks, block_id, label) =
                (probe_blocks.clone(), block_id.clone(), label.clone());
            async move {
                loop {
                    if let Some(found) = probe_blocks.find_one(doc! { "_id": &block_id }).await? {
                        if found
                            .seats
                            .get(&label)
                            .is_some_and(|s| s.status == SeatStatus::Booked)
                        {
                            return anyhow::Ok(Instant::now());
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
        });
        blocks
            .replace_one(doc! { "_id": &block_id }, &*block)
            .await?;
        let at = Instant::now();
        tallies
            .replace_one(doc! { "_id": &block_id }, block.tally())
            .await?;
        written.push((label.clone(), at));
        probed.push(probe.await??.saturating_duration_since(at));
        tokio::time::sleep(Duration::from_millis(options.interval_ms)).await;
    }
    // Until every subscriber has every change, or 30 s.
    let started = Instant::now();
    loop {
        let done = arrivals
            .lock()
            .map_err(|_| anyhow::anyhow!("poisoned"))?
            .iter()
            .all(|seen| seen.len() >= written.len());
        if done || started.elapsed() > Duration::from_secs(30) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut latencies = Vec::new();
    let mut missed = 0;
    for seen in arrivals
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .iter()
    {
        for (label, at) in &written {
            match seen.get(label) {
                Some(arrived) => latencies.push(arrived.saturating_duration_since(*at)),
                None => missed += 1,
            }
        }
    }
    println!(
        "{} subscribers of a {seats}-seat show, all with a snapshot in {:.0} ms; {} writes {} ms apart:",
        options.subscribers,
        opened.as_secs_f64() * 1e3,
        options.changes,
        options.interval_ms
    );
    println!(
        "  write -> change at a subscriber: {} ({} never arrived)",
        percentiles(&mut latencies),
        missed
    );
    println!(
        "  write -> seen by the bare driver polling the block: {}",
        percentiles(&mut probed)
    );
    stop.cancel();
    for reader in readers {
        reader.abort();
    }
    let _ = server.await;
    mongodb.database(&database).drop().await?;
    Ok(())
}

/// Row names A, B, ... Z, AA, AB, ...
fn row_name(mut index: u32) -> String {
    let mut name = Vec::new();
    loop {
        name.push(b'A' + u8::try_from(index % 26).unwrap_or(0));
        if index < 26 {
            break;
        }
        index = index / 26 - 1;
    }
    name.reverse();
    String::from_utf8(name).unwrap_or_default()
}

fn percentiles(samples: &mut [Duration]) -> String {
    samples.sort();
    let at = |q: f64| {
        let rank = ((q * samples.len() as f64).ceil() as usize).clamp(1, samples.len().max(1));
        samples.get(rank - 1).map_or(0.0, |d| d.as_secs_f64() * 1e3)
    };
    format!(
        "n={} p50 {:.1} ms  p99 {:.1} ms  max {:.1} ms",
        samples.len(),
        at(0.5),
        at(0.99),
        at(1.0)
    )
}
