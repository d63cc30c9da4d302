//! Runs the box office against the log: each command is one Postgres
//! transaction that locks the streams it decides on (in a fixed order),
//! loads them in one query per aggregate type, asks the pure domain for the
//! events, and appends them all with their expected versions.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use chrono::Utc;
use cqrs_es::Aggregate;
use domain::box_office::{self, BookingRequest, Purchase, Streams};
use domain::{
    Booking, BookingId, BookingStatus, ConsistencyToken, Seat, SeatLabel, Show, ShowDetails,
    ShowId, Timestamp, TokenKey, UserId,
};
use service_kit::auth::Caller;
use sqlx::{PgConnection, PgPool};
use tokio::sync::Notify;

use crate::error::ApiError;
use crate::event_log::{self, Append, Loaded, LockWait, LogError, Versions};
use crate::gate::SeatGate;
use crate::group_commit::{Command, GroupCommit, Grouping, Outcome, Placement, Refusal, ReplyOf};
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
    /// The longest wait for one stream's lock.
    pub lock_wait: Duration,
    /// Signalled after every commit, for the relay in this process.
    commits: Arc<Notify>,
    /// One booking command per seat at a time goes to Postgres from here.
    pub gate: SeatGate,
    /// What best-available pickers of this process share: the seats they
    /// are trying, and the latest reading of each section's taken seats.
    pub pickers: crate::best_available::Pickers,
    /// Booking commands that arrive together commit together.
    group: Option<GroupCommit>,
    /// Signs the consistency tokens of the answers.
    token_key: Arc<TokenKey>,
}

impl Sales {
    /// Sales on `pool`, holding seats for `hold_for`, running a command at
    /// most `max_attempts` times when it meets concurrent writers, each time
    /// waiting at most `lock_wait` for a stream's lock.
    pub fn new(pool: PgPool, hold_for: Duration, max_attempts: u32, lock_wait: Duration) -> Self {
        Self {
            pool,
            shows: Arc::default(),
            hold_for,
            max_attempts: max_attempts.max(1),
            lock_wait,
            commits: Arc::default(),
            gate: SeatGate::default(),
            pickers: crate::best_available::Pickers::default(),
            group: None,
            token_key: Arc::new(development_key()),
        }
    }

    /// Tokens are signed with `key` (the development key otherwise).
    #[must_use]
    pub fn signing(mut self, key: TokenKey) -> Self {
        self.token_key = Arc::new(key);
        self
    }

    /// The signed header value of `token`.
    pub fn signed(&self, token: &ConsistencyToken) -> String {
        self.token_key.sign(token)
    }

    /// Bookings are grouped as `grouping` says (see [`crate::group_commit`]).
    /// Spawns the task that runs the groups.
    #[must_use]
    pub fn grouped(mut self, grouping: Grouping) -> Self {
        if grouping.max > 1 {
            self.group = Some(GroupCommit::start(
                self.pool.clone(),
                grouping,
                Arc::clone(&self.commits),
            ));
        }
        self
    }

    /// The answer to a request refused before its transaction: its key's
    /// stored answer if it has one (its first request may have won the
    /// very seats), else `refusal`, kept for the key (in a group when
    /// grouping is on). Without a key, just `refusal`.
    ///
    /// # Errors
    /// `refusal` without a key; the key's own refusals; store errors.
    pub async fn refuse(
        &self,
        keyed: Option<&Keyed>,
        refusal: ApiError,
    ) -> Result<Reply, ApiError> {
        let Some(keyed) = keyed else {
            return Err(refusal);
        };
        let reply = refusal.to_reply();
        if let Some(group) = &self.group {
            let command = Command::Refuse(Refusal {
                keyed: keyed.clone(),
                reply: reply.clone(),
            });
            if let Outcome::Answered(answer) = group.submit(command).await {
                return answer;
            }
        }
        idempotency::refuse(&self.pool, keyed, &reply).await
    }

    /// For a booking that met another for its seats in this process: its
    /// answer if a seat is someone else's as of the committed state (a
    /// refusal, kept for its key; or the key's stored answer), `None` if it
    /// may go on.
    ///
    /// # Errors
    /// Store errors and the key's own refusals.
    pub async fn refused_from_snapshot(
        &self,
        keyed: Option<&Keyed>,
        show: &Arc<Show>,
        order: &Order,
        reply: &ReplyOf,
    ) -> Result<Option<Reply>, ApiError> {
        if let Some(group) = &self.group {
            let check = Command::Check(Placement {
                show: Arc::clone(show),
                order: order.clone(),
                keyed: keyed.cloned(),
                reply: Arc::clone(reply),
                picked: false,
                cause: crate::cause::Cause::current(),
            });
            match group.submit(check).await {
                Outcome::Answered(answer) => return answer.map(Some),
                Outcome::OnItsOwn | Outcome::Busy if keyed.is_none() => return Ok(None),
                // The key was busy: its first request is in flight.
                Outcome::OnItsOwn | Outcome::Busy => {}
            }
        }
        let taken = self.taken_seats(order.show_id, &order.seats).await?;
        if taken.is_empty() {
            return Ok(None);
        }
        self.refuse(keyed, ApiError::Unavailable { seats: taken })
            .await
            .map(Some)
    }

    /// Places a booking: in a group when grouping is on and the group can
    /// decide it, else on its own (with waits for its locks). `reply`
    /// builds the answer from what was decided, either way.
    ///
    /// # Errors
    /// Store errors and the key's own refusals; the box office's refusals
    /// are answers (`Ok`), as with [`Sales::transact`].
    pub async fn book(
        &self,
        keyed: Option<&Keyed>,
        show: Arc<Show>,
        order: Order,
        reply: ReplyOf,
    ) -> Result<Reply, ApiError> {
        if let Some(group) = &self.group {
            let placement = Placement {
                show: Arc::clone(&show),
                order: order.clone(),
                keyed: keyed.cloned(),
                reply: Arc::clone(&reply),
                picked: false,
                cause: crate::cause::Cause::current(),
            };
            if let Outcome::Answered(answer) = group.submit(Command::Place(placement)).await {
                return answer;
            }
        }
        let lock_wait = self.lock_wait;
        let mut attempts = 0;
        self.transact(keyed, |conn| {
            let (show, order, reply) = (Arc::clone(&show), order.clone(), Arc::clone(&reply));
            attempts += 1;
            let patient = attempts > 1;
            Box::pin(async move {
                let decided = Self::place(conn, &show, order, lock_wait, patient).await?;
                reply(&decided)
            })
        })
        .await
    }

    /// Books `order`, whose seats best available picked from a snapshot,
    /// in the next group (see [`Placement::picked`]); `None` when grouping
    /// is off.
    pub async fn place_picked(
        &self,
        keyed: Option<&Keyed>,
        show: &Arc<Show>,
        order: Order,
        reply: &ReplyOf,
    ) -> Option<Outcome> {
        let group = self.group.as_ref()?;
        let placement = Placement {
            show: Arc::clone(show),
            order,
            keyed: keyed.cloned(),
            reply: Arc::clone(reply),
            picked: true,
            cause: crate::cause::Cause::current(),
        };
        Some(group.submit(Command::Place(placement)).await)
    }

    /// Whether booking commands run in groups.
    pub fn grouping(&self) -> bool {
        self.group.is_some()
    }

    /// The numbers of the seats of `rows`, by row name, that are held
    /// (until their hold lapses) or booked as of the committed state: a
    /// snapshot to pick from, never to decide on.
    ///
    /// # Errors
    /// Store errors.
    pub async fn taken_in_rows(
        &self,
        show_id: ShowId,
        rows: &[domain::RowName],
    ) -> Result<HashMap<String, Vec<u32>>, ApiError> {
        let mut conn = self.pool.acquire().await.map_err(LogError::Unreachable)?;
        Ok(event_log::taken_in_rows(&mut conn, show_id, rows, Self::now()).await?)
    }

    /// The longest a command may wait in all: for every attempt's locks.
    pub fn command_wait(&self) -> Duration {
        self.lock_wait.saturating_mul(self.max_attempts)
    }

    /// The requested seats that are someone else's as of the committed
    /// state (a snapshot, no lock): fit to refuse from, not to decide on.
    ///
    /// # Errors
    /// Store errors.
    pub async fn taken_seats(
        &self,
        show_id: ShowId,
        labels: &[SeatLabel],
    ) -> Result<Vec<SeatLabel>, ApiError> {
        let mut conn = self.pool.acquire().await.map_err(LogError::Unreachable)?;
        let seats = event_log::load_seats(&mut conn, show_id, labels).await?;
        let now = Self::now();
        Ok(labels
            .iter()
            .filter(|label| {
                seats
                    .get(*label)
                    .is_some_and(|seat| seat.state.owner_at(now).is_some())
            })
            .cloned()
            .collect())
    }

    /// Refuses, before anything is read, an order the show could never
    /// take (no seats, too many, a seat twice, seats it does not have).
    ///
    /// # Errors
    /// The box office's refusal.
    pub fn check(show: &Show, order: &Order) -> Result<(), ApiError> {
        let now = Self::now();
        box_office::place(
            show,
            order.request(now),
            &Booking::default(),
            Streams {
                seats: &BTreeMap::new(),
                bookings: &BTreeMap::new(),
            },
            now,
        )?;
        Ok(())
    }

    /// Signalled after every commit (a permit is kept when nobody waits),
    /// so the relay of this process wakes without a poll.
    pub fn commits(&self) -> Arc<Notify> {
        Arc::clone(&self.commits)
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
                Ok(()) => {
                    self.commits.notify_one();
                    return Ok(reply);
                }
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
    /// Refuses from a committed snapshot, without taking any lock, when a
    /// seat is already someone else's: the refusal is true as of that
    /// snapshot. Otherwise it locks every stream it will write (the seats,
    /// the new booking, and any booking whose lapsed hold it replaces with
    /// all of that booking's seats), reloads them, and decides at a "now"
    /// taken once the locks are held. `patient` (a later attempt) skips the
    /// first try at taking the requested locks at once and waits, in one
    /// ordered acquisition, for all of them, the lapsed holders' included:
    /// two buyers of two seats of one lapsed hold would otherwise each take
    /// one seat, fail to take the other, and start over forever.
    ///
    /// A booking whose stream already exists (the command ran before, in a
    /// group whose commit reported an error but took effect) is answered as
    /// it stands, not placed twice.
    ///
    /// # Errors
    /// The box office's refusals and store errors;
    /// [`LogError::LockTimeout`] after `lock_wait` for a lock.
    pub async fn place(
        conn: &mut PgConnection,
        show: &Show,
        order: Order,
        lock_wait: Duration,
        patient: bool,
    ) -> Result<Decided, ApiError> {
        let show_id = order.show_id;
        let booking_id = order.booking_id;
        let buyer = order.buyer(show);
        // Checked before any lock, so bad requests never queue behind buyers.
        Self::check(show, &order)?;
        let before = Self::now();
        let at_once = if patient {
            None
        } else {
            Some(
                event_log::lock_and_load(
                    conn,
                    show_id,
                    &order.seats,
                    &[booking_id],
                    buyer,
                    LockWait::Never,
                )
                .await?,
            )
        };
        let (mut streams, held) = match at_once {
            Some(first) if first.locked => {
                let held = Held {
                    seats: order.seats.iter().cloned().collect(),
                    bookings: BTreeSet::from([booking_id]),
                };
                (first, held)
            }
            at_once => {
                let snapshot = match at_once {
                    Some(first) => first.seats,
                    None => event_log::load_seats(conn, show_id, &order.seats).await?,
                };
                let taken: Vec<SeatLabel> = order
                    .seats
                    .iter()
                    .filter(|label| {
                        snapshot
                            .get(*label)
                            .and_then(|seat| seat.state.owner_at(before))
                            .is_some_and(|owner| owner != booking_id)
                    })
                    .cloned()
                    .collect();
                if !taken.is_empty() {
                    return Err(ApiError::Unavailable { seats: taken });
                }
                // Free as of the snapshot: wait for every lock, the lapsed
                // holders' too, in one ordered acquisition.
                let holders: Vec<BookingId> =
                    box_office::lapsed_holders(&states(&snapshot), &order.seats, before)
                        .into_iter()
                        .collect();
                let mut seats = order.seats.clone();
                seats.extend(holder_seats(conn, &holders, &seats).await?);
                let bookings: Vec<BookingId> = std::iter::once(booking_id).chain(holders).collect();
                let streams = event_log::lock_and_load(
                    conn,
                    show_id,
                    &seats,
                    &bookings,
                    buyer,
                    LockWait::Upto(lock_wait),
                )
                .await?;
                let held = Held {
                    seats: seats.into_iter().collect(),
                    bookings: bookings.into_iter().collect(),
                };
                (streams, held)
            }
        };
        let now = Self::now();
        if let Some(existing) = streams.bookings.get(&booking_id) {
            return Ok(Decided {
                booking: existing.state.clone(),
                token: standing(show_id, booking_id, &order.seats, &streams),
                now,
            });
        }
        // Holds that lapsed since the snapshot: their bookings and seats are
        // written too, so they are locked too, without waiting (a lock held
        // out of order could deadlock); if one is busy, start over, then
        // patiently.
        let holders: Vec<BookingId> =
            box_office::lapsed_holders(&states(&streams.seats), &order.seats, now)
                .into_iter()
                .filter(|holder| !held.bookings.contains(holder))
                .collect();
        if !holders.is_empty() {
            let seats: Vec<SeatLabel> = holder_seats(conn, &holders, &order.seats)
                .await?
                .into_iter()
                .filter(|label| !held.seats.contains(label))
                .collect();
            let extra =
                event_log::lock_and_load(conn, show_id, &seats, &holders, None, LockWait::Never)
                    .await?;
            if !extra.locked {
                return Err(LogError::Conflict.into());
            }
            streams.seats.extend(extra.seats);
            streams.bookings.extend(extra.bookings);
        }
        let seat_states = states(&streams.seats);
        let booking_states = states(&streams.bookings);
        let changes = box_office::place(
            show,
            order.request(now),
            &Booking::default(),
            Streams {
                seats: &seat_states,
                bookings: &booking_states,
            },
            now,
        )?;
        if let Some(user) = buyer {
            let live = event_log::live_seats(conn, &[(show_id, user)], now).await?;
            let current = live.get(&(show_id, user)).copied().unwrap_or(0);
            box_office::check_seat_limit(show, current, order.seats.len())?;
        }
        let after = after(&Booking::default(), booking_id, &changes);
        let token =
            append_changes(conn, show_id, changes, &streams.seats, &streams.bookings).await?;
        Ok(Decided {
            booking: after,
            token,
            now,
        })
    }

    /// Confirms or cancels a booking, with its seats, deciding from the
    /// booking and seats as they are once their locks are held.
    ///
    /// A confirm or cancel that finds the hold lapsed records the expiry in
    /// the same transaction and then answers 409 `expired`.
    ///
    /// Only the booking's buyer, or an admin, may settle it: anyone else is
    /// refused before anything is locked or written. A confirm holds the
    /// buyer's allowance lock: it turns a hold that would lapse into seats
    /// kept, which a concurrent booking of the buyer must see.
    ///
    /// # Errors
    /// [`ApiError::NotFound`], [`ApiError::Forbidden`],
    /// [`ApiError::BookingClosed`], store errors.
    pub async fn settle(
        conn: &mut PgConnection,
        caller: &Caller,
        booking_id: BookingId,
        action: Settle,
        lock_wait: Duration,
    ) -> Result<Decided, ApiError> {
        let (show_id, user_id, labels) = booking_seats(conn, booking_id)
            .await?
            .ok_or(ApiError::NotFound("booking"))?;
        tracing::Span::current().record("show_id", tracing::field::display(show_id));
        if !caller.acts_for(user_id.as_uuid()) {
            return Err(ApiError::Forbidden(
                "only the booking's buyer or an admin may change it",
            ));
        }
        let buyer = (action == Settle::Confirm).then_some(user_id);
        let mut streams = event_log::lock_and_load(
            conn,
            show_id,
            &labels,
            &[booking_id],
            buyer,
            LockWait::Never,
        )
        .await?;
        if !streams.locked {
            streams = event_log::lock_and_load(
                conn,
                show_id,
                &labels,
                &[booking_id],
                buyer,
                LockWait::Upto(lock_wait),
            )
            .await?;
        }
        let now = Self::now();
        let loaded = streams
            .bookings
            .get(&booking_id)
            .ok_or(ApiError::NotFound("booking"))?;
        let seat_states = states(&streams.seats);
        let booking_states = states(&streams.bookings);
        let views = Streams {
            seats: &seat_states,
            bookings: &booking_states,
        };
        let decided = match action {
            Settle::Confirm => box_office::confirm(&loaded.state, views, now),
            Settle::Cancel { by } => box_office::cancel(&loaded.state, views, now, by),
        };
        let lapsed = matches!(loaded.state.status(), Some(BookingStatus::Held { expires_at }) if expires_at <= now);
        let (changes, refusal) = match decided {
            Ok(changes) => (changes, None),
            Err(domain::BoxOfficeError::Booking(domain::BookingError::Expired)) if lapsed => (
                box_office::expire(&loaded.state, views, now)?,
                Some(ApiError::BookingClosed { status: "expired" }),
            ),
            Err(e) => return Err(e.into()),
        };
        let booking = after(&loaded.state, booking_id, &changes);
        let token =
            append_changes(conn, show_id, changes, &streams.seats, &streams.bookings).await?;
        match refusal {
            Some(refusal) => Err(refusal),
            None => Ok(Decided {
                booking,
                token,
                now,
            }),
        }
    }

    /// Records the lapse of a held booking, for the sweeper: only if its
    /// streams are free at once (a buyer working on them records it
    /// itself) and it is still a lapsed hold. Whether it expired it.
    ///
    /// # Errors
    /// Store errors.
    pub async fn expire(conn: &mut PgConnection, booking_id: BookingId) -> Result<bool, ApiError> {
        let Some((show_id, _, labels)) = booking_seats(conn, booking_id).await? else {
            return Ok(false);
        };
        let streams =
            event_log::lock_and_load(conn, show_id, &labels, &[booking_id], None, LockWait::Never)
                .await?;
        if !streams.locked {
            return Ok(false);
        }
        let now = Self::now();
        let Some(loaded) = streams.bookings.get(&booking_id) else {
            return Ok(false);
        };
        if !matches!(loaded.state.status(), Some(BookingStatus::Held { expires_at }) if expires_at <= now)
        {
            return Ok(false);
        }
        let seat_states = states(&streams.seats);
        let booking_states = states(&streams.bookings);
        let changes = box_office::expire(
            &loaded.state,
            Streams {
                seats: &seat_states,
                bookings: &booking_states,
            },
            now,
        )?;
        append_changes(conn, show_id, changes, &streams.seats, &streams.bookings).await?;
        Ok(true)
    }

    /// The current time, for a command. The domain never reads a clock.
    pub fn now() -> Timestamp {
        Utc::now()
    }
}

fn development_key() -> TokenKey {
    // Long enough by construction; a failure here would be a typo in the
    // constant, caught by every test.
    TokenKey::new(domain::consistency::DEVELOPMENT_KEY.as_bytes().to_vec())
        .unwrap_or_else(|_| unreachable!("the development key is long enough"))
}

/// One attempt at a command, inside its transaction.
pub type Work<'c> = Pin<Box<dyn Future<Output = Result<Reply, ApiError>> + Send + 'c>>;

/// What to do with an existing booking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settle {
    /// Buy a held booking.
    Confirm,
    /// Cancel and free the seats, as the verified user `by` (`None` when
    /// tokens are not checked).
    Cancel {
        /// Who asks.
        by: Option<UserId>,
    },
}

pub(crate) fn states<K: Ord + Clone, A: Clone>(loaded: &BTreeMap<K, Loaded<A>>) -> BTreeMap<K, A> {
    loaded
        .iter()
        .map(|(k, l)| (k.clone(), l.state.clone()))
        .collect()
}

/// A booking asked for, before the time of its decision is known.
#[derive(Debug, Clone)]
pub struct Order {
    /// The new booking's id.
    pub booking_id: BookingId,
    /// The show.
    pub show_id: ShowId,
    /// The buyer.
    pub user_id: UserId,
    /// The seats, in the buyer's order.
    pub seats: Vec<SeatLabel>,
    /// Hold the seats this long (to be confirmed), or buy them at once.
    pub hold_for: Option<chrono::Duration>,
}

impl Order {
    /// The buyer whose allowance the order is decided with: `None` when
    /// `show` sets no per-buyer limit (then nothing is locked or read).
    pub(crate) fn buyer(&self, show: &Show) -> Option<UserId> {
        show.details()
            .and_then(|d| d.max_seats_per_user)
            .map(|_| self.user_id)
    }

    /// The box office's request, decided at `now`.
    pub(crate) fn request(&self, now: Timestamp) -> BookingRequest {
        BookingRequest {
            booking_id: self.booking_id,
            show_id: self.show_id,
            user_id: self.user_id,
            seats: self.seats.clone(),
            purchase: match self.hold_for {
                Some(hold_for) => Purchase::Hold {
                    expires_at: now + hold_for,
                },
                None => Purchase::Book,
            },
        }
    }
}

/// A booking decided from its seats alone.
#[derive(Debug)]
pub enum Placed {
    /// The events to append, and the booking after them.
    Decided {
        /// Booking and seat events.
        changes: domain::Changes,
        /// The new booking.
        booking: Booking,
    },
    /// A seat carries a lapsed hold: that booking and its other seats are
    /// written too, so they must be locked first.
    NeedsLapsedHolders,
}

/// Decides `order` at `now` from its seats and its buyer's live seats in
/// the show (all loaded under their locks).
///
/// # Errors
/// The box office's refusals.
pub(crate) fn decide_place(
    show: &Show,
    order: &Order,
    seats: &BTreeMap<SeatLabel, Loaded<Seat>>,
    buyer_seats: u32,
    now: Timestamp,
) -> Result<Placed, ApiError> {
    let seat_states = states(seats);
    if !box_office::lapsed_holders(&seat_states, &order.seats, now).is_empty() {
        return Ok(Placed::NeedsLapsedHolders);
    }
    let changes = box_office::place(
        show,
        order.request(now),
        &Booking::default(),
        Streams {
            seats: &seat_states,
            bookings: &BTreeMap::new(),
        },
        now,
    )?;
    box_office::check_seat_limit(show, buyer_seats, order.seats.len())?;
    let booking = after(&Booking::default(), order.booking_id, &changes);
    Ok(Placed::Decided { changes, booking })
}

/// What a command decided: the booking after it, the consistency token of
/// what it wrote, and the time it decided at.
#[derive(Debug)]
pub struct Decided {
    /// The booking once the command's events apply.
    pub booking: Booking,
    /// The streams written and the sequences they reached.
    pub token: ConsistencyToken,
    /// When it was decided (after its locks were held).
    pub now: Timestamp,
}

/// The streams whose locks a command holds.
#[derive(Debug, Default)]
struct Held {
    seats: BTreeSet<SeatLabel>,
    bookings: BTreeSet<BookingId>,
}

/// A booking's show, buyer and seats, from a committed snapshot: what it
/// locks (a booking's details never change once written). `None`: no
/// booking.
async fn booking_seats(
    conn: &mut PgConnection,
    booking_id: BookingId,
) -> Result<Option<(ShowId, UserId, Vec<SeatLabel>)>, LogError> {
    let bookings = event_log::load_bookings(conn, &[booking_id]).await?;
    Ok(bookings
        .get(&booking_id)
        .and_then(|loaded| loaded.state.details())
        .map(|details| {
            (
                details.show_id,
                details.user_id,
                details.seats.iter().map(|s| s.label.clone()).collect(),
            )
        }))
}

/// The seats of `holders` (lapsed holds to be expired) other than
/// `requested`, from a committed snapshot.
async fn holder_seats(
    conn: &mut PgConnection,
    holders: &[BookingId],
    requested: &[SeatLabel],
) -> Result<Vec<SeatLabel>, LogError> {
    if holders.is_empty() {
        return Ok(Vec::new());
    }
    let bookings = event_log::load_bookings(conn, holders).await?;
    let mut seats: Vec<SeatLabel> = bookings
        .values()
        .filter_map(|b| b.state.details())
        .flat_map(|d| d.seats.iter().map(|s| s.label.clone()))
        .filter(|label| !requested.contains(label))
        .collect();
    seats.sort();
    seats.dedup();
    Ok(seats)
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
    let token = token_for(show_id, &changes, seats, bookings);
    let mut versions = Versions::default();
    add_versions(&mut versions, show_id, seats, bookings);
    let append = Append {
        changes,
        ..Append::default()
    };
    event_log::append(conn, &append, &versions).await?;
    Ok(token)
}

/// The token of a booking as it stands: its stream and its seats' at the
/// versions loaded.
fn standing(
    show_id: ShowId,
    booking_id: BookingId,
    labels: &[SeatLabel],
    streams: &event_log::ShowStreams,
) -> ConsistencyToken {
    let mut token = ConsistencyToken::new(show_id);
    if let Some(booking) = streams.bookings.get(&booking_id) {
        token
            .bookings
            .insert(booking_id, u64::try_from(booking.version).unwrap_or(0));
    }
    for label in labels {
        if let Some(seat) = streams.seats.get(label) {
            token
                .seats
                .insert(label.clone(), u64::try_from(seat.version).unwrap_or(0));
        }
    }
    token
}

/// The streams `changes` write and the sequences they reach from the
/// versions loaded.
pub(crate) fn token_for(
    show_id: ShowId,
    changes: &domain::Changes,
    seats: &BTreeMap<SeatLabel, Loaded<Seat>>,
    bookings: &BTreeMap<BookingId, Loaded<Booking>>,
) -> ConsistencyToken {
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
    token
}

/// Adds the loaded versions of one show's streams to `versions`.
pub(crate) fn add_versions(
    versions: &mut Versions,
    show_id: ShowId,
    seats: &BTreeMap<SeatLabel, Loaded<Seat>>,
    bookings: &BTreeMap<BookingId, Loaded<Booking>>,
) {
    for (label, loaded) in seats {
        versions
            .seats
            .insert(domain::SeatId::new(show_id, label.clone()), loaded.version);
    }
    for (id, loaded) in bookings {
        versions.bookings.insert(*id, loaded.version);
    }
}

/// The sequence a stream at `version` reaches with `appended` more events.
fn reached(version: i64, appended: usize) -> u64 {
    u64::try_from(version)
        .unwrap_or(0)
        .saturating_add(appended as u64)
}

/// The booking once the changes are applied.
pub(crate) fn after(before: &Booking, booking_id: BookingId, changes: &domain::Changes) -> Booking {
    let mut booking = before.clone();
    for event in changes.bookings.get(&booking_id).into_iter().flatten() {
        booking.apply(event.clone());
    }
    booking
}
