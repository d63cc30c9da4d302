//! The relay: publishes every committed event of the log to Kafka, in commit
//! order, at least once, whatever crashes.
//!
//! It reads the log in `(tx_id, global_position)` order, only below the
//! oldest transaction still open, so an event whose transaction commits late
//! is published late but never skipped (a plain `global_position > last`
//! cursor would skip it). It keeps reading and sending while earlier
//! messages await their acknowledgement (up to `RELAY_IN_FLIGHT` batches),
//! and stores as its cursor the end of the longest run of batches, from the
//! stored cursor on, that Kafka acknowledged whole; so a crash republishes,
//! never loses, and consumers deduplicate by `(aggregate_id, sequence)`.
//! Messages are queued to the idempotent producer in commit order, which
//! keeps them in that order on every partition.
//!
//! `command-api republish` moves a topic's checkpoint back and counts the
//! rewind; the active relay saves its cursor only while that count is the
//! one it loaded, so it notices and publishes again from there (see
//! `republish`).
//!
//! One relay per topic is active across all processes: it holds a Postgres
//! session advisory lock on a connection of its own and reads and checkpoints
//! through that same connection, so if the connection dies the lock is gone
//! and so is its ability to move the cursor. The others retry the lock every
//! `RELAY_STANDBY_POLL_MS` and take over within about that long. The
//! connection asks the server to probe it (TCP keepalives and a user
//! timeout of a few seconds), so a relay whose host freezes or vanishes
//! loses the lock within seconds rather than after the operating system's
//! two-hour keepalive.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::FutureExt;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use serde::Serialize;
use sqlx::postgres::PgPool;
use sqlx::{Connection, PgConnection, Row};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

pub use event_feed::{Committed, Cursor};

/// `ce_source` of every published event.
pub const CE_SOURCE: &str = "/ticketing/command-api";

/// Settings of the relay.
#[derive(Debug, Clone, clap::Args)]
pub struct RelaySettings {
    /// Kafka bootstrap servers.
    #[arg(long, env = "KAFKA_BROKERS", default_value = "127.0.0.1:9092")]
    pub kafka_brokers: String,
    /// The topic events are published to.
    #[arg(long, env = "RELAY_TOPIC", default_value = domain::envelope::EVENTS_TOPIC)]
    pub relay_topic: String,
    /// Partitions of the topic when the relay has to create it.
    #[arg(long, env = "RELAY_PARTITIONS", default_value_t = 6,
          value_parser = clap::value_parser!(i32).range(1..))]
    pub relay_partitions: i32,
    /// Most events read and published per batch.
    #[arg(long, env = "RELAY_BATCH", default_value_t = 1000,
          value_parser = clap::value_parser!(i64).range(1..))]
    pub relay_batch: i64,
    /// Longest wait for new events when this process commits none, in ms:
    /// how soon the commits of other processes are published (and the delay
    /// after a long-open transaction finally ends). Each poll is one indexed
    /// query.
    #[arg(long, env = "RELAY_POLL_MS", default_value_t = 20,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub relay_poll_ms: u64,
    /// How often a standby relay tries to take over, in ms.
    #[arg(long, env = "RELAY_STANDBY_POLL_MS", default_value_t = 1000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub relay_standby_poll_ms: u64,
    /// How long Kafka may take to acknowledge a message (counted from when
    /// it is queued) before the relay starts over from its checkpoint, in
    /// ms.
    #[arg(long, env = "RELAY_ACK_TIMEOUT_MS", default_value_t = 15_000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub relay_ack_timeout_ms: u64,
    /// Most batches sent and not yet acknowledged at once.
    #[arg(long, env = "RELAY_IN_FLIGHT", default_value_t = 8,
          value_parser = clap::value_parser!(u64).range(1..=64))]
    pub relay_in_flight: u64,
}

/// What the relay is doing, for `/readyz`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Not running in this process.
    Disabled,
    /// Connecting or recovering from an error.
    Starting,
    /// Another process holds the relay lock.
    Standby,
    /// This process publishes.
    Active,
}

/// The relay's state as last seen.
#[derive(Debug, Clone, Serialize)]
pub struct RelayReport {
    /// What it is doing.
    pub role: Role,
    /// The topic.
    pub topic: String,
    /// The cursor (active relay only).
    pub published_through: Option<Cursor>,
    /// Events in the log not yet published (active relay only).
    pub lag_events: Option<i64>,
    /// Age of the oldest unpublished event, in seconds (active relay only).
    pub lag_seconds: Option<f64>,
    /// Events published by this process since it started.
    pub published: u64,
    /// The last error, until the next successful batch.
    pub last_error: Option<String>,
}

/// Events the relay had acknowledged by the broker, counted by the
/// process relaying.
pub const PUBLISHED: &str = "relay_published_total";
/// Committed events not yet published, measured at most once a second by
/// the process relaying (0 on a standby).
pub const LAG_EVENTS: &str = "relay_lag_events";
/// Age of the oldest committed event not yet published.
pub const LAG_SECONDS: &str = "relay_lag_seconds";

/// Shared view of the relay's state.
#[derive(Debug, Clone)]
pub struct RelayStatus(Arc<Mutex<RelayReport>>);

impl RelayStatus {
    fn new(role: Role, topic: &str) -> Self {
        Self(Arc::new(Mutex::new(RelayReport {
            role,
            topic: topic.to_owned(),
            published_through: None,
            lag_events: None,
            lag_seconds: None,
            published: 0,
            last_error: None,
        })))
    }

    /// For a process that does not run the relay.
    pub fn disabled(topic: &str) -> Self {
        Self::new(Role::Disabled, topic)
    }

    /// A copy of the current state.
    pub fn report(&self) -> Option<RelayReport> {
        self.0.lock().ok().map(|report| report.clone())
    }

    /// The backlog just measured, in the report, and in the metrics when
    /// this process relays.
    fn lagging(&self, events: i64, seconds: f64, relaying: bool) {
        if relaying {
            #[allow(clippy::cast_precision_loss)] // a count of events
            metrics::gauge!(LAG_EVENTS).set(events as f64);
            metrics::gauge!(LAG_SECONDS).set(seconds);
        }
        self.update(|report| {
            report.lag_events = Some(events);
            report.lag_seconds = Some(seconds);
        });
    }

    /// A standby's lag gauges: zero, so that the sum or the max over
    /// instances is the active relay's.
    fn not_relaying(&self) {
        metrics::gauge!(LAG_EVENTS).set(0.0);
        metrics::gauge!(LAG_SECONDS).set(0.0);
    }

    fn update(&self, change: impl FnOnce(&mut RelayReport)) {
        if let Ok(mut report) = self.0.lock() {
            change(&mut report);
        }
    }
}

/// The relay of one topic.
pub struct Relay {
    pool: PgPool,
    settings: RelaySettings,
    status: RelayStatus,
    /// Names this process in the checkpoint table and in Postgres'
    /// `application_name`.
    instance: String,
    lock_key: i64,
    /// Signalled by this process' commits; other processes' are polled for.
    commits: Arc<Notify>,
}

/// Builds the idempotent, `acks=all` producer the relay publishes with.
///
/// # Errors
/// When librdkafka refuses the configuration.
pub fn producer(brokers: &str, ack_timeout: Duration) -> anyhow::Result<FutureProducer> {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "2")
        .set("message.timeout.ms", ack_timeout.as_millis().to_string())
        .create()
        .context("creating the Kafka producer")
}

impl Relay {
    /// A relay over `pool`'s database. Connects to nothing yet.
    ///
    /// # Errors
    /// When the producer cannot be configured.
    pub fn new(pool: PgPool, settings: RelaySettings) -> anyhow::Result<Self> {
        // Fail at start-up, not in the loop, on a configuration librdkafka refuses.
        drop(producer(&settings.kafka_brokers, Duration::from_secs(1))?);
        let status = RelayStatus::new(Role::Starting, &settings.relay_topic);
        let lock_key = crate::event_log::stream_key("relay", &settings.relay_topic);
        Ok(Self {
            pool,
            status,
            instance: format!(
                "{}{}-{}",
                crate::republish::RELAY_NAME_PREFIX,
                std::process::id(),
                uuid::Uuid::new_v4()
            ),
            lock_key,
            settings,
            commits: Arc::default(),
        })
    }

    /// Wakes on `commits` (the [`crate::sales::Sales`] of this process)
    /// instead of waiting for the next poll.
    #[must_use]
    pub fn woken_by(mut self, commits: Arc<Notify>) -> Self {
        self.commits = commits;
        self
    }

    /// The shared state, for `/readyz`.
    pub fn status(&self) -> RelayStatus {
        self.status.clone()
    }

    /// This process' name in the checkpoint table.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// Runs until `stop`: waits for the lock, then publishes; on any error
    /// lets the lock go, backs off and starts over.
    pub async fn run(self, stop: CancellationToken) {
        let mut backoff = service_kit::backoff::Backoff::default();
        while !stop.is_cancelled() {
            match self.lead(&stop).await {
                Ok(()) => return,
                Err(error) => {
                    tracing::warn!(
                        topic = %self.settings.relay_topic,
                        error = %format_args!("{error:#}"),
                        retry_in = ?backoff.delay(),
                        "relay stopped publishing; retrying"
                    );
                    // While it cannot publish, the backlog still shows, in
                    // the metrics too when this process was the one
                    // publishing (a standby's are the active relay's).
                    let was_active = self
                        .status
                        .report()
                        .is_some_and(|report| matches!(report.role, Role::Active));
                    if let Ok((events, seconds)) = self.lag_from_checkpoint().await {
                        self.status.lagging(events, seconds, was_active);
                    }
                    self.status.update(|report| {
                        report.role = Role::Starting;
                        report.last_error = Some(format!("{error:#}"));
                    });
                }
            }
            if !backoff.wait(&stop).await {
                return;
            }
        }
    }

    async fn lead(&self, stop: &CancellationToken) -> anyhow::Result<()> {
        let options = self
            .pool
            .connect_options()
            .as_ref()
            .clone()
            .application_name(&self.instance);
        let mut conn = PgConnection::connect_with(&options)
            .await
            .context("connecting to postgres")?;
        // The lock lives as long as this connection. The server probes it
        // after 5 s of silence and drops it after three unanswered probes
        // 2 s apart, or 10 s after data it sent went unacknowledged: a
        // frozen or vanished host loses the lock within seconds.
        sqlx::query(
            "SELECT set_config('tcp_keepalives_idle', '5', false),
                    set_config('tcp_keepalives_interval', '2', false),
                    set_config('tcp_keepalives_count', '3', false),
                    set_config('tcp_user_timeout', '10000', false)",
        )
        .execute(&mut conn)
        .await
        .context("setting the relay connection's keepalives")?;
        let standby_poll = Duration::from_millis(self.settings.relay_standby_poll_ms);
        loop {
            let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
                .bind(self.lock_key)
                .fetch_one(&mut conn)
                .await
                .context("taking the relay lock")?;
            if locked {
                break;
            }
            self.status.update(|report| {
                report.role = Role::Standby;
                report.last_error = None;
            });
            // Another process relays: its gauges tell the lag, and this
            // one's must not keep a figure from when it relayed.
            self.status.not_relaying();
            tokio::select! {
                () = stop.cancelled() => return Ok(()),
                () = tokio::time::sleep(standby_poll) => {}
            }
        }
        tracing::info!(topic = %self.settings.relay_topic, instance = %self.instance, "relay: active");
        ensure_topic(&self.settings).await?;
        // A new producer for every term: after a failure an idempotent
        // producer may be fenced for good (a broker that restarted without
        // its producer state answers with a fatal sequence error).
        // librdkafka times a message from when it is queued, so a slow
        // broker may time out the tail of a full window; what was
        // acknowledged ahead of it is saved, and the next term goes on
        // from there.
        let producer = producer(
            &self.settings.kafka_brokers,
            Duration::from_millis(self.settings.relay_ack_timeout_ms),
        )?;
        let topic = &self.settings.relay_topic;
        let mut stored = checkpoint(&mut conn, topic).await?;
        self.status.update(|report| {
            report.role = Role::Active;
            report.published_through = Some(stored.cursor);
        });
        let poll = Duration::from_millis(self.settings.relay_poll_ms.max(1));
        let in_flight_max = usize::try_from(self.settings.relay_in_flight.max(1)).unwrap_or(1);
        let mut lag_measured = Instant::now() - Duration::from_secs(60);
        // Sent and not yet acknowledged, oldest first: each batch's last
        // place and the acknowledgement of all of it.
        let mut in_flight: VecDeque<(Cursor, usize, Acks)> = VecDeque::new();
        let mut read_through = stored.cursor;
        let mut caught_up = false;
        // Other processes' commits are looked for `poll` after the last
        // read, whatever the relay waited for meanwhile.
        let mut last_read = tokio::time::Instant::now();
        while !stop.is_cancelled() {
            if in_flight.len() < in_flight_max && !caught_up {
                last_read = tokio::time::Instant::now();
                let batch =
                    event_feed::read_after(&mut conn, &read_through, self.settings.relay_batch)
                        .await?;
                caught_up =
                    i64::try_from(batch.len()).unwrap_or(i64::MAX) < self.settings.relay_batch;
                if let Some(last) = batch.last() {
                    let acks = send(&producer, topic, &batch)?;
                    in_flight.push_back((last.cursor, batch.len(), acks));
                    read_through = last.cursor;
                }
            }
            // Acknowledged from the oldest on: the stored cursor moves to
            // the end of that run, never past a batch still in flight.
            let mut acked: Option<(Cursor, usize)> = None;
            let mut failed = None;
            while let Some((cursor, count, acks)) = in_flight.front_mut() {
                match acks.as_mut().now_or_never() {
                    Some(Ok(_)) => {}
                    Some(Err(error)) => {
                        // What was acknowledged before it is saved first,
                        // so the next term does not send it again.
                        failed = Some(error);
                        break;
                    }
                    None => break,
                };
                let (cursor, count) = (*cursor, *count);
                in_flight.pop_front();
                let total = acked.map_or(0, |(_, n)| n) + count;
                acked = Some((cursor, total));
            }
            if let Some((last, published)) = acked {
                let saved =
                    save_checkpoint(&mut conn, topic, &last, stored.rewinds, &self.instance)
                        .await?;
                if saved || !self.follow_rewind(&mut conn, &mut stored).await? {
                    stored.cursor = last;
                } else {
                    // Moved back by `republish`: what is in flight goes out
                    // anyway, and everything from the rewind is sent again.
                    in_flight.clear();
                    read_through = stored.cursor;
                    caught_up = false;
                }
                let published = u64::try_from(published).unwrap_or(u64::MAX);
                metrics::counter!(PUBLISHED).increment(published);
                self.status.update(|report| {
                    report.published_through = Some(stored.cursor);
                    report.published += published;
                    report.last_error = None;
                });
            }
            if let Some(error) = failed {
                return Err(error);
            }
            // Counting the backlog is not free: at most once a second. A
            // busy relay learns of a rewind when a save fails, an idle one
            // here.
            if lag_measured.elapsed() >= Duration::from_secs(1) {
                if self.follow_rewind(&mut conn, &mut stored).await? {
                    in_flight.clear();
                    read_through = stored.cursor;
                    caught_up = false;
                }
                let (events, seconds) = lag(&mut conn, &stored.cursor).await?;
                self.status.lagging(events, seconds, true);
                self.status
                    .update(|report| report.published_through = Some(stored.cursor));
                lag_measured = Instant::now();
            }
            if in_flight.len() >= in_flight_max || (caught_up && !in_flight.is_empty()) {
                // Nothing more to send now: wait for the oldest batch's
                // acknowledgement (or a commit, when there is room).
                let room = in_flight.len() < in_flight_max;
                if let Some((_, _, acks)) = in_flight.front_mut() {
                    tokio::select! {
                        () = stop.cancelled() => {}
                        result = acks.as_mut() => {
                            result?;
                            // Settled at the top of the loop.
                            *acks = Box::pin(std::future::ready(Ok(true)));
                        }
                        () = self.commits.notified(), if room => caught_up = false,
                        () = tokio::time::sleep_until(last_read + poll), if room => caught_up = false,
                    }
                }
            } else if caught_up {
                tokio::select! {
                    () = stop.cancelled() => {}
                    () = self.commits.notified() => {}
                    () = tokio::time::sleep_until(last_read + poll) => {}
                }
                // Whatever woke it, every commit since is read together.
                caught_up = false;
            }
        }
        Ok(())
    }

    /// Starts over from the stored checkpoint if `republish` moved it back
    /// since `stored` was loaded; whether it did.
    async fn follow_rewind(
        &self,
        conn: &mut PgConnection,
        stored: &mut Checkpoint,
    ) -> anyhow::Result<bool> {
        let now = checkpoint(conn, &self.settings.relay_topic).await?;
        if now.rewinds != stored.rewinds {
            tracing::info!(
                topic = %self.settings.relay_topic,
                from = %now.cursor,
                was_at = %stored.cursor,
                "relay: the checkpoint was moved back (republish); publishing again from there"
            );
            *stored = now;
            return Ok(true);
        }
        Ok(false)
    }

    async fn lag_from_checkpoint(&self) -> anyhow::Result<(i64, f64)> {
        let mut conn = self.pool.acquire().await?;
        let stored = checkpoint(&mut conn, &self.settings.relay_topic).await?;
        lag(&mut conn, &stored.cursor).await
    }
}

/// The acknowledgement of a whole batch: `Ok(true)` once Kafka took every
/// message of it.
type Acks = Pin<Box<dyn Future<Output = anyhow::Result<bool>> + Send>>;

/// Sends every event of the batch and waits until Kafka acknowledged them
/// all. Any failure fails the whole batch: it is sent again from the
/// same cursor.
///
/// # Errors
/// When Kafka refuses or does not acknowledge a message in time.
pub async fn publish(
    producer: &FutureProducer,
    topic: &str,
    batch: &[Committed],
) -> anyhow::Result<()> {
    send(producer, topic, batch)?.await?;
    Ok(())
}

/// Queues every event of the batch to the producer, in order, and returns
/// the acknowledgement of all of them.
///
/// # Errors
/// When an event cannot be encoded or queued.
fn send(producer: &FutureProducer, topic: &str, batch: &[Committed]) -> anyhow::Result<Acks> {
    let mut acks = Vec::with_capacity(batch.len());
    for outgoing in batch {
        let event = &outgoing.event;
        let body = serde_json::to_vec(event).context("encoding an envelope")?;
        let key = event.key();
        let record = FutureRecord::to(topic)
            .key(&key)
            .payload(&body)
            .headers(headers_of(event));
        let ack = producer
            .send_result(record)
            .map_err(|(error, _)| error)
            .context("queueing a message")?;
        acks.push(ack);
    }
    Ok(Box::pin(async move {
        for ack in acks {
            ack.await
                .context("the producer went away")?
                .map_err(|(error, _)| error)
                .context("Kafka did not acknowledge a message")?;
        }
        Ok(true)
    }))
}

/// Creates the topic when it is missing.
///
/// # Errors
/// When Kafka is unreachable or refuses.
pub async fn ensure_topic(settings: &RelaySettings) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &settings.kafka_brokers)
        .create()
        .context("creating the Kafka admin client")?;
    let topic = NewTopic::new(
        &settings.relay_topic,
        settings.relay_partitions,
        TopicReplication::Fixed(1),
    );
    let results = admin
        .create_topics(
            &[topic],
            &AdminOptions::new()
                .operation_timeout(Some(Duration::from_secs(10)))
                .request_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .context("creating the topic")?;
    for result in results {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => anyhow::bail!("creating topic {name}: {code}"),
        }
    }
    Ok(())
}

/// The CloudEvents headers of a published event.
pub fn headers_of(event: &domain::PublishedEvent) -> OwnedHeaders {
    let ce_id = format!(
        "{}/{}/{}",
        event.aggregate_type, event.aggregate_id, event.sequence
    );
    let ce_time = event.recorded_at.to_rfc3339();
    let headers = OwnedHeaders::new()
        .insert(header("ce_specversion", "1.0"))
        .insert(header("ce_type", &event.event_type))
        .insert(header("ce_id", &ce_id))
        .insert(header("ce_source", CE_SOURCE))
        .insert(header("ce_time", &ce_time))
        .insert(header("content-type", "application/json"));
    match event.metadata.get("correlation_id") {
        Some(correlation_id) => headers
            .insert(header("correlation_id", correlation_id))
            .insert(header(
                "traceparent",
                &traceparent(correlation_id, event.global_position),
            )),
        None => headers,
    }
}

/// W3C Trace Context's `traceparent` of an event: the trace is the request
/// that caused it (its id when that is a UUID, as the ids command-api makes
/// are; else a UUID derived from it), the parent span the event itself.
pub fn traceparent(correlation_id: &str, global_position: i64) -> String {
    let trace = uuid::Uuid::parse_str(correlation_id)
        .ok()
        .filter(|id| !id.is_nil())
        .unwrap_or_else(|| {
            uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, correlation_id.as_bytes())
        });
    format!("00-{}-{:016x}-01", trace.simple(), global_position)
}

fn header<'a>(key: &'a str, value: &'a str) -> Header<'a, &'a str> {
    Header {
        key,
        value: Some(value),
    }
}

/// Where the relay of a topic stands, as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Checkpoint {
    /// Every event up to here was acknowledged by Kafka (or, after a
    /// rewind, is to be published again from here).
    pub cursor: Cursor,
    /// How many times `republish` moved the checkpoint back.
    pub rewinds: i64,
}

/// The stored checkpoint of `topic`, or the start of the log.
///
/// # Errors
/// Store errors.
pub async fn checkpoint(conn: &mut PgConnection, topic: &str) -> anyhow::Result<Checkpoint> {
    let row = sqlx::query(
        "SELECT tx_id, global_position, rewinds FROM relay_checkpoints WHERE topic = $1",
    )
    .bind(topic)
    .fetch_optional(conn)
    .await
    .context("reading the relay checkpoint")?;
    Ok(match row {
        Some(row) => Checkpoint {
            cursor: Cursor {
                tx_id: row.try_get("tx_id")?,
                global_position: row.try_get("global_position")?,
            },
            rewinds: row.try_get("rewinds")?,
        },
        None => Checkpoint {
            cursor: Cursor::START,
            rewinds: 0,
        },
    })
}

/// Moves the checkpoint forward to `cursor`, unless it was rewound since
/// the relay loaded it (`rewinds` is no longer the count it loaded) or is
/// already past `cursor`. Whether it moved.
async fn save_checkpoint(
    conn: &mut PgConnection,
    topic: &str,
    cursor: &Cursor,
    rewinds: i64,
    instance: &str,
) -> anyhow::Result<bool> {
    let saved = sqlx::query(
        "INSERT INTO relay_checkpoints (topic, tx_id, global_position, relay)
         VALUES ($1, $2, $3, $4)
         ON CONFLICT (topic) DO UPDATE
            SET tx_id = excluded.tx_id, global_position = excluded.global_position,
                relay = excluded.relay, updated_at = now()
          WHERE (relay_checkpoints.tx_id, relay_checkpoints.global_position)
              < (excluded.tx_id, excluded.global_position)
            AND relay_checkpoints.rewinds = $5",
    )
    .bind(topic)
    .bind(cursor.tx_id)
    .bind(cursor.global_position)
    .bind(instance)
    .bind(rewinds)
    .execute(conn)
    .await
    .context("saving the relay checkpoint")?;
    Ok(saved.rows_affected() == 1)
}

/// Events after `cursor` and the age of the oldest of them, in seconds.
async fn lag(conn: &mut PgConnection, cursor: &Cursor) -> anyhow::Result<(i64, f64)> {
    let row = sqlx::query(
        "SELECT count(*) AS events,
                COALESCE(EXTRACT(EPOCH FROM now() - min(recorded_at))::float8, 0) AS seconds
           FROM events
          WHERE (tx_id, global_position) > ($1, $2)",
    )
    .bind(cursor.tx_id)
    .bind(cursor.global_position)
    .fetch_one(conn)
    .await
    .context("measuring the relay's lag")?;
    Ok((row.try_get("events")?, row.try_get("seconds")?))
}

#[cfg(test)]
mod tests {
    use super::traceparent;

    #[test]
    fn the_trace_is_the_request_and_the_span_the_event() {
        assert_eq!(
            traceparent("0b8e7f3a-52c1-4d7e-9a0f-3c2b1d4e5f60", 255),
            "00-0b8e7f3a52c14d7e9a0f3c2b1d4e5f60-00000000000000ff-01"
        );
        // A client's own id that is not a UUID: derived, the same each time.
        let derived = traceparent("checkout-42", 1);
        assert_eq!(derived, traceparent("checkout-42", 1));
        assert_ne!(derived, traceparent("checkout-43", 1));
        let parts: Vec<&str> = derived.split('-').collect();
        assert_eq!(parts.len(), 4);
        assert_eq!(parts[1].len(), 32);
        assert!(parts[1].chars().all(|c| c.is_ascii_hexdigit()));
    }
}
