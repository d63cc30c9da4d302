//! The live projection: a Kafka consumer group that applies the event topic
//! to the current read-model generation.
//!
//! Per batch: collect up to `batch` messages (or what arrives within
//! `linger`), apply them in one MongoDB round of writes, and only then
//! commit the offsets. A crash between the write and the commit replays the
//! batch, which per-stream sequences make harmless. MongoDB down: the batch
//! is retried with backoff and nothing is committed until it lands.
//!
//! Each generation of read models has its own consumer group
//! (`{group}.g{n}`), so a replay can hand a new generation over with the
//! offsets it reached: the live projector notices the switch, leaves the old
//! group and continues in the new one from there.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use domain::PublishedEvent;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::store::{ReadStore, StoreError};

/// Settings of the consumer.
#[derive(Debug, Clone, clap::Args)]
pub struct ConsumerSettings {
    /// Kafka bootstrap brokers, comma-separated.
    #[arg(long, env = "KAFKA_BROKERS", default_value = "127.0.0.1:9092")]
    pub kafka_brokers: String,
    /// The event topic.
    #[arg(long, env = "PROJECTOR_TOPIC", default_value = domain::EVENTS_TOPIC)]
    pub topic: String,
    /// Consumer group; each read-model generation `n` uses `{group}.g{n}`.
    #[arg(long, env = "PROJECTOR_GROUP", default_value = "ticketing-projector")]
    pub group: String,
    /// Most events applied in one batch.
    #[arg(long, env = "PROJECTOR_BATCH", default_value_t = 500)]
    pub batch: usize,
    /// How long a batch waits for more events once it has one, in ms.
    #[arg(long, env = "PROJECTOR_LINGER_MS", default_value_t = 20)]
    pub linger_ms: u64,
    /// Longest the broker may hold a fetch with nothing new, in ms. Tansu
    /// answers a waiting fetch only when this runs out, so it bounds how
    /// stale the read side is when idle (librdkafka's default is 500).
    #[arg(long, env = "PROJECTOR_FETCH_WAIT_MS", default_value_t = 20)]
    pub fetch_wait_ms: u64,
}

/// The consumer group of read-model generation `generation`.
pub fn group_of(group: &str, generation: u32) -> String {
    format!("{group}.g{generation}")
}

/// What `/readyz` shows of the projection.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    /// The generation being written.
    pub generation: u32,
    /// Events applied since start (duplicates included).
    pub events: u64,
    /// Events refused as inconsistent with the read models (logged).
    pub rejected: u64,
    /// The last error, if the last attempt failed.
    pub last_error: Option<String>,
}

/// Shared view of the projection's progress.
#[derive(Debug, Clone, Default)]
pub struct Status(Arc<Mutex<Report>>);

impl Status {
    /// A copy of the report.
    pub fn report(&self) -> Report {
        self.0.lock().map(|r| r.clone()).unwrap_or_default()
    }

    fn update(&self, change: impl FnOnce(&mut Report)) {
        if let Ok(mut report) = self.0.lock() {
            change(&mut report);
        }
    }
}

/// When [`Projection::run_generation`] returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Until {
    /// When the query side is switched to another generation.
    Switched,
    /// When every partition is consumed up to where it ended when the run
    /// began; `start` is where the group's offsets stood then.
    CaughtUp {
        /// Next offset per partition.
        start: BTreeMap<i32, i64>,
    },
}

/// The projection of the event topic into the read models.
#[derive(Debug, Clone)]
pub struct Projection {
    settings: ConsumerSettings,
    store: ReadStore,
    status: Status,
}

const IDLE: Duration = Duration::from_millis(500);
const KAFKA_TIMEOUT: Duration = Duration::from_secs(10);

impl Projection {
    /// A projection with these settings into `store`.
    pub fn new(settings: ConsumerSettings, store: ReadStore) -> Self {
        Self {
            settings,
            store,
            status: Status::default(),
        }
    }

    /// Its progress.
    pub fn status(&self) -> Status {
        self.status.clone()
    }

    /// Projects into whatever generation is current, following switches,
    /// until `stop`.
    ///
    /// # Errors
    /// Only settings errors; store and broker failures are retried.
    pub async fn run(&self, stop: CancellationToken) -> anyhow::Result<()> {
        while !stop.is_cancelled() {
            let generation = match self.store.pointer().await {
                Ok(pointer) => pointer.current,
                Err(error) => {
                    self.failed(&error);
                    pause(&stop, Duration::from_secs(1)).await;
                    continue;
                }
            };
            if let Err(error) = self.store.prepare(generation).await {
                self.failed(&error);
                pause(&stop, Duration::from_secs(1)).await;
                continue;
            }
            self.status.update(|r| r.generation = generation);
            tracing::info!(generation, "projecting");
            self.run_generation(generation, Until::Switched, &stop)
                .await?;
        }
        Ok(())
    }

    /// Consumes into `generation` with its own group until `until` or `stop`.
    ///
    /// # Errors
    /// Consumer set-up errors.
    pub async fn run_generation(
        &self,
        generation: u32,
        until: Until,
        stop: &CancellationToken,
    ) -> anyhow::Result<()> {
        let consumer: Arc<StreamConsumer> = Arc::new(
            ClientConfig::new()
                .set("bootstrap.servers", &self.settings.kafka_brokers)
                .set("group.id", group_of(&self.settings.group, generation))
                .set("enable.auto.commit", "false")
                .set("auto.offset.reset", "earliest")
                .set("fetch.wait.max.ms", self.settings.fetch_wait_ms.to_string())
                .create()
                .context("invalid Kafka consumer settings")?,
        );
        if !self.assign_every_partition(&consumer, stop).await? {
            return Ok(());
        }
        let mut next = match &until {
            Until::CaughtUp { start } => start.clone(),
            Until::Switched => BTreeMap::new(),
        };
        // A catch-up ends at the topic's end as it was when the catch-up
        // began, not when the topic goes idle: during an on-sale it never
        // does. What arrives later is the new generation's group's to apply,
        // from the offsets this run commits.
        let mut end: Option<BTreeMap<i32, i64>> = None;
        loop {
            if stop.is_cancelled() {
                return Ok(());
            }
            if let Until::CaughtUp { .. } = until {
                if end.is_none() {
                    end = self.end_offsets(&consumer).await;
                }
                if end.as_ref().is_some_and(|end| reached(&next, end)) {
                    return Ok(());
                }
            }
            let batch = self.collect(&consumer).await;
            if batch.offsets.is_empty() {
                if until == Until::Switched && self.switched_from(generation).await {
                    return Ok(());
                }
                continue;
            }
            if until == Until::Switched && self.switched_from(generation).await {
                // Not applied, not committed: the new generation's group
                // starts where the replay left it.
                return Ok(());
            }
            if !self.apply(generation, &batch.events, stop).await {
                return Ok(());
            }
            commit(&consumer, &self.settings.topic, &batch.offsets).await;
            for (partition, offset) in &batch.offsets {
                next.insert(*partition, offset + 1);
            }
        }
    }

    /// Up to `batch` messages: waits [`IDLE`] for the first, then `linger`.
    async fn collect(&self, consumer: &StreamConsumer) -> Batch {
        let mut batch = Batch::default();
        match tokio::time::timeout(IDLE, consumer.recv()).await {
            Err(_) => return batch,
            Ok(Err(error)) => {
                tracing::warn!(%error, "kafka consumer error");
                tokio::time::sleep(Duration::from_millis(200)).await;
                return batch;
            }
            Ok(Ok(message)) => batch.add(&message),
        }
        let deadline = Instant::now() + Duration::from_millis(self.settings.linger_ms);
        while batch.offsets.len() < self.settings.batch.max(1)
            && batch.events.len() < self.settings.batch.max(1)
        {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, consumer.recv()).await {
                Ok(Ok(message)) => batch.add(&message),
                Ok(Err(error)) => {
                    tracing::warn!(%error, "kafka consumer error");
                    break;
                }
                Err(_) => break,
            }
        }
        batch
    }

    /// Applies a batch, retrying with backoff while MongoDB fails. False when
    /// stopped first.
    async fn apply(
        &self,
        generation: u32,
        events: &[PublishedEvent],
        stop: &CancellationToken,
    ) -> bool {
        let mut backoff = Duration::from_millis(200);
        loop {
            match self.store.apply(generation, events).await {
                Ok(applied) => {
                    self.status.update(|r| {
                        r.events += events.len() as u64;
                        r.rejected += applied.rejected as u64;
                        r.last_error = None;
                    });
                    return true;
                }
                Err(error) => {
                    self.failed(&error);
                    if !pause(stop, backoff).await {
                        return false;
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    async fn switched_from(&self, generation: u32) -> bool {
        match self.store.pointer().await {
            Ok(pointer) => pointer.current != generation,
            Err(error) => {
                self.failed(&error);
                false
            }
        }
    }

    /// Takes every partition of the topic, each from the group's committed
    /// offset (the start of the partition when there is none), waiting for
    /// the topic to exist. False when stopped first.
    ///
    /// One projector reads the whole topic, so it assigns the partitions to
    /// itself rather than joining the group: Tansu 0.6.0 keeps a SIGKILLed
    /// member as the group's leader, and a projector restarted after one was
    /// assigned no partition and never resumed (observed for minutes). The
    /// group still holds the committed offsets.
    async fn assign_every_partition(
        &self,
        consumer: &Arc<StreamConsumer>,
        stop: &CancellationToken,
    ) -> anyhow::Result<bool> {
        loop {
            let found = {
                let consumer = Arc::clone(consumer);
                let topic = self.settings.topic.clone();
                tokio::task::spawn_blocking(move || -> anyhow::Result<TopicPartitionList> {
                    let mut list = TopicPartitionList::new();
                    for partition in partitions_of(consumer.as_ref(), &topic)? {
                        list.add_partition_offset(&topic, partition, Offset::Stored)?;
                    }
                    Ok(list)
                })
                .await
                .context("metadata task failed")?
            };
            match found {
                Ok(list) if list.count() > 0 => {
                    consumer
                        .assign(&list)
                        .context("cannot assign the event topic's partitions")?;
                    return Ok(true);
                }
                Ok(_) => tracing::warn!(topic = %self.settings.topic, "no such topic yet; waiting"),
                Err(error) => tracing::warn!("cannot read the event topic's partitions: {error:#}"),
            }
            if !pause(stop, Duration::from_secs(1)).await {
                return Ok(false);
            }
        }
    }

    /// The next offset past the end of every partition, or `None` when the
    /// broker cannot say now.
    async fn end_offsets(&self, consumer: &Arc<StreamConsumer>) -> Option<BTreeMap<i32, i64>> {
        let consumer = Arc::clone(consumer);
        let topic = self.settings.topic.clone();
        tokio::task::spawn_blocking(move || -> anyhow::Result<BTreeMap<i32, i64>> {
            let mut end = BTreeMap::new();
            for partition in partitions_of(consumer.as_ref(), &topic)? {
                let (_, high) = consumer.fetch_watermarks(&topic, partition, KAFKA_TIMEOUT)?;
                end.insert(partition, high);
            }
            Ok(end)
        })
        .await
        .map_err(anyhow::Error::from)
        .and_then(|r| r)
        .map_err(|error| tracing::warn!("cannot read the topic's end offsets: {error:#}"))
        .ok()
    }

    fn failed(&self, error: &StoreError) {
        tracing::warn!(%error, "read models unavailable; retrying");
        self.status
            .update(|r| r.last_error = Some(error.to_string()));
    }
}

/// The partitions of `topic`; none while it does not exist. Blocking.
///
/// # Errors
/// When the broker cannot be asked.
pub fn partitions_of<C, X>(consumer: &C, topic: &str) -> anyhow::Result<Vec<i32>>
where
    C: Consumer<X>,
    X: rdkafka::consumer::ConsumerContext,
{
    let metadata = consumer
        .fetch_metadata(Some(topic), KAFKA_TIMEOUT)
        .context("reading the event topic's partitions")?;
    Ok(metadata
        .topics()
        .iter()
        .filter(|t| t.name() == topic && t.error().is_none())
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect())
}

/// Whether `next` is at or past `end` on every partition.
fn reached(next: &BTreeMap<i32, i64>, end: &BTreeMap<i32, i64>) -> bool {
    end.iter()
        .all(|(partition, end)| next.get(partition).copied().unwrap_or(0) >= *end)
}

/// Messages of one batch: the decodable events, and the last offset seen
/// per partition (undecodable messages are logged and passed over).
#[derive(Debug, Default)]
struct Batch {
    events: Vec<PublishedEvent>,
    offsets: BTreeMap<i32, i64>,
}

impl Batch {
    fn add(&mut self, message: &impl Message) {
        self.offsets.insert(message.partition(), message.offset());
        match message
            .payload()
            .map(serde_json::from_slice::<PublishedEvent>)
        {
            Some(Ok(event)) => self.events.push(event),
            Some(Err(error)) => tracing::error!(
                partition = message.partition(),
                offset = message.offset(),
                %error,
                "a message on the event topic is not an event envelope; passed over"
            ),
            None => tracing::error!(
                partition = message.partition(),
                offset = message.offset(),
                "an empty message on the event topic; passed over"
            ),
        }
    }
}

/// Commits `offsets` (last applied per partition). A failed commit only
/// means the batch is applied again later, which changes nothing.
async fn commit(consumer: &Arc<StreamConsumer>, topic: &str, offsets: &BTreeMap<i32, i64>) {
    let mut list = TopicPartitionList::new();
    for (partition, offset) in offsets {
        if let Err(error) = list.add_partition_offset(topic, *partition, Offset::Offset(offset + 1))
        {
            tracing::warn!(%error, "cannot build an offset commit");
            return;
        }
    }
    let consumer = Arc::clone(consumer);
    let committed =
        tokio::task::spawn_blocking(move || consumer.commit(&list, CommitMode::Sync)).await;
    match committed {
        Ok(Ok(())) => {}
        Ok(Err(error)) => {
            tracing::warn!(%error, "offset commit failed; the batch may be applied again")
        }
        Err(error) => tracing::warn!(%error, "offset commit task failed"),
    }
}

/// Sleeps `delay` unless stopped first. False when stopped.
pub async fn pause(stop: &CancellationToken, delay: Duration) -> bool {
    tokio::select! {
        () = stop.cancelled() => false,
        () = tokio::time::sleep(delay) => true,
    }
}
