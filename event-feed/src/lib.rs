//! The event log read in commit order, for every reader that must see each
//! committed event once and never pass one over: the relay (which publishes
//! it) and replay (which rebuilds the read models from it).
//!
//! A plain `global_position > last` cursor loses events: positions are handed
//! out at insert and transactions commit out of order. This reads in
//! `(tx_id, global_position)` order and only below the oldest transaction
//! still open (`pg_snapshot_xmin`), so nothing can later appear behind the
//! cursor. A long-open transaction anywhere in the cluster delays readers;
//! it never makes them skip.

use anyhow::Context;
use chrono::{DateTime, Utc};
use domain::envelope::ENVELOPE_VERSION;
use domain::{AnyEvent, PublishedEvent};
use serde::Serialize;
use sqlx::{PgConnection, Row};

/// A place in the log in commit order: just after the event it names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Cursor {
    /// The transaction id (xid8) as text.
    pub tx_id: String,
    /// The global position.
    pub global_position: i64,
}

impl Cursor {
    /// Before the first event.
    pub fn start() -> Self {
        Self {
            tx_id: "0".to_owned(),
            global_position: 0,
        }
    }
}

/// One committed event, with its place in commit order.
#[derive(Debug, Clone)]
pub struct Committed {
    /// Its place; reading after it continues with the next event.
    pub cursor: Cursor,
    /// The envelope as published.
    pub event: PublishedEvent,
}

/// The next `limit` committed events after `cursor`, in commit order.
///
/// # Errors
/// Store errors, and an event that does not decode (the log and the code
/// disagree: a reader stops there rather than skip it).
pub async fn read_after(
    conn: &mut PgConnection,
    cursor: &Cursor,
    limit: i64,
) -> anyhow::Result<Vec<Committed>> {
    let rows = sqlx::query(
        "SELECT tx_id::text AS tx_id, global_position, aggregate_type, aggregate_id, sequence,
                event_type, event_version, payload, metadata, recorded_at
           FROM events
          WHERE (tx_id, global_position) > ($1::text::xid8, $2)
            AND tx_id < pg_snapshot_xmin(pg_current_snapshot())
          ORDER BY tx_id, global_position
          LIMIT $3",
    )
    .bind(&cursor.tx_id)
    .bind(cursor.global_position)
    .bind(limit)
    .fetch_all(conn)
    .await
    .context("reading the log")?;
    rows.into_iter()
        .map(|row| {
            let aggregate_type: String = row.try_get("aggregate_type")?;
            let aggregate_id: String = row.try_get("aggregate_id")?;
            let sequence: i64 = row.try_get("sequence")?;
            let payload: serde_json::Value = row.try_get("payload")?;
            let metadata: serde_json::Value = row.try_get("metadata")?;
            let decoded = AnyEvent::decode(&aggregate_type, &payload).with_context(|| {
                format!("event {aggregate_type} {aggregate_id}#{sequence} does not decode")
            })?;
            let recorded_at: DateTime<Utc> = row.try_get("recorded_at")?;
            let global_position: i64 = row.try_get("global_position")?;
            Ok(Committed {
                cursor: Cursor {
                    tx_id: row.try_get("tx_id")?,
                    global_position,
                },
                event: PublishedEvent {
                    envelope_version: ENVELOPE_VERSION,
                    show_id: decoded.show_id(),
                    aggregate_type,
                    aggregate_id,
                    sequence: u64::try_from(sequence).context("a negative sequence")?,
                    event_type: row.try_get("event_type")?,
                    event_version: row.try_get("event_version")?,
                    global_position,
                    recorded_at,
                    payload,
                    metadata: serde_json::from_value(metadata).unwrap_or_default(),
                },
            })
        })
        .collect()
}

/// Every committed event, in commit order, read `chunk` at a time.
///
/// # Errors
/// As [`read_after`].
pub async fn read_all(conn: &mut PgConnection, chunk: i64) -> anyhow::Result<Vec<PublishedEvent>> {
    let mut cursor = Cursor::start();
    let mut events = Vec::new();
    loop {
        let batch = read_after(conn, &cursor, chunk).await?;
        let Some(last) = batch.last() else {
            return Ok(events);
        };
        cursor = last.cursor.clone();
        let full = i64::try_from(batch.len()).unwrap_or(i64::MAX) >= chunk;
        events.extend(batch.into_iter().map(|c| c.event));
        if !full {
            return Ok(events);
        }
    }
}
