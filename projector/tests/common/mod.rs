//! Harness for the read-side tests: the whole pipeline on the real servers,
//! each test with its own Postgres database, Kafka topic, consumer groups
//! and MongoDB database. command-api (with its relay), the projector and
//! query-api run in this process unless a test needs to kill one.

#![allow(dead_code)] // each test file uses its share

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use command_api::relay::RelaySettings;
use domain::read_model::{BlockDoc, BookingDoc, Models, ShowDoc};
use domain::PublishedEvent;
use projector::live::{ConsumerSettings, Projection};
use projector::store::ReadStore;
use serde_json::{json, Value};
use sqlx::Row;
use ticketing_tests::TestDatabase;
use tokio_util::sync::CancellationToken;

pub struct Service {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Service {
    pub async fn stop(self) -> anyhow::Result<()> {
        self.stop.cancel();
        self.task.await?
    }
}

/// Who publishes the write side's log to its topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Relaying {
    /// The relay inside command-api.
    InProcess,
    /// The test itself (command-api runs without its relay).
    ByTheTest,
}

/// The write side: command-api with its relay, over its own database and
/// topic.
pub struct Writes {
    pub base: String,
    pub db: TestDatabase,
    pub topic: String,
    service: Service,
}

pub fn command_settings(
    database_url: String,
    topic: &str,
    hold_secs: u64,
) -> command_api::settings::Settings {
    command_api::settings::Settings {
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
        relay_enabled: true,
        relay: RelaySettings {
            kafka_brokers: ticketing_tests::kafka_brokers(),
            relay_topic: topic.to_owned(),
            relay_partitions: 3,
            relay_batch: 200,
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

impl Writes {
    pub async fn spawn(hold_secs: u64) -> anyhow::Result<Self> {
        Self::spawn_on(
            &ticketing_tests::postgres_url(),
            hold_secs,
            Relaying::InProcess,
        )
        .await
    }

    /// Over a database of its own on the Postgres server of `server`.
    pub async fn spawn_on(
        server: &str,
        hold_secs: u64,
        relaying: Relaying,
    ) -> anyhow::Result<Self> {
        let relay = relaying == Relaying::InProcess;
        let db = TestDatabase::create_on(server).await?;
        let topic = ticketing_tests::unique_name("read_side");
        let mut settings = command_settings(db.url(), &topic, hold_secs);
        settings.relay_enabled = relay;
        let app = command_api::startup::App::build(settings).await?;
        let base = format!("http://{}", app.addr()?);
        let stop = CancellationToken::new();
        let task = tokio::spawn(app.run_until(stop.clone()));
        let writes = Self {
            base,
            db,
            topic,
            service: Service { stop, task },
        };
        // The relay creates the topic; consumers subscribing before that
        // would wait for a metadata refresh.
        if relay {
            writes.wait_for_topic().await?;
        }
        Ok(writes)
    }

    async fn wait_for_topic(&self) -> anyhow::Result<()> {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        let consumer: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", ticketing_tests::kafka_brokers())
            .create()?;
        let topic = self.topic.clone();
        tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let metadata = consumer.fetch_metadata(Some(&topic), Duration::from_secs(5));
                if let Ok(metadata) = metadata {
                    if metadata
                        .topics()
                        .iter()
                        .any(|t| t.name() == topic && !t.partitions().is_empty())
                    {
                        return Ok(());
                    }
                }
                ensure!(Instant::now() < deadline, "topic {topic} never appeared");
                std::thread::sleep(Duration::from_millis(200));
            }
        })
        .await?
    }

    pub async fn stop(self) -> anyhow::Result<()> {
        self.service.stop().await?;
        self.db.drop_database().await
    }

    /// The events of the log in the relay's order, as published. Read with
    /// its own query (not the `event-feed` crate under test), and without
    /// the open-transaction barrier, so it sees everything committed.
    pub async fn log(&self) -> anyhow::Result<Vec<PublishedEvent>> {
        let rows = sqlx::query(
            "SELECT global_position, aggregate_type, aggregate_id, sequence, event_type,
                    event_version, payload, recorded_at
               FROM events ORDER BY tx_id, global_position",
        )
        .fetch_all(&self.db.pool)
        .await?;
        rows.into_iter()
            .map(|row| {
                let aggregate_type: String = row.try_get("aggregate_type")?;
                let payload: Value = row.try_get("payload")?;
                let event_version: String = row.try_get("event_version")?;
                let decoded = domain::AnyEvent::decode(&aggregate_type, &event_version, &payload)?;
                Ok(PublishedEvent {
                    envelope_version: 1,
                    aggregate_type,
                    aggregate_id: row.try_get("aggregate_id")?,
                    sequence: u64::try_from(row.try_get::<i64, _>("sequence")?)?,
                    event_type: row.try_get("event_type")?,
                    event_version,
                    global_position: row.try_get("global_position")?,
                    show_id: decoded.show_id(),
                    recorded_at: row.try_get("recorded_at")?,
                    payload,
                    metadata: BTreeMap::new(),
                })
            })
            .collect()
    }
}

/// A read-model database with its own consumer group name.
#[derive(Clone)]
pub struct ReadSide {
    pub uri: String,
    pub database: String,
    pub group: String,
    pub store: ReadStore,
}

impl ReadSide {
    pub async fn new() -> anyhow::Result<Self> {
        Self::at(&ticketing_tests::mongodb_uri()).await
    }

    /// Read models on the MongoDB server at `uri`.
    pub async fn at(uri: &str) -> anyhow::Result<Self> {
        let database = ticketing_tests::unique_name("read_models");
        let store = ReadStore::connect(uri, &database, Duration::from_secs(2)).await?;
        Ok(Self {
            uri: uri.to_owned(),
            group: ticketing_tests::unique_name("projector"),
            database,
            store,
        })
    }

    pub fn consumer(&self, topic: &str) -> ConsumerSettings {
        ConsumerSettings {
            kafka_brokers: ticketing_tests::kafka_brokers(),
            topic: topic.to_owned(),
            group: self.group.clone(),
            batch: 200,
            linger_ms: 20,
            fetch_wait_ms: 20,
        }
    }

    /// The live projector, in this process.
    pub fn project(&self, topic: &str) -> Service {
        let projection = Projection::new(self.consumer(topic), self.store.clone());
        let stop = CancellationToken::new();
        let run_stop = stop.clone();
        let task = tokio::spawn(async move { projection.run(run_stop).await });
        Service { stop, task }
    }

    /// query-api over this database, in this process.
    pub async fn serve(&self) -> anyhow::Result<(String, Service)> {
        self.serve_waiting(2000, 5000).await
    }

    /// query-api over this database, each MongoDB operation allowed
    /// `mongodb_timeout_ms`, a read with a consistency token
    /// `consistency_wait_ms`.
    pub async fn serve_waiting(
        &self,
        mongodb_timeout_ms: u64,
        consistency_wait_ms: u64,
    ) -> anyhow::Result<(String, Service)> {
        let settings = query_api::startup::Settings {
            mongodb_uri: self.uri.clone(),
            mongodb_database: self.database.clone(),
            addr: "127.0.0.1:0".parse()?,
            startup_timeout_secs: 5,
            mongodb_timeout_ms,
            consistency_wait_ms,
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
        };
        let app = query_api::startup::App::build(settings).await?;
        let base = format!("http://{}", app.addr()?);
        let stop = CancellationToken::new();
        let task = tokio::spawn(app.run_until(stop.clone()));
        Ok((base, Service { stop, task }))
    }

    /// Every document of the current generation, `v` and `w` left out
    /// (they count writes, not content).
    pub async fn snapshot(&self) -> anyhow::Result<Documents> {
        let generation = self.store.pointer().await?.current;
        let shows: Vec<ShowDoc> =
            ticketing_tests::all_documents(&self.store.shows(generation)).await?;
        let blocks: Vec<BlockDoc> =
            ticketing_tests::all_documents(&self.store.blocks(generation)).await?;
        let tallies: Vec<BlockDoc> =
            ticketing_tests::all_documents(&self.store.tallies(generation)).await?;
        let bookings: Vec<BookingDoc> =
            ticketing_tests::all_documents(&self.store.bookings(generation)).await?;
        let by_id = |blocks: Vec<BlockDoc>| {
            blocks
                .into_iter()
                .map(|mut b| {
                    b.writes = 0;
                    (b.block_id.clone(), b)
                })
                .collect()
        };
        Ok(Documents {
            shows: shows.into_iter().map(|s| (s.show_id.clone(), s)).collect(),
            blocks: by_id(blocks),
            tallies: by_id(tallies),
            bookings: bookings
                .into_iter()
                .map(|mut b| {
                    b.v = 0;
                    (b.booking_id.clone(), b)
                })
                .collect(),
        })
    }

    pub async fn drop(self) -> anyhow::Result<()> {
        self.store.database().drop().await?;
        Ok(())
    }
}

/// Every document of a generation, by id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Documents {
    pub shows: BTreeMap<String, ShowDoc>,
    pub blocks: BTreeMap<String, BlockDoc>,
    /// Each block's counts and holds, as the query side reads them for
    /// the sections not asked for.
    pub tallies: BTreeMap<String, BlockDoc>,
    pub bookings: BTreeMap<String, BookingDoc>,
}

/// What the read models must hold after `events`: the domain's fold, in
/// memory, `v` and `w` zero, and each block's tally.
pub fn expected(events: &[PublishedEvent]) -> anyhow::Result<Documents> {
    let mut models = Models::default();
    for event in events {
        models
            .apply(event)
            .with_context(|| format!("applying {event:?}"))?;
    }
    let blocks: BTreeMap<String, BlockDoc> = models
        .blocks
        .into_iter()
        .filter_map(|(id, b)| Some((id, b?)))
        .collect();
    Ok(Documents {
        shows: models
            .shows
            .into_iter()
            .filter_map(|(id, s)| Some((id, s?)))
            .collect(),
        tallies: blocks
            .iter()
            .map(|(id, block)| (id.clone(), block.tally()))
            .collect(),
        blocks,
        bookings: models
            .bookings
            .into_iter()
            .filter_map(|(id, b)| Some((id, b?)))
            .collect(),
    })
}

/// Waits until the read side holds exactly what `writes`' log says.
pub async fn converge(writes: &Writes, read: &ReadSide, within: Duration) -> anyhow::Result<usize> {
    let deadline = Instant::now() + within;
    loop {
        let log = writes.log().await?;
        let want = expected(&log)?;
        let have = read.snapshot().await?;
        if have == want {
            return Ok(log.len());
        }
        if Instant::now() > deadline {
            let shows: Vec<&String> = want
                .shows
                .keys()
                .filter(|k| have.shows.get(*k) != want.shows.get(*k))
                .collect();
            let blocks: Vec<&String> = want
                .blocks
                .keys()
                .filter(|k| have.blocks.get(*k) != want.blocks.get(*k))
                .collect();
            let tallies: Vec<&String> = want
                .tallies
                .keys()
                .filter(|k| have.tallies.get(*k) != want.tallies.get(*k))
                .collect();
            let bookings: Vec<&String> = want
                .bookings
                .keys()
                .filter(|k| have.bookings.get(*k) != want.bookings.get(*k))
                .collect();
            anyhow::bail!(
                "read models never matched the log ({} events): {} of {} shows, {} of {} blocks, \
                 {} tallies and {} of {} bookings differ, e.g. {:?} / {:?} / {:?}",
                log.len(),
                shows.len(),
                want.shows.len(),
                blocks.len(),
                want.blocks.len(),
                tallies.len(),
                bookings.len(),
                want.bookings.len(),
                blocks
                    .first()
                    .map(|k| (have.blocks.get(*k), want.blocks.get(*k))),
                tallies
                    .first()
                    .map(|k| (have.tallies.get(*k), want.tallies.get(*k))),
                bookings
                    .first()
                    .map(|k| (have.bookings.get(*k), want.bookings.get(*k)))
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
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

/// An HTTP answer: status, headers we look at, JSON body.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub token: Option<String>,
    pub etag: Option<String>,
    pub retry_after: Option<String>,
    pub content_type: Option<String>,
    pub body: Value,
}

pub async fn send(request: reqwest::RequestBuilder) -> anyhow::Result<Answer> {
    // Every wait of a test is bounded: a hang fails it, with a reason.
    let response = request.timeout(Duration::from_secs(30)).send().await?;
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(ToOwned::to_owned)
    };
    let (token, etag, retry_after, content_type) = (
        header("x-consistency-token"),
        header("etag"),
        header("retry-after"),
        header("content-type"),
    );
    let status = response.status().as_u16();
    let body = response.json().await.unwrap_or(Value::Null);
    Ok(Answer {
        status,
        token,
        etag,
        retry_after,
        content_type,
        body,
    })
}

/// `text` (a token's text form) signed as command-api signs it.
pub fn signed(text: &str) -> anyhow::Result<String> {
    let token: domain::ConsistencyToken = text.parse()?;
    let key = domain::TokenKey::new(domain::consistency::DEVELOPMENT_KEY.as_bytes().to_vec())?;
    Ok(key.sign(&token))
}
