//! An event the projector cannot apply is set aside with its reason, its
//! offset and the message, the rest of the topic goes on, and
//! `projector unpark` applies it once it can be. The bad messages are made
//! by hand and put on the topic beside the relay's.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use reqwest::StatusCode;
use serde_json::Value;
use ticketing_tests::kafka::read_topic;
use ticketing_tests::kafka_brokers;
use ticketing_tests::system::{Service, System, SystemSettings};

const WAIT: Duration = Duration::from_secs(15);

/// Puts `body` on partition 0 of `topic`; its offset there.
async fn produce(topic: &str, key: &str, body: &[u8]) -> anyhow::Result<i64> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", kafka_brokers())
        .create()?;
    let delivered = producer
        .send(
            FutureRecord::to(topic).partition(0).key(key).payload(body),
            Duration::from_secs(10),
        )
        .await
        .map_err(|(error, _)| error)?;
    ensure!(delivered.partition == 0);
    Ok(delivered.offset)
}

async fn get(system: &System, path: &str) -> anyhow::Result<(StatusCode, Value)> {
    let answer = system
        .http
        .get(format!("{}{path}", system.query_url))
        .send()
        .await?;
    let status = answer.status();
    Ok((status, answer.json().await.unwrap_or(Value::Null)))
}

/// Waits until `done` holds of the seat statuses of `show`.
async fn seats_until(
    system: &System,
    show: &str,
    what: &str,
    done: impl Fn(&Value) -> bool,
) -> anyhow::Result<()> {
    system
        .read_until(&format!("/shows/{show}/availability"), what, |body| {
            done(&body["seats"])
        })
        .await?;
    Ok(())
}

/// Waits until the projector shows `count` parked events in `/metrics`
/// and `/readyz`.
async fn parked_until(system: &System, count: f64) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        let scrape = system.metrics(Service::Projector).await?;
        let ready = system.readyz(Service::Projector).await?;
        let parked = scrape.sum("projector_parked_events", &[]);
        if parked == count && ready["parked_events"].as_f64() == Some(count) {
            return Ok(());
        }
        ensure!(
            started.elapsed() < WAIT,
            "{parked} parked in /metrics, {} in /readyz; want {count}",
            ready["parked_events"]
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn parked_lines(listed: &str) -> anyhow::Result<Vec<Value>> {
    listed
        .lines()
        .map(|line| serde_json::from_str(line).context("a listed line is not JSON"))
        .collect()
}

#[tokio::test]
async fn a_message_that_cannot_be_applied_is_parked_and_unparked_after_a_fix() -> anyhow::Result<()>
{
    let system = System::start(SystemSettings::default()).await?;
    let show = system.create_show(&[("Floor", &[("A", 10)])]).await?;
    system.book(&show, &["A1"], false).await?;

    // The relay's own envelopes of the show, as the shapes of hand-made
    // ones for another show the read side has never heard of.
    let received = read_topic(system.topic(), WAIT, |received| {
        received.iter().any(|r| r.event.aggregate_type == "Seat")
    })
    .await?;
    let shaped = |aggregate_type: &str| -> anyhow::Result<String> {
        let real = received
            .iter()
            .find(|r| r.event.aggregate_type == aggregate_type)
            .with_context(|| format!("no {aggregate_type} event on the topic"))?;
        Ok(serde_json::to_string(&real.event)?)
    };
    let other = uuid::Uuid::new_v4().to_string();
    let seat_event = shaped("Seat")?;
    let show_created = shaped("Show")?;
    let orphan_seat = seat_event.replace(&show, &other);
    let late_show = show_created.replace(&show, &other);
    ensure!(orphan_seat != seat_event && late_show != show_created);

    // A message that is no envelope, and a seat event of a show never
    // created: both parked, with the reason and where they were.
    let garbage_at = produce(system.topic(), "garbage", b"{not an envelope").await?;
    let orphan_at = produce(system.topic(), &other, orphan_seat.as_bytes()).await?;
    parked_until(&system, 2.0).await?;

    // Nothing else stalls: the next booking reaches the reads.
    system.book(&show, &["A2"], false).await?;
    seats_until(
        &system,
        &show,
        "A2 booked after the bad messages",
        |seats| seats["A2"] == "booked",
    )
    .await?;

    let listed = parked_lines(&system.projector_command(&["parked"]).await?)?;
    ensure!(listed.len() == 2, "listed: {listed:?}");
    let garbage = listed
        .iter()
        .find(|p| p["message"] == "{not an envelope")
        .context("the message that is no envelope is not listed whole")?;
    ensure!(
        garbage["reason"]
            .as_str()
            .is_some_and(|r| r.contains("not an event envelope")),
        "{garbage}"
    );
    let orphan = listed
        .iter()
        .find(|p| p["show_id"] == other.as_str())
        .context("the orphan seat event is not listed")?;
    ensure!(
        orphan["reason"]
            .as_str()
            .is_some_and(|r| r.contains("before the stream it belongs to was created")),
        "{orphan}"
    );
    ensure!(orphan["event"].as_str().is_some_and(|e| e.contains(&other)));
    for (parked, offset) in [(garbage, garbage_at), (orphan, orphan_at)] {
        ensure!(
            parked["partition"] == 0 && parked["offset"] == offset,
            "{parked} was produced at 0:{offset}"
        );
    }
    // The relay's first seat event is the first booking's.
    let orphan_label = "A1";

    // The fix: the show's first event arrives. Unparking then applies the
    // seat event; the message that is no envelope stays parked.
    produce(system.topic(), &other, late_show.as_bytes()).await?;
    seats_until(&system, &other, "the late show readable", |seats| {
        seats[orphan_label] == "available"
    })
    .await?;
    let unparked: Value =
        serde_json::from_str(system.projector_command(&["unpark"]).await?.trim())?;
    ensure!(
        unparked["applied"] == 1 && unparked["still_parked"] == 1,
        "{unparked}"
    );
    seats_until(
        &system,
        &other,
        "the unparked seat event applied",
        |seats| seats[orphan_label] == "booked",
    )
    .await?;
    parked_until(&system, 1.0).await?;
    let listed = parked_lines(&system.projector_command(&["parked"]).await?)?;
    ensure!(
        listed.len() == 1 && listed[0]["message"] == "{not an envelope",
        "{listed:?}"
    );

    // Again: nothing more to apply, nothing lost.
    let again: Value = serde_json::from_str(system.projector_command(&["unpark"]).await?.trim())?;
    ensure!(
        again["applied"] == 0 && again["still_parked"] == 1,
        "{again}"
    );
    system.stop().await
}

/// An event of a version this release does not know, as a later release
/// would write it: the relay publishes it as it is, and the projector parks
/// it with every later event of its show, in order, while the other shows
/// go on. Unparking on this release keeps them all parked.
#[tokio::test]
async fn an_event_of_a_later_release_holds_its_show_back_in_order() -> anyhow::Result<()> {
    let system = System::start(SystemSettings::default()).await?;
    let show = system.create_show(&[("Floor", &[("A", 10)])]).await?;
    let other = system.create_show(&[("Floor", &[("A", 10)])]).await?;
    sqlx::query(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type,
                             event_version, payload, metadata)
         VALUES ('Seat', $1, 1, 'SeatBooked', '9', $2, '{}')",
    )
    .bind(format!("{show}:A5"))
    .bind(
        serde_json::json!({"SeatBooked": {"show_id": show, "label": "A5",
        "booking_id": uuid::Uuid::new_v4(), "sold_by": "a later release"}}),
    )
    .execute(system.postgres()?)
    .await?;
    parked_until(&system, 1.0).await?;

    // The show's next events wait behind it; the other show's do not.
    system.book(&show, &["A6"], false).await?;
    system.book(&other, &["A6"], false).await?;
    seats_until(&system, &other, "the other show goes on", |seats| {
        seats["A6"] == "booked"
    })
    .await?;
    parked_until(&system, 3.0).await?;
    let (_, seats) = get(&system, &format!("/shows/{show}/availability")).await?;
    ensure!(
        seats["seats"]["A6"] == "available",
        "applied before an event parked ahead of it: {seats}"
    );
    let ready = system.readyz(Service::Projector).await?;
    ensure!(
        ready["projection"]["parked_shows"] == serde_json::json!([show]),
        "{ready}"
    );
    let listed = parked_lines(&system.projector_command(&["parked"]).await?)?;
    ensure!(
        listed.len() == 3
            && listed.iter().any(|p| p["reason"]
                .as_str()
                .is_some_and(|r| r.contains("newer than this release"))),
        "{listed:?}"
    );

    // This release still cannot read it: unparking applies nothing of the
    // show, in particular nothing past it.
    let unparked: Value =
        serde_json::from_str(system.projector_command(&["unpark"]).await?.trim())?;
    ensure!(
        unparked["applied"] == 0 && unparked["still_parked"] == 3,
        "{unparked}"
    );
    let (_, seats) = get(&system, &format!("/shows/{show}/availability")).await?;
    ensure!(seats["seats"]["A6"] == "available", "{seats}");
    parked_until(&system, 3.0).await?;
    system.stop().await
}
