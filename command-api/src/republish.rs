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

/// Moves the relay's checkpoint of `topic` back to just before the event
/// at `from_position` (the start of the log when `None`), in commit order.
/// `None` when the relay has not passed that event yet: there is nothing to
/// publish again.
///
/// # Errors
/// No event at `from_position`; store errors.
pub async fn rewind(
    pool: &PgPool,
    topic: &str,
    from_position: Option<i64>,
) -> anyhow::Result<Option<Rewind>> {
    let mut tx = pool.begin().await.context("connecting to postgres")?;
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
        return Ok(None);
    };
    let through = Cursor {
        tx_id: stored.try_get("tx_id")?,
        global_position: stored.try_get("global_position")?,
    };
    if through <= from {
        return Ok(None);
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
    let events = event_feed::count_between(&mut tx, &from, &through).await?;
    tx.commit()
        .await
        .context("moving the relay checkpoint back")?;
    tracing::info!(%topic, %from, %through, events, "relay checkpoint moved back");
    Ok(Some(Rewind {
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
/// `rewind` moved it back over.
///
/// # Errors
/// Store errors.
pub async fn wait_for(pool: &PgPool, rewind: &Rewind, wait: Duration) -> anyhow::Result<Progress> {
    let deadline = tokio::time::Instant::now() + wait;
    let mut logged = tokio::time::Instant::now();
    loop {
        let mut conn = pool.acquire().await.context("connecting to postgres")?;
        let Checkpoint { cursor, rewinds } = relay::checkpoint(&mut conn, &rewind.topic).await?;
        drop(conn);
        if rewinds != rewind.rewinds {
            return Ok(Progress::Superseded);
        }
        if cursor >= rewind.through {
            return Ok(Progress::Republished);
        }
        let now = tokio::time::Instant::now();
        if now >= deadline {
            return Ok(Progress::Pending);
        }
        if now.duration_since(logged) >= Duration::from_secs(5) {
            tracing::info!(topic = %rewind.topic, at = %cursor, through = %rewind.through, "publishing again");
            logged = now;
        }
        tokio::time::sleep(Duration::from_millis(100).min(deadline - now)).await;
    }
}
