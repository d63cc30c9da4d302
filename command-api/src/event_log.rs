//! The event log in Postgres: the postgres-es `events` table, read and
//! written many streams at a time. postgres-es commits one aggregate per
//! transaction; a booking must append to its own stream and one per seat
//! atomically, so the multi-stream load and append live here, on the same
//! table and with the same serialization (`serde_json` of the event enum).

use std::collections::BTreeMap;
use std::str::FromStr;

use cqrs_es::{Aggregate, DomainEvent};
use domain::{Booking, BookingEvent, BookingId, Changes, Seat, SeatLabel, Show, ShowId};
use serde::de::DeserializeOwned;
use sqlx::{PgConnection, PgPool, Row};

/// A stream's state and the sequence of its last event (0: no stream yet).
#[derive(Debug, Clone, Default)]
pub struct Loaded<A> {
    /// The aggregate after all its events.
    pub state: A,
    /// The last sequence; the next event gets `version + 1`.
    pub version: i64,
}

/// Why the log could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// Another writer appended to one of the streams first.
    #[error("a stream changed since it was loaded")]
    Conflict,
    /// No connection could be had. Nothing ran, so whatever broke (a refused
    /// connect, a reset, a handshake cut short, which sqlx reports as a
    /// protocol error) the store is simply not there right now.
    #[error("no connection to the event store")]
    Unreachable(#[source] sqlx::Error),
    /// Postgres refused or failed the statement.
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    /// A stored event does not decode: the log and the code disagree.
    #[error("stored {aggregate_type} event {aggregate_id}#{sequence} does not decode")]
    Corrupt {
        /// Its aggregate type.
        aggregate_type: String,
        /// Its stream.
        aggregate_id: String,
        /// Its sequence.
        sequence: i64,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
}

impl LogError {
    /// Whether retrying the whole command from a fresh load may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Conflict => true,
            // 40P01 deadlock, 40001 serialization failure.
            Self::Database(sqlx::Error::Database(e)) => {
                matches!(e.code().as_deref(), Some("40P01" | "40001"))
            }
            _ => false,
        }
    }
}

fn conflict_or(error: sqlx::Error) -> LogError {
    match &error {
        sqlx::Error::Database(e) if e.code().as_deref() == Some("23505") => LogError::Conflict,
        _ => LogError::Database(error),
    }
}

/// Locks streams until the transaction ends, in a fixed (sorted) order.
///
/// # Errors
/// [`LogError::Database`].
pub async fn lock_streams(
    conn: &mut PgConnection,
    streams: impl IntoIterator<Item = (&str, String)>,
) -> Result<(), LogError> {
    let keys: Vec<i64> = streams
        .into_iter()
        .map(|(aggregate_type, id)| stream_key(aggregate_type, &id))
        .collect();
    if keys.is_empty() {
        return Ok(());
    }
    sqlx::query("SELECT lock_streams($1)")
        .bind(&keys)
        .execute(conn)
        .await?;
    Ok(())
}

/// A stable 64-bit key for a stream (FNV-1a): the same in every process.
pub(crate) fn stream_key(aggregate_type: &str, id: &str) -> i64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in aggregate_type.bytes().chain([b':']).chain(id.bytes()) {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    i64::from_ne_bytes(hash.to_ne_bytes())
}

/// Loads many streams of one aggregate type in one query. Streams with no
/// events are absent from the map.
///
/// # Errors
/// [`LogError::Database`] or [`LogError::Corrupt`].
pub async fn load<A, K>(
    conn: &mut PgConnection,
    ids: &[K],
) -> Result<BTreeMap<K, Loaded<A>>, LogError>
where
    A: Aggregate,
    A::Event: DeserializeOwned,
    K: ToString + FromStr + Ord + Clone,
{
    let id_texts: Vec<String> = ids.iter().map(ToString::to_string).collect();
    let by_text: BTreeMap<&str, &K> = id_texts.iter().map(String::as_str).zip(ids).collect();
    let rows = sqlx::query(
        "SELECT aggregate_id, sequence, payload FROM events
          WHERE aggregate_type = $1 AND aggregate_id = ANY($2)
          ORDER BY aggregate_id, sequence",
    )
    .bind(A::TYPE)
    .bind(&id_texts)
    .fetch_all(conn)
    .await?;
    let mut streams: BTreeMap<K, Loaded<A>> = BTreeMap::new();
    for row in rows {
        let aggregate_id: String = row.try_get("aggregate_id")?;
        let sequence: i64 = row.try_get("sequence")?;
        let payload: serde_json::Value = row.try_get("payload")?;
        let event: A::Event =
            serde_json::from_value(payload).map_err(|source| LogError::Corrupt {
                aggregate_type: A::TYPE.to_owned(),
                aggregate_id: aggregate_id.clone(),
                sequence,
                source,
            })?;
        if let Some(&key) = by_text.get(aggregate_id.as_str()) {
            let stream = streams.entry(key.clone()).or_default();
            stream.state.apply(event);
            stream.version = sequence;
        }
    }
    Ok(streams)
}

/// Loads one show.
///
/// # Errors
/// As [`load`].
pub async fn load_show(pool: &PgPool, show_id: ShowId) -> Result<Option<Show>, LogError> {
    let mut conn = pool.acquire().await.map_err(LogError::Unreachable)?;
    let mut shows = load::<Show, ShowId>(&mut conn, &[show_id]).await?;
    Ok(shows.remove(&show_id).map(|loaded| loaded.state))
}

/// The seat streams of one show, keyed by label.
///
/// # Errors
/// As [`load`].
pub async fn load_seats(
    conn: &mut PgConnection,
    show_id: ShowId,
    labels: &[SeatLabel],
) -> Result<BTreeMap<SeatLabel, Loaded<Seat>>, LogError> {
    let ids: Vec<domain::SeatId> = labels
        .iter()
        .map(|label| domain::SeatId::new(show_id, label.clone()))
        .collect();
    Ok(load::<Seat, domain::SeatId>(conn, &ids)
        .await?
        .into_iter()
        .map(|(id, loaded)| (id.label, loaded))
        .collect())
}

/// Booking streams by id.
///
/// # Errors
/// As [`load`].
pub async fn load_bookings(
    conn: &mut PgConnection,
    ids: &[BookingId],
) -> Result<BTreeMap<BookingId, Loaded<Booking>>, LogError> {
    load::<Booking, BookingId>(conn, ids).await
}

/// One row to insert.
struct NewEvent {
    aggregate_type: &'static str,
    aggregate_id: String,
    sequence: i64,
    event_type: String,
    event_version: String,
    payload: String,
}

fn rows_for<K: ToString, E: DomainEvent>(
    aggregate_type: &'static str,
    streams: &BTreeMap<K, Vec<E>>,
    version_of: impl Fn(&K) -> i64,
    rows: &mut Vec<NewEvent>,
) -> Result<(), serde_json::Error> {
    for (id, events) in streams {
        for (sequence, event) in (version_of(id) + 1..).zip(events) {
            rows.push(NewEvent {
                aggregate_type,
                aggregate_id: id.to_string(),
                sequence,
                event_type: event.event_type(),
                event_version: event.event_version(),
                payload: serde_json::to_string(event)?,
            });
        }
    }
    Ok(())
}

/// The versions each stream had when loaded (absent: 0).
#[derive(Debug, Default)]
pub struct Versions {
    /// Seat streams by label.
    pub seats: BTreeMap<SeatLabel, i64>,
    /// Booking streams by id.
    pub bookings: BTreeMap<BookingId, i64>,
    /// Show streams by id.
    pub shows: BTreeMap<ShowId, i64>,
}

fn version<K: Ord>(versions: &BTreeMap<K, i64>, key: &K) -> i64 {
    versions.get(key).copied().unwrap_or(0)
}

/// Everything one command appends: box-office changes and new shows.
#[derive(Debug, Default)]
pub struct Append {
    /// Booking and seat events.
    pub changes: Changes,
    /// Show events.
    pub shows: BTreeMap<ShowId, Vec<domain::ShowEvent>>,
}

/// Appends every event of one command in one statement, each stream at the
/// sequence after the version it was loaded at, and keeps `pending_holds` in
/// step with the booking events. Returns the highest `global_position`
/// written (0 when nothing was).
///
/// # Errors
/// [`LogError::Conflict`] when a stream moved on since it was loaded (the
/// primary key refuses the stale sequence; the caller's transaction is then
/// aborted), [`LogError::Database`] otherwise.
pub async fn append(
    conn: &mut PgConnection,
    append: &Append,
    versions: &Versions,
) -> Result<i64, LogError> {
    let mut rows = Vec::new();
    let encode = |e: serde_json::Error| LogError::Database(sqlx::Error::Encode(Box::new(e)));
    rows_for(
        Show::TYPE,
        &append.shows,
        |id| version(&versions.shows, id),
        &mut rows,
    )
    .map_err(encode)?;
    rows_for(
        Booking::TYPE,
        &append.changes.bookings,
        |id| version(&versions.bookings, id),
        &mut rows,
    )
    .map_err(encode)?;
    rows_for(
        Seat::TYPE,
        &append.changes.seats,
        |id: &domain::SeatId| version(&versions.seats, &id.label),
        &mut rows,
    )
    .map_err(encode)?;
    if rows.is_empty() {
        return Ok(0);
    }
    let column = |f: fn(&NewEvent) -> String| rows.iter().map(f).collect::<Vec<String>>();
    let position: Option<i64> = sqlx::query_scalar(
        "WITH appended AS (
           INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
           SELECT t, id, seq, et, ev, p::json, '{}'::json
             FROM UNNEST($1::text[], $2::text[], $3::bigint[], $4::text[], $5::text[], $6::text[])
                  AS u(t, id, seq, et, ev, p)
           RETURNING global_position)
         SELECT max(global_position) FROM appended",
    )
    .bind(column(|r| r.aggregate_type.to_owned()))
    .bind(column(|r| r.aggregate_id.clone()))
    .bind(rows.iter().map(|r| r.sequence).collect::<Vec<i64>>())
    .bind(column(|r| r.event_type.clone()))
    .bind(column(|r| r.event_version.clone()))
    .bind(column(|r| r.payload.clone()))
    .fetch_one(&mut *conn)
    .await
    .map_err(conflict_or)?;
    track_pending_holds(conn, &append.changes.bookings).await?;
    Ok(position.unwrap_or(0))
}

async fn track_pending_holds(
    conn: &mut PgConnection,
    bookings: &BTreeMap<BookingId, Vec<BookingEvent>>,
) -> Result<(), LogError> {
    for events in bookings.values() {
        for event in events {
            match event {
                BookingEvent::BookingHeld {
                    details,
                    expires_at,
                    ..
                } => {
                    sqlx::query(
                        "INSERT INTO pending_holds (booking_id, show_id, expires_at) VALUES ($1, $2, $3)",
                    )
                    .bind(details.booking_id.as_uuid())
                    .bind(details.show_id.as_uuid())
                    .bind(expires_at)
                    .execute(&mut *conn)
                    .await
                    .map_err(conflict_or)?;
                }
                BookingEvent::BookingConfirmed { booking_id, .. }
                | BookingEvent::BookingCancelled { booking_id, .. }
                | BookingEvent::BookingExpired { booking_id, .. } => {
                    sqlx::query("DELETE FROM pending_holds WHERE booking_id = $1")
                        .bind(booking_id.as_uuid())
                        .execute(&mut *conn)
                        .await?;
                }
                BookingEvent::BookingPlaced { .. } => {}
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::stream_key;

    #[test]
    fn stream_keys_are_stable_across_processes_and_distinct() {
        // Pinned: every process must lock the same key for the same stream.
        assert_eq!(stream_key("Seat", "x:A1"), stream_key("Seat", "x:A1"));
        assert_ne!(stream_key("Seat", "x:A1"), stream_key("Seat", "x:A2"));
        assert_ne!(stream_key("Seat", "x"), stream_key("Booking", "x"));
        assert_eq!(stream_key("Seat", "x:A1"), 0xfa137fc72382f916_u64 as i64);
    }
}
