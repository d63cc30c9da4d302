//! Booking throughput and latency of the command-api against Postgres, with
//! identity checked (a JWT per client, the user's rate counted) and without
//! (`AUTH_DISABLED`), next to the ceiling of the same Postgres measured in
//! the same run: the same event rows inserted by one bare transaction per
//! booking. Then best available: the same service picking two adjacent
//! seats for each buyer of a rush on one show, next to the explicit-seat
//! bookings of the same round.
//!
//! ```sh
//! make up
//! cargo run --release -p command-api --example bench_bookings -- --clients 32 --seconds 5 --rounds 3
//! ```
//!
//! Rounds alternate baseline and services so that all see the same machine
//! noise; the figures printed are medians over rounds.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use clap::Parser;
use command_api::settings::Settings;
use command_api::startup::App;
use serde_json::{json, Value};
use sqlx::PgPool;
use ticketing_tests::TestDatabase;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Parser)]
struct Args {
    /// Concurrent clients.
    #[arg(long, default_value_t = 32)]
    clients: usize,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Alternating baseline/service rounds.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Postgres connections of the service (its default), and of the bare
    /// baseline's pool.
    #[arg(long, default_value_t = 16)]
    connections: u32,
    /// Most booking commands in one transaction (`COMMAND_BATCH_MAX`; 1:
    /// each on its own, as before group commit).
    #[arg(long, default_value_t = 64)]
    batch_max: u64,
    /// Sections of the best-available show: buyers of a rush ask for the
    /// same few sections, several for each, as at an on-sale.
    #[arg(long, default_value_t = 8)]
    best_sections: usize,
    /// Rows of each of its sections (40,000 seats in all by default, more
    /// than a round sells at this machine's rate).
    #[arg(long, default_value_t = 50)]
    best_rows: usize,
    /// Seats in each of those rows.
    #[arg(long, default_value_t = 100)]
    best_row_seats: usize,
}

/// Row names of the benchmark show: one row per client.
fn row_name(n: usize) -> String {
    let letter = |i: usize| char::from(b'A' + u8::try_from(i % 26).unwrap_or(0));
    format!("{}{}", letter(n / 26), letter(n))
}

/// Seats per row: as many as a show may have, shared out, and enough that
/// one client alone does not sell its row out within a round.
fn seats_per_row(clients: usize) -> usize {
    (100_000 / clients.max(1)).min(20_000)
}

/// A fresh show with a row per client: every round books from empty rows,
/// so no client ever runs into another's seats.
async fn new_show(client: &reqwest::Client, base: &str, clients: usize) -> anyhow::Result<String> {
    let rows: Vec<Value> = (0..clients)
        .map(|r| json!({"row": row_name(r), "seats": seats_per_row(clients)}))
        .collect();
    let show: Value = client
        .post(format!("{base}/shows"))
        .json(
            &json!({"name": "Benchmark", "venue": "Stadium", "starts_at": "2027-09-01T19:00:00Z",
                      "sections": [{"name": "All", "price_cents": 5000, "rows": rows}]}),
        )
        .send()
        .await?
        .json()
        .await?;
    let show_id = show["show_id"].as_str().context("show created")?.to_owned();
    Ok(show_id)
}

#[derive(Debug, Clone, Copy)]
struct Figures {
    per_second: f64,
    p50_ms: f64,
    p99_ms: f64,
    failures: usize,
}

fn figures(mut latencies: Vec<Duration>, failures: usize, elapsed: Duration) -> Figures {
    latencies.sort();
    let at = |q: f64| {
        latencies
            .get(((latencies.len() as f64 - 1.0) * q).round() as usize)
            .map_or(f64::NAN, |d| d.as_secs_f64() * 1000.0)
    };
    Figures {
        per_second: latencies.len() as f64 / elapsed.as_secs_f64(),
        p50_ms: at(0.50),
        p99_ms: at(0.99),
        failures,
    }
}

/// Runs `clients` loops of `one` for `seconds`, timing each call.
async fn measure<F, Fut>(clients: usize, seconds: u64, one: F) -> Figures
where
    F: Fn(usize, usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let one = Arc::new(one);
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let start = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|client| {
            let one = Arc::clone(&one);
            tokio::spawn(async move {
                let (mut latencies, mut failures, mut n) = (Vec::new(), 0, 0);
                while Instant::now() < deadline {
                    let t = Instant::now();
                    if one(client, n).await {
                        latencies.push(t.elapsed());
                    } else {
                        failures += 1;
                    }
                    n += 1;
                }
                (latencies, failures)
            })
        })
        .collect();
    let (mut all, mut failures) = (Vec::new(), 0);
    for task in tasks {
        if let Ok((latencies, f)) = task.await {
            all.extend(latencies);
            failures += f;
        }
    }
    figures(all, failures, start.elapsed())
}

/// The rows a two-seat booking appends, inserted by a bare transaction.
async fn bare_booking(pool: &PgPool, client: usize, n: usize) -> bool {
    let booking = uuid::Uuid::new_v4().to_string();
    let show = "00000000-0000-4000-8000-000000000001";
    let payload = json!({"BookingPlaced": {"booking_id": booking, "show_id": show,
        "user_id": booking, "seats": [{"label": "A1", "price_cents": 1}, {"label": "A2", "price_cents": 1}],
        "total_cents": 2, "placed_at": "2027-01-01T00:00:00Z"}})
    .to_string();
    let seat = |i: usize| format!("{show}:B{client}x{n}x{i}");
    let seat_payload =
        json!({"SeatBooked": {"show_id": show, "label": "A1", "booking_id": booking}}).to_string();
    let run = async {
        let mut tx = pool.begin().await?;
        sqlx::query(
            "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
             VALUES ('Booking', $1, 1, 'BookingPlaced', '1', $2::json, '{}'),
                    ('Seat', $3, 1, 'SeatBooked', '1', $4::json, '{}'),
                    ('Seat', $5, 1, 'SeatBooked', '1', $4::json, '{}')",
        )
        .bind(&booking)
        .bind(&payload)
        .bind(seat(1))
        .bind(&seat_payload)
        .bind(seat(2))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok::<_, sqlx::Error>(())
    };
    run.await.is_ok()
}

/// A command-api of the benchmark, on the shared database.
struct Service {
    base: String,
    stop: CancellationToken,
    server: tokio::task::JoinHandle<anyhow::Result<()>>,
}

async fn serve(settings: Settings) -> anyhow::Result<Service> {
    let app = App::build(settings).await?;
    let base = format!("http://{}", app.addr()?);
    let stop = CancellationToken::new();
    let server = tokio::spawn(app.run_until(stop.clone()));
    Ok(Service { base, stop, server })
}

/// Books two seats of the client's own row per call: with `tokens`, as the
/// client's own user (a token each, the user taken from it); without, with
/// the user in the body (`AUTH_DISABLED`).
async fn measure_service(
    args: &Args,
    client: &reqwest::Client,
    service: &Service,
    tokens: Option<Arc<Vec<String>>>,
) -> anyhow::Result<Figures> {
    let show_id = new_show(client, &service.base, args.clients).await?;
    let (client, base) = (client.clone(), service.base.clone());
    Ok(measure(args.clients, args.seconds, move |c, n| {
        // Seats 2n+1 and 2n+2 of the client's own row (a 409 once the row
        // is sold out, counted as a failure).
        let number = 2 * n + 1;
        let seats = [
            format!("{}{}", row_name(c), number),
            format!("{}{}", row_name(c), number + 1),
        ];
        let mut request = client.post(format!("{base}/bookings"));
        let body = match tokens.as_ref().and_then(|t| t.get(c)) {
            Some(token) => {
                request = request.bearer_auth(token);
                json!({"show_id": show_id, "seats": seats})
            }
            None => json!({"show_id": show_id, "user_id": "00000000-0000-4000-8000-00000000000a",
                           "seats": seats}),
        };
        async move { matches!(request.json(&body).send().await, Ok(r) if r.status() == 201) }
    })
    .await)
}

/// Client `c` asks for two seats of section `c % best_sections`, the box
/// office picking them, as the client's own user.
async fn measure_best_available(
    args: &Args,
    client: &reqwest::Client,
    service: &Service,
    tokens: Arc<Vec<String>>,
) -> anyhow::Result<Figures> {
    let sections: Vec<Value> = (0..args.best_sections)
        .map(|s| {
            let rows: Vec<Value> = (0..args.best_rows)
                .map(|r| json!({"row": format!("{}{}", row_name(s), row_name(r)), "seats": args.best_row_seats}))
                .collect();
            json!({"name": format!("S{s}"), "price_cents": 5000, "rows": rows})
        })
        .collect();
    let show: Value = client
        .post(format!("{}/shows", service.base))
        .json(
            &json!({"name": "Rush", "venue": "Stadium", "starts_at": "2027-09-01T19:00:00Z",
                       "sections": sections}),
        )
        .send()
        .await?
        .json()
        .await?;
    let show_id = show["show_id"].as_str().context("show created")?.to_owned();
    let (client, base) = (client.clone(), service.base.clone());
    let sections_asked = args.best_sections.max(1);
    Ok(measure(args.clients, args.seconds, move |c, _| {
        let request = client
            .post(format!("{base}/bookings"))
            .bearer_auth(tokens.get(c).map_or("", String::as_str));
        let body = json!({"show_id": show_id,
                          "best_available": {"count": 2, "section": format!("S{}", c % sections_asked)}});
        async move { matches!(request.json(&body).send().await, Ok(r) if r.status() == 201) }
    })
    .await)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    ensure!(
        (1..=676).contains(&args.clients),
        "each client books from a row of its own: 1 to 676 clients"
    );
    ensure!(
        (1..=676).contains(&args.best_sections) && (1..=676).contains(&args.best_rows),
        "rows and sections are named by two letters each: 1 to 676 of each"
    );
    let db = TestDatabase::create()
        .await
        .context("Postgres (run `make up`)")?;
    let mut settings: Settings = test_settings(db.url());
    settings.max_connections = args.connections;
    settings.command_batch_max = args.batch_max;
    // The same service twice on the same database: without identity (1.0),
    // and with every request's token verified and its user's rate counted
    // (at a rate no client reaches, so that the cost is paid and nobody is
    // refused).
    let mut open = settings.clone();
    open.auth = service_kit::auth::AuthSettings {
        disabled: true,
        ..service_kit::auth::AuthSettings::default()
    };
    let mut checked = settings;
    checked.rates = service_kit::rate_limit::RateSettings {
        user_per_sec: 1_000_000,
        user_burst: 1_000_000,
        address_per_sec: 1_000_000,
        address_burst: 1_000_000,
    };
    let open = serve(open).await?;
    let checked = serve(checked).await?;
    let client = ticketing_tests::auth::staff_client().expect("an HTTP client");
    let tokens: Arc<Vec<String>> = Arc::new(
        (0..args.clients)
            .map(|_| ticketing_tests::auth::token(uuid::Uuid::new_v4(), &[]))
            .collect(),
    );

    // As many connections as the service has: the ceiling of the same work.
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(args.connections)
        .connect(&db.url())
        .await?;
    let (mut baseline, mut unchecked, mut service) = (Vec::new(), Vec::new(), Vec::new());
    let mut picked = Vec::new();
    for round in 0..args.rounds {
        let bare = pool.clone();
        baseline.push(
            measure(args.clients, args.seconds, move |c, n| {
                let pool = bare.clone();
                async move { bare_booking(&pool, c, n + round * 1_000_000).await }
            })
            .await,
        );
        // Alternating which goes first, so that neither always follows
        // the baseline's writes.
        let (first, second) = if round % 2 == 0 {
            ((&open, None), (&checked, Some(Arc::clone(&tokens))))
        } else {
            ((&checked, Some(Arc::clone(&tokens))), (&open, None))
        };
        // Best available first in odd rounds, last in even ones, so that
        // neither it nor explicit seats always run on the fuller machine.
        let early = if round % 2 == 1 {
            Some(measure_best_available(&args, &client, &checked, Arc::clone(&tokens)).await?)
        } else {
            None
        };
        let a = measure_service(&args, &client, first.0, first.1.clone()).await?;
        let b = measure_service(&args, &client, second.0, second.1.clone()).await?;
        let (off, on) = if round % 2 == 0 { (a, b) } else { (b, a) };
        unchecked.push(off);
        service.push(on);
        picked.push(match early {
            Some(figures) => figures,
            None => measure_best_available(&args, &client, &checked, Arc::clone(&tokens)).await?,
        });
        println!("round {round}: baseline  {:?}", baseline[round]);
        println!("round {round}: auth off  {:?}", unchecked[round]);
        println!("round {round}: auth on   {:?}", service[round]);
        println!("round {round}: best av.  {:?}", picked[round]);
    }

    let median = |v: &[Figures], f: fn(&Figures) -> f64| {
        let mut x: Vec<f64> = v.iter().map(f).collect();
        x.sort_by(f64::total_cmp);
        x[x.len() / 2]
    };
    let (b, u, s) = (&baseline, &unchecked, &service);
    println!(
        "\n{} clients, {} rounds of {} s, COMMAND_BATCH_MAX {}, medians:",
        args.clients, args.rounds, args.seconds, args.batch_max
    );
    println!(
        "bare Postgres transaction per booking:   {:8.0} tx/s        p50 {:6.2} ms   p99 {:6.2} ms",
        median(b, |f| f.per_second),
        median(b, |f| f.p50_ms),
        median(b, |f| f.p99_ms)
    );
    for (name, figures) in [
        ("auth off (AUTH_DISABLED)", u),
        ("auth on (JWT + rate)   ", s),
        ("best available, auth on", &picked),
    ] {
        println!(
            "command-api, {name}: {:8.0} bookings/s  p50 {:6.2} ms   p99 {:6.2} ms   failures {}",
            median(figures, |f| f.per_second),
            median(figures, |f| f.p50_ms),
            median(figures, |f| f.p99_ms),
            figures.iter().map(|f| f.failures).sum::<usize>()
        );
    }
    println!(
        "ratio auth on / auth off: {:.2}; auth on / bare: {:.2} (throughput)",
        median(s, |f| f.per_second) / median(u, |f| f.per_second),
        median(s, |f| f.per_second) / median(b, |f| f.per_second)
    );
    // The machine drifts over a run (the log grows, neighbours come and
    // go): the ratio within each round, where both ran back to back, is the
    // fairer comparison.
    let within_rounds = |name: &str, over: &[Figures], under: &[Figures]| {
        let mut paired: Vec<f64> = over
            .iter()
            .zip(under)
            .map(|(a, b)| a.per_second / b.per_second)
            .collect();
        paired.sort_by(f64::total_cmp);
        println!(
            "{name} within each round: {} (median {:.2})",
            paired
                .iter()
                .map(|r| format!("{r:.2}"))
                .collect::<Vec<_>>()
                .join(" "),
            paired[paired.len() / 2]
        );
    };
    within_rounds("auth on / auth off", s, u);
    within_rounds("best available / explicit seats (auth on)", &picked, s);
    for service in [open, checked] {
        service.stop.cancel();
        service.server.await??;
    }
    db.drop_database().await
}

fn test_settings(database_url: String) -> Settings {
    Settings {
        database_url,
        addr: "127.0.0.1:0"
            .parse()
            .unwrap_or_else(|_| std::net::SocketAddr::from(([127, 0, 0, 1], 0))),
        max_connections: 16,
        acquire_timeout_secs: 10,
        startup_timeout_secs: 10,
        hold_secs: 600,
        sweep_every_secs: 5,
        idempotency_keep_hours: 24,
        command_attempts: 8,
        command_lock_wait_ms: 250,
        command_batch_max: 64,
        command_batch_window_us: 1000,
        command_batches: 2,
        // Bookings alone: the relay has a benchmark of its own.
        relay_enabled: false,
        relay: command_api::relay::RelaySettings {
            kafka_brokers: "127.0.0.1:9092".to_owned(),
            relay_topic: "ticketing.bench.unused".to_owned(),
            relay_partitions: 1,
            relay_batch: 1000,
            relay_poll_ms: 20,
            relay_standby_poll_ms: 1000,
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
