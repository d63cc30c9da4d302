//! The `Show` aggregate: created once with its seat map, it answers whether a
//! seat exists and what it costs. It never tracks seat state: that is one
//! `Seat` stream per seat, so a 60,000-seat stadium is one event here.

use std::collections::HashSet;

use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use serde::{Deserialize, Serialize};

use crate::ids::{RowName, SeatLabel, SectionName, ShowId, ShowName, VenueName};
use crate::Timestamp;

/// Most seats one show may have.
pub const MAX_SEATS_PER_SHOW: u32 = 100_000;

/// The highest price of a seat: ten million in the currency's units. With at
/// most ten seats a booking, every total is exact in an `i64`, a `u64` and a
/// JSON number a browser reads (below 2^53), on both sides of the system.
pub const MAX_PRICE_CENTS: i64 = 1_000_000_000;

/// The largest per-buyer seat limit a show may set.
pub const MAX_SEATS_PER_USER: u32 = 100;

/// An amount of money in cents; never negative.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Cents(u64);

impl Cents {
    /// Checks a price given in signed cents, as clients send it.
    ///
    /// # Errors
    /// [`ShowError::NegativePrice`] below zero, [`ShowError::PriceTooHigh`]
    /// above [`MAX_PRICE_CENTS`].
    pub fn new(cents: i64) -> Result<Self, ShowError> {
        if cents > MAX_PRICE_CENTS {
            return Err(ShowError::PriceTooHigh {
                cents,
                max: MAX_PRICE_CENTS,
            });
        }
        u64::try_from(cents)
            .map(Self)
            .map_err(|_| ShowError::NegativePrice { cents })
    }

    /// The amount in cents.
    pub const fn get(self) -> u64 {
        self.0
    }

    /// The sum, saturating (prices are bounded, so a booking's total never
    /// reaches the bound; events written before the bound existed are read
    /// as they are).
    pub fn saturating_add(self, other: Self) -> Self {
        Self(self.0.saturating_add(other.0))
    }
}

/// One row of a section: its name and how many seats it has (numbered from 1).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Row {
    /// The row's name, the letter part of its seats' labels.
    pub row: RowName,
    /// How many seats the row has.
    pub seats: u32,
}

/// A priced part of the venue with its rows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Section {
    /// The section's name.
    pub name: SectionName,
    /// The price of each of its seats.
    pub price_cents: Cents,
    /// Its rows, in the order given.
    pub rows: Vec<Row>,
}

/// A show's seats: sections with a price, rows, seat labels. Built only by
/// [`SeatMap::new`], so every seat map in the domain obeys the rules below.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SeatMap {
    sections: Vec<Section>,
}

impl SeatMap {
    /// Checks a seat map.
    ///
    /// # Errors
    /// [`ShowError::NoSections`], [`ShowError::SectionWithoutRows`],
    /// [`ShowError::EmptyRow`], [`ShowError::DuplicateRow`] (row names are
    /// unique across the whole show, since a label names only its row),
    /// [`ShowError::DuplicateSection`] or [`ShowError::TooManySeats`].
    pub fn new(sections: Vec<Section>) -> Result<Self, ShowError> {
        if sections.is_empty() {
            return Err(ShowError::NoSections);
        }
        let mut section_names = HashSet::new();
        let mut row_names = HashSet::new();
        let mut total: u64 = 0;
        for section in &sections {
            if !section_names.insert(section.name.as_str()) {
                return Err(ShowError::DuplicateSection {
                    section: section.name.to_string(),
                });
            }
            if section.rows.is_empty() {
                return Err(ShowError::SectionWithoutRows {
                    section: section.name.to_string(),
                });
            }
            for row in &section.rows {
                if row.seats == 0 {
                    return Err(ShowError::EmptyRow {
                        row: row.row.to_string(),
                    });
                }
                if !row_names.insert(row.row.as_str()) {
                    return Err(ShowError::DuplicateRow {
                        row: row.row.to_string(),
                    });
                }
                total += u64::from(row.seats);
            }
        }
        if total > u64::from(MAX_SEATS_PER_SHOW) {
            return Err(ShowError::TooManySeats {
                seats: total,
                max: MAX_SEATS_PER_SHOW,
            });
        }
        Ok(Self { sections })
    }

    /// The sections, in the order given at creation.
    pub fn sections(&self) -> &[Section] {
        &self.sections
    }

    /// How many seats the show has.
    pub fn seat_count(&self) -> u32 {
        // Bounded by MAX_SEATS_PER_SHOW at construction.
        self.sections
            .iter()
            .flat_map(|s| &s.rows)
            .map(|r| r.seats)
            .sum()
    }

    /// The section a seat belongs to, or `None` when the show has no such seat.
    pub fn section_of(&self, label: &SeatLabel) -> Option<&Section> {
        self.sections.iter().find(|section| {
            section
                .rows
                .iter()
                .any(|row| &row.row == label.row() && label.number() <= row.seats)
        })
    }

    /// Every seat label, section by section, row by row, in seat order.
    pub fn labels(&self) -> impl Iterator<Item = (&Section, SeatLabel)> + '_ {
        self.sections.iter().flat_map(|section| {
            section.rows.iter().flat_map(move |row| {
                (1..=row.seats).filter_map(move |n| {
                    SeatLabel::new(row.row.clone(), n)
                        .ok()
                        .map(|label| (section, label))
                })
            })
        })
    }
}

/// Why a show could not be created.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShowError {
    /// The show exists already.
    #[error("show already exists")]
    AlreadyCreated,
    /// The seat map has no section.
    #[error("a show needs at least one section")]
    NoSections,
    /// A section has no row.
    #[error("section {section:?} has no rows")]
    SectionWithoutRows {
        /// The section's name.
        section: String,
    },
    /// A row has no seat.
    #[error("row {row:?} has 0 seats")]
    EmptyRow {
        /// The row's name.
        row: String,
    },
    /// Two rows share a name.
    #[error("row {row:?} appears more than once")]
    DuplicateRow {
        /// The repeated row name.
        row: String,
    },
    /// Two sections share a name.
    #[error("section {section:?} appears more than once")]
    DuplicateSection {
        /// The repeated section name.
        section: String,
    },
    /// More seats than one show may have.
    #[error("a show may have at most {max} seats, this one has {seats}")]
    TooManySeats {
        /// Seats asked for.
        seats: u64,
        /// The limit.
        max: u32,
    },
    /// A price below zero.
    #[error("price must not be negative, got {cents} cents")]
    NegativePrice {
        /// The price given.
        cents: i64,
    },
    /// A price above [`MAX_PRICE_CENTS`].
    #[error("price may be at most {max} cents, got {cents}")]
    PriceTooHigh {
        /// The price given.
        cents: i64,
        /// The bound.
        max: i64,
    },
    /// A per-buyer seat limit outside 1 to [`MAX_SEATS_PER_USER`].
    #[error("max_seats_per_user must be 1 to {max}, got {limit}")]
    BadSeatLimit {
        /// The limit given.
        limit: i64,
        /// The bound.
        max: u32,
    },
}

/// What a show is once created.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShowDetails {
    /// The show's id.
    pub show_id: ShowId,
    /// Its name.
    pub name: ShowName,
    /// Its venue.
    pub venue: VenueName,
    /// When it starts.
    pub starts_at: Timestamp,
    /// Its seats.
    pub seat_map: SeatMap,
    /// Most live seats (held or bought) one buyer may have in the show;
    /// `None`: no limit. Absent from shows created before limits existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_seats_per_user: Option<SeatLimit>,
}

/// A show's per-buyer seat limit: 1 to [`MAX_SEATS_PER_USER`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SeatLimit(u32);

impl SeatLimit {
    /// Checks a limit as clients send it.
    ///
    /// # Errors
    /// [`ShowError::BadSeatLimit`] outside 1 to [`MAX_SEATS_PER_USER`].
    pub fn new(limit: i64) -> Result<Self, ShowError> {
        u32::try_from(limit)
            .ok()
            .filter(|l| (1..=MAX_SEATS_PER_USER).contains(l))
            .map(Self)
            .ok_or(ShowError::BadSeatLimit {
                limit,
                max: MAX_SEATS_PER_USER,
            })
    }

    /// The limit.
    pub const fn get(self) -> u32 {
        self.0
    }
}

/// The `Show` aggregate; `None` until created.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Show {
    details: Option<ShowDetails>,
}

impl Show {
    /// The show, once created.
    pub fn details(&self) -> Option<&ShowDetails> {
        self.details.as_ref()
    }

    /// Creates the show.
    ///
    /// # Errors
    /// [`ShowError::AlreadyCreated`] when it exists.
    pub fn decide(&self, command: ShowCommand) -> Result<Vec<ShowEvent>, ShowError> {
        match command {
            ShowCommand::CreateShow(details) => {
                if self.details.is_some() {
                    return Err(ShowError::AlreadyCreated);
                }
                Ok(vec![ShowEvent::ShowCreated(details)])
            }
        }
    }
}

/// Commands to a `Show`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ShowCommand {
    /// Create the show with its (already checked) seat map.
    CreateShow(ShowDetails),
}

/// Facts about a `Show`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ShowEvent {
    /// The show was created with this seat map.
    ShowCreated(ShowDetails),
}

impl DomainEvent for ShowEvent {
    fn event_type(&self) -> String {
        match self {
            Self::ShowCreated(_) => "ShowCreated",
        }
        .to_owned()
    }

    fn event_version(&self) -> String {
        // Every type of this release has a version.
        crate::versions::current(&self.event_type())
            .unwrap_or(crate::EVENT_VERSION)
            .to_owned()
    }
}

impl ShowEvent {
    /// The show this event belongs to.
    pub fn show_id(&self) -> ShowId {
        match self {
            Self::ShowCreated(details) => details.show_id,
        }
    }
}

impl Aggregate for Show {
    const TYPE: &'static str = "Show";
    type Command = ShowCommand;
    type Event = ShowEvent;
    type Error = ShowError;
    type Services = ();

    async fn handle(
        &mut self,
        command: Self::Command,
        _services: &Self::Services,
        sink: &EventSink<Self>,
    ) -> Result<(), Self::Error> {
        for event in self.decide(command)? {
            sink.write(event, self).await;
        }
        Ok(())
    }

    fn apply(&mut self, event: Self::Event) {
        match event {
            ShowEvent::ShowCreated(details) => self.details = Some(details),
        }
    }
}
