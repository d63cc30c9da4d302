//! The read models: documents shaped like the questions of the query API,
//! and the pure rules that fold published events into them.
//!
//! They are the contract between the projector (which writes them) and the
//! query-api (which reads them), as the envelope is between the relay and
//! the projector. Plain serde structs, so this stays free of any driver.
//!
//! Idempotence: every document records the last sequence it applied of each
//! stream it holds (a show document: each seat's; a booking document: its
//! own). An event at or below that sequence changes nothing, so duplicated,
//! replayed and redelivered messages are harmless.
//!
//! Time: a hold that has lapsed is stored as held until the log records the
//! expiry; readers ask for the state *at* a time, and a lapsed hold reads as
//! available (the seat) or expired (the booking).

use std::collections::BTreeMap;

use chrono::SecondsFormat;
use serde::{Deserialize, Serialize};

use crate::booking::BookingEvent;
use crate::ids::SeatLabel;
use crate::seat::{SeatEvent, SeatStatus};
use crate::show::{ShowDetails, ShowEvent};
use crate::{AnyEvent, BookingState, PublishedEvent, Timestamp};

/// Collection of the show documents (a show, its counts and its seats).
pub const SHOWS: &str = "shows";
/// Collection of the booking documents.
pub const BOOKINGS: &str = "bookings";
/// Collection (not generation-specific) naming the generation the query
/// side reads.
pub const GENERATIONS: &str = "read_model_generations";
/// `_id` of the one document in [`GENERATIONS`].
pub const GENERATION_POINTER: &str = "current";

/// The name of `collection` in read-model generation `generation`.
pub fn collection_name(generation: u32, collection: &str) -> String {
    format!("g{generation}_{collection}")
}

/// Formats a time the way every document and answer carries it.
pub fn format_time(time: Timestamp) -> String {
    time.to_rfc3339_opts(SecondsFormat::AutoSi, true)
}

/// Reads a time written by [`format_time`].
pub fn parse_time(text: &str) -> Option<Timestamp> {
    chrono::DateTime::parse_from_rfc3339(text)
        .ok()
        .map(|t| t.with_timezone(&chrono::Utc))
}

/// How many seats are in each state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    /// All seats.
    pub total: i64,
    /// Free.
    pub available: i64,
    /// Held by a hold (lapsed holds included until recorded; see `counts_at`).
    pub held: i64,
    /// Sold.
    pub booked: i64,
}

impl Counts {
    fn add(&mut self, status: SeatStatus, n: i64) {
        match status {
            SeatStatus::Available => self.available += n,
            SeatStatus::Held => self.held += n,
            SeatStatus::Booked => self.booked += n,
        }
    }

    fn lapse(&mut self, n: i64) {
        self.held -= n;
        self.available += n;
    }
}

/// A row of a section, as created.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RowDoc {
    /// Row name.
    pub row: String,
    /// Seats in the row.
    pub seats: u32,
}

/// A section with its price, rows and counts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SectionDoc {
    /// Section name.
    pub name: String,
    /// Price of each seat.
    pub price_cents: i64,
    /// Rows as created.
    pub rows: Vec<RowDoc>,
    /// Seats per state, as recorded.
    pub counts: Counts,
}

/// One seat of a show document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeatDoc {
    /// Status as recorded.
    #[serde(rename = "s")]
    pub status: SeatStatus,
    /// Index of its section in `sections`.
    #[serde(rename = "c")]
    pub section: u32,
    /// Last sequence applied of the seat's stream (0: none yet).
    #[serde(rename = "q")]
    pub sequence: i64,
    /// The booking holding or owning it.
    #[serde(rename = "b", default, skip_serializing_if = "Option::is_none")]
    pub booking_id: Option<String>,
    /// When its hold lapses, while held.
    #[serde(rename = "x", default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
}

/// A held seat, listed apart so that counts can be read without the seats.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HoldDoc {
    /// When the hold lapses.
    #[serde(rename = "x")]
    pub expires_at: String,
    /// Index of the seat's section.
    #[serde(rename = "c")]
    pub section: u32,
}

/// A show: details, counts and every seat. Answers `GET /shows`,
/// `GET /shows/{id}` and `GET /shows/{id}/availability`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShowDoc {
    /// The show id.
    #[serde(rename = "_id")]
    pub show_id: String,
    /// Write version, for optimistic concurrency between projector instances.
    pub v: i64,
    /// Last sequence applied of the show's own stream (0 in documents
    /// written before it was kept; their show stream has one event).
    #[serde(default)]
    pub q: i64,
    /// Name.
    pub name: String,
    /// Venue.
    pub venue: String,
    /// Start time.
    pub starts_at: String,
    /// Start time in microseconds since the epoch: the list's sort key.
    pub starts_order: i64,
    /// Sections in seat-map order.
    pub sections: Vec<SectionDoc>,
    /// Seats per state, as recorded.
    pub counts: Counts,
    /// Every seat by label (left out of reads that need only counts).
    #[serde(default)]
    pub seats: BTreeMap<String, SeatDoc>,
    /// The seats held now (as recorded), by label.
    pub holds: BTreeMap<String, HoldDoc>,
}

/// Why an event could not be applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApplyError {
    /// A seat or booking event for a show or booking whose first event was
    /// never applied. Events of a show travel on one partition in log order,
    /// so this means a broken log or topic, not a race.
    #[error("{0} arrived before the stream it belongs to was created")]
    Orphan(String),
    /// A seat the show does not have.
    #[error("show {show_id} has no seat {label}")]
    UnknownSeat {
        /// The show.
        show_id: String,
        /// The label.
        label: String,
    },
    /// The payload did not decode.
    #[error("{0}")]
    Undecodable(String),
}

impl ShowDoc {
    /// The document of a just-created show: every seat available.
    pub fn created(details: &ShowDetails) -> Self {
        let mut sections: Vec<SectionDoc> = details
            .seat_map
            .sections()
            .iter()
            .map(|section| SectionDoc {
                name: section.name.to_string(),
                price_cents: i64::try_from(section.price_cents.get()).unwrap_or(i64::MAX),
                rows: section
                    .rows
                    .iter()
                    .map(|row| RowDoc {
                        row: row.row.to_string(),
                        seats: row.seats,
                    })
                    .collect(),
                counts: Counts::default(),
            })
            .collect();
        let mut seats = BTreeMap::new();
        for (index, section) in details.seat_map.sections().iter().enumerate() {
            for row in &section.rows {
                for number in 1..=row.seats {
                    let Ok(label) = SeatLabel::new(row.row.clone(), number) else {
                        continue;
                    };
                    let index = u32::try_from(index).unwrap_or(u32::MAX);
                    seats.insert(
                        label.to_string(),
                        SeatDoc {
                            status: SeatStatus::Available,
                            section: index,
                            sequence: 0,
                            booking_id: None,
                            expires_at: None,
                        },
                    );
                }
            }
        }
        let mut counts = Counts::default();
        for seat in seats.values() {
            if let Some(section) = sections.get_mut(seat.section as usize) {
                section.counts.total += 1;
                section.counts.available += 1;
            }
            counts.total += 1;
            counts.available += 1;
        }
        Self {
            show_id: details.show_id.to_string(),
            v: 0,
            q: 1,
            name: details.name.to_string(),
            venue: details.venue.to_string(),
            starts_at: format_time(details.starts_at),
            starts_order: details.starts_at.timestamp_micros(),
            sections,
            counts,
            seats,
            holds: BTreeMap::new(),
        }
    }

    /// Applies the `sequence`th event of a seat's stream. Returns whether
    /// anything changed (false for an event already applied).
    ///
    /// # Errors
    /// [`ApplyError::UnknownSeat`].
    pub fn apply_seat(&mut self, sequence: u64, event: &SeatEvent) -> Result<bool, ApplyError> {
        let (label, status, booking_id, expires_at) = match event {
            SeatEvent::SeatHeld {
                label,
                booking_id,
                expires_at,
                ..
            } => (
                label,
                SeatStatus::Held,
                Some(booking_id.to_string()),
                Some(format_time(*expires_at)),
            ),
            SeatEvent::SeatBooked {
                label, booking_id, ..
            } => (
                label,
                SeatStatus::Booked,
                Some(booking_id.to_string()),
                None,
            ),
            SeatEvent::SeatReleased { label, .. } => (label, SeatStatus::Available, None, None),
        };
        let key = label.to_string();
        let sequence = i64::try_from(sequence).unwrap_or(i64::MAX);
        let seat = self
            .seats
            .get_mut(&key)
            .ok_or_else(|| ApplyError::UnknownSeat {
                show_id: self.show_id.clone(),
                label: key.clone(),
            })?;
        if sequence <= seat.sequence {
            return Ok(false);
        }
        // Each seat event states the seat's whole new state, so the last one
        // applied is the truth whatever came before it.
        let before = seat.status;
        seat.status = status;
        seat.sequence = sequence;
        seat.booking_id = booking_id;
        seat.expires_at.clone_from(&expires_at);
        let section = seat.section;
        if let Some(counts) = self
            .sections
            .get_mut(section as usize)
            .map(|s| &mut s.counts)
        {
            counts.add(before, -1);
            counts.add(status, 1);
        }
        self.counts.add(before, -1);
        self.counts.add(status, 1);
        match expires_at {
            Some(expires_at) => {
                self.holds.insert(
                    key,
                    HoldDoc {
                        expires_at,
                        section,
                    },
                );
            }
            None => {
                self.holds.remove(&key);
            }
        }
        Ok(true)
    }

    /// Counts of the whole show and of each section at `now`: a lapsed hold
    /// counts as available.
    pub fn counts_at(&self, now: Timestamp) -> (Counts, Vec<Counts>) {
        let mut total = self.counts;
        let mut sections: Vec<Counts> = self.sections.iter().map(|s| s.counts).collect();
        for hold in self.holds.values() {
            if lapsed(&hold.expires_at, now) {
                total.lapse(1);
                if let Some(counts) = sections.get_mut(hold.section as usize) {
                    counts.lapse(1);
                }
            }
        }
        (total, sections)
    }

    /// A seat's status at `now`.
    pub fn seat_status_at(seat: &SeatDoc, now: Timestamp) -> SeatStatus {
        match (&seat.status, &seat.expires_at) {
            (SeatStatus::Held, Some(expires_at)) if lapsed(expires_at, now) => {
                SeatStatus::Available
            }
            (status, _) => *status,
        }
    }

    /// The show stream's last applied sequence; a document written before
    /// it was kept holds the show's one event.
    pub fn show_sequence(&self) -> i64 {
        self.q.max(1)
    }

    /// Whether the seats of `labels` have applied at least these sequences.
    pub fn reflects_seats<'a>(
        &self,
        mut labels: impl Iterator<Item = (&'a SeatLabel, &'a u64)>,
    ) -> bool {
        labels.all(|(label, sequence)| {
            self.seats.get(&label.to_string()).is_some_and(|seat| {
                u64::try_from(seat.sequence).is_ok_and(|applied| applied >= *sequence)
            })
        })
    }
}

fn lapsed(expires_at: &str, now: Timestamp) -> bool {
    parse_time(expires_at).is_some_and(|at| at <= now)
}

/// Status of a booking as recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BookingDocStatus {
    /// Held until `expires_at`.
    Held,
    /// Bought.
    Confirmed,
    /// Cancelled.
    Cancelled,
    /// The lapse was recorded.
    Expired,
}

/// A booking. Answers `GET /bookings/{id}` and, by the `user_id` index,
/// `GET /users/{id}/bookings`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BookingDoc {
    /// The booking id.
    #[serde(rename = "_id")]
    pub booking_id: String,
    /// Write version, for optimistic concurrency between projector instances.
    pub v: i64,
    /// Last sequence applied of the booking's stream.
    pub q: i64,
    /// Its show.
    pub show_id: String,
    /// Who booked.
    pub user_id: String,
    /// Seat labels, in the order booked.
    pub seats: Vec<String>,
    /// Status as recorded.
    pub status: BookingDocStatus,
    /// Sum of the seats' prices.
    pub total_cents: i64,
    /// When the hold lapses, while held.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    /// When it was held or placed.
    pub created_at: String,
    /// `created_at` in microseconds since the epoch: the list's sort key.
    pub created_order: i64,
    /// When its last event happened.
    pub updated_at: String,
}

impl BookingDoc {
    /// The document a booking's first event creates; `None` for any other
    /// event.
    pub fn first(event: &BookingEvent) -> Option<Self> {
        let (details, status, expires_at, at) = match event {
            BookingEvent::BookingHeld {
                details,
                expires_at,
                held_at,
            } => (
                details,
                BookingDocStatus::Held,
                Some(format_time(*expires_at)),
                held_at,
            ),
            BookingEvent::BookingPlaced { details, placed_at } => {
                (details, BookingDocStatus::Confirmed, None, placed_at)
            }
            _ => return None,
        };
        Some(Self {
            booking_id: details.booking_id.to_string(),
            v: 0,
            q: 1,
            show_id: details.show_id.to_string(),
            user_id: details.user_id.to_string(),
            seats: details.seats.iter().map(|s| s.label.to_string()).collect(),
            status,
            total_cents: i64::try_from(details.total_cents.get()).unwrap_or(i64::MAX),
            expires_at,
            created_at: format_time(*at),
            created_order: at.timestamp_micros(),
            updated_at: format_time(*at),
        })
    }

    /// Applies the `sequence`th event of the booking's stream. Returns
    /// whether anything changed.
    pub fn apply(&mut self, sequence: u64, event: &BookingEvent) -> bool {
        let sequence = i64::try_from(sequence).unwrap_or(i64::MAX);
        if sequence <= self.q {
            return false;
        }
        let (status, at) = match event {
            // A first event again at a later sequence cannot happen; a
            // booking is created once.
            BookingEvent::BookingHeld { .. } | BookingEvent::BookingPlaced { .. } => return false,
            BookingEvent::BookingConfirmed { confirmed_at, .. } => {
                (BookingDocStatus::Confirmed, confirmed_at)
            }
            BookingEvent::BookingCancelled { cancelled_at, .. } => {
                (BookingDocStatus::Cancelled, cancelled_at)
            }
            BookingEvent::BookingExpired { expired_at, .. } => {
                (BookingDocStatus::Expired, expired_at)
            }
        };
        self.q = sequence;
        self.status = status;
        self.expires_at = None;
        self.updated_at = format_time(*at);
        true
    }

    /// The booking's state at `now`: a lapsed hold reads as expired.
    pub fn state_at(&self, now: Timestamp) -> BookingState {
        match self.status {
            BookingDocStatus::Held => match &self.expires_at {
                Some(expires_at) if lapsed(expires_at, now) => BookingState::Expired,
                _ => BookingState::Held,
            },
            BookingDocStatus::Confirmed => BookingState::Confirmed,
            BookingDocStatus::Cancelled => BookingState::Cancelled,
            BookingDocStatus::Expired => BookingState::Expired,
        }
    }
}

/// Read models being built from a batch of events: the documents the batch
/// touches, as loaded (`None`: not there yet) and then changed in place.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Models {
    /// Show documents by show id.
    pub shows: BTreeMap<String, Option<ShowDoc>>,
    /// Booking documents by booking id.
    pub bookings: BTreeMap<String, Option<BookingDoc>>,
}

/// The document an event lands in.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Target {
    /// A show document, by show id.
    Show(String),
    /// A booking document, by booking id.
    Booking(String),
}

/// Which document `event` lands in.
pub fn target(event: &PublishedEvent) -> Target {
    if event.aggregate_type == <crate::booking::Booking as cqrs_es::Aggregate>::TYPE {
        Target::Booking(event.aggregate_id.clone())
    } else {
        Target::Show(event.show_id.to_string())
    }
}

impl Models {
    /// Applies one published event. Returns whether a document changed.
    ///
    /// # Errors
    /// [`ApplyError`]: undecodable payload, orphan or unknown seat.
    pub fn apply(&mut self, event: &PublishedEvent) -> Result<bool, ApplyError> {
        let decoded = event
            .decode()
            .map_err(|e| ApplyError::Undecodable(e.to_string()))?;
        let orphan = || {
            ApplyError::Orphan(format!(
                "{} {}#{}",
                event.aggregate_type, event.aggregate_id, event.sequence
            ))
        };
        match decoded {
            AnyEvent::Show(ShowEvent::ShowCreated(details)) => {
                let slot = self.shows.entry(details.show_id.to_string()).or_default();
                if slot.is_some() {
                    return Ok(false);
                }
                let mut show = ShowDoc::created(&details);
                show.q = i64::try_from(event.sequence).unwrap_or(i64::MAX);
                *slot = Some(show);
                Ok(true)
            }
            AnyEvent::Seat(seat_event) => {
                let show = self
                    .shows
                    .get_mut(&seat_event.show_id().to_string())
                    .and_then(Option::as_mut)
                    .ok_or_else(orphan)?;
                show.apply_seat(event.sequence, &seat_event)
            }
            AnyEvent::Booking(booking_event) => {
                let slot = self.bookings.entry(event.aggregate_id.clone()).or_default();
                match slot {
                    Some(booking) => Ok(booking.apply(event.sequence, &booking_event)),
                    None if event.sequence == 1 => {
                        *slot = Some(BookingDoc::first(&booking_event).ok_or_else(orphan)?);
                        Ok(true)
                    }
                    None => Err(orphan()),
                }
            }
        }
    }
}
