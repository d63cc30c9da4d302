//! Proves the real clients work against the real servers that `make up`
//! starts: postgres-es on Postgres, rdkafka on the Kafka broker, the mongodb
//! driver on the MongoDB server. Each test uses its own database, topic or
//! consumer group.

use std::time::Duration;

use anyhow::{ensure, Context};
use cqrs_es::EventStore;
use domain::{
    Cents, Row, RowName, SeatMap, Section, SectionName, Show, ShowCommand, ShowDetails, ShowEvent,
    ShowId, ShowName, VenueName, EVENTS_TOPIC,
};
use mongodb::bson::{doc, Document};
use postgres_es::{postgres_cqrs, PostgresEventRepository};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use ticketing_tests::{kafka_brokers, mongodb_uri, unique_name, TestDatabase};
use uuid::Uuid;

fn jazz_night(show_id: ShowId) -> anyhow::Result<ShowDetails> {
    Ok(ShowDetails {
        show_id,
        name: ShowName::new("Jazz Night")?,
        venue: VenueName::new("Blue Note")?,
        starts_at: "2027-03-01T20:00:00Z".parse()?,
        seat_map: SeatMap::new(vec![Section {
            name: SectionName::new("VIP")?,
            price_cents: Cents::new(22_500)?,
            rows: vec![Row {
                row: RowName::new("A")?,
                seats: 10,
            }],
        }])?,
        max_seats_per_user: None,
    })
}

#[tokio::test]
async fn postgres_es_appends_and_loads_an_event() -> anyhow::Result<()> {
    let db = TestDatabase::create().await?;
    let show_id = ShowId::from_uuid(Uuid::new_v4());
    let details = jazz_night(show_id)?;

    let cqrs = postgres_cqrs::<Show>(db.pool.clone(), vec![], ());
    cqrs.execute(
        &show_id.to_string(),
        ShowCommand::CreateShow(details.clone()),
    )
    .await
    .context("creating a show through postgres-es")?;
    // The same command again meets the stored event: the show exists.
    let again = cqrs
        .execute(
            &show_id.to_string(),
            ShowCommand::CreateShow(details.clone()),
        )
        .await;
    ensure!(again.is_err(), "a show was created twice");

    let store =
        cqrs_es::persist::PersistedEventStore::<PostgresEventRepository, Show>::new_event_store(
            PostgresEventRepository::new(db.pool.clone()),
        );
    let events = store.load_events(&show_id.to_string()).await?;
    ensure!(
        events.len() == 1,
        "expected one event, got {}",
        events.len()
    );
    ensure!(events[0].sequence == 1);
    ensure!(events[0].payload == ShowEvent::ShowCreated(details));

    // The columns the relay depends on are filled in by Postgres itself.
    let (position, tx_id): (i64, String) =
        sqlx::query_as("SELECT global_position, tx_id::text FROM events WHERE aggregate_id = $1")
            .bind(show_id.to_string())
            .fetch_one(&db.pool)
            .await?;
    ensure!(
        position >= 1 && tx_id.parse::<u64>().is_ok(),
        "relay columns: {position} {tx_id}"
    );

    // The log is append-only.
    let update = sqlx::query("UPDATE events SET event_type = 'Tampered'")
        .execute(&db.pool)
        .await;
    ensure!(update.is_err(), "the events table accepted an UPDATE");
    let delete = sqlx::query("DELETE FROM events").execute(&db.pool).await;
    ensure!(delete.is_err(), "the events table accepted a DELETE");

    db.drop_database().await
}

#[tokio::test]
async fn kafka_idempotent_producer_and_consumer_group_round_trip() -> anyhow::Result<()> {
    let brokers = kafka_brokers();
    let topic = unique_name("smoke");
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()?;
    let created = admin
        .create_topics(
            &[NewTopic::new(&topic, 1, TopicReplication::Fixed(1))],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .context("kafka is unreachable: run `make up`")?;
    for result in created {
        result.map_err(|(name, code)| anyhow::anyhow!("creating topic {name}: {code}"))?;
    }

    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("message.timeout.ms", "15000")
        .create()?;
    let key = Uuid::new_v4().to_string();
    let mut offsets = Vec::new();
    for n in 0..3 {
        let payload = format!(r#"{{"n":{n},"topic":"{EVENTS_TOPIC}"}}"#);
        let delivery = producer
            .send(
                FutureRecord::to(&topic).key(&key).payload(&payload),
                Duration::from_secs(15),
            )
            .await
            .map_err(|(error, _)| error)
            .context("the broker did not acknowledge")?;
        offsets.push(delivery.offset);
    }
    ensure!(
        offsets.windows(2).all(|w| w[0] < w[1]),
        "offsets not increasing: {offsets:?}"
    );

    let group = unique_name("smoke_group");
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("group.id", &group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()?;
    consumer.subscribe(&[&topic])?;
    let mut seen = Vec::new();
    while seen.len() < 3 {
        let message = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
            .await
            .context("no message within 30 s")??;
        ensure!(message.key() == Some(key.as_bytes()));
        let body: serde_json::Value =
            serde_json::from_slice(message.payload().unwrap_or_default())?;
        seen.push(body["n"].as_i64().context("payload has n")?);
        consumer.commit_message(&message, CommitMode::Sync)?;
    }
    ensure!(seen == [0, 1, 2], "messages out of order: {seen:?}");

    let mut partitions = TopicPartitionList::new();
    partitions.add_partition(&topic, 0);
    let committed = consumer.committed_offsets(partitions, Duration::from_secs(10))?;
    let offset = committed
        .find_partition(&topic, 0)
        .context("no committed offset")?
        .offset();
    ensure!(
        offset == Offset::Offset(offsets[2] + 1),
        "committed {offset:?}, produced {offsets:?}"
    );
    Ok(())
}

#[tokio::test]
async fn mongodb_upserts_and_reads_a_document() -> anyhow::Result<()> {
    let client = mongodb::Client::with_uri_str(mongodb_uri()).await?;
    let database = client.database(&unique_name("smoke"));
    let shows = database.collection::<Document>("shows");
    let show_id = Uuid::new_v4().to_string();

    for (sequence, available) in [(1, 10), (2, 9)] {
        shows
            .update_one(
                doc! { "_id": &show_id },
                doc! { "$set": { "name": "Jazz Night", "available": available, "last_sequence": sequence } },
            )
            .upsert(true)
            .await
            .context("mongodb is unreachable: run `make up`")?;
    }
    let stored = shows
        .find_one(doc! { "_id": &show_id })
        .await?
        .context("the upserted document is missing")?;
    ensure!(stored.get_str("name")? == "Jazz Night");
    ensure!(stored.get_i32("available")? == 9);
    ensure!(stored.get_i32("last_sequence")? == 2);
    ensure!(
        shows.count_documents(doc! {}).await? == 1,
        "the upsert inserted twice"
    );

    database.drop().await?;
    Ok(())
}
