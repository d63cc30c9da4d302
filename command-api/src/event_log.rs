//! The event log in Postgres: the postgres-es `events` table, read and
//! written many streams at a time. postgres-es commits one aggregate per
//! transaction; a booking must append to its own stream and one per seat
//! atomically, so the multi-stream load and append live here, on the same
//! table and with the same serialization (`serde_json` of the event enum).

use std::collections::{BTreeMap, HashMap};
use std::str::FromStr;

use cqrs_es::{Aggregate, DomainEvent};
use domain::{Booking, BookingEvent, BookingId, Changes, Seat, SeatLabel, Show, ShowId, UserId};
use serde::de::DeserializeOwned;
use sqlx::{PgConnection, PgPool, Row};

use crate::cause::Cause;

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
    /// Another writer appended to one of the streams first, or a stream the
    /// command must also write was locked by another.
    #[error("a stream changed since it was loaded")]
    Conflict,
    /// The wait for a stream's lock ran out: another command holds it.
    #[error("a stream stayed locked by another command")]
    LockTimeout,
    /// A stream id in the log that does not parse: the log and the code
    /// disagree.
    #[error("stored {aggregate_type} stream id {aggregate_id} does not parse")]
    BadStreamId {
        /// Its aggregate type.
        aggregate_type: String,
        /// The id.
        aggregate_id: String,
    },
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
    /// A stored event's version cannot be brought to the current shape
    /// (written by a later release, say).
    #[error("stored {aggregate_type} event {aggregate_id}#{sequence} cannot be read")]
    Version {
        /// Its aggregate type.
        aggregate_type: String,
        /// Its stream.
        aggregate_id: String,
        /// Its sequence.
        sequence: i64,
        /// Why.
        #[source]
        source: domain::versions::VersionError,
    },
}

impl LogError {
    /// Whether retrying the whole command from a fresh load may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            // A fresh attempt reads a fresh snapshot, which most often
            // refuses at once what the lock holder took.
            Self::Conflict | Self::LockTimeout => true,
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

/// How long a command may wait for the locks of its streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockWait {
    /// Not at all: every lock at once, or none.
    Never,
    /// At most this long for all the locks together, then
    /// [`LogError::LockTimeout`].
    Upto(std::time::Duration),
}

/// Streams of one show, as loaded by [`lock_and_load`].
#[derive(Debug, Default)]
pub struct ShowStreams {
    /// Whether their locks are held (until the transaction ends). Without
    /// them, what was loaded is a committed snapshot, fit to refuse from
    /// but not to decide on.
    pub locked: bool,
    /// Seat streams by label (absent: no events yet).
    pub seats: BTreeMap<SeatLabel, Loaded<Seat>>,
    /// Booking streams by id (absent: no events yet).
    pub bookings: BTreeMap<BookingId, Loaded<Booking>>,
}

/// Locks the seat streams of `labels` (of `show_id`), the booking streams
/// of `bookings` and, when given, the buyer's allowance in the show (see
/// [`buyer_key`]) until the transaction ends, then loads the streams, in
/// one round trip. Locks are taken in a fixed (sorted) order, so commands
/// queue instead of deadlocking; with [`LockWait::Never`] none is waited
/// for, and the streams are loaded unlocked if any was taken.
///
/// # Errors
/// [`LogError::LockTimeout`], [`LogError::Database`], [`LogError::Corrupt`].
pub async fn lock_and_load(
    conn: &mut PgConnection,
    show_id: ShowId,
    labels: &[SeatLabel],
    bookings: &[BookingId],
    buyer: Option<UserId>,
    wait: LockWait,
) -> Result<ShowStreams, LogError> {
    let seat_ids: Vec<String> = labels
        .iter()
        .map(|label| domain::SeatId::new(show_id, label.clone()).to_string())
        .collect();
    let booking_ids: Vec<String> = bookings.iter().map(ToString::to_string).collect();
    let keys: Vec<i64> = seat_ids
        .iter()
        .map(|id| stream_key(Seat::TYPE, id))
        .chain(booking_ids.iter().map(|id| stream_key(Booking::TYPE, id)))
        .chain(buyer.map(|user| buyer_key(show_id, user)))
        .collect();
    let types: Vec<&str> = seat_ids
        .iter()
        .map(|_| Seat::TYPE)
        .chain(booking_ids.iter().map(|_| Booking::TYPE))
        .collect();
    let ids: Vec<&String> = seat_ids.iter().chain(&booking_ids).collect();
    let wait_ms = match wait {
        LockWait::Never => 0,
        LockWait::Upto(wait) => i32::try_from(wait.as_millis()).unwrap_or(i32::MAX).max(1),
    };
    let row = sqlx::query(
        "SELECT locked, aggregate_types, aggregate_ids, sequences, event_versions, payloads
           FROM lock_and_load($1, $2, $3, $4)",
    )
    .bind(&keys)
    .bind(wait_ms)
    .bind(&types)
    .bind(&ids)
    .fetch_one(&mut *conn)
    .await
    .map_err(lock_timeout_or)?;
    let mut streams = ShowStreams {
        locked: row.try_get("locked")?,
        ..ShowStreams::default()
    };
    let types: Vec<String> = row.try_get("aggregate_types")?;
    let ids: Vec<String> = row.try_get("aggregate_ids")?;
    let sequences: Vec<i64> = row.try_get("sequences")?;
    let versions: Vec<String> = row.try_get("event_versions")?;
    let payloads: Vec<String> = row.try_get("payloads")?;
    for ((((aggregate_type, aggregate_id), sequence), version), payload) in types
        .into_iter()
        .zip(ids)
        .zip(sequences)
        .zip(versions)
        .zip(payloads)
    {
        let stored = (
            aggregate_id.as_str(),
            sequence,
            version.as_str(),
            payload.as_str(),
        );
        if aggregate_type == Seat::TYPE {
            let id: domain::SeatId = parse_id(&aggregate_type, &aggregate_id)?;
            let event = decode_text(&aggregate_type, stored)?;
            fold(streams.seats.entry(id.label).or_default(), event, sequence);
        } else {
            let id: BookingId = parse_id(&aggregate_type, &aggregate_id)?;
            let event = decode_text(&aggregate_type, stored)?;
            fold(streams.bookings.entry(id).or_default(), event, sequence);
        }
    }
    Ok(streams)
}

fn lock_timeout_or(error: sqlx::Error) -> LogError {
    match &error {
        // 55P03 lock_not_available: a lock wait ran out.
        sqlx::Error::Database(e) if e.code().as_deref() == Some("55P03") => LogError::LockTimeout,
        _ => LogError::Database(error),
    }
}

fn parse_id<K: FromStr>(aggregate_type: &str, aggregate_id: &str) -> Result<K, LogError> {
    aggregate_id.parse().map_err(|_| LogError::BadStreamId {
        aggregate_type: aggregate_type.to_owned(),
        aggregate_id: aggregate_id.to_owned(),
    })
}

/// A stored event in the current shape of its type (see
/// [`domain::versions`]).
fn decode<E: DeserializeOwned>(
    aggregate_type: &str,
    aggregate_id: &str,
    sequence: i64,
    event_version: &str,
    payload: serde_json::Value,
) -> Result<E, LogError> {
    let corrupt = |source| LogError::Corrupt {
        aggregate_type: aggregate_type.to_owned(),
        aggregate_id: aggregate_id.to_owned(),
        sequence,
        source,
    };
    let payload =
        domain::versions::upcast(event_version, payload).map_err(|source| LogError::Version {
            aggregate_type: aggregate_type.to_owned(),
            aggregate_id: aggregate_id.to_owned(),
            sequence,
            source,
        })?;
    serde_json::from_value(payload).map_err(corrupt)
}

/// [`decode`] of a row of `lock_and_load`: stream id, sequence, version
/// and payload as text.
fn decode_text<E: DeserializeOwned>(
    aggregate_type: &str,
    (aggregate_id, sequence, event_version, payload): (&str, i64, &str, &str),
) -> Result<E, LogError> {
    let payload = serde_json::from_str(payload).map_err(|source| LogError::Corrupt {
        aggregate_type: aggregate_type.to_owned(),
        aggregate_id: aggregate_id.to_owned(),
        sequence,
        source,
    })?;
    decode(
        aggregate_type,
        aggregate_id,
        sequence,
        event_version,
        payload,
    )
}

fn fold<A: Aggregate>(stream: &mut Loaded<A>, event: A::Event, sequence: i64) {
    stream.state.apply(event);
    stream.version = sequence;
}

/// The lock key of a seat's stream.
pub fn seat_key(show_id: ShowId, label: &SeatLabel) -> i64 {
    stream_key(
        Seat::TYPE,
        &domain::SeatId::new(show_id, label.clone()).to_string(),
    )
}

/// The lock key of a booking's stream.
pub fn booking_key(booking_id: BookingId) -> i64 {
    stream_key(Booking::TYPE, &booking_id.to_string())
}

/// The lock key of a buyer's allowance in a show: held by every command
/// that adds to the buyer's live seats there (a booking, a confirm), so that
/// the count it reads in [`live_seats`] cannot change before it commits.
pub fn buyer_key(show_id: ShowId, user_id: UserId) -> i64 {
    stream_key("Buyer", &format!("{show_id}:{user_id}"))
}

/// The live seats (bought, or held and not lapsed at `now`) of each buyer
/// in each show of `buyers`, read in the caller's transaction, which holds
/// their [`buyer_key`] locks. A buyer with none is absent.
///
/// # Errors
/// [`LogError::Database`].
pub async fn live_seats(
    conn: &mut PgConnection,
    buyers: &[(ShowId, UserId)],
    now: domain::Timestamp,
) -> Result<HashMap<(ShowId, UserId), u32>, LogError> {
    if buyers.is_empty() {
        return Ok(HashMap::new());
    }
    let rows: Vec<(uuid::Uuid, uuid::Uuid, i64)> = sqlx::query_as(
        "SELECT b.show_id, b.user_id, sum(b.seats)::bigint
           FROM buyer_seats AS b
           JOIN unnest($1::uuid[], $2::uuid[]) AS u(show_id, user_id)
             ON b.show_id = u.show_id AND b.user_id = u.user_id
          WHERE b.expires_at IS NULL OR b.expires_at > $3
          GROUP BY b.show_id, b.user_id",
    )
    .bind(buyers.iter().map(|(s, _)| s.as_uuid()).collect::<Vec<_>>())
    .bind(buyers.iter().map(|(_, u)| u.as_uuid()).collect::<Vec<_>>())
    .bind(now)
    .fetch_all(conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(show, user, seats)| {
            (
                (ShowId::from_uuid(show), UserId::from_uuid(user)),
                u32::try_from(seats).unwrap_or(u32::MAX),
            )
        })
        .collect())
}

/// A lock a command takes: a stream's, in the one-key advisory lock space,
/// or an idempotency key's, in the two-key space.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LockKey {
    /// A stream's lock.
    Stream(i64),
    /// An idempotency key's lock.
    Key(i32, i32),
}

/// Tries `locks` (held until the transaction ends), waiting for none:
/// which were taken, lock by lock. A lock this transaction already holds
/// counts as taken.
///
/// # Errors
/// [`LogError::Database`].
pub async fn try_locks(conn: &mut PgConnection, locks: &[LockKey]) -> Result<Vec<bool>, LogError> {
    if locks.is_empty() {
        // A group of keyless snapshot checks: no round trip for nothing.
        return Ok(Vec::new());
    }
    let (mut streams, mut highs, mut lows) = (Vec::new(), Vec::new(), Vec::new());
    for lock in locks {
        match *lock {
            LockKey::Stream(key) => {
                streams.push(Some(key));
                highs.push(None);
                lows.push(None);
            }
            LockKey::Key(high, low) => {
                streams.push(None);
                highs.push(Some(high));
                lows.push(Some(low));
            }
        }
    }
    Ok(sqlx::query_scalar(
        "SELECT CASE WHEN k IS NOT NULL THEN pg_try_advisory_xact_lock(k)
                     ELSE pg_try_advisory_xact_lock(high, low) END
           FROM unnest($1::bigint[], $2::integer[], $3::integer[]) WITH ORDINALITY
                AS u(k, high, low, i)
          ORDER BY i",
    )
    .bind(streams)
    .bind(highs)
    .bind(lows)
    .fetch_all(conn)
    .await?)
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
        "SELECT aggregate_id, sequence, event_version, payload FROM events
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
        let version: String = row.try_get("event_version")?;
        let payload: serde_json::Value = row.try_get("payload")?;
        let event: A::Event = decode(A::TYPE, &aggregate_id, sequence, &version, payload)?;
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
    /// Seat streams.
    pub seats: BTreeMap<domain::SeatId, i64>,
    /// Booking streams by id.
    pub bookings: BTreeMap<BookingId, i64>,
    /// Show streams by id.
    pub shows: BTreeMap<ShowId, i64>,
}

fn version<K: Ord>(versions: &BTreeMap<K, i64>, key: &K) -> i64 {
    versions.get(key).copied().unwrap_or(0)
}

/// Everything one command (or one batch of them) appends: box-office
/// changes, new shows, and the answers to keep for idempotency keys.
#[derive(Debug, Default)]
pub struct Append {
    /// Booking and seat events.
    pub changes: Changes,
    /// Show events.
    pub shows: BTreeMap<ShowId, Vec<domain::ShowEvent>>,
    /// First answers to idempotency keys, kept with the events.
    pub answers: Vec<crate::idempotency::Stored>,
    /// The cause of each stream's events where it is not the current
    /// task's ([`Cause::current`]): group commit appends the streams of
    /// many requests, each with its own. By stream id.
    pub causes: BTreeMap<String, Cause>,
}

impl Append {
    /// Records `cause` as the cause of every stream of `changes`.
    pub fn caused_by(&mut self, changes: &Changes, cause: &Cause) {
        let streams = changes
            .bookings
            .keys()
            .map(ToString::to_string)
            .chain(changes.seats.keys().map(ToString::to_string));
        for stream in streams {
            self.causes.insert(stream, cause.clone());
        }
    }
}

/// Appends every event of one command in one statement, each stream at the
/// sequence after the version it was loaded at, and keeps `pending_holds`
/// and `buyer_seats` in step with the booking events. Returns the highest `global_position`
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
        |id| version(&versions.seats, id),
        &mut rows,
    )
    .map_err(encode)?;
    if rows.is_empty() && append.answers.is_empty() {
        return Ok(0);
    }
    let column = |f: fn(&NewEvent) -> String| rows.iter().map(f).collect::<Vec<String>>();
    let current = Cause::current();
    let metadata = rows
        .iter()
        .map(|r| {
            let cause = append.causes.get(&r.aggregate_id).unwrap_or(&current);
            serde_json::to_string(&cause.metadata())
        })
        .collect::<Result<Vec<String>, _>>()
        .map_err(encode)?;
    let holds = Holds::of(&append.changes.bookings);
    let seats = TakenSeats::of(&append.changes.seats);
    let answers = &append.answers;
    // One statement: the events and the pending holds they start and end,
    // which the sweeper reads.
    let position: Option<i64> = sqlx::query_scalar(
        "WITH appended AS (
           INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
           SELECT t, id, seq, et, ev, p::json, m::json
             FROM UNNEST($1::text[], $2::text[], $3::bigint[], $4::text[], $5::text[], $6::text[],
                         $32::text[])
                  AS u(t, id, seq, et, ev, p, m)
           RETURNING global_position),
         held AS (
           INSERT INTO pending_holds (booking_id, show_id, expires_at)
           SELECT * FROM UNNEST($7::uuid[], $8::uuid[], $9::timestamptz[])),
         settled AS (
           DELETE FROM pending_holds WHERE booking_id = ANY($10::uuid[])),
         bought AS (
           INSERT INTO buyer_seats (booking_id, show_id, user_id, seats, expires_at)
           SELECT b, s, u, n, t::timestamptz
             FROM UNNEST($17::uuid[], $18::uuid[], $19::uuid[], $20::integer[], $21::text[])
                  AS x(b, s, u, n, t)),
         kept AS (
           UPDATE buyer_seats SET expires_at = NULL WHERE booking_id = ANY($22::uuid[])),
         released AS (
           DELETE FROM buyer_seats WHERE booking_id = ANY($23::uuid[])),
         taken AS (
           INSERT INTO taken_seats (show_id, row_name, number, booking_id, expires_at)
           SELECT s, r, n, b, t::timestamptz
             FROM UNNEST($24::uuid[], $25::text[], $26::integer[], $27::uuid[], $28::text[])
                  AS x(s, r, n, b, t)
           ON CONFLICT (show_id, row_name, number)
           DO UPDATE SET booking_id = EXCLUDED.booking_id, expires_at = EXCLUDED.expires_at),
         freed AS (
           DELETE FROM taken_seats AS t
            USING UNNEST($29::uuid[], $30::text[], $31::integer[]) AS f(show_id, row_name, number)
            WHERE t.show_id = f.show_id AND t.row_name = f.row_name AND t.number = f.number),
         answered AS (
           INSERT INTO idempotency_keys (route, key, request, status, headers, body)
           SELECT * FROM UNNEST($11::text[], $12::text[], $13::bytea[], $14::smallint[],
                                $15::jsonb[], $16::bytea[]))
         SELECT max(global_position) FROM appended",
    )
    .bind(column(|r| r.aggregate_type.to_owned()))
    .bind(column(|r| r.aggregate_id.clone()))
    .bind(rows.iter().map(|r| r.sequence).collect::<Vec<i64>>())
    .bind(column(|r| r.event_type.clone()))
    .bind(column(|r| r.event_version.clone()))
    .bind(column(|r| r.payload.clone()))
    .bind(&holds.held)
    .bind(&holds.shows)
    .bind(&holds.until)
    .bind(&holds.settled)
    .bind(answers.iter().map(|a| a.route.as_str()).collect::<Vec<_>>())
    .bind(answers.iter().map(|a| a.key.as_str()).collect::<Vec<_>>())
    .bind(answers.iter().map(|a| a.request.as_slice()).collect::<Vec<_>>())
    .bind(answers.iter().map(|a| a.status).collect::<Vec<_>>())
    .bind(answers.iter().map(|a| &a.headers).collect::<Vec<_>>())
    .bind(answers.iter().map(|a| a.body.as_slice()).collect::<Vec<_>>())
    .bind(&holds.buyers.bookings)
    .bind(&holds.buyers.shows)
    .bind(&holds.buyers.users)
    .bind(&holds.buyers.seats)
    .bind(&holds.buyers.until)
    .bind(&holds.bought)
    .bind(&holds.released)
    .bind(&seats.taken.shows)
    .bind(&seats.taken.rows)
    .bind(&seats.taken.numbers)
    .bind(&seats.taken_by)
    .bind(&seats.until)
    .bind(&seats.freed.shows)
    .bind(&seats.freed.rows)
    .bind(&seats.freed.numbers)
    .bind(&metadata)
    .fetch_one(&mut *conn)
    .await
    .map_err(conflict_or)?;
    Ok(position.unwrap_or(0))
}

/// The pending holds a command's booking events start and end, and the
/// buyers' seats they add, keep (a hold confirmed) and release.
#[derive(Debug, Default)]
struct Holds {
    held: Vec<uuid::Uuid>,
    shows: Vec<uuid::Uuid>,
    until: Vec<domain::Timestamp>,
    settled: Vec<uuid::Uuid>,
    buyers: BuyerSeats,
    bought: Vec<uuid::Uuid>,
    released: Vec<uuid::Uuid>,
}

/// Seats, column by column.
#[derive(Debug, Default)]
struct SeatColumns {
    shows: Vec<uuid::Uuid>,
    rows: Vec<String>,
    numbers: Vec<i32>,
}

impl SeatColumns {
    fn push(&mut self, seat: &domain::SeatId) {
        self.shows.push(seat.show_id.as_uuid());
        self.rows.push(seat.label.row().to_string());
        self.numbers
            .push(i32::try_from(seat.label.number()).unwrap_or(i32::MAX));
    }
}

/// What a command's seat events leave in `taken_seats`: each seat as its
/// last event in the command leaves it (a lapsed hold released and the
/// seat held again in one command is one upsert, never two changes of one
/// row in one statement).
#[derive(Debug, Default)]
struct TakenSeats {
    taken: SeatColumns,
    taken_by: Vec<uuid::Uuid>,
    until: Vec<Option<String>>,
    freed: SeatColumns,
}

/// A hold's end as the event's payload writes it: Postgres parses the same
/// text here as when the table is rebuilt from the log, so both round the
/// nanoseconds to the same microsecond.
fn as_in_payload(at: &domain::Timestamp) -> Option<String> {
    match serde_json::to_value(at) {
        Ok(serde_json::Value::String(text)) => Some(text),
        _ => Some(at.to_rfc3339()),
    }
}

impl TakenSeats {
    fn of(seats: &BTreeMap<domain::SeatId, Vec<domain::SeatEvent>>) -> Self {
        use domain::SeatEvent;
        let mut taken = Self::default();
        for (seat, events) in seats {
            match events.last() {
                Some(SeatEvent::SeatHeld {
                    booking_id,
                    expires_at,
                    ..
                }) => {
                    taken.taken.push(seat);
                    taken.taken_by.push(booking_id.as_uuid());
                    taken.until.push(as_in_payload(expires_at));
                }
                Some(SeatEvent::SeatBooked { booking_id, .. }) => {
                    taken.taken.push(seat);
                    taken.taken_by.push(booking_id.as_uuid());
                    taken.until.push(None);
                }
                Some(SeatEvent::SeatReleased { .. }) => taken.freed.push(seat),
                None => {}
            }
        }
        taken
    }
}

/// A step of a savepoint: one try within a transaction that may be undone,
/// the locks it took given back.
#[derive(Debug, Clone, Copy)]
pub enum Savepoint {
    /// Start a try.
    Begin,
    /// Keep what the try did.
    Keep,
    /// Undo it, releasing its locks (transaction-level advisory locks go
    /// with the savepoint they were taken under).
    Undo,
}

/// Runs a step of the savepoint of a best-available try.
///
/// # Errors
/// [`LogError::Database`].
pub async fn savepoint(conn: &mut PgConnection, step: Savepoint) -> Result<(), LogError> {
    let statements: &[&str] = match step {
        Savepoint::Begin => &["SAVEPOINT best_available"],
        Savepoint::Keep => &["RELEASE SAVEPOINT best_available"],
        Savepoint::Undo => &[
            "ROLLBACK TO SAVEPOINT best_available",
            "RELEASE SAVEPOINT best_available",
        ],
    };
    for statement in statements {
        sqlx::query(statement).execute(&mut *conn).await?;
    }
    Ok(())
}

/// The numbers of the seats of `rows` (of `show_id`), by row name, that a
/// booking holds (and has not let lapse by `now`) or owns, from the
/// committed `taken_seats`: a snapshot to choose from, never to decide on.
///
/// # Errors
/// [`LogError::Database`].
pub async fn taken_in_rows(
    conn: &mut PgConnection,
    show_id: ShowId,
    rows: &[domain::RowName],
    now: domain::Timestamp,
) -> Result<std::collections::HashMap<String, Vec<u32>>, LogError> {
    // One answer row per seat row: a section's thousands of taken seats
    // cross the wire as a few arrays.
    let found: Vec<(String, Vec<i32>)> = sqlx::query_as(
        "SELECT row_name, array_agg(number) FROM taken_seats
          WHERE show_id = $1 AND row_name = ANY($2)
            AND (expires_at IS NULL OR expires_at > $3)
          GROUP BY row_name",
    )
    .bind(show_id.as_uuid())
    .bind(rows.iter().map(ToString::to_string).collect::<Vec<_>>())
    .bind(now)
    .fetch_all(conn)
    .await?;
    Ok(found
        .into_iter()
        .map(|(row, numbers)| {
            let numbers = numbers
                .into_iter()
                .filter_map(|n| u32::try_from(n).ok())
                .collect();
            (row, numbers)
        })
        .collect())
}

/// New rows of `buyer_seats`, column by column.
#[derive(Debug, Default)]
struct BuyerSeats {
    bookings: Vec<uuid::Uuid>,
    shows: Vec<uuid::Uuid>,
    users: Vec<uuid::Uuid>,
    seats: Vec<i32>,
    until: Vec<Option<String>>,
}

impl BuyerSeats {
    fn add(&mut self, details: &domain::BookingDetails, until: Option<domain::Timestamp>) {
        self.bookings.push(details.booking_id.as_uuid());
        self.shows.push(details.show_id.as_uuid());
        self.users.push(details.user_id.as_uuid());
        // At most MAX_SEATS_PER_BOOKING.
        self.seats
            .push(i32::try_from(details.seats.len()).unwrap_or(i32::MAX));
        self.until.push(until.as_ref().and_then(as_in_payload));
    }
}

impl Holds {
    fn of(bookings: &BTreeMap<BookingId, Vec<BookingEvent>>) -> Self {
        let mut holds = Self::default();
        for event in bookings.values().flatten() {
            match event {
                BookingEvent::BookingHeld {
                    details,
                    expires_at,
                    ..
                } => {
                    holds.held.push(details.booking_id.as_uuid());
                    holds.shows.push(details.show_id.as_uuid());
                    holds.until.push(*expires_at);
                    holds.buyers.add(details, Some(*expires_at));
                }
                BookingEvent::BookingConfirmed { booking_id, .. } => {
                    holds.settled.push(booking_id.as_uuid());
                    holds.bought.push(booking_id.as_uuid());
                }
                BookingEvent::BookingCancelled { booking_id, .. }
                | BookingEvent::BookingExpired { booking_id, .. } => {
                    holds.settled.push(booking_id.as_uuid());
                    holds.released.push(booking_id.as_uuid());
                }
                BookingEvent::BookingPlaced { details, .. } => holds.buyers.add(details, None),
            }
        }
        holds
    }
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
