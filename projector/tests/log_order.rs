//! The read side over a log whose transaction ids cross a change in their
//! number of digits (9,999,999,999 to 10,000,000,000, on a private cluster):
//! replay applies every event at any batch size, and a topic that the
//! text-ordered relay left short is repaired by `republish`.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use command_api::relay::{self, Committed, Relay};
use command_api::republish::{Progress, Rewound};
use common::{command_settings, converge, expected, send, ReadSide, Relaying, Writes};
use event_feed::{Cursor, TxId};
use projector::replay::{self, ReplaySettings};
use ticketing_tests::cluster::PrivateCluster;
use ticketing_tests::kafka::{distinct_events, read_topic};
use ticketing_tests::log_order::{bookings_across, read_as_text};
use tokio_util::sync::CancellationToken;

/// 10^10: ids of ten digits below, eleven from here on (in the third epoch).
const BOUNDARY: u64 = 10_000_000_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_of_a_log_crossing_a_change_of_digit_count_applies_every_event_at_any_batch_size(
) -> anyhow::Result<()> {
    let cluster = PrivateCluster::start_near(BOUNDARY - 30_000).await?;
    let writes = Writes::spawn_on(&cluster.url(), 600, Relaying::InProcess).await?;
    let log = bookings_across(&writes.base, &writes.db.pool, BOUNDARY).await?;
    let read = ReadSide::new().await?;
    let live = read.project(&writes.topic);
    converge(&writes, &read, Duration::from_secs(60)).await?;
    let last = log.last().context("an empty log")?;
    let high_water = Cursor {
        tx_id: TxId::new(last.tx_id),
        global_position: last.global_position,
    };
    for (round, batch) in [1, 2, 7, 5000].into_iter().enumerate() {
        let report = replay::replay(
            &read.store,
            &writes.db.pool,
            &read.consumer(&writes.topic),
            &ReplaySettings {
                database_url: writes.db.url(),
                replay_batch: batch,
                grace_secs: 0,
                switch_wait_secs: 120,
            },
            &CancellationToken::new(),
        )
        .await
        .with_context(|| format!("replay in batches of {batch}"))?;
        ensure!(
            report.events == log.len() as u64 && report.through == high_water,
            "batches of {batch}: {report:?}, the log has {} events through {high_water}",
            log.len()
        );
        let generation = u32::try_from(round)? + 2;
        ensure!(report.to == generation, "{report:?}");
        // The generation was built from the log alone before the catch-up,
        // and the topic adds nothing here: it must equal the log's fold.
        converge(&writes, &read, Duration::from_secs(30))
            .await
            .with_context(|| format!("after the replay in batches of {batch}"))?;
    }
    live.stop().await?;
    read.drop().await?;
    writes.stop().await?;
    drop(cluster);
    Ok(())
}

/// Reads the read side until it stops changing (two equal snapshots 1 s
/// apart, with something in it).
async fn settled(read: &ReadSide) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut before = read.snapshot().await?;
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = read.snapshot().await?;
        if now == before && (!now.shows.is_empty() || !now.bookings.is_empty()) {
            return Ok(());
        }
        ensure!(Instant::now() < deadline, "the read side never settled");
        before = now;
    }
}

/// A deployment that ran the text-ordered relay: its topic lacks events and
/// the projector's models are wrong. After the upgrade the relay resumes
/// from its checkpoint while buyers go on, cancelling bookings whose start
/// it never sent (their cancellations reach the projector as orphans);
/// `republish`, with the relay running, has it send everything again: the
/// same projector, deduplicating, ends with models equal to the log's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn republish_gives_a_projector_what_the_text_ordered_relay_skipped() -> anyhow::Result<()> {
    let cluster = PrivateCluster::start_near(BOUNDARY - 30_000).await?;
    let writes = Writes::spawn_on(&cluster.url(), 600, Relaying::ByTheTest).await?;
    let log = bookings_across(&writes.base, &writes.db.pool, BOUNDARY).await?;
    let settings = command_settings(writes.db.url(), &writes.topic, 600).relay;

    // The faulty relay, replayed: what it sent, in its order, and where it
    // left its checkpoint.
    let (sent, (end_tx, end_position)) = read_as_text(&writes.db.pool, 7).await?;
    let mut conn = writes.db.pool.acquire().await?;
    let mut by_position: BTreeMap<i64, Committed> = BTreeMap::new();
    event_feed::read_pages(&mut conn, Cursor::START, None, 1000, async |page| {
        by_position.extend(page.into_iter().map(|c| (c.event.global_position, c)));
        Ok(())
    })
    .await?;
    drop(conn);
    let batch: Vec<Committed> = sent
        .iter()
        .map(|p| {
            by_position
                .get(p)
                .cloned()
                .context("a position not in the log")
        })
        .collect::<anyhow::Result<_>>()?;
    relay::ensure_topic(&settings).await?;
    let producer = relay::producer(&settings.kafka_brokers, Duration::from_secs(15))?;
    relay::publish(&producer, &writes.topic, &batch).await?;
    sqlx::query(
        "INSERT INTO relay_checkpoints (topic, tx_id, global_position, relay)
         VALUES ($1, $2::text::xid8, $3, 'text-ordered')",
    )
    .bind(&writes.topic)
    .bind(&end_tx)
    .bind(end_position)
    .execute(&writes.db.pool)
    .await?;

    let read = ReadSide::new().await?;
    let live = read.project(&writes.topic);
    settled(&read).await?;
    ensure!(
        read.snapshot().await? != expected(&writes.log().await?)?,
        "the projector got it right from a topic that lacked {} events",
        log.len() - sent.len()
    );

    // The upgrade: the relay resumes from its checkpoint while buyers
    // cancel bookings the faulty relay never sent.
    let stop = CancellationToken::new();
    let relay =
        tokio::spawn(Relay::new(writes.db.pool.clone(), settings.clone())?.run(stop.clone()));
    let events_per_stream = log.iter().fold(BTreeMap::new(), |mut n, p| {
        *n.entry(p.aggregate_id.as_str()).or_insert(0) += 1;
        n
    });
    let unsent: Vec<&str> = log
        .iter()
        .filter(|p| {
            p.aggregate_type == "Booking"
                && !sent.contains(&p.global_position)
                && events_per_stream.get(p.aggregate_id.as_str()) == Some(&1)
        })
        .map(|p| p.aggregate_id.as_str())
        .take(4)
        .collect();
    ensure!(
        unsent.len() == 4,
        "the faulty relay skipped only {} live bookings",
        unsent.len()
    );
    let client = ticketing_tests::auth::staff_client().expect("an HTTP client");
    for id in &unsent {
        let answer = send(client.post(format!("{}/bookings/{id}/cancel", writes.base))).await?;
        ensure!(answer.status == 200, "{answer:?}");
    }
    let in_log = writes.log().await?.len();
    let cancelled = sent.len() + (in_log - log.len());
    read_topic(&writes.topic, Duration::from_secs(60), |r| {
        distinct_events(r) >= cancelled
    })
    .await?;

    // ...and republish, the relay running, has it send everything again.
    let Rewound::Rewound(rewind) =
        command_api::republish::rewind(&writes.db.pool, &writes.topic, None).await?
    else {
        anyhow::bail!("nothing to publish again");
    };
    let progress =
        command_api::republish::wait_for(&writes.db.pool, &rewind, Duration::from_secs(60)).await;
    ensure!(
        progress == Progress::Republished,
        "{progress:?} after {rewind:?}"
    );
    let received = read_topic(&writes.topic, Duration::from_secs(60), |r| {
        distinct_events(r) >= in_log
    })
    .await?;
    ensure!(
        distinct_events(&received) == in_log,
        "the topic has {} of the log's {in_log} events",
        distinct_events(&received)
    );
    converge(&writes, &read, Duration::from_secs(60)).await?;
    stop.cancel();
    relay.await?;
    live.stop().await?;
    read.drop().await?;
    writes.stop().await?;
    drop(cluster);
    Ok(())
}
