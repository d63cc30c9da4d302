//! Harness for the command-api tests: a real server on a random port over
//! its own Postgres database, and a checker that replays the whole log.

#![allow(dead_code)] // each test file uses its share

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{ensure, Context};
use chrono::Utc;
use command_api::relay::RelaySettings;
use command_api::settings::Settings;
use command_api::startup::App;
use cqrs_es::Aggregate;
use domain::{Booking, BookingId, BookingState, Seat, SeatId, SeatState};
use serde_json::{json, Value};
use sqlx::{PgPool, Row};
use ticketing_tests::TestDatabase;
use tokio_util::sync::CancellationToken;

pub struct TestApp {
    pub base: String,
    /// Its requests carry a box-office operator's token (organizer and
    /// admin): these tests are about the log, not about who may write.
    pub client: reqwest::Client,
    /// The operator whose token `client` sends.
    pub staff: uuid::Uuid,
    pub db: TestDatabase,
    stop: CancellationToken,
    server: tokio::task::JoinHandle<anyhow::Result<()>>,
}

pub fn settings(database_url: String, hold_secs: u64) -> Settings {
    Settings {
        database_url,
        addr: "127.0.0.1:0".parse().expect("an address"),
        max_connections: 16,
        acquire_timeout_secs: 10,
        startup_timeout_secs: 5,
        hold_secs,
        sweep_every_secs: 1,
        idempotency_keep_hours: 24,
        command_attempts: 8,
        command_lock_wait_ms: 250,
        command_batch_max: 64,
        command_batch_window_us: 1000,
        command_batches: 2,
        relay_enabled: false,
        relay: relay_settings("ticketing.unused", &ticketing_tests::kafka_brokers()),
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

/// Relay settings for tests: small batches, short waits.
pub fn relay_settings(topic: &str, brokers: &str) -> RelaySettings {
    RelaySettings {
        kafka_brokers: brokers.to_owned(),
        relay_topic: topic.to_owned(),
        relay_partitions: 3,
        relay_batch: 50,
        relay_poll_ms: 20,
        relay_standby_poll_ms: 300,
        relay_ack_timeout_ms: 15_000,
        relay_in_flight: 8,
    }
}

impl TestApp {
    pub async fn spawn() -> anyhow::Result<Self> {
        Self::spawn_with(600).await
    }

    pub async fn spawn_with(hold_secs: u64) -> anyhow::Result<Self> {
        Self::spawn_with_settings(|s| s.hold_secs = hold_secs).await
    }

    /// With the relay running in the server, to `topic` on `brokers`.
    pub async fn spawn_relaying(topic: &str, brokers: &str) -> anyhow::Result<Self> {
        Self::spawn_with_settings(|s| {
            s.relay_enabled = true;
            s.relay = relay_settings(topic, brokers);
        })
        .await
    }

    pub async fn spawn_with_settings(change: impl FnOnce(&mut Settings)) -> anyhow::Result<Self> {
        Self::spawn_on(&ticketing_tests::postgres_url(), change).await
    }

    /// Over a database of its own on the Postgres server of `server`.
    pub async fn spawn_on(
        server: &str,
        change: impl FnOnce(&mut Settings),
    ) -> anyhow::Result<Self> {
        let db = TestDatabase::create_on(server).await?;
        let mut settings = settings(db.url(), 600);
        change(&mut settings);
        let (base, stop, server) = serve(settings).await?;
        let staff = uuid::Uuid::new_v4();
        Ok(Self {
            base,
            client: ticketing_tests::auth::staff_client_of(staff)?,
            staff,
            db,
            stop,
            server,
        })
    }

    pub async fn post(&self, path: &str, body: &Value) -> anyhow::Result<(u16, Value)> {
        self.post_with(path, body, None).await
    }

    pub async fn post_with(
        &self,
        path: &str,
        body: &Value,
        key: Option<&str>,
    ) -> anyhow::Result<(u16, Value)> {
        let mut request = self.client.post(format!("{}{path}", self.base)).json(body);
        if let Some(key) = key {
            request = request.header("Idempotency-Key", key);
        }
        let response = request.send().await?;
        let status = response.status().as_u16();
        let body = response.json().await.unwrap_or(Value::Null);
        Ok((status, body))
    }

    /// Creates the show of docs/api.md's example: VIP row A (10 seats at 225.00),
    /// Floor rows B and C (20 seats each at 90.00).
    pub async fn jazz_night(&self) -> anyhow::Result<String> {
        let (status, body) = self.post("/shows", &jazz_night()).await?;
        ensure!(status == 201, "creating a show: {status} {body}");
        Ok(body["show_id"].as_str().context("show_id")?.to_owned())
    }

    pub async fn stop(self) -> anyhow::Result<()> {
        self.stop.cancel();
        self.server.await??;
        self.db.drop_database().await
    }
}

/// A second command-api on a test app's database, as another replica.
pub struct Replica {
    pub base: String,
    stop: CancellationToken,
    server: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl TestApp {
    /// Starts another command-api on this app's database.
    pub async fn replica(&self) -> anyhow::Result<Replica> {
        let (base, stop, server) = serve(settings(self.db.url(), 600)).await?;
        Ok(Replica { base, stop, server })
    }
}

/// A command-api with `settings`, serving on a random port until stopped.
async fn serve(
    settings: Settings,
) -> anyhow::Result<(
    String,
    CancellationToken,
    tokio::task::JoinHandle<anyhow::Result<()>>,
)> {
    let app = App::build(settings).await?;
    let base = format!("http://{}", app.addr()?);
    let stop = CancellationToken::new();
    let server = tokio::spawn(app.run_until(stop.clone()));
    Ok((base, stop, server))
}

impl Replica {
    pub async fn stop(self) -> anyhow::Result<()> {
        self.stop.cancel();
        self.server.await?
    }
}

pub fn jazz_night() -> Value {
    json!({
        "name": "Jazz Night", "venue": "Blue Note", "starts_at": "2027-03-01T20:00:00Z",
        "sections": [
            { "name": "VIP", "price_cents": 22500, "rows": [ { "row": "A", "seats": 10 } ] },
            { "name": "Floor", "price_cents": 9000,
              "rows": [ { "row": "B", "seats": 20 }, { "row": "C", "seats": 20 } ] }
        ]
    })
}

pub fn booking(show_id: &str, seats: &[&str], hold: bool) -> Value {
    json!({ "show_id": show_id, "user_id": uuid::Uuid::new_v4().to_string(), "seats": seats, "hold": hold })
}

/// What the whole log says, after checking it is consistent.
#[derive(Debug, Default)]
pub struct LogSummary {
    pub events: usize,
    pub bookings: BTreeMap<BookingId, Booking>,
    pub seats: BTreeMap<SeatId, Seat>,
}

impl LogSummary {
    /// Seat labels owned now, by booking.
    pub fn owned_by(&self, booking: BookingId) -> BTreeSet<String> {
        let now = Utc::now();
        self.seats
            .iter()
            .filter(|(_, seat)| seat.owner_at(now) == Some(booking))
            .map(|(id, _)| id.label.to_string())
            .collect()
    }
}

/// Replays every stream of the log and checks: every stream's sequences run
/// 1..n without holes; no seat belongs to two live bookings; every live
/// booking owns all its seats (booked, when confirmed); every owned seat
/// belongs to a live booking that lists it.
pub async fn check_log(pool: &PgPool) -> anyhow::Result<LogSummary> {
    let rows = sqlx::query(
        "SELECT aggregate_type, aggregate_id, sequence, payload, event_version FROM events
          ORDER BY aggregate_type, aggregate_id, sequence",
    )
    .fetch_all(pool)
    .await?;
    let mut summary = LogSummary {
        events: rows.len(),
        ..LogSummary::default()
    };
    let mut last: BTreeMap<(String, String), i64> = BTreeMap::new();
    for row in rows {
        let (kind, id): (String, String) = (row.try_get(0)?, row.try_get(1)?);
        let sequence: i64 = row.try_get(2)?;
        // As every reader does: in the current shape of its type.
        let payload = domain::versions::upcast(&row.try_get::<String, _>(4)?, row.try_get(3)?)?;
        let previous = last
            .insert((kind.clone(), id.clone()), sequence)
            .unwrap_or(0);
        ensure!(
            sequence == previous + 1,
            "{kind} {id}: sequence {sequence} after {previous}"
        );
        match kind.as_str() {
            "Booking" => summary
                .bookings
                .entry(id.parse()?)
                .or_default()
                .apply(serde_json::from_value(payload)?),
            "Seat" => summary
                .seats
                .entry(id.parse()?)
                .or_default()
                .apply(serde_json::from_value(payload)?),
            _ => {}
        }
    }
    let now = Utc::now();
    let mut claimed: BTreeMap<String, BookingId> = BTreeMap::new();
    for (id, booking) in &summary.bookings {
        if !booking.is_live_at(now) {
            continue;
        }
        let details = booking.details().context("a booking without details")?;
        for seat in &details.seats {
            let seat_id = SeatId::new(details.show_id, seat.label.clone());
            if let Some(other) = claimed.insert(seat_id.to_string(), *id) {
                anyhow::bail!("seat {seat_id} belongs to live bookings {other} and {id}");
            }
            let state = summary.seats.get(&seat_id).map(Seat::state);
            let owner = summary.seats.get(&seat_id).and_then(|s| s.owner_at(now));
            ensure!(
                owner == Some(*id),
                "live booking {id} does not own {seat_id}: {state:?}"
            );
            if booking.state_at(now) == Some(BookingState::Confirmed) {
                ensure!(
                    state == Some(SeatState::Booked { booking_id: *id }),
                    "confirmed booking {id} has seat {seat_id} {state:?}"
                );
            }
        }
    }
    for (seat_id, seat) in &summary.seats {
        if let Some(owner) = seat.owner_at(now) {
            ensure!(
                claimed.get(&seat_id.to_string()) == Some(&owner),
                "seat {seat_id} is owned by {owner}, which is not a live booking listing it"
            );
        }
    }
    Ok(summary)
}
