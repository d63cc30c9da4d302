//! Crashes and outages: the real binary killed with SIGKILL in the middle of
//! a load, and Postgres vanishing behind a proxy.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use command_api::startup::App;
use common::{check_log, settings};
use serde_json::{json, Value};
use ticketing_tests::TestDatabase;
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn start_binary(database_url: &str, port: u16) -> anyhow::Result<Child> {
    Ok(Command::new(env!("CARGO_BIN_EXE_command-api"))
        .env("DATABASE_URL", database_url)
        .env("COMMAND_API_ADDR", format!("127.0.0.1:{port}"))
        .env("RELAY_ENABLED", "false")
        .envs(ticketing_tests::auth::service_env())
        .env("RUST_LOG", "error")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()?)
}

async fn wait_ready(client: &reqwest::Client, base: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Ok(response) = client.get(format!("{base}/readyz")).send().await {
            if response.status() == 200 {
                return Ok(());
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!("command-api at {base} did not become ready")
}

/// Row letters for a 20-row show.
const ROWS: &str = "ABCDEFGHIJKLMNOPQRST";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_process_loses_no_acknowledged_booking_and_leaves_the_log_consistent(
) -> anyhow::Result<()> {
    let db = TestDatabase::create().await?;
    let port = free_port()?;
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .default_headers(ticketing_tests::auth::staff_headers())
        .build()?;
    let mut child = start_binary(&db.url(), port)?;
    wait_ready(&client, &base).await?;

    let rows: Vec<Value> = ROWS
        .chars()
        .map(|r| json!({"row": r.to_string(), "seats": 50}))
        .collect();
    let show: Value = client
        .post(format!("{base}/shows"))
        .json(
            &json!({"name": "Crash Night", "venue": "Hall", "starts_at": "2027-06-01T19:00:00Z",
                      "sections": [{"name": "All", "price_cents": 1000, "rows": rows}]}),
        )
        .send()
        .await?
        .json()
        .await?;
    let show_id = show["show_id"].as_str().context("show_id")?.to_owned();

    // Buyers keep booking (and cancelling) while the server is killed under them.
    let acknowledged = Arc::new(Mutex::new(Vec::<(String, &'static str)>::new()));
    let running = Arc::new(AtomicBool::new(true));
    let mut buyers = JoinSet::new();
    for buyer in 0..12u64 {
        let (client, base, show_id) = (client.clone(), base.clone(), show_id.clone());
        let (acknowledged, running) = (Arc::clone(&acknowledged), Arc::clone(&running));
        buyers.spawn(async move {
            let mut state = 0x2545_f491_4f6c_dd1d ^ (buyer + 1);
            while running.load(Ordering::Relaxed) {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let seats: Vec<String> = (0..1 + state % 3)
                    .map(|i| {
                        let n = (state >> (8 * i)) % 1000;
                        format!(
                            "{}{}",
                            ROWS.as_bytes()[(n / 50) as usize] as char,
                            n % 50 + 1
                        )
                    })
                    .collect();
                let body = json!({"show_id": show_id, "user_id": uuid::Uuid::new_v4().to_string(),
                                  "seats": seats, "hold": state % 2 == 0});
                let Ok(response) = client
                    .post(format!("{base}/bookings"))
                    .json(&body)
                    .send()
                    .await
                else {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                };
                if response.status() != 201 {
                    continue;
                }
                let Ok(booked) = response.json::<Value>().await else {
                    continue;
                };
                let id = booked["booking_id"].as_str().unwrap_or_default().to_owned();
                if let Ok(mut acknowledged) = acknowledged.lock() {
                    acknowledged.push((id.clone(), "booked"));
                }
                if state % 5 == 0 {
                    if let Ok(response) = client
                        .post(format!("{base}/bookings/{id}/cancel"))
                        .send()
                        .await
                    {
                        if response.status() == 200 {
                            if let Ok(mut acknowledged) = acknowledged.lock() {
                                acknowledged.push((id, "cancelled"));
                            }
                        }
                    }
                }
            }
        });
    }

    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        child.kill().await?; // SIGKILL: no shutdown, transactions cut mid-flight
        child = start_binary(&db.url(), port)?;
        wait_ready(&client, &base).await?;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    running.store(false, Ordering::Relaxed);
    while buyers.join_next().await.is_some() {}
    child.kill().await?;

    let summary = check_log(&db.pool).await?;
    let acknowledged = acknowledged.lock().map(|a| a.clone()).unwrap_or_default();
    ensure!(
        acknowledged.len() > 20,
        "the load barely ran: {} answers",
        acknowledged.len()
    );
    for (id, what) in &acknowledged {
        let booking = summary
            .bookings
            .get(&id.parse()?)
            .with_context(|| format!("booking {id} was acknowledged but is not in the log"))?;
        if *what == "cancelled" {
            ensure!(
                booking.status() == Some(domain::BookingStatus::Cancelled),
                "{id} lost its cancel"
            );
        }
    }
    db.drop_database().await
}

/// Forwards TCP to Postgres until told to cut every connection, then refuses
/// new ones until told to resume.
struct Proxy {
    port: u16,
    up: Arc<AtomicBool>,
    cut: Arc<tokio::sync::Notify>,
}

impl Proxy {
    async fn start(target: String) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let up = Arc::new(AtomicBool::new(true));
        let cut = Arc::new(tokio::sync::Notify::new());
        let (up2, cut2) = (Arc::clone(&up), Arc::clone(&cut));
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if !up2.load(Ordering::SeqCst) {
                    continue; // dropped: connection refused, in effect
                }
                let (target, cut) = (target.clone(), Arc::clone(&cut2));
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(&target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        () = cut.notified() => {}
                    }
                });
            }
        });
        Ok(Self { port, up, cut })
    }

    fn down(&self) {
        self.up.store(false, Ordering::SeqCst);
        self.cut.notify_waiters();
    }

    fn resume(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_down_is_a_503_with_retry_after_and_recovery_is_automatic() -> anyhow::Result<()> {
    let db = TestDatabase::create().await?;
    let real: sqlx::postgres::PgConnectOptions = db.url().parse()?;
    let proxy = Proxy::start(format!("{}:{}", real.get_host(), real.get_port())).await?;
    let through_proxy = db.url().replacen(
        &format!(":{}/", real.get_port()),
        &format!(":{}/", proxy.port),
        1,
    );
    ensure!(
        through_proxy != db.url(),
        "could not route {} through the proxy",
        db.url()
    );
    let mut settings = settings(through_proxy, 600);
    settings.acquire_timeout_secs = 1;
    let app = App::build(settings).await?;
    let base = format!("http://{}", app.addr()?);
    let stop = CancellationToken::new();
    let server = tokio::spawn(app.run_until(stop.clone()));
    let client = ticketing_tests::auth::staff_client().expect("an HTTP client");
    let show = common::jazz_night();

    proxy.down();
    let response = client
        .post(format!("{base}/shows"))
        .json(&show)
        .send()
        .await?;
    ensure!(response.status() == 503, "got {}", response.status());
    ensure!(
        response.headers().get("retry-after").is_some(),
        "no Retry-After"
    );
    let problem: Value = response.json().await?;
    ensure!(problem["status"] == 503, "{problem}");
    // Each of these opens a new connection that the proxy accepts and drops
    // mid-handshake, which sqlx reports as a protocol error, not an I/O one.
    for _ in 0..3 {
        let ready = client.get(format!("{base}/readyz")).send().await?.status();
        ensure!(ready == 503, "readyz said {ready} with Postgres down");
        let booked = client
            .post(format!("{base}/shows"))
            .json(&show)
            .send()
            .await?
            .status();
        ensure!(booked == 503, "a command got {booked} with Postgres down");
    }

    proxy.resume();
    let mut status = 0;
    for _ in 0..50 {
        status = client
            .post(format!("{base}/shows"))
            .json(&show)
            .send()
            .await?
            .status()
            .as_u16();
        if status == 201 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ensure!(status == 201, "did not recover: last status {status}");
    ensure!(
        check_log(&db.pool).await?.events == 1,
        "the outage wrote or lost events"
    );
    stop.cancel();
    server.await??;
    db.drop_database().await
}
