//! The read side over a log whose transaction ids cross a change in their
//! number of digits (9,999,999,999 to 10,000,000,000, on a private cluster):
//! replay applies every event at any batch size.

mod common;

use std::time::Duration;

use anyhow::{ensure, Context};
use common::{converge, ReadSide, Relaying, Writes};
use event_feed::{Cursor, TxId};
use projector::replay::{self, ReplaySettings};
use ticketing_tests::cluster::PrivateCluster;
use ticketing_tests::log_order::bookings_across;
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
