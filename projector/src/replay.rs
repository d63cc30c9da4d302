//! `projector replay`: rebuilds every read model from the Postgres log into a
//! new generation, catches up with the live topic, and switches the query
//! side over in one write. The live projector and the query side keep
//! working on the old generation until the switch.
//!
//! No event can fall between the log and the topic: the replay first reads
//! where the live group's offsets stand, then reads the log. Everything
//! below those offsets was applied by the live projector, so it was
//! committed, so the log read (which comes after) holds it; everything from
//! those offsets on is consumed from the topic. Overlap is harmless.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::Context;
use domain::PublishedEvent;
use event_feed::Cursor;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::live::{group_of, partitions_of, ConsumerSettings, Projection, Until};
use crate::store::ReadStore;

/// Settings of a replay.
#[derive(Debug, Clone, clap::Args)]
pub struct ReplaySettings {
    /// The Postgres event log.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/ticketing"
    )]
    pub database_url: String,
    /// Events read from the log per batch.
    #[arg(long, env = "REPLAY_BATCH", default_value_t = 5000,
          value_parser = clap::value_parser!(i64).range(1..))]
    pub replay_batch: i64,
    /// How long the old generation is kept after the switch, so that readers
    /// and writers still on it finish, in seconds.
    #[arg(long, env = "REPLAY_GRACE_SECS", default_value_t = 5)]
    pub grace_secs: u64,
}

/// What a replay did.
#[derive(Debug, Clone, Copy, Default)]
pub struct ReplayReport {
    /// The generation replaced.
    pub from: u32,
    /// The generation built and switched to.
    pub to: u32,
    /// Events read from the log and applied: every event up to `through`.
    pub events: u64,
    /// The log's high-water mark: its last event applied.
    pub through: Cursor,
    /// Time spent reading and applying the log.
    pub log_secs: f64,
    /// Time from start to switch.
    pub total_secs: f64,
}

/// Runs a replay to the end.
///
/// # Errors
/// Any store, log or broker failure: the replay stops, the query side stays
/// on the old generation, and the half-built one is dropped by the next
/// replay.
pub async fn replay(
    store: &ReadStore,
    pool: &PgPool,
    consumer: &ConsumerSettings,
    settings: &ReplaySettings,
    stop: &CancellationToken,
) -> anyhow::Result<ReplayReport> {
    let started = Instant::now();
    let pointer = store.pointer().await?;
    let from = pointer.current;
    let to = from.max(pointer.building.unwrap_or(0)) + 1;
    if let Some(stale) = pointer.building {
        tracing::warn!(
            generation = stale,
            "dropping a generation an earlier replay left half-built"
        );
        store.drop_generation(stale).await?;
    }
    store.drop_generation(to).await?;
    store.start_building(to).await?;
    store.prepare(to).await?;
    tracing::info!(from, to, "replay started");

    let start = live_offsets(consumer, from).await?;
    hand_over_offsets(consumer, to, &start).await?;

    let log_started = Instant::now();
    let mut conn = pool
        .acquire()
        .await
        .context("connecting to the event log")?;
    // Every event up to the high-water mark must have been applied: the
    // reading counts the log below it and fails if that is not what it
    // handed over (a log once read in text order lost a third this way,
    // and the replay said it was done). A refused event means the same: a
    // log read whole and in order contradicts nothing.
    let mut refused = 0_usize;
    let reading = event_feed::read_pages(
        &mut conn,
        Cursor::START,
        None,
        settings.replay_batch,
        async |chunk| {
            if stop.is_cancelled() {
                anyhow::bail!("replay stopped before the switch; generation {from} still answers");
            }
            let published: Vec<PublishedEvent> = chunk.into_iter().map(|c| c.event).collect();
            refused += store.apply(to, &published).await?.rejected;
            Ok(())
        },
    )
    .await
    .with_context(|| format!("replaying the log into generation {to}"))?;
    let events = reading.events;
    anyhow::ensure!(
        refused == 0,
        "{refused} of the log's {events} events were refused by the read models (logged \
         above); generation {from} still answers"
    );
    drop(conn);
    let log_secs = log_started.elapsed().as_secs_f64();
    tracing::info!(
        events,
        through = %reading.through,
        log_secs,
        "log applied, every event up to its high-water mark; catching up with the topic"
    );

    let projection = Projection::new(consumer.clone(), store.clone());
    projection
        .run_generation(to, Until::CaughtUp { start }, stop)
        .await?;
    if stop.is_cancelled() {
        anyhow::bail!("replay stopped before the switch; generation {from} still answers");
    }
    store.switch_to(to).await?;
    let total_secs = started.elapsed().as_secs_f64();
    tracing::info!(from, to, "query side switched to the new generation");
    tokio::time::sleep(Duration::from_secs(settings.grace_secs)).await;
    store.drop_generation(from).await?;
    Ok(ReplayReport {
        from,
        to,
        events,
        through: reading.through,
        log_secs,
        total_secs,
    })
}

/// Where the live group of `generation` stands on every partition: its
/// committed offset, or the start of the partition when it has none.
async fn live_offsets(
    settings: &ConsumerSettings,
    generation: u32,
) -> anyhow::Result<BTreeMap<i32, i64>> {
    let consumer = group_consumer(settings, generation)?;
    let topic = settings.topic.clone();
    tokio::task::spawn_blocking(move || -> anyhow::Result<BTreeMap<i32, i64>> {
        let timeout = Duration::from_secs(10);
        let partitions = partitions_of(&consumer, &topic)?;
        let mut list = TopicPartitionList::new();
        for partition in &partitions {
            list.add_partition(&topic, *partition);
        }
        let committed = consumer
            .committed_offsets(list, timeout)
            .context("reading the live group's offsets")?;
        let mut start = BTreeMap::new();
        for partition in partitions {
            let offset = match committed
                .find_partition(&topic, partition)
                .map(|p| p.offset())
            {
                Some(Offset::Offset(n)) => n,
                _ => {
                    consumer
                        .fetch_watermarks(&topic, partition, timeout)
                        .context("reading a partition's first offset")?
                        .0
                }
            };
            start.insert(partition, offset);
        }
        Ok(start)
    })
    .await
    .context("offset task failed")?
}

/// Starts the new generation's group at `start`.
async fn hand_over_offsets(
    settings: &ConsumerSettings,
    generation: u32,
    start: &BTreeMap<i32, i64>,
) -> anyhow::Result<()> {
    if start.is_empty() {
        return Ok(());
    }
    let consumer = group_consumer(settings, generation)?;
    let mut list = TopicPartitionList::new();
    for (partition, offset) in start {
        list.add_partition_offset(&settings.topic, *partition, Offset::Offset(*offset))?;
    }
    tokio::task::spawn_blocking(move || consumer.commit(&list, CommitMode::Sync))
        .await
        .context("commit task failed")?
        .context("starting the new generation's consumer group")
}

fn group_consumer(settings: &ConsumerSettings, generation: u32) -> anyhow::Result<BaseConsumer> {
    ClientConfig::new()
        .set("bootstrap.servers", &settings.kafka_brokers)
        .set("group.id", group_of(&settings.group, generation))
        .set("enable.auto.commit", "false")
        .create()
        .context("invalid Kafka consumer settings")
}
