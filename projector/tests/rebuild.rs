//! Rebuilding and crashing: a replay while bookings continue, and the
//! projector binary SIGKILLed under load.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use common::{converge, jazz_night, send, ReadSide, Writes};
use projector::replay::{self, ReplaySettings};
use serde_json::json;
use tokio_util::sync::CancellationToken;

/// Clients booking random seats and cancelling half of what they get, until
/// `stop`. Returns how many bookings were placed.
fn book_until(
    base: String,
    show: String,
    clients: usize,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<usize> {
    tokio::spawn(async move {
        let placed = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..clients {
            let (base, show, stop, placed) = (
                base.clone(),
                show.clone(),
                Arc::clone(&stop),
                Arc::clone(&placed),
            );
            tasks.push(tokio::spawn(async move {
                let client = ticketing_tests::auth::staff_client().expect("an HTTP client");
                while !stop.load(Ordering::Relaxed) {
                    let dice = uuid::Uuid::new_v4().as_u128();
                    let row = ["A", "B", "C"][(dice % 3) as usize];
                    let seats: Vec<String> = (0..1 + (dice >> 8) % 2)
                        .map(|i| format!("{row}{}", 1 + ((dice >> 16) + i) % 10))
                        .collect();
                    let body = json!({ "show_id": show, "user_id": uuid::Uuid::new_v4().to_string(),
                        "seats": seats, "hold": (dice >> 24) % 3 == 0 });
                    let Ok(answer) =
                        send(client.post(format!("{base}/bookings")).json(&body)).await
                    else {
                        continue;
                    };
                    if answer.status == 201 {
                        placed.fetch_add(1, Ordering::Relaxed);
                        if (dice >> 32) % 2 == 0 {
                            if let Some(id) = answer.body["booking_id"].as_str() {
                                let _ =
                                    send(client.post(format!("{base}/bookings/{id}/cancel"))).await;
                            }
                        }
                    }
                }
            }));
        }
        for task in tasks {
            let _ = task.await;
        }
        placed.load(Ordering::Relaxed)
    })
}

async fn new_show(base: &str) -> anyhow::Result<String> {
    let created = send(
        ticketing_tests::auth::staff_client()
            .expect("an HTTP client")
            .post(format!("{base}/shows"))
            .json(&jazz_night()),
    )
    .await?;
    Ok(created.body["show_id"]
        .as_str()
        .context("show_id")?
        .to_owned())
}

/// A replay while bookings keep coming: the query side answers throughout,
/// switches to the new generation, drops the old one, and the rebuilt
/// models equal, document by document, those of a projector that never
/// replayed, and the fold of the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_while_writes_continue_equals_the_live_models() -> anyhow::Result<()> {
    let writes = Writes::spawn(600).await?;
    let live = ReadSide::new().await?;
    let rebuilt = ReadSide::new().await?;
    let live_projector = live.project(&writes.topic);
    let rebuilt_projector = rebuilt.project(&writes.topic);
    let (query, query_service) = rebuilt.serve().await?;
    let shows = [new_show(&writes.base).await?, new_show(&writes.base).await?];
    // The reader below starts once the show is on the read side.
    let visible = send(
        ticketing_tests::auth::staff_client()
            .expect("an HTTP client")
            .get(format!("{query}/shows/{}", shows[0]))
            .header(
                "X-Consistency-Token",
                common::signed(&format!("v1;show={}:1", shows[0]))?,
            ),
    )
    .await?;
    assert_eq!(visible.status, 200, "{visible:?}");

    let stop = Arc::new(AtomicBool::new(false));
    let load: Vec<_> = shows
        .iter()
        .map(|show| book_until(writes.base.clone(), show.clone(), 3, Arc::clone(&stop)))
        .collect();
    // A reader of the query side for the whole run.
    let reading = Arc::new(AtomicBool::new(true));
    let reader = {
        let (query, show, reading) = (query.clone(), shows[0].clone(), Arc::clone(&reading));
        tokio::spawn(async move {
            let client = ticketing_tests::auth::staff_client().expect("an HTTP client");
            let mut statuses = Vec::new();
            while reading.load(Ordering::Relaxed) {
                match send(client.get(format!("{query}/shows/{show}/availability"))).await {
                    Ok(answer) => statuses.push(answer.status),
                    Err(_) => statuses.push(0),
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            statuses
        })
    };
    tokio::time::sleep(Duration::from_secs(3)).await;

    let report = replay::replay(
        &rebuilt.store,
        &writes.db.pool,
        &rebuilt.consumer(&writes.topic),
        &ReplaySettings {
            database_url: writes.db.url(),
            replay_batch: 100,
            grace_secs: 1,
            switch_wait_secs: 120,
        },
        &CancellationToken::new(),
    )
    .await?;
    assert_eq!((report.from, report.to), (1, 2), "{report:?}");
    assert!(report.events > 0, "{report:?}");

    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    let mut placed = 0;
    for task in load {
        placed += task.await?;
    }
    assert!(placed > 10, "the load placed only {placed} bookings");

    let events = converge(&writes, &live, Duration::from_secs(30)).await?;
    converge(&writes, &rebuilt, Duration::from_secs(30)).await?;
    assert_eq!(rebuilt.snapshot().await?, live.snapshot().await?);
    assert_eq!(rebuilt.store.pointer().await?.current, 2);
    let collections = rebuilt.store.database().list_collection_names().await?;
    assert!(
        collections.iter().all(|c| !c.starts_with("g1_")),
        "the old generation is dropped: {collections:?}"
    );

    reading.store(false, Ordering::Relaxed);
    let statuses = reader.await?;
    assert!(statuses.len() > 20, "{} reads", statuses.len());
    assert!(
        statuses.iter().all(|s| *s == 200),
        "every read answered: {statuses:?}"
    );
    eprintln!(
        "{placed} bookings, {events} events, {} reads during the run",
        statuses.len()
    );

    live_projector.stop().await?;
    rebuilt_projector.stop().await?;
    query_service.stop().await?;
    live.drop().await?;
    rebuilt.drop().await?;
    writes.stop().await
}

/// The projector binary, SIGKILLed again and again while bookings flow,
/// then left to finish: the read models equal the fold of the log exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_projector_killed_mid_batch_leaves_exact_models() -> anyhow::Result<()> {
    let writes = Writes::spawn(600).await?;
    let read = ReadSide::new().await?;
    let show = new_show(&writes.base).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let load = book_until(writes.base.clone(), show, 4, Arc::clone(&stop));

    let spawn = || {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_projector"))
            .env("KAFKA_BROKERS", ticketing_tests::kafka_brokers())
            .env("PROJECTOR_TOPIC", &writes.topic)
            .env("PROJECTOR_GROUP", &read.group)
            .env("PROJECTOR_BATCH", "20")
            .env("PROJECTOR_ADDR", "127.0.0.1:0")
            .env("MONGODB_URI", ticketing_tests::mongodb_uri())
            .env("MONGODB_DATABASE", &read.database)
            .env("RUST_LOG", "warn")
            .kill_on_drop(true)
            .spawn()
    };
    let mut kills = 0;
    for round in 0..6_u64 {
        let mut child = spawn()?;
        // Long enough to join the group and apply some batches; the kill
        // lands wherever the projector is, mostly inside a batch.
        tokio::time::sleep(Duration::from_millis(2500 + 300 * round)).await;
        child.start_kill()?;
        child.wait().await?;
        kills += 1;
    }
    stop.store(true, Ordering::Relaxed);
    let placed = load.await?;
    let mut last = spawn()?;
    let events = converge(&writes, &read, Duration::from_secs(60)).await?;
    last.start_kill()?;
    last.wait().await?;
    eprintln!("{kills} kills, {placed} bookings, {events} events");
    assert!(placed > 10, "the load placed only {placed} bookings");

    read.drop().await?;
    writes.stop().await
}

/// A SecantusDB of the test's own (own port and data), so stopping it
/// leaves every other test's server alone.
struct PrivateMongo {
    port: u16,
    dir: std::path::PathBuf,
    child: Option<tokio::process::Child>,
}

impl PrivateMongo {
    async fn start() -> anyhow::Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let dir = std::env::temp_dir().join(ticketing_tests::unique_name("secantus"));
        std::fs::create_dir_all(&dir)?;
        let mut mongo = Self {
            port,
            dir,
            child: None,
        };
        mongo.restart().await?;
        Ok(mongo)
    }

    fn uri(&self) -> String {
        format!("mongodb://127.0.0.1:{}", self.port)
    }

    async fn restart(&mut self) -> anyhow::Result<()> {
        let child = tokio::process::Command::new("python3")
            .args([
                "-m",
                "secantus",
                "--host",
                "127.0.0.1",
                "--port",
                &self.port.to_string(),
            ])
            .arg("--storage-path")
            .arg(&self.dir)
            .args(["--log-level", "WARNING"])
            .kill_on_drop(true)
            .spawn()
            .context("python3 -m secantus (run `make up` to install it)")?;
        self.child = Some(child);
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .is_err()
        {
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "secantus did not start"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    }

    /// Stops the server (SIGTERM, as an operator or orchestrator would).
    async fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            if let Some(pid) = child.id() {
                std::process::Command::new("kill")
                    .arg(pid.to_string())
                    .status()?;
            }
            if tokio::time::timeout(Duration::from_secs(10), child.wait())
                .await
                .is_err()
            {
                child.start_kill()?;
                child.wait().await?;
            }
        }
        Ok(())
    }
}

impl Drop for PrivateMongo {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// MongoDB stopped while bookings continue: query-api answers 503 with
/// Retry-After, the projector holds its offsets and retries; MongoDB back:
/// both recover by themselves and the read models miss nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mongodb_down_is_a_503_and_nothing_is_lost() -> anyhow::Result<()> {
    let mut mongo = PrivateMongo::start().await?;
    let writes = Writes::spawn(600).await?;
    let read = ReadSide::at(&mongo.uri()).await?;
    let projector = read.project(&writes.topic);
    let (query, query_service) = read.serve().await?;
    let client = ticketing_tests::auth::staff_client().expect("an HTTP client");
    let show = new_show(&writes.base).await?;
    let book = |seat: &'static str| {
        let (client, base, show) = (client.clone(), writes.base.clone(), show.clone());
        async move {
            let body = json!({ "show_id": show, "user_id": uuid::Uuid::new_v4().to_string(), "seats": [seat] });
            let answer = send(client.post(format!("{base}/bookings")).json(&body)).await?;
            anyhow::ensure!(answer.status == 201, "{answer:?}");
            anyhow::Ok(())
        }
    };
    book("A1").await?;
    converge(&writes, &read, Duration::from_secs(20)).await?;

    mongo.stop().await?;
    for seat in ["A2", "A3", "B1", "B2"] {
        book(seat).await?;
    }
    let answer = send(client.get(format!("{query}/shows/{show}/availability"))).await?;
    assert_eq!(answer.status, 503, "{answer:?}");
    assert_eq!(answer.retry_after.as_deref(), Some("1"));
    assert_eq!(
        answer.content_type.as_deref(),
        Some("application/problem+json")
    );
    let ready = send(client.get(format!("{query}/readyz"))).await?;
    assert_eq!(ready.status, 503, "{ready:?}");
    // Long enough for the projector to meet the outage with events in hand.
    tokio::time::sleep(Duration::from_secs(3)).await;

    mongo.restart().await?;
    let events = converge(&writes, &read, Duration::from_secs(40)).await?;
    // query-api's own connections come back by themselves: until then it
    // answers 503 with Retry-After, which a client follows.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let answer = loop {
        let answer = send(client.get(format!("{query}/shows/{show}/availability"))).await?;
        if answer.status != 503 || tokio::time::Instant::now() >= deadline {
            break answer;
        }
        assert_eq!(answer.retry_after.as_deref(), Some("1"));
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(answer.body["booked"], 5);
    eprintln!("{events} events, all projected after the outage");

    projector.stop().await?;
    query_service.stop().await?;
    read.drop().await?;
    mongo.stop().await?;
    writes.stop().await
}
