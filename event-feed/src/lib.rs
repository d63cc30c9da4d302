//! The event log read in commit order, for every reader that must see each
//! committed event once and never pass one over: the relay (which publishes
//! it), replay (which rebuilds the read models from it) and republishing
//! (which repairs a topic).
//!
//! A plain `global_position > last` cursor loses events: positions are handed
//! out at insert and transactions commit out of order. This reads in
//! `(tx_id, global_position)` order and only below the oldest transaction
//! still open (`pg_snapshot_xmin`), so nothing can later appear behind the
//! cursor. A long-open transaction anywhere in the cluster delays readers;
//! it never makes them skip.
//!
//! The transaction id is an `xid8` everywhere: in the `ORDER BY`, in the
//! comparison with the cursor, in the checkpoint table and, as [`TxId`], in
//! memory. It was once selected as text under its own column name, so the
//! `ORDER BY` sorted the text ("1000" < "735") while the `WHERE` compared
//! numbers, and every page that spanned a change in the number of digits
//! passed events over. Each page is therefore also checked against the log
//! (see [`read_after`]), so a reader stops rather than skip.

use std::fmt;
use std::str::FromStr;

use anyhow::{ensure, Context};
use chrono::{DateTime, Utc};
use domain::envelope::{EnvelopeError, ENVELOPE_VERSION};
use domain::{AnyEvent, PublishedEvent};
use serde::{Serialize, Serializer};
use sqlx::encode::IsNull;
use sqlx::error::BoxDynError;
use sqlx::postgres::types::Oid;
use sqlx::postgres::{PgArgumentBuffer, PgTypeInfo, PgValueFormat, PgValueRef};
use sqlx::{PgConnection, Postgres, Row};

/// A transaction id of the log: Postgres' `xid8`, the 32-bit xid with its
/// wraparound epoch above it, which only grows. Compared as the number it
/// is; it travels to and from Postgres as an `xid8` (binary), never as text.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TxId(u64);

/// The OID of `xid8` in `pg_type` (fixed for built-in types).
const XID8: Oid = Oid(5069);

impl TxId {
    /// Before every transaction.
    pub const ZERO: Self = Self(0);

    /// The id with this 64-bit value.
    pub const fn new(value: u64) -> Self {
        Self(value)
    }

    /// Its 64-bit value.
    pub const fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for TxId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for TxId {
    type Err = std::num::ParseIntError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        text.parse().map(Self)
    }
}

/// As a JSON string: a JavaScript number loses digits above 2^53.
impl Serialize for TxId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl sqlx::Type<Postgres> for TxId {
    fn type_info() -> PgTypeInfo {
        PgTypeInfo::with_oid(XID8)
    }

    fn compatible(ty: &PgTypeInfo) -> bool {
        ty.oid() == Some(XID8)
    }
}

impl sqlx::Encode<'_, Postgres> for TxId {
    fn encode_by_ref(&self, buf: &mut PgArgumentBuffer) -> Result<IsNull, BoxDynError> {
        // xid8's binary form is the unsigned 64-bit value, big-endian.
        buf.extend_from_slice(&self.0.to_be_bytes());
        Ok(IsNull::No)
    }

    fn size_hint(&self) -> usize {
        8
    }
}

impl sqlx::Decode<'_, Postgres> for TxId {
    fn decode(value: PgValueRef<'_>) -> Result<Self, BoxDynError> {
        Ok(match value.format() {
            PgValueFormat::Binary => Self(u64::from_be_bytes(value.as_bytes()?.try_into()?)),
            PgValueFormat::Text => value.as_str()?.parse()?,
        })
    }
}

/// A place in the log in commit order: just after the event it names.
/// Ordered as the log is: by transaction, then by position.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Cursor {
    /// The transaction that wrote the event.
    pub tx_id: TxId,
    /// The event's position, unique across the log.
    pub global_position: i64,
}

impl Cursor {
    /// Before the first event.
    pub const START: Self = Self {
        tx_id: TxId::ZERO,
        global_position: 0,
    };
}

impl fmt::Display for Cursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "(tx {}, position {})", self.tx_id, self.global_position)
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
/// The page is checked before it is returned: its places ascend from
/// `cursor`, and the log holds no event between `cursor` and its last
/// event that the page lacks (one count over the same index range). A
/// reader that gets a page can move its cursor to the page's end without
/// passing anything over.
///
/// # Errors
/// Store errors; an event that does not decode (the log and the code
/// disagree); a page that fails its check. A reader stops there rather than
/// skip.
pub async fn read_after(
    conn: &mut PgConnection,
    cursor: &Cursor,
    limit: i64,
) -> anyhow::Result<Vec<Committed>> {
    // Qualified, and no output column named `tx_id`: an `ORDER BY` name
    // resolves to an output column before a table column.
    let rows = sqlx::query(
        "SELECT e.tx_id, e.global_position, e.aggregate_type, e.aggregate_id, e.sequence,
                e.event_type, e.event_version, e.payload, e.metadata, e.recorded_at
           FROM events AS e
          WHERE (e.tx_id, e.global_position) > ($1, $2)
            AND e.tx_id < pg_snapshot_xmin(pg_current_snapshot())
          ORDER BY e.tx_id, e.global_position
          LIMIT $3",
    )
    .bind(cursor.tx_id)
    .bind(cursor.global_position)
    .bind(limit)
    .fetch_all(&mut *conn)
    .await
    .context("reading the log")?;
    let page = rows
        .into_iter()
        .map(|row| committed(&row))
        .collect::<anyhow::Result<Vec<_>>>()?;
    check_page(conn, cursor, &page).await?;
    Ok(page)
}

fn committed(row: &sqlx::postgres::PgRow) -> anyhow::Result<Committed> {
    let aggregate_type: String = row.try_get("aggregate_type")?;
    let aggregate_id: String = row.try_get("aggregate_id")?;
    let sequence: i64 = row.try_get("sequence")?;
    let payload: serde_json::Value = row.try_get("payload")?;
    let metadata: serde_json::Value = row.try_get("metadata")?;
    let event_version: String = row.try_get("event_version")?;
    let show_id = match AnyEvent::decode(&aggregate_type, &event_version, &payload) {
        Ok(decoded) => decoded.show_id(),
        // Written by a later release: published as it is (its consumers
        // know the version, or park it), routed by the show it names.
        Err(EnvelopeError::Version(later)) if later.is_from_a_later_release() => {
            show_id_named(&payload).with_context(|| {
                format!("event {aggregate_type} {aggregate_id}#{sequence} names no show")
            })?
        }
        Err(error) => {
            return Err(anyhow::Error::new(error).context(format!(
                "event {aggregate_type} {aggregate_id}#{sequence} does not decode"
            )))
        }
    };
    let recorded_at: DateTime<Utc> = row.try_get("recorded_at")?;
    let global_position: i64 = row.try_get("global_position")?;
    Ok(Committed {
        cursor: Cursor {
            tx_id: row.try_get("tx_id")?,
            global_position,
        },
        event: PublishedEvent {
            envelope_version: ENVELOPE_VERSION,
            show_id,
            aggregate_type,
            aggregate_id,
            sequence: u64::try_from(sequence).context("a negative sequence")?,
            event_type: row.try_get("event_type")?,
            event_version,
            global_position,
            recorded_at,
            payload,
            metadata: serde_json::from_value(metadata).unwrap_or_default(),
        },
    })
}

/// The `show_id` of a tagged payload (`{"<event type>": {"show_id": …}}`),
/// which every event type has.
fn show_id_named(payload: &serde_json::Value) -> Option<domain::ShowId> {
    let body = payload.as_object()?.values().next()?;
    body.get("show_id")?.as_str()?.parse().ok()
}

/// Checks a page read after `cursor` against the log (see [`read_after`]).
async fn check_page(
    conn: &mut PgConnection,
    cursor: &Cursor,
    page: &[Committed],
) -> anyhow::Result<()> {
    let Some(last) = page.last() else {
        return Ok(());
    };
    let held = count_between(conn, cursor, &last.cursor).await?;
    let places: Vec<Cursor> = page.iter().map(|event| event.cursor).collect();
    page_is_whole(cursor, &places, held)
}

/// A page of events at `places`, read after `after`, ascends from `after`
/// and is all of the `held` events the log has from `after` to its end.
fn page_is_whole(after: &Cursor, places: &[Cursor], held: i64) -> anyhow::Result<()> {
    let mut previous = *after;
    for place in places {
        ensure!(
            *place > previous,
            "the log came back out of commit order: {place} after {previous}"
        );
        previous = *place;
    }
    ensure!(
        usize::try_from(held).is_ok_and(|held| held == places.len()),
        "the log holds {held} events after {after} through {previous}, but a page of {} came back",
        places.len()
    );
    Ok(())
}

/// How many events the log holds after `after` and up to `through`
/// included, in commit order.
///
/// # Errors
/// Store errors.
pub async fn count_between(
    conn: &mut PgConnection,
    after: &Cursor,
    through: &Cursor,
) -> anyhow::Result<i64> {
    sqlx::query_scalar(
        "SELECT count(*) FROM events
          WHERE (tx_id, global_position) > ($1, $2)
            AND (tx_id, global_position) <= ($3, $4)",
    )
    .bind(after.tx_id)
    .bind(after.global_position)
    .bind(through.tx_id)
    .bind(through.global_position)
    .fetch_one(conn)
    .await
    .context("counting the log")
}

/// What a reading of the log covered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reading {
    /// Events handed over.
    pub events: u64,
    /// The last event handed over (the start when there was none): the
    /// reading's high-water mark.
    pub through: Cursor,
}

/// Reads the log after `from` in pages of `page` events, handing each page
/// to `each` in commit order, until the log is caught up (a page comes back
/// short) or, with `until`, until that place (included). Then counts the
/// log between `from` and the last event handed over, and fails if the
/// count is not what was handed over.
///
/// # Errors
/// As [`read_after`]; what `each` returns; a count that differs.
pub async fn read_pages(
    conn: &mut PgConnection,
    from: Cursor,
    until: Option<Cursor>,
    page: i64,
    mut each: impl AsyncFnMut(Vec<Committed>) -> anyhow::Result<()>,
) -> anyhow::Result<Reading> {
    ensure!(page > 0, "a page of {page} events");
    let mut reading = Reading {
        events: 0,
        through: from,
    };
    loop {
        let mut batch = read_after(conn, &reading.through, page).await?;
        let caught_up = i64::try_from(batch.len()).unwrap_or(i64::MAX) < page;
        let before = batch.len();
        if let Some(until) = until {
            batch.retain(|event| event.cursor <= until);
        }
        let reached = batch.len() < before || batch.last().map(|e| e.cursor) == until;
        let Some(last) = batch.last().map(|e| e.cursor) else {
            break;
        };
        reading.events += u64::try_from(batch.len())?;
        reading.through = last;
        each(batch).await?;
        if caught_up || reached {
            break;
        }
    }
    let held = count_between(conn, &from, &reading.through).await?;
    ensure!(
        u64::try_from(held).is_ok_and(|held| held == reading.events),
        "the log holds {held} events after {from} through {}, but {} were read: \
         it was not read whole and in commit order",
        reading.through,
        reading.events
    );
    Ok(reading)
}

/// Every committed event, in commit order, read `chunk` at a time.
///
/// # Errors
/// As [`read_pages`].
pub async fn read_all(conn: &mut PgConnection, chunk: i64) -> anyhow::Result<Vec<PublishedEvent>> {
    let mut events = Vec::new();
    read_pages(conn, Cursor::START, None, chunk, async |page| {
        events.extend(page.into_iter().map(|c| c.event));
        Ok(())
    })
    .await?;
    Ok(events)
}

#[cfg(test)]
mod tests {
    use super::{page_is_whole, Cursor, TxId};

    fn at(tx_id: u64, global_position: i64) -> Cursor {
        Cursor {
            tx_id: TxId::new(tx_id),
            global_position,
        }
    }

    #[test]
    fn cursors_order_as_numbers_then_positions() {
        assert!(at(999, 50) < at(1000, 1));
        assert!(at(735, 1) < at(10_884, 2));
        assert!(at(9_999_999_999, 7) < at(10_000_000_000, 3));
        assert!(at(1000, 1) < at(1000, 2));
        assert_eq!(
            "10000000000".parse::<TxId>().map(TxId::get),
            Ok(10_000_000_000)
        );
        assert_eq!(
            serde_json::to_value(at(812, 5120)).ok(),
            Some(serde_json::json!({"tx_id": "812", "global_position": 5120}))
        );
    }

    #[test]
    fn a_page_in_commit_order_holding_its_whole_range_passes() {
        let page = [at(999, 8), at(999, 9), at(1000, 4), at(1001, 10)];
        assert!(page_is_whole(&at(735, 3), &page, 4).is_ok());
        assert!(page_is_whole(&at(735, 3), &[], 0).is_ok());
    }

    #[test]
    fn a_page_sorted_as_text_is_refused() {
        // "1000" < "735" as text: the order the faulty query returned.
        let page = [at(1000, 4), at(735, 5)];
        let refused = page_is_whole(&Cursor::START, &page, 2);
        assert!(
            refused
                .as_ref()
                .is_err_and(|e| e.to_string().contains("out of commit order")),
            "{refused:?}"
        );
    }

    #[test]
    fn a_page_that_starts_behind_its_cursor_is_refused() {
        assert!(page_is_whole(&at(1000, 4), &[at(1000, 4)], 1).is_err());
        assert!(page_is_whole(&at(1000, 4), &[at(999, 9)], 1).is_err());
    }

    #[test]
    fn a_page_that_lacks_events_of_its_range_is_refused() {
        // A page of size 1 cannot be out of order, but its one event may
        // lie past others: the faulty query's first page was "1000" when
        // 735 was also there.
        let refused = page_is_whole(&Cursor::START, &[at(1000, 4)], 2);
        assert!(
            refused
                .as_ref()
                .is_err_and(|e| e.to_string().contains("holds 2 events")),
            "{refused:?}"
        );
    }
}
