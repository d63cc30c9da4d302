//! Runs the box office against the log: each command is one Postgres
//! transaction that locks the streams it decides on (in a fixed order),
//! loads them in one query per aggregate type, asks the pure domain for the
//! events, and appends them all with their expected versions.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use chrono::Utc;
use cqrs_es::Aggregate;
use domain::box_office::{self, BookingRequest, Streams};
use domain::{
    Booking, BookingId, BookingStatus, ConsistencyToken, Seat, SeatLabel, Show, ShowDetails,
    ShowId, Timestamp,
};
use sqlx::{PgConnection, PgPool};

use crate::error::ApiError;
use crate::event_log::{self, Append, Loaded, LogError, Versions};
use crate::idempotency::{self, Claim, Keyed};
use crate::reply::Reply;

/// The command side's handle on the log.
#[derive(Debug, Clone)]
pub struct Sales {
    pool: PgPool,
    shows: Arc<RwLock<HashMap<ShowId, Arc<Show>>>>,
    /// How long a hold lasts.
    pub hold_for: Duration,
    max_attempts: u32,
}

impl Sales {
    /// Sales on `pool`, holding seats for `hold_for`, running a command at
    /// most `max_attempts` times when it meets concurrent writers.
    pub fn new(pool: PgPool, hold_for: Duration, max_attempts: u32) -> Self {
        Self {
            pool,
            shows: Arc::default(),
            hold_for,
            max_attempts: max_attempts.max(1),
        }
    }

    /// The pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// A show. Shows never change once created, so each is read once.
    ///
    /// # Errors
    /// [`ApiError::NotFound`] or store errors.
    pub async fn show(&self, show_id: ShowId) -> Result<Arc<Show>, ApiError> {
        if let Some(show) = self.cached(show_id) {
            return Ok(show);
        }
        let show = event_log::load_show(&self.pool, show_id)
            .await?
            .filter(|show| show.details().is_some())
            .ok_or(ApiError::NotFound("show"))?;
        let show = Arc::new(show);
        if let Ok(mut shows) = self.shows.write() {
            shows.insert(show_id, Arc::clone(&show));
        }
        Ok(show)
    }

    fn cached(&self, show_id: ShowId) -> Option<Arc<Show>> {
        self.shows.read().ok()?.get(&show_id).cloned()
    }

    /// Runs `work` in a transaction, retrying from scratch when it meets a
    /// concurrent writer. With a key, the first answer (2xx or 4xx) is stored
    /// in the same transaction and replayed to retries.
    ///
    /// # Errors
    /// 5xx errors (never stored), and the key's own 409 and 422.
    pub async fn transact(
        &self,
        keyed: Option<&Keyed>,
        mut work: impl for<'c> FnMut(&'c mut PgConnection) -> Work<'c> + Send,
    ) -> Result<Reply, ApiError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut tx = self.pool.begin().await.map_err(LogError::Unreachable)?;
            if let Some(keyed) = keyed {
                if let Claim::Replay(reply) = idempotency::claim(&mut tx, keyed).await? {
                    return Ok(reply);
                }
            }
            let reply = match work(&mut tx).await {
                Ok(reply) => reply,
                Err(e) if e.is_retryable() && attempt < self.max_attempts => continue,
                Err(e) if e.is_server_error() => return Err(e),
                // A refusal is an answer too: remembered for the key, and
                // committed with whatever the command recorded before it.
                Err(e) => e.to_reply(),
            };
            if let Some(keyed) = keyed {
                idempotency::remember(&mut tx, keyed, &reply).await?;
            }
            match tx.commit().await {
                Ok(()) => return Ok(reply),
                Err(e) => {
                    let e = ApiError::from(e);
                    if !(e.is_retryable() && attempt < self.max_attempts) {
                        return Err(e);
                    }
                }
            }
        }
    }

    /// Appends a new show.
    ///
    /// # Errors
    /// Store errors.
    pub async fn create_show(
        conn: &mut PgConnection,
        details: ShowDetails,
    ) -> Result<ConsistencyToken, ApiError> {
        let show_id = details.show_id;
        let events = Show::default().decide(domain::ShowCommand::CreateShow(details))?;
        let append = Append {
            shows: BTreeMap::from([(show_id, events)]),
            ..Append::default()
        };
        event_log::append(conn, &append, &Versions::default()).await?;
        let mut token = ConsistencyToken::new(show_id);
        token.show_sequence = 1;
        Ok(token)
    }

    /// Places a booking: all its seats or none.
    ///
    /// # Errors
    /// The box office's refusals and store errors.
    pub async fn place(
        conn: &mut PgConnection,
        show: &Show,
        request: BookingRequest,
        now: Timestamp,
    ) -> Result<(Booking, ConsistencyToken), ApiError> {
        let booking_id = request.booking_id;
        let show_id = request.show_id;
        // Checked before any lock, so bad requests never queue behind buyers.
        let probe = box_office::place(
            show,
            request.clone(),
            &Booking::default(),
            Streams {
                seats: &BTreeMap::new(),
                bookings: &BTreeMap::new(),
            },
            now,
        );
        if let Err(e) = probe {
            return Err(e.into());
        }
        lock_seats(conn, request.show_id, &request.seats).await?;
        let mut seats = event_log::load_seats(conn, request.show_id, &request.seats).await?;
        let seat_states = states(&seats);
        let lapsed: Vec<BookingId> = box_office::lapsed_holders(&seat_states, &request.seats, now)
            .into_iter()
            .collect();
        let mut bookings = BTreeMap::new();
        if !lapsed.is_empty() {
            // Not locked: these streams are guarded by their expected versions.
            bookings = event_log::load_bookings(conn, &lapsed).await?;
            let others: Vec<SeatLabel> = bookings
                .values()
                .filter_map(|b| b.state.details())
                .flat_map(|d| d.seats.iter().map(|s| s.label.clone()))
                .filter(|label| !seats.contains_key(label))
                .collect();
            seats.extend(event_log::load_seats(conn, request.show_id, &others).await?);
        }
        let seat_states = states(&seats);
        let booking_states = states(&bookings);
        let changes = box_office::place(
            show,
            request,
            &Booking::default(),
            Streams {
                seats: &seat_states,
                bookings: &booking_states,
            },
            now,
        )?;
        let after = after(&Booking::default(), booking_id, &changes);
        let token = append_changes(conn, show_id, changes, &seats, &bookings).await?;
        Ok((after, token))
    }

    /// Confirms, cancels or expires a booking, with its seats.
    ///
    /// A confirm or cancel that finds the hold lapsed records the expiry in
    /// the same transaction and then answers 409 `expired`.
    ///
    /// # Errors
    /// [`ApiError::NotFound`], [`ApiError::BookingClosed`], store errors.
    pub async fn settle(
        conn: &mut PgConnection,
        booking_id: BookingId,
        action: Settle,
        now: Timestamp,
    ) -> Result<(Booking, ConsistencyToken), ApiError> {
        event_log::lock_streams(conn, [(Booking::TYPE, booking_id.to_string())]).await?;
        let bookings = event_log::load_bookings(conn, &[booking_id]).await?;
        let loaded = bookings
            .get(&booking_id)
            .ok_or(ApiError::NotFound("booking"))?;
        let details = loaded
            .state
            .details()
            .ok_or(ApiError::NotFound("booking"))?;
        let labels: Vec<SeatLabel> = details.seats.iter().map(|s| s.label.clone()).collect();
        lock_seats(conn, details.show_id, &labels).await?;
        let seats = event_log::load_seats(conn, details.show_id, &labels).await?;
        let seat_states = states(&seats);
        let booking_states = states(&bookings);
        let streams = Streams {
            seats: &seat_states,
            bookings: &booking_states,
        };
        let decided = match action {
            Settle::Confirm => box_office::confirm(&loaded.state, streams, now),
            Settle::Cancel => box_office::cancel(&loaded.state, streams, now),
            Settle::Expire => box_office::expire(&loaded.state, streams, now),
        };
        let lapsed = matches!(loaded.state.status(), Some(BookingStatus::Held { expires_at }) if expires_at <= now);
        let (changes, refusal) = match decided {
            Ok(changes) => (changes, None),
            Err(domain::BoxOfficeError::Booking(domain::BookingError::Expired)) if lapsed => (
                box_office::expire(&loaded.state, streams, now)?,
                Some(ApiError::BookingClosed { status: "expired" }),
            ),
            Err(e) => return Err(e.into()),
        };
        let after = after(&loaded.state, booking_id, &changes);
        let token = append_changes(conn, details.show_id, changes, &seats, &bookings).await?;
        match refusal {
            Some(refusal) => Err(refusal),
            None => Ok((after, token)),
        }
    }

    /// The current time, for a command. The domain never reads a clock.
    pub fn now() -> Timestamp {
        Utc::now()
    }
}

/// One attempt at a command, inside its transaction.
pub type Work<'c> = Pin<Box<dyn Future<Output = Result<Reply, ApiError>> + Send + 'c>>;

/// What to do with an existing booking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settle {
    /// Buy a held booking.
    Confirm,
    /// Cancel and free the seats.
    Cancel,
    /// Record a lapsed hold and free the seats.
    Expire,
}

fn states<K: Ord + Clone, A: Clone>(loaded: &BTreeMap<K, Loaded<A>>) -> BTreeMap<K, A> {
    loaded
        .iter()
        .map(|(k, l)| (k.clone(), l.state.clone()))
        .collect()
}

/// Locks the seat streams of `labels` for the rest of the transaction.
async fn lock_seats(
    conn: &mut PgConnection,
    show_id: ShowId,
    labels: &[SeatLabel],
) -> Result<(), event_log::LogError> {
    event_log::lock_streams(
        conn,
        labels.iter().map(|label| {
            (
                Seat::TYPE,
                domain::SeatId::new(show_id, label.clone()).to_string(),
            )
        }),
    )
    .await
}

/// Appends one command's booking and seat events, each stream at the
/// version it was loaded at, and says which sequences they reached.
async fn append_changes(
    conn: &mut PgConnection,
    show_id: ShowId,
    changes: domain::Changes,
    seats: &BTreeMap<SeatLabel, Loaded<Seat>>,
    bookings: &BTreeMap<BookingId, Loaded<Booking>>,
) -> Result<ConsistencyToken, event_log::LogError> {
    let mut token = ConsistencyToken::new(show_id);
    for (id, events) in &changes.bookings {
        let before = bookings.get(id).map_or(0, |l| l.version);
        token.bookings.insert(*id, reached(before, events.len()));
    }
    for (id, events) in &changes.seats {
        let before = seats.get(&id.label).map_or(0, |l| l.version);
        token
            .seats
            .insert(id.label.clone(), reached(before, events.len()));
    }
    let versions = Versions {
        seats: versions(seats),
        bookings: versions(bookings),
        ..Versions::default()
    };
    let append = Append {
        changes,
        ..Append::default()
    };
    event_log::append(conn, &append, &versions).await?;
    Ok(token)
}

/// The sequence a stream at `version` reaches with `appended` more events.
fn reached(version: i64, appended: usize) -> u64 {
    u64::try_from(version)
        .unwrap_or(0)
        .saturating_add(appended as u64)
}

fn versions<K: Ord + Clone, A>(loaded: &BTreeMap<K, Loaded<A>>) -> BTreeMap<K, i64> {
    loaded.iter().map(|(k, l)| (k.clone(), l.version)).collect()
}

/// The booking once the changes are applied.
fn after(before: &Booking, booking_id: BookingId, changes: &domain::Changes) -> Booking {
    let mut booking = before.clone();
    for event in changes.bookings.get(&booking_id).into_iter().flatten() {
        booking.apply(event.clone());
    }
    booking
}
