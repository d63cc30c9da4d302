//! Best available on the command side: the box office picks the seats
//! inside the booking's transaction, from state that cannot be stale.
//!
//! 1. The section's taken seats are read from `taken_seats` (an inline
//!    projection of the seat events; a hold counts until it lapses), and
//!    the domain picks the best block of what is left
//!    ([`domain::best_available::best_block`]), leaving out seats another
//!    picker of this process is trying at this moment ([`Claims`]).
//! 2. The block's seat streams are locked without waiting, as
//!    `FOR UPDATE SKIP LOCKED` would: a block another transaction holds is
//!    left out and the next best one is tried, so concurrent pickers spread
//!    over the section instead of queueing for its best seats. Under its
//!    locks the block is loaded; a seat taken since the snapshot sends the
//!    picker to the next block too.
//! 3. The locked block is then booked as any booking is
//!    ([`Sales::place`], whose locks are the ones already held), so the
//!    seat aggregates decide, the buyer's limit holds, and lapsed holds on
//!    the block are expired in the same transaction.
//!
//! A picker answers 409 `no-adjacent-seats` only when no block is left
//! that is free as of the log, none being tried by anyone else; while
//! blocks are only busy, it waits a moment and looks again.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use domain::best_available::{best_block, Block};
use domain::{SeatLabel, Show, ShowId};
use sqlx::PgConnection;

use crate::error::ApiError;
use crate::event_log::{self, LockWait, LogError};
use crate::sales::{Decided, Order, Sales};

/// How long a picker waits before looking again when every block left is
/// busy (being taken by transactions that may yet fail).
const BUSY_PAUSE: Duration = Duration::from_millis(5);

/// Seats that pickers of this process are trying right now, so that a
/// rush of pickers does not all try the same best block first.
#[derive(Debug, Clone, Default)]
pub struct Claims(Arc<Mutex<HashSet<(ShowId, SeatLabel)>>>);

/// Seats claimed until dropped.
#[derive(Debug)]
pub struct Claimed {
    claims: Claims,
    show_id: ShowId,
    seats: Vec<SeatLabel>,
}

impl Drop for Claimed {
    fn drop(&mut self) {
        if let Ok(mut claimed) = self.claims.0.lock() {
            for seat in self.seats.drain(..) {
                claimed.remove(&(self.show_id, seat));
            }
        }
    }
}

impl Claims {
    /// Picks the best block of `section` that `out` leaves and no other
    /// picker here is trying, and claims it; also says whether a claim of
    /// another picker was passed over.
    fn pick(
        &self,
        show_id: ShowId,
        section: &domain::Section,
        count: u32,
        out: impl Fn(&SeatLabel) -> bool,
    ) -> (Option<(Block, Claimed)>, bool) {
        let Ok(mut claimed) = self.0.lock() else {
            return (None, true);
        };
        let passed_over = std::cell::Cell::new(false);
        let block = best_block(section, count, |seat| {
            if out(seat) {
                return true;
            }
            let busy = claimed.contains(&(show_id, seat.clone()));
            passed_over.set(passed_over.get() || busy);
            busy
        });
        let passed_over = passed_over.get();
        let Some(block) = block else {
            return (None, passed_over);
        };
        for seat in &block.seats {
            claimed.insert((show_id, seat.clone()));
        }
        let guard = Claimed {
            claims: self.clone(),
            show_id,
            seats: block.seats.clone(),
        };
        (Some((block, guard)), passed_over)
    }
}

/// Picks `count` adjacent seats of section `section` for `order` (whose
/// `seats` are ignored) and places the booking, in the caller's
/// transaction. Gives up with 503 after the command's whole wait
/// ([`Sales::command_wait`]).
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
) -> Result<Decided, ApiError> {
    let (claims, lock_wait, patience) = (&sales.claims, sales.lock_wait, sales.command_wait());
    let section = show
        .details()
        .and_then(|d| d.seat_map.sections().get(section))
        .ok_or(ApiError::NotFound("section"))?;
    let rows: Vec<domain::RowName> = section.rows.iter().map(|r| r.row.clone()).collect();
    let started = tokio::time::Instant::now();
    // Seats found busy (locked by another transaction) or taken since the
    // last snapshot: left out until the next snapshot.
    let mut skipped: HashSet<SeatLabel> = HashSet::new();
    loop {
        let now = Sales::now();
        let taken = event_log::taken_in_rows(conn, order.show_id, &rows, now).await?;
        let mut busy = false;
        loop {
            let (picked, passed_over) = claims.pick(order.show_id, section, count, |seat| {
                taken.contains(seat) || skipped.contains(seat)
            });
            busy |= passed_over;
            let Some((block, _claimed)) = picked else {
                break;
            };
            let streams = event_log::lock_and_load(
                conn,
                order.show_id,
                &block.seats,
                &[],
                None,
                LockWait::Never,
            )
            .await?;
            if !streams.locked {
                busy = true;
                skipped.extend(block.seats);
                continue;
            }
            let now = Sales::now();
            let gone: Vec<SeatLabel> = block
                .seats
                .iter()
                .filter(|seat| {
                    streams
                        .seats
                        .get(*seat)
                        .is_some_and(|s| s.state.owner_at(now).is_some())
                })
                .cloned()
                .collect();
            if !gone.is_empty() {
                skipped.extend(gone);
                continue;
            }
            order.seats = block.seats;
            // The block's locks are held: `place` takes them again at once
            // (advisory locks are re-entrant in a transaction).
            return Sales::place(conn, show, order, lock_wait, false).await;
        }
        if !busy {
            return Err(ApiError::NoAdjacentSeats { count });
        }
        if started.elapsed() >= patience {
            return Err(ApiError::StoreUnavailable(Some(LogError::LockTimeout)));
        }
        // Every block left is being taken by someone: look again once some
        // have committed (their seats are then taken) or failed (free).
        tokio::time::sleep(BUSY_PAUSE).await;
        skipped.clear();
    }
}
