//! The box office: the rules that span a booking and its seats. Each function
//! takes the current state of every stream a command touches and returns the
//! events to append to each, all or nothing, so the caller can write them in
//! one transaction with each stream's expected version.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::booking::{
    BookedSeat, Booking, BookingCommand, BookingDetails, BookingError, BookingEvent,
};
use crate::ids::{BookingId, SeatId, SeatLabel, ShowId, UserId};
use crate::seat::{ReleaseReason, Seat, SeatCommand, SeatEvent};
use crate::show::Show;
use crate::Timestamp;

/// Most seats one booking may take.
pub const MAX_SEATS_PER_BOOKING: usize = 10;

/// How a booking takes its seats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "snake_case")]
pub enum Purchase {
    /// Hold them until `expires_at`, to be confirmed.
    Hold {
        /// When the hold lapses.
        expires_at: Timestamp,
    },
    /// Buy them at once.
    Book,
}

/// A request for seats, as the box office receives it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BookingRequest {
    /// The new booking's id.
    pub booking_id: BookingId,
    /// The show.
    pub show_id: ShowId,
    /// The buyer.
    pub user_id: UserId,
    /// The seats asked for, in the buyer's order.
    pub seats: Vec<SeatLabel>,
    /// Hold or buy.
    pub purchase: Purchase,
}

/// The events one command appends, per stream, in a fixed (id) order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    /// Events per booking stream.
    pub bookings: BTreeMap<BookingId, Vec<BookingEvent>>,
    /// Events per seat stream.
    pub seats: BTreeMap<SeatId, Vec<SeatEvent>>,
}

impl Changes {
    /// Whether the command changes nothing (a retry of something done).
    pub fn is_empty(&self) -> bool {
        self.bookings.values().all(Vec::is_empty) && self.seats.values().all(Vec::is_empty)
    }

    fn add_booking(&mut self, id: BookingId, events: Vec<BookingEvent>) {
        if !events.is_empty() {
            self.bookings.entry(id).or_default().extend(events);
        }
    }

    fn add_seat(&mut self, id: SeatId, events: Vec<SeatEvent>) {
        if !events.is_empty() {
            self.seats.entry(id).or_default().extend(events);
        }
    }
}

/// Why the box office refused a command.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BoxOfficeError {
    /// No show has this id.
    #[error("show not found")]
    ShowNotFound,
    /// The request names no seat.
    #[error("a booking needs at least one seat")]
    NoSeats,
    /// The request names too many seats.
    #[error("a booking may have at most {max} seats, {asked} were asked for")]
    TooManySeats {
        /// Seats asked for.
        asked: usize,
        /// The limit.
        max: usize,
    },
    /// The request names a seat twice.
    #[error("seat {label} is asked for more than once")]
    DuplicateSeat {
        /// The repeated seat.
        label: SeatLabel,
    },
    /// Seats the show does not have.
    #[error("the show has no seat {}", join(.labels))]
    UnknownSeats {
        /// The seats not in the show.
        labels: Vec<SeatLabel>,
    },
    /// Seats another booking holds or owns; nothing was taken.
    #[error("seats {} are not available", join(.labels))]
    Unavailable {
        /// The seats someone else has.
        labels: Vec<SeatLabel>,
    },
    /// The buyer would have more live seats in the show than its limit.
    #[error(
        "this show allows {limit} seats per buyer; you have {current}, and asked for {asked} more"
    )]
    SeatLimit {
        /// The show's limit.
        limit: u32,
        /// The buyer's live seats in the show now.
        current: u32,
        /// Seats asked for.
        asked: usize,
    },
    /// The booking refused the command.
    #[error(transparent)]
    Booking(#[from] BookingError),
    /// The streams disagree with each other, or the caller left one out: a
    /// bug, never the buyer's doing.
    #[error("inconsistent streams: {0}")]
    Inconsistent(String),
}

fn join(labels: &[SeatLabel]) -> String {
    labels
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Whether a buyer who has `current` live seats (held and not lapsed, or
/// bought) in `show` may take `asked` more. The caller counts `current` under
/// the buyer's lock for the show, in the transaction that writes the seats,
/// so that concurrent requests of one buyer cannot each see room for
/// themselves.
///
/// # Errors
/// [`BoxOfficeError::SeatLimit`] when the seats would go over the limit.
pub fn check_seat_limit(show: &Show, current: u32, asked: usize) -> Result<(), BoxOfficeError> {
    let Some(limit) = show.details().and_then(|d| d.max_seats_per_user) else {
        return Ok(());
    };
    let after = u64::from(current) + u64::try_from(asked).unwrap_or(u64::MAX);
    if after > u64::from(limit.get()) {
        return Err(BoxOfficeError::SeatLimit {
            limit: limit.get(),
            current,
            asked,
        });
    }
    Ok(())
}

/// Seat streams by label (a label with no entry has no stream: available),
/// and booking streams by id.
#[derive(Debug, Clone, Copy)]
pub struct Streams<'a> {
    /// Seat streams of the show.
    pub seats: &'a BTreeMap<SeatLabel, Seat>,
    /// Booking streams.
    pub bookings: &'a BTreeMap<BookingId, Booking>,
}

impl Streams<'_> {
    fn seat(&self, label: &SeatLabel) -> Seat {
        self.seats.get(label).cloned().unwrap_or_default()
    }
}

/// The bookings whose lapsed holds sit on some of `labels` at `now`. A caller
/// of [`place`] loads these bookings, and all their seats, before calling it.
pub fn lapsed_holders<'a>(
    seats: &BTreeMap<SeatLabel, Seat>,
    labels: impl IntoIterator<Item = &'a SeatLabel>,
    now: Timestamp,
) -> BTreeSet<BookingId> {
    labels
        .into_iter()
        .filter_map(|label| seats.get(label)?.lapsed_hold_at(now))
        .collect()
}

/// Places a booking: all its seats or none.
///
/// `booking` is the current state of the new booking's stream (normally
/// empty); `streams` holds the requested seats and, for every booking in
/// [`lapsed_holders`], that booking and all its seats. Seats whose holds have
/// lapsed are released, and their bookings expired, in the same changes.
///
/// # Errors
/// [`BoxOfficeError::ShowNotFound`], [`BoxOfficeError::NoSeats`],
/// [`BoxOfficeError::TooManySeats`], [`BoxOfficeError::DuplicateSeat`],
/// [`BoxOfficeError::UnknownSeats`], [`BoxOfficeError::Unavailable`] (with
/// every seat someone else has), [`BoxOfficeError::Booking`] when the
/// booking id is taken, [`BoxOfficeError::Inconsistent`] when a lapsed
/// holder was not loaded.
pub fn place(
    show: &Show,
    request: BookingRequest,
    booking: &Booking,
    streams: Streams<'_>,
    now: Timestamp,
) -> Result<Changes, BoxOfficeError> {
    let details = show.details().ok_or(BoxOfficeError::ShowNotFound)?;
    check_seat_list(&request.seats)?;

    let mut seats = Vec::with_capacity(request.seats.len());
    let mut unknown = Vec::new();
    for label in &request.seats {
        match details.seat_map.section_of(label) {
            Some(section) => seats.push(BookedSeat {
                label: label.clone(),
                price_cents: section.price_cents,
            }),
            None => unknown.push(label.clone()),
        }
    }
    if !unknown.is_empty() {
        return Err(BoxOfficeError::UnknownSeats { labels: unknown });
    }
    let unavailable: Vec<SeatLabel> = request
        .seats
        .iter()
        .filter(|label| {
            streams
                .seat(label)
                .owner_at(now)
                .is_some_and(|owner| owner != request.booking_id)
        })
        .cloned()
        .collect();
    if !unavailable.is_empty() {
        return Err(BoxOfficeError::Unavailable {
            labels: unavailable,
        });
    }

    let booking_details =
        BookingDetails::new(request.booking_id, request.show_id, request.user_id, seats);
    let command = match request.purchase {
        Purchase::Hold { expires_at } => BookingCommand::Hold {
            details: booking_details,
            expires_at,
            now,
        },
        Purchase::Book => BookingCommand::Place {
            details: booking_details,
            now,
        },
    };
    let mut changes = Changes::default();
    changes.add_booking(request.booking_id, booking.decide(command)?);

    for stale in lapsed_holders(streams.seats, &request.seats, now) {
        expire_lapsed_holder(stale, &request.seats, streams, now, &mut changes)?;
    }
    for label in request.seats {
        let seat = SeatId::new(request.show_id, label);
        let command = match request.purchase {
            Purchase::Hold { expires_at } => SeatCommand::Hold {
                seat: seat.clone(),
                booking_id: request.booking_id,
                expires_at,
                now,
            },
            Purchase::Book => SeatCommand::Book {
                seat: seat.clone(),
                booking_id: request.booking_id,
                now,
            },
        };
        let events = streams
            .seat(&seat.label)
            .decide(command)
            .map_err(inconsistent)?;
        changes.add_seat(seat, events);
    }
    Ok(changes)
}

/// Expires a booking whose lapsed hold sits on a requested seat, releasing
/// its other seats too; the requested ones are released by their own
/// hold or book command, in the same changes.
fn expire_lapsed_holder(
    stale: BookingId,
    requested: &[SeatLabel],
    streams: Streams<'_>,
    now: Timestamp,
    changes: &mut Changes,
) -> Result<(), BoxOfficeError> {
    let booking = streams.bookings.get(&stale).ok_or_else(|| {
        BoxOfficeError::Inconsistent(format!("lapsed holder {stale} was not loaded"))
    })?;
    let events = booking
        .decide(BookingCommand::Expire { now })
        .map_err(inconsistent)?;
    changes.add_booking(stale, events);
    let details = booking.details().ok_or_else(|| {
        BoxOfficeError::Inconsistent(format!("lapsed holder {stale} has no details"))
    })?;
    for seat in details
        .seats
        .iter()
        .filter(|s| !requested.contains(&s.label))
    {
        release(
            details,
            &seat.label,
            ReleaseReason::Expired,
            streams,
            changes,
        )?;
    }
    Ok(())
}

fn check_seat_list(labels: &[SeatLabel]) -> Result<(), BoxOfficeError> {
    if labels.is_empty() {
        return Err(BoxOfficeError::NoSeats);
    }
    if labels.len() > MAX_SEATS_PER_BOOKING {
        return Err(BoxOfficeError::TooManySeats {
            asked: labels.len(),
            max: MAX_SEATS_PER_BOOKING,
        });
    }
    let mut seen = BTreeSet::new();
    for label in labels {
        if !seen.insert(label) {
            return Err(BoxOfficeError::DuplicateSeat {
                label: label.clone(),
            });
        }
    }
    Ok(())
}

/// Confirms a held booking and books its seats. Confirming a confirmed
/// booking changes nothing.
///
/// # Errors
/// [`BoxOfficeError::Booking`] with [`BookingError::NotFound`],
/// [`BookingError::Expired`] or [`BookingError::Cancelled`];
/// [`BoxOfficeError::Inconsistent`] if a seat is not held by the booking.
pub fn confirm(
    booking: &Booking,
    streams: Streams<'_>,
    now: Timestamp,
) -> Result<Changes, BoxOfficeError> {
    let events = booking.decide(BookingCommand::Confirm { now })?;
    let mut changes = Changes::default();
    if events.is_empty() {
        return Ok(changes);
    }
    let details = booking_details(booking)?;
    changes.add_booking(details.booking_id, events);
    for seat in &details.seats {
        let seat_id = SeatId::new(details.show_id, seat.label.clone());
        let events = streams
            .seat(&seat.label)
            .decide(SeatCommand::Confirm {
                seat: seat_id.clone(),
                booking_id: details.booking_id,
                now,
            })
            .map_err(inconsistent)?;
        changes.add_seat(seat_id, events);
    }
    Ok(changes)
}

/// Cancels a booking and frees exactly the seats it has. Cancelling a
/// cancelled booking changes nothing.
///
/// # Errors
/// [`BoxOfficeError::Booking`] with [`BookingError::NotFound`] or
/// [`BookingError::Expired`].
pub fn cancel(
    booking: &Booking,
    streams: Streams<'_>,
    now: Timestamp,
    by: Option<UserId>,
) -> Result<Changes, BoxOfficeError> {
    end(
        booking,
        BookingCommand::Cancel { now, by },
        ReleaseReason::Cancelled,
        streams,
    )
}

/// Records that a booking's hold has lapsed and frees exactly the seats it
/// still has. Expiring an expired booking changes nothing.
///
/// # Errors
/// [`BoxOfficeError::Booking`] with [`BookingError::NotFound`] or
/// [`BookingError::NotExpirable`].
pub fn expire(
    booking: &Booking,
    streams: Streams<'_>,
    now: Timestamp,
) -> Result<Changes, BoxOfficeError> {
    end(
        booking,
        BookingCommand::Expire { now },
        ReleaseReason::Expired,
        streams,
    )
}

fn end(
    booking: &Booking,
    command: BookingCommand,
    reason: ReleaseReason,
    streams: Streams<'_>,
) -> Result<Changes, BoxOfficeError> {
    let events = booking.decide(command)?;
    let mut changes = Changes::default();
    if events.is_empty() {
        return Ok(changes);
    }
    let details = booking_details(booking)?;
    changes.add_booking(details.booking_id, events);
    for seat in &details.seats {
        release(details, &seat.label, reason, streams, &mut changes)?;
    }
    Ok(changes)
}

fn release(
    details: &BookingDetails,
    label: &SeatLabel,
    reason: ReleaseReason,
    streams: Streams<'_>,
    changes: &mut Changes,
) -> Result<(), BoxOfficeError> {
    let seat_id = SeatId::new(details.show_id, label.clone());
    let events = streams
        .seat(label)
        .decide(SeatCommand::Release {
            seat: seat_id.clone(),
            booking_id: details.booking_id,
            reason,
        })
        .map_err(inconsistent)?;
    changes.add_seat(seat_id, events);
    Ok(())
}

fn booking_details(booking: &Booking) -> Result<&BookingDetails, BoxOfficeError> {
    booking
        .details()
        .ok_or_else(|| BoxOfficeError::Inconsistent("a booking with events has no details".into()))
}

fn inconsistent(error: impl std::fmt::Display) -> BoxOfficeError {
    BoxOfficeError::Inconsistent(error.to_string())
}
