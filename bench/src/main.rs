//! `onsale`: an on-sale against the running system (`make up`), over its
//! public HTTP API only. It creates a show, lets N buyers at it (a share of
//! them after a few hot seats; holds, confirms and cancels as configured),
//! then prints throughput, latency percentiles, the conflict rate, the time
//! from a 201 to the booking being readable on the query side, and checks
//! that no seat was sold twice: among the buyers' own answers, and on the
//! query side once it has caught up. With `--out` it writes the same figures
//! as JSON, with the machine and the commit.

mod report;
mod watchers;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use clap::Parser;
use rand::seq::IndexedRandom;
use rand::Rng;
use reqwest::StatusCode;
use serde_json::{json, Value};
use uuid::Uuid;

use report::{LiveReport, Machine, Percentiles, Report};
use service_kit::auth::{AuthSettings, Role};

/// An on-sale scenario.
#[derive(Debug, Clone, Parser, serde::Serialize)]
#[command(version, about)]
struct Scenario {
    /// Name of the scenario, in the report.
    #[arg(long, default_value = "onsale")]
    name: String,
    /// command-api.
    #[arg(
        long,
        env = "BENCH_COMMAND_URL",
        default_value = "http://127.0.0.1:8081"
    )]
    command_url: String,
    /// query-api.
    #[arg(long, env = "BENCH_QUERY_URL", default_value = "http://127.0.0.1:8082")]
    query_url: String,
    /// Concurrent buyers.
    #[arg(long, default_value_t = 64)]
    clients: usize,
    /// Seats of the show (rows of up to 100).
    #[arg(long, default_value_t = 2000)]
    seats: u32,
    /// Share of the show's seats that are hot (the front rows everyone wants).
    #[arg(long, default_value_t = 0.05)]
    hot_seats: f64,
    /// Share of booking attempts aimed at the hot seats.
    #[arg(long, default_value_t = 0.5)]
    hot_traffic: f64,
    /// Most seats per booking (each booking takes 1 to this many).
    #[arg(long, default_value_t = 2)]
    max_seats: usize,
    /// Share of bookings made as holds.
    #[arg(long, default_value_t = 0.5)]
    holds: f64,
    /// Share of holds that are confirmed (the rest are cancelled).
    #[arg(long, default_value_t = 0.8)]
    confirms: f64,
    /// Share of confirmed bookings cancelled afterwards.
    #[arg(long, default_value_t = 0.1)]
    cancels: f64,
    /// How long buyers keep buying.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Each buyer makes exactly one attempt, all released at once: a race.
    #[arg(long, default_value_t = false)]
    once: bool,
    /// Subscribers of the show's live availability stream during the run:
    /// each must end with the seat map the GET answers.
    #[arg(long, default_value_t = 0)]
    watchers: usize,
    /// query-api's process, whose memory per subscriber is reported
    /// (default: the pid `make up` wrote in .data/services/).
    #[arg(long)]
    query_api_pid: Option<u32>,
    /// Write the report as JSON here too.
    #[arg(long)]
    out: Option<std::path::PathBuf>,
    /// The secret the system's tokens are signed with (default: the one
    /// `make up` keeps in .data/auth-secret). Every buyer books with a token
    /// of its own, as a real buyer would.
    #[arg(long, env = "AUTH_JWT_SECRET", hide_env_values = true)]
    #[serde(skip)]
    auth_secret: Option<String>,
}

impl Scenario {
    /// A token for `user`, signed as the system expects.
    fn token(&self, user: Uuid, roles: &[Role]) -> anyhow::Result<String> {
        let settings = AuthSettings {
            jwt_secret: self.auth_secret.clone(),
            ..AuthSettings::default()
        };
        Ok(service_kit::auth::mint(
            &settings,
            user,
            roles,
            Duration::from_secs(3600),
        )?)
    }
}

/// What the buyers were told, kept to check the system against.
#[derive(Default)]
struct Ledger {
    /// booking id -> (seats, status the buyer last got)
    bookings: BTreeMap<String, (Vec<String>, &'static str)>,
    latencies: BTreeMap<&'static str, Vec<Duration>>,
    statuses: BTreeMap<String, u64>,
    attempts: u64,
    created: u64,
    conflicts: u64,
    freshness: Vec<Duration>,
    /// Bookings that stayed booked: when their 201 was read, their seats.
    kept: Vec<(Instant, Vec<String>, &'static str)>,
}

type Shared = Arc<Mutex<Ledger>>;

fn lock(ledger: &Shared) -> anyhow::Result<std::sync::MutexGuard<'_, Ledger>> {
    ledger
        .lock()
        .map_err(|_| anyhow::anyhow!("a buyer panicked"))
}

struct Buyers {
    scenario: Scenario,
    http: reqwest::Client,
    show: String,
    hot: Vec<String>,
    cold: Vec<String>,
    ledger: Shared,
    /// Freshness probes still polling (0 or 1).
    probes: AtomicUsize,
}

impl Buyers {
    /// One request; its latency recorded under `kind`.
    async fn post(
        &self,
        kind: &'static str,
        path: &str,
        token: &str,
        body: Value,
    ) -> anyhow::Result<(StatusCode, Value)> {
        let started = Instant::now();
        let response = self
            .http
            .post(format!("{}{path}", self.scenario.command_url))
            .bearer_auth(token)
            .header("Idempotency-Key", Uuid::new_v4().to_string())
            .json(&body)
            .send()
            .await
            .with_context(|| format!("POST {path}"))?;
        let status = response.status();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        let took = started.elapsed();
        let mut ledger = lock(&self.ledger)?;
        ledger.latencies.entry(kind).or_default().push(took);
        *ledger
            .statuses
            .entry(format!("{kind} {}", status.as_u16()))
            .or_default() += 1;
        Ok((status, body))
    }

    fn pick_seats(&self) -> Vec<String> {
        let mut rng = rand::rng();
        let pool = if self.cold.is_empty()
            || (!self.hot.is_empty() && rng.random_bool(self.scenario.hot_traffic))
        {
            &self.hot
        } else {
            &self.cold
        };
        let count = rng.random_range(1..=self.scenario.max_seats.clamp(1, pool.len()));
        pool.choose_multiple(&mut rng, count).cloned().collect()
    }

    /// One buyer's go: book (or hold), then confirm or cancel as the
    /// scenario says. Each go is a buyer of its own, with its own token:
    /// a real buyer books a few times, not hundreds of times a second (which
    /// the per-user rate limit would refuse).
    async fn attempt(self: &Arc<Self>) -> anyhow::Result<()> {
        let token = self.scenario.token(Uuid::new_v4(), &[])?;
        let (seats, hold, confirm, cancel) = {
            let mut rng = rand::rng();
            (
                self.pick_seats(),
                rng.random_bool(self.scenario.holds),
                rng.random_bool(self.scenario.confirms),
                rng.random_bool(self.scenario.cancels),
            )
        };
        let (status, body) = self
            .post(
                "book",
                "/bookings",
                &token,
                json!({"show_id": self.show, "seats": seats, "hold": hold}),
            )
            .await?;
        let answered = Instant::now();
        {
            let mut ledger = lock(&self.ledger)?;
            ledger.attempts += 1;
            match status {
                StatusCode::CREATED => ledger.created += 1,
                StatusCode::CONFLICT => {
                    ledger.conflicts += 1;
                    return Ok(());
                }
                other => bail!("POST /bookings answered {other}: {body}"),
            }
        }
        let id = body["booking_id"]
            .as_str()
            .context("no booking_id")?
            .to_owned();
        let mut state = if hold { "held" } else { "confirmed" };
        self.record(&id, &seats, state)?;
        // One probe at a time, on the next 201 after the last one ended:
        // probes of every booking, each polling, would load the query side
        // more than the buyers do and measure themselves.
        if self
            .probes
            .compare_exchange(0, 1, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            let buyers = self.clone();
            let id = id.clone();
            tokio::spawn(async move {
                buyers.probe_freshness(&id, answered).await;
                buyers.probes.fetch_sub(1, Ordering::Relaxed);
            });
        }
        if hold {
            let (kind, path) = if confirm {
                ("confirm", "confirm")
            } else {
                ("cancel", "cancel")
            };
            let (status, body) = self
                .post(kind, &format!("/bookings/{id}/{path}"), &token, json!({}))
                .await?;
            ensure!(status == StatusCode::OK, "{kind} answered {status}: {body}");
            state = if confirm { "confirmed" } else { "cancelled" };
            self.record(&id, &seats, state)?;
        }
        if state == "confirmed" && cancel {
            let (status, body) = self
                .post(
                    "cancel",
                    &format!("/bookings/{id}/cancel"),
                    &token,
                    json!({}),
                )
                .await?;
            ensure!(status == StatusCode::OK, "cancel answered {status}: {body}");
            self.record(&id, &seats, "cancelled")?;
        } else if !hold {
            // Booked at once and kept: its change must reach every
            // subscriber. (A hold confirmed or a booking cancelled within one
            // poll of the stream may rightly never show its first state.)
            lock(&self.ledger)?.kept.push((answered, seats, "booked"));
        }
        Ok(())
    }

    fn record(&self, id: &str, seats: &[String], state: &'static str) -> anyhow::Result<()> {
        lock(&self.ledger)?
            .bookings
            .insert(id.to_owned(), (seats.to_vec(), state));
        Ok(())
    }

    /// Time from a 201 to `GET /bookings/{id}` answering 200, polling every
    /// 2 ms without a consistency token (what a client without one sees).
    ///
    /// Each poll is an admin of its own: a buyer polling every 2 ms would
    /// meet the per-user rate limit at once, and the probe would measure
    /// that instead of the read side.
    async fn probe_freshness(&self, id: &str, answered: Instant) {
        let url = format!("{}/bookings/{id}", self.scenario.query_url);
        while answered.elapsed() < Duration::from_secs(30) {
            let Ok(token) = self.scenario.token(Uuid::new_v4(), &[Role::Admin]) else {
                return;
            };
            if let Ok(response) = self.http.get(&url).bearer_auth(token).send().await {
                if response.status() == StatusCode::OK {
                    if let Ok(mut ledger) = self.ledger.lock() {
                        ledger.freshness.push(answered.elapsed());
                    }
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}

/// Row names A, B, ... Z, AA, AB, ...
fn row_name(mut index: usize) -> String {
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

async fn create_show(
    scenario: &Scenario,
    http: &reqwest::Client,
) -> anyhow::Result<(String, Vec<String>)> {
    let mut rows = Vec::new();
    let mut labels = Vec::new();
    let mut left = scenario.seats;
    while left > 0 {
        let seats = left.min(100);
        let row = row_name(rows.len());
        labels.extend((1..=seats).map(|n| format!("{row}{n}")));
        rows.push(json!({"row": row, "seats": seats}));
        left -= seats;
    }
    let response = http
        .post(format!("{}/shows", scenario.command_url))
        .bearer_auth(scenario.token(Uuid::new_v4(), &[Role::Organizer])?)
        .json(
            &json!({"name": format!("On-sale {}", scenario.name), "venue": "Arena",
                      "starts_at": "2027-09-01T19:00:00Z",
                      "sections": [{"name": "Floor", "price_cents": 6500, "rows": rows}]}),
        )
        .send()
        .await
        .with_context(|| format!("is command-api up at {}? (`make up`)", scenario.command_url))?;
    let status = response.status();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    ensure!(
        status == StatusCode::CREATED,
        "POST /shows answered {status}: {body}"
    );
    let id = body["show_id"].as_str().context("no show_id")?.to_owned();
    Ok((id, labels))
}

/// The seats buyers hold or own, from their own answers; a seat in two
/// live bookings is an oversell.
fn owned_seats(ledger: &Ledger) -> (BTreeMap<String, &'static str>, u64) {
    let mut owned = BTreeMap::new();
    let mut oversold = 0;
    for (seats, state) in ledger.bookings.values() {
        if matches!(*state, "held" | "confirmed") {
            for seat in seats {
                let status = if *state == "held" { "held" } else { "booked" };
                if owned.insert(seat.clone(), status).is_some() {
                    oversold += 1;
                }
            }
        }
    }
    (owned, oversold)
}

/// Waits until the query side shows exactly the buyers' seats, for as long
/// as it keeps catching up (a projector behind a large on-sale needs
/// minutes, not a fixed minute); returns the seats it disagrees on at the
/// end, and how long it took.
/// How long the read side may go without getting closer to the buyers'
/// answers before the check gives up.
const READ_SIDE_STALL: Duration = Duration::from_secs(30);

async fn check_read_side(
    scenario: &Scenario,
    http: &reqwest::Client,
    show: &str,
    owned: &BTreeMap<String, &'static str>,
) -> anyhow::Result<(u64, u64, Duration)> {
    let started = Instant::now();
    let url = format!("{}/shows/{show}/availability", scenario.query_url);
    let mut fewest = u64::MAX;
    let mut progressed = Instant::now();
    loop {
        let response = http.get(&url).send().await?;
        let status = response.status();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        ensure!(
            status == StatusCode::OK,
            "GET availability answered {status}: {body}"
        );
        let seats: BTreeMap<String, String> = serde_json::from_value(body["seats"].clone())?;
        let mismatched = seats
            .iter()
            .filter(|(label, now)| {
                owned.get(*label).copied().unwrap_or("available") != now.as_str()
            })
            .count() as u64;
        let sold = seats.values().filter(|s| *s == "booked").count() as u64;
        if mismatched < fewest {
            fewest = mismatched;
            progressed = Instant::now();
        }
        if mismatched == 0 || progressed.elapsed() > READ_SIDE_STALL {
            return Ok((mismatched, sold, started.elapsed()));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn run(mut scenario: Scenario) -> anyhow::Result<Report> {
    if scenario.auth_secret.is_none() {
        // What `make up` generated, when the bench runs from the checkout.
        scenario.auth_secret = std::fs::read_to_string(".data/auth-secret")
            .ok()
            .map(|s| s.trim().to_owned());
    }
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(scenario.clients)
        .build()?;
    let (show, labels) = create_show(&scenario, &http).await?;
    let mut live = None;
    if scenario.watchers > 0 {
        wait_for_show(&scenario, &http, &show).await?;
        let pid = scenario.query_api_pid.or_else(|| {
            std::fs::read_to_string(".data/services/query-api.pid")
                .ok()
                .and_then(|pid| pid.trim().parse().ok())
        });
        // The first subscriber starts the show's feed: the memory measured
        // per subscriber is what the others add.
        let mut opened = watchers::Watchers::new()?;
        opened.add(&scenario, &show, 1).await?;
        let before = pid.and_then(watchers::rss_kib);
        opened.add(&scenario, &show, scenario.watchers - 1).await?;
        let after = pid.and_then(watchers::rss_kib);
        live = Some((opened, before, after));
    }
    let hot_count = ((labels.len() as f64 * scenario.hot_seats).ceil() as usize).min(labels.len());
    let (hot, cold) = labels.split_at(hot_count);
    let buyers = Arc::new(Buyers {
        scenario: scenario.clone(),
        http: http.clone(),
        show: show.clone(),
        hot: hot.to_vec(),
        cold: cold.to_vec(),
        ledger: Shared::default(),
        probes: AtomicUsize::new(0),
    });
    let http_floor = http_floor(&scenario).await?;
    let barrier = Arc::new(tokio::sync::Barrier::new(scenario.clients));
    let deadline = Duration::from_secs(scenario.seconds);
    let started = Instant::now();
    let tasks: Vec<_> = (0..scenario.clients)
        .map(|_| {
            let (buyers, barrier) = (buyers.clone(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                let began = Instant::now();
                loop {
                    buyers.attempt().await?;
                    if buyers.scenario.once || began.elapsed() >= deadline {
                        return anyhow::Ok(());
                    }
                }
            })
        })
        .collect();
    for task in futures::future::join_all(tasks).await {
        task??;
    }
    let elapsed = started.elapsed();
    // Let the last freshness probe finish (it gives up after 30 s).
    while buyers.probes.load(Ordering::Relaxed) > 0 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let ledger = std::mem::take(&mut *lock(&buyers.ledger)?);
    let (owned, oversold) = owned_seats(&ledger);
    let (mismatched, sold_on_read_side, caught_up) =
        check_read_side(&scenario, &http, &show, &owned).await?;
    let live = match live {
        None => None,
        Some((opened, before, after)) => {
            let maps_differing = check_watchers(&scenario, &http, &show, &opened).await?;
            let (latencies, changes_missed) = watchers::latencies(&opened, &ledger.kept)?;
            let reconnects = opened
                .seen
                .iter()
                .filter_map(|s| s.lock().ok().map(|s| s.reconnects))
                .sum();
            let refused = opened.refused.load(Ordering::Relaxed);
            opened.close().await;
            Some(LiveReport {
                subscribers: scenario.watchers,
                change_latency_ms: Percentiles::of(&latencies),
                changes_missed,
                maps_differing,
                reconnects,
                refused,
                query_rss_kib_before: before,
                query_rss_kib_per_subscriber: before
                    .zip(after)
                    .filter(|_| scenario.watchers > 1)
                    .map(|(before, after)| {
                        after.saturating_sub(before) as f64 / (scenario.watchers - 1) as f64
                    }),
            })
        }
    };
    let requests: u64 = ledger.latencies.values().map(|l| l.len() as u64).sum();
    let secs = elapsed.as_secs_f64();
    Ok(Report {
        scenario: serde_json::to_value(&scenario)?,
        machine: Machine::read(),
        commit: report::commit(),
        at: chrono::Utc::now().to_rfc3339(),
        show_id: show,
        seconds: secs,
        requests,
        requests_per_sec: requests as f64 / secs,
        booking_attempts: ledger.attempts,
        bookings_created: ledger.created,
        bookings_per_sec: ledger.created as f64 / secs,
        conflicts: ledger.conflicts,
        conflict_rate: ledger.conflicts as f64 / (ledger.attempts.max(1)) as f64,
        statuses: ledger.statuses.clone(),
        latency_ms: ledger
            .latencies
            .iter()
            .map(|(kind, l)| ((*kind).to_owned(), Percentiles::of(l)))
            .collect(),
        seats_sold: owned.values().filter(|s| **s == "booked").count() as u64,
        seats_held: owned.values().filter(|s| **s == "held").count() as u64,
        oversold_seats: oversold,
        read_side_sold: sold_on_read_side,
        read_side_mismatched_seats: mismatched,
        read_side_caught_up_ms: caught_up.as_secs_f64() * 1e3,
        freshness_ms: Percentiles::of(&ledger.freshness),
        http_floor_ms: Percentiles::of(&http_floor),
        live,
    })
}

/// Waits until the query side has the show: a stream of a show it does
/// not know yet is a 404.
async fn wait_for_show(
    scenario: &Scenario,
    http: &reqwest::Client,
    show: &str,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let url = format!("{}/shows/{show}", scenario.query_url);
    while http.get(&url).send().await?.status() != StatusCode::OK {
        ensure!(
            started.elapsed() < Duration::from_secs(30),
            "the show never reached the query side"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// How many subscribers' seat maps still differ from the GET once the read
/// side has caught up, after giving their streams a while to deliver.
async fn check_watchers(
    scenario: &Scenario,
    http: &reqwest::Client,
    show: &str,
    opened: &watchers::Watchers,
) -> anyhow::Result<u64> {
    let url = format!("{}/shows/{show}/availability", scenario.query_url);
    let started = Instant::now();
    loop {
        // Read again each time: a hold may lapse meanwhile.
        let body: Value = http.get(&url).send().await?.json().await?;
        let seats: BTreeMap<String, String> = serde_json::from_value(body["seats"].clone())?;
        let differing = opened
            .seen
            .iter()
            .filter(|seen| seen.lock().map_or(true, |seen| seen.seats != seats))
            .count() as u64;
        if differing == 0 || started.elapsed() > Duration::from_secs(10) {
            return Ok(differing);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The latencies of `clients` simultaneous `GET /healthz`, released
/// together as the buyers are, each on a new connection as theirs are: the
/// floor under every figure of the run.
async fn http_floor(scenario: &Scenario) -> anyhow::Result<Vec<Duration>> {
    // A client of its own, so that the buyers' connections start cold.
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(scenario.clients)
        .build()?;
    let barrier = Arc::new(tokio::sync::Barrier::new(scenario.clients));
    let url = format!("{}/healthz", scenario.command_url);
    let probes: Vec<_> = (0..scenario.clients)
        .map(|_| {
            let (barrier, http, url) = (Arc::clone(&barrier), http.clone(), url.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                let started = Instant::now();
                let answer = http.get(&url).send().await?;
                ensure!(
                    answer.status().is_success(),
                    "GET /healthz: {}",
                    answer.status()
                );
                anyhow::Ok(started.elapsed())
            })
        })
        .collect();
    let mut latencies = Vec::with_capacity(probes.len());
    for probe in futures::future::join_all(probes).await {
        latencies.push(probe??);
    }
    Ok(latencies)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let scenario = Scenario::parse();
    ensure!(
        scenario.clients > 0 && scenario.seats > 0,
        "--clients and --seats must be positive"
    );
    for share in [
        scenario.hot_seats,
        scenario.hot_traffic,
        scenario.holds,
        scenario.confirms,
        scenario.cancels,
    ] {
        ensure!(
            (0.0..=1.0).contains(&share),
            "shares are between 0 and 1, not {share}"
        );
    }
    let out = scenario.out.clone();
    let report = run(scenario).await?;
    print!("{}", report.text());
    if let Some(out) = out {
        if let Some(dir) = out.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(&out, serde_json::to_string_pretty(&report)? + "\n")
            .with_context(|| format!("cannot write {}", out.display()))?;
        println!("report written to {}", out.display());
    }
    ensure!(
        report.oversold_seats == 0,
        "OVERSOLD: {} seats were sold twice",
        report.oversold_seats
    );
    if let Some(live) = &report.live {
        ensure!(
            live.maps_differing == 0 && live.changes_missed == 0,
            "live subscribers fell out of step: {} seat maps differ from the GET, {} changes never arrived",
            live.maps_differing,
            live.changes_missed
        );
    }
    ensure!(
        report.read_side_mismatched_seats == 0,
        "the query side disagrees with the buyers on {} seats and stopped catching up for {} s",
        report.read_side_mismatched_seats,
        READ_SIDE_STALL.as_secs()
    );
    Ok(())
}
