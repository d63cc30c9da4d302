//! `command-api republish`: has the relay publish again, in commit order,
//! every event of the log it has already passed, from the start or from a
//! given event on.
//!
//! It repairs a topic that lacks events: a relay that read the log with its
//! transaction ids sorted as text (before the log was read as `xid8`) moved
//! its checkpoint past events it never sent. Consumers deduplicate by
//! `(aggregate_id, sequence)`, so what they already have changes nothing
//! and what they lacked arrives, each stream from its start and in order.
//!
//! It does not publish itself: a second publisher would race the relay, and
//! a stream's later events sent by the relay before its earlier ones came
//! from the second publisher would reach consumers as orphans and be lost
//! to them. Instead it moves the topic's checkpoint back and counts the
//! rewind (`relay_checkpoints.rewinds`); the active relay notices (when it
//! next saves its checkpoint, or within a second when idle) and starts over
//! from there, and a relay that starts later begins there. So the topic's
//! one publisher sends everything again in commit order, and a crash
//! meanwhile resumes the rewind instead of losing it.

use std::time::Duration;

use anyhow::Context;
use serde::Serialize;
use sqlx::{PgPool, Row};

use crate::relay::{self, Checkpoint, Cursor};

/// A rewind of a topic's relay.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Rewind {
    /// The topic.
    pub topic: String,
    /// Where the relay starts over: just before the first event it sends
    /// again.
    pub from: Cursor,
    /// Where the relay stood: it has published again once it is back here.
    pub through: Cursor,
    /// Events from `from` through `through`: what is published again.
    pub events: i64,
    /// The checkpoint's rewind count after this one.
    pub rewinds: i64,
}

/// What [`rewind`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rewound {
    /// The checkpoint was moved back.
    Rewound(Rewind),
    /// No relay has published to the topic yet (or the name is wrong): it
    /// will publish everything when one does.
    NoCheckpoint,
    /// The relay has not passed that event yet: it will publish it anyway.
    NotPassed,
}

/// The prefix of the Postgres `application_name` of relays that follow a
/// rewind; relays of an earlier build would save their cursor over it.
pub const RELAY_NAME_PREFIX: &str = "relay-rewindable-";

/// Moves the relay's checkpoint of `topic` back to just before the event
/// at `from_position` (the start of the log when `None`), in commit order.
///
/// # Errors
/// No event at `from_position`; a relay of an earlier build connected to
/// the database (it would undo the rewind); store errors.
pub async fn rewind(
    pool: &PgPool,
    topic: &str,
    from_position: Option<i64>,
) -> anyhow::Result<Rewound> {
    let mut tx = pool.begin().await.context("connecting to postgres")?;
    // Relays before rewinds named their sessions `relay-{pid}-{uuid}`.
    let old_relays: Vec<String> = sqlx::query_scalar(
        "SELECT application_name FROM pg_stat_activity
          WHERE datname = current_database()
            AND application_name LIKE 'relay-%' AND application_name NOT LIKE $1 || '%'",
    )
    .bind(RELAY_NAME_PREFIX)
    .fetch_all(&mut *tx)
    .await
    .context("looking for relays of an earlier build")?;
    anyhow::ensure!(
        old_relays.is_empty(),
        "relays of an earlier build are connected ({}): they would save their cursor over the \
         rewind; upgrade every command-api first",
        old_relays.join(", ")
    );
    let from = match from_position {
        None => Cursor::START,
        Some(position) => {
            let tx_id = sqlx::query_scalar("SELECT tx_id FROM events WHERE global_position = $1")
                .bind(position)
                .fetch_optional(&mut *tx)
                .await
                .context("looking up the first event")?
                .with_context(|| format!("the log has no event at global position {position}"))?;
            // Just before it in commit order: positions are unique, so this
            // is after every event before it and before it alone.
            Cursor {
                tx_id,
                global_position: position - 1,
            }
        }
    };
    // Locked until the rewind commits, so that a relay saving meanwhile
    // either saves first (and is rewound) or finds the new count.
    let stored = sqlx::query(
        "SELECT tx_id, global_position, rewinds FROM relay_checkpoints
          WHERE topic = $1 FOR UPDATE",
    )
    .bind(topic)
    .fetch_optional(&mut *tx)
    .await
    .context("reading the relay checkpoint")?;
    let Some(stored) = stored else {
        return Ok(Rewound::NoCheckpoint);
    };
    let through = Cursor {
        tx_id: stored.try_get("tx_id")?,
        global_position: stored.try_get("global_position")?,
    };
    if through <= from {
        return Ok(Rewound::NotPassed);
    }
    let rewinds: i64 = sqlx::query_scalar(
        "UPDATE relay_checkpoints
            SET tx_id = $2, global_position = $3, rewinds = rewinds + 1,
                relay = 'republish', updated_at = now()
          WHERE topic = $1
      RETURNING rewinds",
    )
    .bind(topic)
    .bind(from.tx_id)
    .bind(from.global_position)
    .fetch_one(&mut *tx)
    .await
    .context("moving the relay checkpoint back")?;
    tx.commit()
        .await
        .context("moving the relay checkpoint back")?;
    // Counted after the commit: the relay's saves wait while the row is
    // locked, and a long log takes a while to count.
    let mut conn = pool.acquire().await.context("connecting to postgres")?;
    let events = event_feed::count_between(&mut conn, &from, &through).await?;
    tracing::info!(%topic, %from, %through, events, "relay checkpoint moved back");
    Ok(Rewound::Rewound(Rewind {
        topic: topic.to_owned(),
        from,
        through,
        events,
        rewinds,
    }))
}

/// How a wait for a rewind ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Progress {
    /// The relay has published again through where it stood.
    Republished,
    /// The wait ran out; the relay will get there (or one that starts will).
    Pending,
    /// Another rewind came after this one; it carries on from its own point.
    Superseded,
}

/// Waits, up to `wait`, until the relay has published again everything
/// `rewind` moved it back over. Store errors while waiting are logged and
/// waited out: the rewind is committed whatever happens here.
pub async fn wait_for(pool: &PgPool, rewind: &Rewind, wait: Duration) -> Progress {
    let started = tokio::time::Instant::now();
    let mut logged = started;
    loop {
        match stored(pool, &rewind.topic).await {
            Ok(Checkpoint { rewinds, .. }) if rewinds != rewind.rewinds => {
                return Progress::Superseded
            }
            Ok(Checkpoint { cursor, .. }) if cursor >= rewind.through => {
                return Progress::Republished
            }
            Ok(Checkpoint { cursor, .. }) if logged.elapsed() >= Duration::from_secs(5) => {
                tracing::info!(topic = %rewind.topic, at = %cursor, through = %rewind.through, "publishing again");
                logged = tokio::time::Instant::now();
            }
            Ok(_) => {}
            Err(error) => {
                tracing::warn!(error = %format_args!("{error:#}"), "cannot read the relay checkpoint")
            }
        }
        let left = wait.saturating_sub(started.elapsed());
        if left.is_zero() {
            return Progress::Pending;
        }
        tokio::time::sleep(Duration::from_millis(100).min(left)).await;
    }
}

async fn stored(pool: &PgPool, topic: &str) -> anyhow::Result<Checkpoint> {
    let mut conn = pool.acquire().await.context("connecting to postgres")?;
    relay::checkpoint(&mut conn, topic).await
}
