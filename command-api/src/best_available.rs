//! Best available on the command side: the box office picks the seats
//! from the committed state, and the booking's own transaction decides on
//! them as on any booking, so a pick from state gone stale can never
//! sell a seat twice; it only sends the picker to pick again.
//!
//! With group commit ([`pick_and_book`]):
//!
//! 1. The section's taken seats are read from `taken_seats` (an inline
//!    projection of the seat events; a hold counts until it lapses), and
//!    the domain picks the best block of what is left
//!    ([`domain::best_available::best_block`]), leaving out seats another
//!    picker of this process is trying at this moment ([`Pickers`]), so a
//!    rush of pickers spreads over the section instead of queueing for its
//!    best seats.
//! 2. The block goes to the next group as a booking of those seats. The
//!    group tries its locks without waiting and the seat aggregates decide
//!    under them. A seat taken since the snapshot comes back to the picker
//!    (not as the buyer's 409), which leaves it out and picks again.
//! 3. A block whose locks another transaction holds (a booking in flight
//!    in another process) is passed over for the next best; it is tried
//!    again only once no other block is left. A block the group could not
//!    decide on for another reason (a lapsed hold to expire first, a busy
//!    idempotency key) is picked again in a transaction of its own
//!    ([`pick_and_place`]).
//!
//! In a transaction of its own (no grouping, or handed back by a group):
//! the snapshot is read in the transaction, the block's seat streams are
//! locked without waiting, as `FOR UPDATE SKIP LOCKED` would (a block
//! another transaction holds is left out and the next best one tried),
//! loaded and checked, then booked as any booking is ([`Sales::place`],
//! whose locks are the ones already held).
//!
//! A picker answers 409 `no-adjacent-seats` only when no block is left
//! that is free as of the log, none being tried by anyone else; while
//! blocks are only busy, it waits a moment and looks again.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use domain::best_available::{best_block_from, best_in_row, Block};
use domain::{Section, Show, ShowId};
use sqlx::PgConnection;

use crate::error::ApiError;
use crate::event_log::{self, LockWait, Savepoint};
use crate::group_commit::{Outcome, ReplyOf};
use crate::idempotency::Keyed;
use crate::reply::Reply;
use crate::sales::{Decided, Order, Sales};

/// How long a picker waits before looking again when every block left is
/// busy (being taken by transactions that may yet fail).
const BUSY_PAUSE: Duration = Duration::from_millis(5);

/// How long one reading of a section's taken seats serves this process's
/// pickers. Reading it for every picker would cost Postgres a scan of the
/// section's taken seats per booking. A seat another process took since
/// the reading costs a picker one more try (and a new reading); a seat
/// given back since (a cancel, a lapse) is offered from the next reading
/// on. A 409 is never answered from a reading this old: it is read again.
const SNAPSHOT_FOR: Duration = Duration::from_millis(100);

/// A section of a show: the show and the section's index in it.
type SectionKey = (ShowId, usize);

/// A seat of a section: its row's index in the section and its number.
type Place = (usize, u32);

/// A section's taken seats as one reading found them: a flag per seat,
/// by row index, then number.
#[derive(Debug, Default)]
struct Taken(Vec<Vec<bool>>);

impl Taken {
    fn of(section: &Section, found: &HashMap<String, Vec<u32>>) -> Self {
        Self(
            section
                .rows
                .iter()
                .map(|row| {
                    let mut flags = vec![false; row.seats as usize];
                    for number in found.get(row.row.as_str()).into_iter().flatten() {
                        if let Some(flag) = flags.get_mut((*number as usize).wrapping_sub(1)) {
                            *flag = true;
                        }
                    }
                    flags
                })
                .collect(),
        )
    }

    fn contains(&self, (row, number): Place) -> bool {
        self.0
            .get(row)
            .and_then(|flags| flags.get((number as usize).wrapping_sub(1)))
            .copied()
            .unwrap_or(false)
    }
}

/// What this process's pickers share: the seats they are trying right now,
/// so that a rush of pickers does not all try the same best block first,
/// and the latest reading of each section's taken seats.
#[derive(Debug, Clone, Default)]
pub struct Pickers(Arc<Mutex<Shared>>);

#[derive(Debug, Default)]
struct Shared {
    claimed: HashSet<(SectionKey, Place)>,
    snapshots: HashMap<SectionKey, Snapshot>,
}

/// A reading of a section's taken seats.
#[derive(Debug)]
struct Snapshot {
    /// When the reading began.
    began: Instant,
    taken: Arc<Taken>,
    /// Seats pickers here booked after the reading began, so that nobody
    /// here tries them again before the next reading shows them.
    booked: Vec<(Instant, Place)>,
    /// By block size, the first row that has such a block as this reading
    /// has it: the rows before it are full for that size, and stay so for
    /// the reading's life (booked seats and claims only take more away), so
    /// pickers of a stadium section do not scan its sold front rows again.
    front: HashMap<u32, usize>,
    /// A picker is reading the section again: the others go on with this
    /// reading meanwhile rather than all reading it at once.
    reading: bool,
}

/// What a picker picks from.
enum Reading {
    /// A reading recent enough.
    Kept(Arc<Taken>),
    /// None: this picker reads the section.
    Due,
}

/// Seats claimed until dropped.
#[derive(Debug)]
pub struct Claimed {
    pickers: Pickers,
    section: SectionKey,
    places: Vec<Place>,
}

impl Drop for Claimed {
    fn drop(&mut self) {
        if let Ok(mut shared) = self.pickers.0.lock() {
            for place in self.places.drain(..) {
                shared.claimed.remove(&(self.section, place));
            }
        }
    }
}

impl Pickers {
    /// The section's latest reading if it is recent enough to pick from
    /// (or is being read again by another picker), unless `again`.
    fn reading(&self, section: SectionKey, again: bool) -> Reading {
        let Ok(mut shared) = self.0.lock() else {
            return Reading::Due;
        };
        let Some(snapshot) = shared.snapshots.get_mut(&section) else {
            return Reading::Due;
        };
        let age = snapshot.began.elapsed();
        if !again && (age < SNAPSHOT_FOR || (snapshot.reading && age < 4 * SNAPSHOT_FOR)) {
            return Reading::Kept(Arc::clone(&snapshot.taken));
        }
        snapshot.reading = true;
        Reading::Due
    }

    /// Keeps a reading that began at `began`, unless a later one is kept.
    fn keep(&self, section: SectionKey, began: Instant, taken: Arc<Taken>) {
        let Ok(mut shared) = self.0.lock() else {
            return;
        };
        // Readings of shows nobody picks from any more go.
        shared
            .snapshots
            .retain(|_, s| s.began.elapsed() < SNAPSHOT_FOR * 400);
        let kept = shared.snapshots.entry(section).or_insert_with(|| Snapshot {
            began,
            taken: Arc::clone(&taken),
            booked: Vec::new(),
            front: HashMap::new(),
            reading: false,
        });
        // A later reading is kept (and whoever reads now clears the flag).
        if kept.began < began {
            kept.began = began;
            kept.taken = taken;
            kept.booked.retain(|(at, _)| *at >= began);
            kept.front.clear();
            kept.reading = false;
        }
    }

    /// Notes that `block` of `section` was booked here just now.
    fn booked(&self, section: SectionKey, block: &Block) {
        let Ok(mut shared) = self.0.lock() else {
            return;
        };
        if let Some(snapshot) = shared.snapshots.get_mut(&section) {
            let now = Instant::now();
            snapshot
                .booked
                .extend(places(block).map(|place| (now, place)));
        }
    }

    /// Picks the best block of `seats` that `out` leaves, no other picker
    /// here is trying and none here booked since the section's reading, and
    /// claims it; also says whether a claim of another picker was passed
    /// over. `out` leaves out at least what the section's kept reading
    /// has taken when `from_reading` (the rows the reading has full are
    /// then skipped); a picker with a reading of its own says false.
    fn pick(
        &self,
        section: SectionKey,
        seats: &Section,
        count: u32,
        from_reading: bool,
        out: impl Fn(Place) -> bool,
    ) -> (Option<(Block, Claimed)>, bool) {
        let Ok(mut shared) = self.0.lock() else {
            return (None, true);
        };
        let first_row = match shared.snapshots.get_mut(&section) {
            Some(snapshot) if from_reading => {
                let taken = Arc::clone(&snapshot.taken);
                let front = snapshot.front.entry(count).or_insert(0);
                while let Some(row) = seats.rows.get(*front) {
                    let index = *front;
                    if best_in_row(row, count, |n| taken.contains((index, n))).is_some() {
                        break;
                    }
                    *front += 1;
                }
                *front
            }
            _ => 0,
        };
        let booked: HashSet<Place> = shared
            .snapshots
            .get(&section)
            .map(|s| s.booked.iter().map(|(_, place)| *place).collect())
            .unwrap_or_default();
        let passed_over = std::cell::Cell::new(false);
        let block = best_block_from(seats, count, first_row, |row, number| {
            let place = (row, number);
            if out(place) || booked.contains(&place) {
                return true;
            }
            let busy = shared.claimed.contains(&(section, place));
            passed_over.set(passed_over.get() || busy);
            busy
        });
        let passed_over = passed_over.get();
        let Some(block) = block else {
            return (None, passed_over);
        };
        let claimed: Vec<Place> = places(&block).collect();
        shared
            .claimed
            .extend(claimed.iter().map(|place| (section, *place)));
        let guard = Claimed {
            pickers: self.clone(),
            section,
            places: claimed,
        };
        (Some((block, guard)), passed_over)
    }
}

/// The seats of a block, as places.
fn places(block: &Block) -> impl Iterator<Item = Place> + '_ {
    block
        .seats
        .iter()
        .map(|seat| (block.row_index, seat.number()))
}

/// The section `index` of `show`, and its rows' names.
fn section_of(show: &Show, index: usize) -> Result<(&Section, Vec<domain::RowName>), ApiError> {
    let section = show
        .details()
        .and_then(|d| d.seat_map.sections().get(index))
        .ok_or(ApiError::NotFound("section"))?;
    let rows = section.rows.iter().map(|r| r.row.clone()).collect();
    Ok((section, rows))
}

/// Picks `count` adjacent seats of section `section` for `order` (whose
/// `seats` are ignored) and books them in a group (see the module's
/// description), or in a transaction of its own when the group hands the
/// block back. Answers as [`Sales::book`] does, `reply` building the 201.
///
/// # Errors
/// 409 `no-adjacent-seats` (kept for the key); the box office's refusals;
/// store errors.
pub async fn pick_and_book(
    sales: &Sales,
    keyed: Option<&Keyed>,
    show: Arc<Show>,
    order: Order,
    section: usize,
    count: u32,
    reply: ReplyOf,
) -> Result<Reply, ApiError> {
    // The whole request's patience, over both paths.
    let deadline = Instant::now() + sales.command_wait();
    if sales.grouping() {
        let (seats, rows) = section_of(&show, section)?;
        let key = (order.show_id, section);
        // Seats a group found taken since the reading they were picked
        // from: left out for the rest of this request, whatever a reading
        // says, so that a reading behind the log cannot send the picker
        // back to the same block.
        let mut refused: HashSet<Place> = HashSet::new();
        // Blocks locked by another transaction when tried: passed over while
        // other blocks remain, tried again when none does (the booking in
        // flight there may yet fail).
        let mut passed: HashSet<Place> = HashSet::new();
        // Read the section again rather than pick from the latest reading.
        let mut again = false;
        loop {
            let (taken, fresh) = match sales.pickers.reading(key, again) {
                Reading::Kept(taken) => (taken, false),
                Reading::Due => {
                    let began = Instant::now();
                    let found = sales.taken_in_rows(order.show_id, &rows).await?;
                    let taken = Arc::new(Taken::of(seats, &found));
                    sales.pickers.keep(key, began, Arc::clone(&taken));
                    again = false;
                    (taken, true)
                }
            };
            let (picked, busy) = sales.pickers.pick(key, seats, count, true, |place| {
                taken.contains(place) || refused.contains(&place) || passed.contains(&place)
            });
            let Some((block, _claimed)) = picked else {
                if !busy && !fresh {
                    again = true;
                    continue;
                }
                let busy = busy || !passed.is_empty();
                passed.clear();
                if !busy {
                    return sales
                        .refuse(keyed, ApiError::NoAdjacentSeats { count })
                        .await;
                }
                if Instant::now() >= deadline {
                    return Err(ApiError::StoreUnavailable(None));
                }
                // Every block left is being tried by another picker here, or
                // was locked by another transaction when tried.
                tokio::time::sleep(BUSY_PAUSE).await;
                continue;
            };
            let mut placed = order.clone();
            placed.seats.clone_from(&block.seats);
            match sales.place_picked(keyed, &show, placed, &reply).await {
                // Taken since the reading: read again and pick again. Never
                // the buyer's answer: they did not ask for those seats.
                Some(Outcome::Answered(Err(ApiError::Unavailable { seats }))) => {
                    if Instant::now() >= deadline {
                        return Err(ApiError::StoreUnavailable(None));
                    }
                    let row = block.row_index;
                    refused.extend(seats.iter().map(|seat| (row, seat.number())));
                    again = true;
                }
                Some(Outcome::Answered(answer)) => {
                    if answer
                        .as_ref()
                        .is_ok_and(|r| r.status == StatusCode::CREATED && !r.replayed)
                    {
                        sales.pickers.booked(key, &block);
                    }
                    return answer;
                }
                Some(Outcome::Busy) => {
                    if Instant::now() >= deadline {
                        return Err(ApiError::StoreUnavailable(None));
                    }
                    passed.extend(places(&block));
                }
                Some(Outcome::OnItsOwn) | None => break,
            }
        }
    }
    sales
        .transact(keyed, |conn| {
            let (sales, show, order, reply) = (
                sales.clone(),
                Arc::clone(&show),
                order.clone(),
                Arc::clone(&reply),
            );
            Box::pin(async move {
                let decided =
                    pick_and_place(conn, &sales, &show, order, section, count, deadline).await?;
                reply(&decided)
            })
        })
        .await
}

/// Picks `count` adjacent seats of section `section` for `order` (whose
/// `seats` are ignored) and places the booking, in the caller's
/// transaction. Gives up with a 503 that is not tried again at `deadline`.
///
/// Each block is tried under a savepoint: the locks of a block found busy
/// or taken are given back at once (advisory transaction locks are released
/// with the savepoint), so a picker never holds seats it does not book.
///
/// # Errors
/// 409 `no-adjacent-seats`; the box office's refusals; store errors.
pub async fn pick_and_place(
    conn: &mut PgConnection,
    sales: &Sales,
    show: &Show,
    mut order: Order,
    section: usize,
    count: u32,
    deadline: Instant,
) -> Result<Decided, ApiError> {
    let (pickers, lock_wait) = (&sales.pickers, sales.lock_wait);
    let key = (order.show_id, section);
    let (seats, rows) = section_of(show, section)?;
    // The booking's and the buyer's locks first, waited for while no seat
    // is locked: a busy buyer (their own confirm, say) must not make every
    // block look busy.
    let own = event_log::lock_and_load(
        conn,
        order.show_id,
        &[],
        &[order.booking_id],
        order.buyer(show),
        LockWait::Upto(lock_wait),
    )
    .await?;
    if let Some(booking) = own.bookings.get(&order.booking_id) {
        // A group's commit reported an error but took effect: the booking
        // is answered as it stands, with its own seats.
        order.seats = booking
            .state
            .details()
            .map(|d| d.seats.iter().map(|s| s.label.clone()).collect())
            .unwrap_or_default();
        return Sales::place(conn, show, order, lock_wait, false).await;
    }
    // Seats found busy (locked by another transaction) or taken since the
    // reading: left out until the next reading.
    let mut skipped: HashSet<Place> = HashSet::new();
    loop {
        let found = event_log::taken_in_rows(conn, order.show_id, &rows, Sales::now()).await?;
        let taken = Taken::of(seats, &found);
        let mut busy = false;
        loop {
            let (picked, passed_over) = pickers.pick(key, seats, count, false, |place| {
                taken.contains(place) || skipped.contains(&place)
            });
            busy |= passed_over;
            let Some((block, _claimed)) = picked else {
                break;
            };
            event_log::savepoint(conn, Savepoint::Begin).await?;
            let streams = event_log::lock_and_load(
                conn,
                order.show_id,
                &block.seats,
                &[],
                None,
                LockWait::Never,
            )
            .await?;
            let now = Sales::now();
            let gone: Vec<Place> = block
                .seats
                .iter()
                .filter(|seat| {
                    streams
                        .seats
                        .get(*seat)
                        .is_some_and(|s| s.state.owner_at(now).is_some())
                })
                .map(|seat| (block.row_index, seat.number()))
                .collect();
            if !streams.locked || !gone.is_empty() {
                event_log::savepoint(conn, Savepoint::Undo).await?;
                if streams.locked {
                    skipped.extend(gone);
                } else {
                    busy = true;
                    skipped.extend(places(&block));
                }
                if Instant::now() >= deadline {
                    return Err(ApiError::StoreUnavailable(None));
                }
                continue;
            }
            event_log::savepoint(conn, Savepoint::Keep).await?;
            order.seats = block.seats;
            // Every lock `place` takes for a booking without lapsed holds is
            // held: it takes them again at once (advisory locks are
            // re-entrant in a transaction), never waiting while it holds
            // these.
            return Sales::place(conn, show, order, lock_wait, false).await;
        }
        if !busy {
            return Err(ApiError::NoAdjacentSeats { count });
        }
        if Instant::now() >= deadline {
            return Err(ApiError::StoreUnavailable(None));
        }
        // Every block left is being taken by someone: look again once some
        // have committed (their seats are then taken) or failed (free).
        tokio::time::sleep(BUSY_PAUSE).await;
        skipped.clear();
    }
}
