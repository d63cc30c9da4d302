//! Reading back what was published to a Kafka topic, and checking it
//! against the event log.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{ensure, Context};
use domain::envelope::PublishedEvent;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use sqlx::{PgPool, Row};
use tokio::time::Instant;

use crate::log_order::Place;
use crate::{kafka_brokers, unique_name};

/// One message read back.
#[derive(Debug, Clone)]
pub struct Received {
    /// Its partition.
    pub partition: i32,
    /// Its offset there.
    pub offset: i64,
    /// The message key.
    pub key: Option<String>,
    /// Its headers, by name.
    pub headers: BTreeMap<String, String>,
    /// The decoded body.
    pub event: PublishedEvent,
}

/// Reads every partition of `topic` on the test broker from the beginning
/// until `done` says enough or `timeout` passes; returns what it read either
/// way.
///
/// # Errors
/// When Kafka is unreachable, the topic never appears, or a body is not an
/// envelope.
pub async fn read_topic(
    topic: &str,
    timeout: Duration,
    done: impl Fn(&[Received]) -> bool,
) -> anyhow::Result<Vec<Received>> {
    read_topic_from(&kafka_brokers(), topic, timeout, done).await
}

/// [`read_topic`] on the broker at `brokers`.
///
/// # Errors
/// As [`read_topic`].
pub async fn read_topic_from(
    brokers: &str,
    topic: &str,
    timeout: Duration,
    done: impl Fn(&[Received]) -> bool,
) -> anyhow::Result<Vec<Received>> {
    let started = Instant::now();
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", unique_name("reader"))
        .set("enable.auto.commit", "false")
        .create()
        .context("creating a Kafka consumer")?;
    let partitions = loop {
        let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(5));
        let count = metadata
            .ok()
            .and_then(|m| m.topics().first().map(|t| t.partitions().len()))
            .unwrap_or(0);
        if count > 0 {
            break count;
        }
        // Metadata can lag behind a busy broker: finding the topic gets its
        // own 30 s, whatever the reading time asked for.
        ensure!(
            started.elapsed() < Duration::from_secs(30),
            "topic {topic} never appeared"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let mut assignment = TopicPartitionList::new();
    for partition in 0..partitions {
        let partition = i32::try_from(partition)?;
        assignment.add_partition_offset(topic, partition, Offset::Beginning)?;
    }
    consumer.assign(&assignment)?;
    let deadline = Instant::now() + timeout;
    let mut received = Vec::new();
    while !done(&received) {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        let Ok(message) = tokio::time::timeout(left, consumer.recv()).await else {
            break;
        };
        // Consumer errors such as "all brokers down" are reports, not the end:
        // librdkafka keeps reconnecting, and the deadline bounds the wait.
        let message = match message {
            Ok(message) => message,
            Err(error) => {
                eprintln!("reading {topic}: {error}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let body = message.payload().context("a message without a body")?;
        let event: PublishedEvent =
            serde_json::from_slice(body).context("a body that is not an envelope")?;
        let mut headers = BTreeMap::new();
        if let Some(all) = message.headers() {
            for header in all.iter() {
                let value = header
                    .value
                    .map(|v| String::from_utf8_lossy(v).into_owned())
                    .unwrap_or_default();
                headers.insert(header.key.to_owned(), value);
            }
        }
        received.push(Received {
            partition: message.partition(),
            offset: message.offset(),
            key: message
                .key()
                .map(|k| String::from_utf8_lossy(k).into_owned()),
            headers,
            event,
        });
    }
    Ok(received)
}

/// How many distinct `(aggregate type, aggregate id, sequence)` were read.
pub fn distinct_events(received: &[Received]) -> usize {
    let mut seen = std::collections::BTreeSet::new();
    for r in received {
        seen.insert((
            r.event.aggregate_type.as_str(),
            r.event.aggregate_id.as_str(),
            r.event.sequence,
        ));
    }
    seen.len()
}

/// Checks what was read against the whole log: every event of the log was
/// published, nothing else was, and after dropping repeats of an
/// `(aggregate, sequence)` already seen, every stream arrives whole and in
/// order (1, 2, 3, …) on the partition of its show. Returns how many
/// messages were repeats.
///
/// # Errors
/// On the first difference.
pub async fn check_against_log(pool: &PgPool, received: &[Received]) -> anyhow::Result<usize> {
    let rows = sqlx::query(
        "SELECT aggregate_type, aggregate_id, max(sequence) AS last, count(*) AS events
           FROM events GROUP BY aggregate_type, aggregate_id",
    )
    .fetch_all(pool)
    .await?;
    let mut log = BTreeMap::new();
    for row in rows {
        let stream: (String, String) =
            (row.try_get("aggregate_type")?, row.try_get("aggregate_id")?);
        let last: i64 = row.try_get("last")?;
        let events: i64 = row.try_get("events")?;
        ensure!(
            last == events,
            "stream {stream:?} has holes in the log itself"
        );
        log.insert(stream, u64::try_from(last)?);
    }
    // Messages of one partition arrive in offset order.
    let mut ordered: Vec<&Received> = received.iter().collect();
    ordered.sort_by_key(|r| (r.partition, r.offset));
    let mut seen: BTreeMap<(String, String), (u64, i32)> = BTreeMap::new();
    let mut repeats = 0;
    for r in ordered {
        let e = &r.event;
        ensure!(
            r.key.as_deref() == Some(e.key().as_str()),
            "{} {}#{} was keyed {:?}, not by its show",
            e.aggregate_type,
            e.aggregate_id,
            e.sequence,
            r.key
        );
        let stream = (e.aggregate_type.clone(), e.aggregate_id.clone());
        let (last, partition) = seen.get(&stream).copied().unwrap_or((0, r.partition));
        ensure!(
            partition == r.partition,
            "stream {stream:?} was spread over partitions {partition} and {}",
            r.partition
        );
        if e.sequence <= last {
            repeats += 1;
            continue;
        }
        ensure!(
            e.sequence == last + 1,
            "stream {stream:?}: #{} arrived after #{last} (offset {} of partition {})",
            e.sequence,
            r.offset,
            r.partition
        );
        seen.insert(stream, (e.sequence, r.partition));
    }
    for (stream, last) in &log {
        let published = seen.get(stream).map_or(0, |(s, _)| *s);
        ensure!(
            published == *last,
            "stream {stream:?}: the log has {last} events, Kafka {published}"
        );
    }
    ensure!(
        seen.len() == log.len(),
        "Kafka has streams that are not in the log"
    );
    Ok(repeats)
}

/// Events in the log.
///
/// # Errors
/// Store errors.
pub async fn events_in_log(pool: &PgPool) -> anyhow::Result<usize> {
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(pool)
        .await?;
    Ok(usize::try_from(count)?)
}

/// Checks that `received` holds every event of `log` (in commit order) and
/// nothing else, and that each partition holds its share of it in commit
/// order (the order the relay must publish in, not merely each stream's
/// own) once repeats are dropped: delivery is at least once, and a batch
/// sent again after a lost acknowledgement repeats what was sent. Returns
/// how many messages were repeats.
///
/// # Errors
/// On the first event missing, foreign or out of order.
pub fn check_commit_order(log: &[Place], received: &[Received]) -> anyhow::Result<usize> {
    let index: BTreeMap<(&str, &str, u64), usize> = log
        .iter()
        .enumerate()
        .map(|(i, p)| {
            (
                (
                    p.aggregate_type.as_str(),
                    p.aggregate_id.as_str(),
                    p.sequence,
                ),
                i,
            )
        })
        .collect();
    let mut ordered: Vec<&Received> = received.iter().collect();
    ordered.sort_by_key(|r| (r.partition, r.offset));
    let mut last: BTreeMap<i32, usize> = BTreeMap::new();
    let mut seen = vec![false; log.len()];
    let mut repeats = 0;
    for r in ordered {
        let e = &r.event;
        let at = *index
            .get(&(
                e.aggregate_type.as_str(),
                e.aggregate_id.as_str(),
                e.sequence,
            ))
            .with_context(|| {
                format!(
                    "{} {}#{} is not in the log",
                    e.aggregate_type, e.aggregate_id, e.sequence
                )
            })?;
        if seen[at] {
            repeats += 1;
            continue;
        }
        seen[at] = true;
        if let Some(before) = last.insert(r.partition, at) {
            ensure!(
                before < at,
                "partition {}: the log's event {at} (tx {}) came after its event {before} (tx {})",
                r.partition,
                log[at].tx_id,
                log[before].tx_id
            );
        }
    }
    let missing = seen.iter().filter(|s| !**s).count();
    ensure!(
        missing == 0,
        "{missing} of the log's {} events were not published",
        log.len()
    );
    Ok(repeats)
}
