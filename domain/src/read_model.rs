//! The read models: documents shaped like the questions of the query API,
//! and the pure rules that fold published events into them.
//!
//! They are the contract between the projector (which writes them) and the
//! query-api (which reads them), as the envelope is between the relay and
//! the projector. Plain serde structs, so this stays free of any driver.
//!
//! Priced by the change: a show's seats live in block documents of at most
//! [`BLOCK_SEATS`] seats each (a section's seats in row order, cut into
//! blocks, each with its counts and holds), next to a show document that
//! never changes once written. A booking of two seats in a 100,000-seat
//! stadium changes two seats and the counts of one or two blocks, and the
//! projector writes just that (targeted `$set` and `$inc`), never a
//! document holding every seat. `GET /shows/{id}/availability` reads a
//! show's blocks in one indexed range (counts alone, without their seats,
//! for the sections not asked for).
//!
//! Idempotence: every document records the last sequence it applied of each
//! stream it holds (a block: each seat's; a booking: its own; a show: the
//! show's). An event at or below that sequence changes nothing, so
//! duplicated, replayed and redelivered messages are harmless.
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

/// Collection of the show documents (details and seat map).
pub const SHOWS: &str = "shows";
/// Collection of the block documents: a block's seats, counts and holds.
pub const BLOCKS: &str = "blocks";
/// Collection of the tallies: each block's counts and holds without its
/// seats, so that the counts of the sections not asked for are read
/// without reading their seats.
pub const TALLIES: &str = "tallies";
/// Collection of the booking documents.
pub const BOOKINGS: &str = "bookings";
/// Collection (not generation-specific) naming the generation the query
/// side reads.
pub const GENERATIONS: &str = "read_model_generations";
/// `_id` of the one document in [`GENERATIONS`].
pub const GENERATION_POINTER: &str = "current";
/// Most seats in one block document. A server may rewrite a whole document
/// to change one seat of it (SecantusDB, measured: 3.7 ms for a block of
/// 100 seats, 5.8 ms for 250, 17 ms for 1,000), so a block is small; a
/// section of a stadium is still a few dozen documents read in one range.
pub const BLOCK_SEATS: u32 = 250;

/// Collection (not generation-specific) of each generation's consumer
/// offsets, one document per generation.
pub const OFFSETS: &str = "read_model_offsets";
/// Collection of the events the projector set aside (per generation).
pub const PARKED: &str = "parked";
/// Collection (not generation-specific) of `projector unpark` requests,
/// which the live projector carries out between batches.
pub const UNPARKS: &str = "read_model_unparks";

/// The name of `collection` in read-model generation `generation`.
pub fn collection_name(generation: u32, collection: &str) -> String {
    format!("{}_{collection}", generation_prefix(generation))
}

/// `g{n}`: what every collection of generation `n` starts with, and the
/// `_id` of its document in [`OFFSETS`].
pub fn generation_prefix(generation: u32) -> String {
    format!("g{generation}")
}

/// The generation a collection name of [`collection_name`] belongs to.
pub fn generation_of_collection(name: &str) -> Option<u32> {
    let (number, _) = name.strip_prefix('g')?.split_once('_')?;
    number.parse().ok()
}

/// A generation number as the pointer and offsets documents hold it: an
/// integer of any width as this project writes it, or a whole double, as a
/// MongoDB shell writes one by hand. Generations count from 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct GenerationNumber(pub u32);

impl<'de> Deserialize<'de> for GenerationNumber {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Number;
        impl serde::de::Visitor<'_> for Number {
            type Value = GenerationNumber;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a whole number from 1")
            }
            fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<Self::Value, E> {
                u32::try_from(n)
                    .ok()
                    .filter(|n| *n >= 1)
                    .map(GenerationNumber)
                    .ok_or_else(|| E::custom(format!("{n} is not a generation")))
            }
            fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<Self::Value, E> {
                self.visit_i64(i64::try_from(n).unwrap_or(-1))
            }
            fn visit_f64<E: serde::de::Error>(self, n: f64) -> Result<Self::Value, E> {
                if n.fract() == 0.0 && (1.0..=f64::from(u32::MAX)).contains(&n) {
                    // Whole and in range: the cast is exact.
                    Ok(GenerationNumber(n as u32))
                } else {
                    Err(E::custom(format!("{n} is not a generation")))
                }
            }
        }
        d.deserialize_any(Number)
    }
}

/// Field paths inside the documents, built in one place so that the writer
/// and the readers cannot spell them differently.
pub mod paths {
    /// A seat of a block document: `seats.{label}`.
    pub fn seat(label: impl std::fmt::Display) -> String {
        format!("seats.{label}")
    }

    /// The sequence of a seat of a block document: `seats.{label}.q`.
    pub fn seat_sequence(label: impl std::fmt::Display) -> String {
        format!("seats.{label}.q")
    }

    /// The hold of a seat in a block's `holds`: `holds.{label}`.
    pub fn hold(label: impl std::fmt::Display) -> String {
        format!("holds.{label}")
    }

    /// The next offset of a partition in an offsets document:
    /// `next.{partition}`.
    pub fn next_offset(partition: i32) -> String {
        format!("next.{partition}")
    }

    /// The `_id` of a parked message: `{partition}:{offset}`.
    pub fn parked_id(partition: i32, offset: i64) -> String {
        format!("{partition}:{offset}")
    }
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
    /// Adds `n` seats of `status`.
    pub fn add(&mut self, status: SeatStatus, n: i64) {
        match status {
            SeatStatus::Available => self.available += n,
            SeatStatus::Held => self.held += n,
            SeatStatus::Booked => self.booked += n,
        }
    }

    /// Adds every count of `other`.
    pub fn plus(&mut self, other: &Counts) {
        self.total += other.total;
        self.available += other.available;
        self.held += other.held;
        self.booked += other.booked;
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

/// A section with its price and rows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SectionDoc {
    /// Section name.
    pub name: String,
    /// Price of each seat.
    pub price_cents: i64,
    /// Rows as created.
    pub rows: Vec<RowDoc>,
    /// Seats in the section.
    pub total: i64,
    /// Block documents the section's seats are in.
    pub blocks: u32,
}

/// One seat of a block.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeatDoc {
    /// Status as recorded.
    #[serde(rename = "s")]
    pub status: SeatStatus,
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

impl SeatDoc {
    /// A seat nobody has held yet.
    pub fn available() -> Self {
        Self {
            status: SeatStatus::Available,
            sequence: 0,
            booking_id: None,
            expires_at: None,
        }
    }

    /// Its status at `now`: a lapsed hold reads as available.
    pub fn status_at(&self, now: Timestamp) -> SeatStatus {
        match (&self.status, &self.expires_at) {
            (SeatStatus::Held, Some(expires_at)) if lapsed(expires_at, now) => {
                SeatStatus::Available
            }
            (status, _) => *status,
        }
    }
}

/// A show: its details and seat map. Written once; answers the details of
/// `GET /shows` and `GET /shows/{id}`, and says which block holds a seat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShowDoc {
    /// The show id.
    #[serde(rename = "_id")]
    pub show_id: String,
    /// Last sequence applied of the show's own stream.
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
    /// Most live seats one buyer may have (absent: no limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_seats_per_user: Option<u32>,
}

/// Up to [`BLOCK_SEATS`] seats of one section, their counts and the holds
/// in force among them. `_id` is `{show_id}:{section}:{block}`. One
/// document, so that a write of its seats and counts is whole by itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockDoc {
    /// `{show_id}:{section}:{block}`.
    #[serde(rename = "_id")]
    pub block_id: String,
    /// Its show.
    pub show_id: String,
    /// Index of its section in the show's `sections`.
    pub section: u32,
    /// Its place among the section's blocks.
    pub block: u32,
    /// Seats per state, as recorded.
    #[serde(default)]
    pub counts: Counts,
    /// The seats, by label (none in a tally).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub seats: BTreeMap<String, SeatDoc>,
    /// When each held seat's hold lapses, so that counts can be read at a
    /// time without the seats.
    #[serde(default)]
    pub holds: BTreeMap<String, String>,
    /// How many writes have changed its seats since it was created. Its
    /// tally carries the number of the write it copies, so that a tally
    /// left behind (a writer stopped between the two documents) is told
    /// from a current one, and is never written over by an older copy.
    #[serde(rename = "w", default)]
    pub writes: i64,
}

/// How many blocks a section of `seats` seats is cut into (one at least).
fn blocks_for(seats: u32) -> u32 {
    seats.div_ceil(BLOCK_SEATS).max(1)
}

/// The `_id` of a block.
pub fn block_id(show_id: &str, section: u32, block: u32) -> String {
    format!("{show_id}:{section}:{block}")
}

/// The show, section and block of a block's `_id`.
pub fn parse_block_id(id: &str) -> Option<(String, u32, u32)> {
    let (rest, block) = id.rsplit_once(':')?;
    let (show, section) = rest.rsplit_once(':')?;
    Some((show.to_owned(), section.parse().ok()?, block.parse().ok()?))
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
    /// The document of a just-created show, whose stream reached `sequence`.
    pub fn created(details: &ShowDetails, sequence: u64) -> Self {
        let sections = details
            .seat_map
            .sections()
            .iter()
            .map(|section| {
                let total: u32 = section.rows.iter().map(|row| row.seats).sum();
                SectionDoc {
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
                    total: i64::from(total),
                    blocks: blocks_for(total),
                }
            })
            .collect();
        Self {
            show_id: details.show_id.to_string(),
            q: i64::try_from(sequence).unwrap_or(i64::MAX),
            name: details.name.to_string(),
            venue: details.venue.to_string(),
            starts_at: format_time(details.starts_at),
            starts_order: details.starts_at.timestamp_micros(),
            sections,
            max_seats_per_user: details.max_seats_per_user.map(crate::show::SeatLimit::get),
        }
    }

    /// The show's blocks as created: every seat available.
    pub fn blocks(&self) -> Vec<BlockDoc> {
        let mut blocks = Vec::new();
        for (index, section) in self.sections.iter().enumerate() {
            let section_index = u32::try_from(index).unwrap_or(u32::MAX);
            let mut seats = section
                .rows
                .iter()
                .flat_map(|row| (1..=row.seats).map(move |number| format!("{}{number}", row.row)));
            for block in 0..section.blocks {
                let mut doc = BlockDoc {
                    block_id: block_id(&self.show_id, section_index, block),
                    show_id: self.show_id.clone(),
                    section: section_index,
                    block,
                    counts: Counts::default(),
                    seats: BTreeMap::new(),
                    holds: BTreeMap::new(),
                    writes: 0,
                };
                for label in seats.by_ref().take(BLOCK_SEATS as usize) {
                    doc.seats.insert(label, SeatDoc::available());
                }
                let n = i64::try_from(doc.seats.len()).unwrap_or(i64::MAX);
                doc.counts.total = n;
                doc.counts.available = n;
                blocks.push(doc);
            }
        }
        blocks
    }

    /// The section and block of the seat `label`, `None` if the show has
    /// no such seat.
    pub fn block_of(&self, label: &SeatLabel) -> Option<(u32, u32)> {
        let row = label.row().to_string();
        let number = label.number();
        for (index, section) in self.sections.iter().enumerate() {
            let mut before = 0_u32;
            for candidate in &section.rows {
                if candidate.row == row {
                    if number == 0 || number > candidate.seats {
                        return None;
                    }
                    let position = before + number - 1;
                    return Some((u32::try_from(index).ok()?, position / BLOCK_SEATS));
                }
                before += candidate.seats;
            }
        }
        None
    }

    /// The `_id` of the block holding `label`.
    pub fn block_id_of(&self, label: &SeatLabel) -> Option<String> {
        let (section, block) = self.block_of(label)?;
        Some(block_id(&self.show_id, section, block))
    }

    /// The index of the section named `name`.
    pub fn section_index(&self, name: &str) -> Option<u32> {
        self.sections
            .iter()
            .position(|s| s.name == name)
            .and_then(|i| u32::try_from(i).ok())
    }

    /// Whether its sections are cut into blocks of [`BLOCK_SEATS`] (a
    /// release with another block size wrote it otherwise).
    pub fn is_cut_into_blocks_of_this_release(&self) -> bool {
        self.sections.iter().all(|section| {
            u32::try_from(section.total).is_ok_and(|total| blocks_for(total) == section.blocks)
        })
    }

    /// How many block documents its sections other than `except` have
    /// (all of them for `None`).
    pub fn blocks_outside(&self, except: Option<u32>) -> u64 {
        self.sections
            .iter()
            .enumerate()
            .filter(|(index, _)| except.is_none_or(|except| except as usize != *index))
            .map(|(_, section)| u64::from(section.blocks))
            .sum()
    }

    /// Counts of the whole show and of each section at `now`, from its
    /// blocks (those of other shows are ignored): a lapsed hold counts as
    /// available.
    pub fn counts_at<'a>(
        &self,
        blocks: impl IntoIterator<Item = &'a BlockDoc>,
        now: Timestamp,
    ) -> (Counts, Vec<Counts>) {
        let mut total = Counts::default();
        let mut sections = vec![Counts::default(); self.sections.len()];
        for block in blocks {
            if block.show_id != self.show_id {
                continue;
            }
            let counts = block.counts_at(now);
            total.plus(&counts);
            if let Some(section) = sections.get_mut(block.section as usize) {
                section.plus(&counts);
            }
        }
        (total, sections)
    }
}

/// What applying a seat event changed in its block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeatChange {
    /// The seat's label.
    pub label: String,
    /// The seat before.
    pub before: SeatDoc,
    /// The seat after.
    pub after: SeatDoc,
}

impl BlockDoc {
    /// Applies the `sequence`th event of a seat's stream. Returns what
    /// changed (`None` for an event already applied).
    ///
    /// The counts change by the seat's move from one status to another, so
    /// a block loaded with only some of its seats and zero counts ends with
    /// the counts' change: what the projector adds with `$inc`.
    ///
    /// # Errors
    /// [`ApplyError::UnknownSeat`] for a seat the block does not hold.
    pub fn apply_seat(
        &mut self,
        sequence: u64,
        event: &SeatEvent,
    ) -> Result<Option<SeatChange>, ApplyError> {
        let (label, after) = match event {
            SeatEvent::SeatHeld {
                label,
                booking_id,
                expires_at,
                ..
            } => (
                label,
                SeatDoc {
                    status: SeatStatus::Held,
                    sequence: 0,
                    booking_id: Some(booking_id.to_string()),
                    expires_at: Some(format_time(*expires_at)),
                },
            ),
            SeatEvent::SeatBooked {
                label, booking_id, ..
            } => (
                label,
                SeatDoc {
                    status: SeatStatus::Booked,
                    sequence: 0,
                    booking_id: Some(booking_id.to_string()),
                    expires_at: None,
                },
            ),
            SeatEvent::SeatReleased { label, .. } => (label, SeatDoc::available()),
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
            return Ok(None);
        }
        // Each seat event states the seat's whole new state, so the last one
        // applied is the truth whatever came before it.
        let before = seat.clone();
        let after = SeatDoc { sequence, ..after };
        *seat = after.clone();
        self.counts.add(before.status, -1);
        self.counts.add(after.status, 1);
        match &after.expires_at {
            Some(expires_at) => {
                self.holds.insert(key.clone(), expires_at.clone());
            }
            None => {
                self.holds.remove(&key);
            }
        }
        Ok(Some(SeatChange {
            label: key,
            before,
            after,
        }))
    }

    /// Its counts at `now`: a lapsed hold counts as available.
    pub fn counts_at(&self, now: Timestamp) -> Counts {
        let mut counts = self.counts;
        for expires_at in self.holds.values() {
            if lapsed(expires_at, now) {
                counts.lapse(1);
            }
        }
        counts
    }

    /// Its counts at `now` from its seats alone: for a block read with its
    /// seats, so that the counts and the seats of one answer agree.
    pub fn seat_counts_at(&self, now: Timestamp) -> Counts {
        let mut counts = Counts {
            total: i64::try_from(self.seats.len()).unwrap_or(i64::MAX),
            ..Counts::default()
        };
        for seat in self.seats.values() {
            counts.add(seat.status_at(now), 1);
        }
        counts
    }

    /// Its tally: the counts and holds as recorded, counted from its seats
    /// (which must be all of them), without the seats.
    pub fn tally(&self) -> BlockDoc {
        let mut counts = Counts {
            total: i64::try_from(self.seats.len()).unwrap_or(i64::MAX),
            ..Counts::default()
        };
        let mut holds = BTreeMap::new();
        for (label, seat) in &self.seats {
            counts.add(seat.status, 1);
            if let (SeatStatus::Held, Some(expires_at)) = (seat.status, &seat.expires_at) {
                holds.insert(label.clone(), expires_at.clone());
            }
        }
        BlockDoc {
            block_id: self.block_id.clone(),
            show_id: self.show_id.clone(),
            section: self.section,
            block: self.block,
            counts,
            seats: BTreeMap::new(),
            holds,
            writes: self.writes,
        }
    }

    /// Whether the seats of `labels` it holds have applied at least these
    /// sequences.
    pub fn reflects_seats<'a>(
        &self,
        mut labels: impl Iterator<Item = (&'a SeatLabel, &'a u64)>,
    ) -> bool {
        labels.all(|(label, sequence)| {
            self.seats.get(&label.to_string()).is_none_or(|seat| {
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
    /// Who cancelled it, once cancelled: `buyer`, `staff` or `unrecorded`
    /// ([`crate::CancelledBy`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cancelled_by: Option<String>,
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
            cancelled_by: None,
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
            BookingEvent::BookingCancelled {
                cancelled_at,
                cancelled_by,
                ..
            } => {
                self.cancelled_by = Some(cancelled_by.kind().to_owned());
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
    /// Block documents by block id.
    pub blocks: BTreeMap<String, Option<BlockDoc>>,
    /// Booking documents by booking id.
    pub bookings: BTreeMap<String, Option<BookingDoc>>,
}

/// The document an event lands in.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Target {
    /// A show document (and its blocks, when it is created), by show id.
    Show(String),
    /// A seat's block: the show's id and the seat's label.
    Seat(String, SeatLabel),
    /// A booking document, by booking id.
    Booking(String),
}

/// Which document `event` lands in.
///
/// # Errors
/// [`ApplyError::Undecodable`] for a seat event whose label does not parse.
pub fn target(event: &PublishedEvent) -> Result<Target, ApplyError> {
    if event.aggregate_type == <crate::booking::Booking as cqrs_es::Aggregate>::TYPE {
        return Ok(Target::Booking(event.aggregate_id.clone()));
    }
    if event.aggregate_type == <crate::seat::Seat as cqrs_es::Aggregate>::TYPE {
        let id: crate::SeatId = event
            .aggregate_id
            .parse()
            .map_err(|_| ApplyError::Undecodable(format!("seat id {}", event.aggregate_id)))?;
        return Ok(Target::Seat(event.show_id.to_string(), id.label));
    }
    Ok(Target::Show(event.show_id.to_string()))
}

impl Models {
    /// Applies one published event. Returns whether a document changed.
    /// A seat event needs its show's document and its block loaded (the
    /// block with at least that seat).
    ///
    /// # Errors
    /// [`ApplyError`]: undecodable payload, orphan or unknown seat.
    pub fn apply(&mut self, event: &PublishedEvent) -> Result<bool, ApplyError> {
        Ok(self.apply_seat_aware(event)?.is_some())
    }

    /// As [`Models::apply`], returning what a seat event changed in its
    /// block (its block id and the change), or `Some(None)` for any other
    /// change; `None` when nothing changed.
    ///
    /// # Errors
    /// [`ApplyError`]: undecodable payload, orphan or unknown seat.
    pub fn apply_seat_aware(
        &mut self,
        event: &PublishedEvent,
    ) -> Result<Option<Option<(String, SeatChange)>>, ApplyError> {
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
                    return Ok(None);
                }
                let show = ShowDoc::created(&details, event.sequence);
                for block in show.blocks() {
                    self.blocks.insert(block.block_id.clone(), Some(block));
                }
                *slot = Some(show);
                Ok(Some(None))
            }
            AnyEvent::Seat(seat_event) => {
                let show = self
                    .shows
                    .get(&seat_event.show_id().to_string())
                    .and_then(Option::as_ref)
                    .ok_or_else(orphan)?;
                let label = seat_event.label();
                let block_id = show
                    .block_id_of(label)
                    .ok_or_else(|| ApplyError::UnknownSeat {
                        show_id: show.show_id.clone(),
                        label: label.to_string(),
                    })?;
                let block = self
                    .blocks
                    .get_mut(&block_id)
                    .and_then(Option::as_mut)
                    .ok_or_else(orphan)?;
                Ok(block
                    .apply_seat(event.sequence, &seat_event)?
                    .map(|change| Some((block_id, change))))
            }
            AnyEvent::Booking(booking_event) => {
                let slot = self.bookings.entry(event.aggregate_id.clone()).or_default();
                match slot {
                    Some(booking) => Ok(booking
                        .apply(event.sequence, &booking_event)
                        .then_some(None)),
                    None if event.sequence == 1 => {
                        *slot = Some(BookingDoc::first(&booking_event).ok_or_else(orphan)?);
                        Ok(Some(None))
                    }
                    None => Err(orphan()),
                }
            }
        }
    }
}
