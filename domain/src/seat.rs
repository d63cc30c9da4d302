//! The `Seat` aggregate: one stream per seat of a show, id `{show_id}:{label}`.
//! It is the single place that decides who owns a seat, so two bookings that
//! race for it meet on this stream's version. A seat with no stream is
//! available; its stream is born on its first hold or booking.

use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use serde::{Deserialize, Serialize};

use crate::ids::{BookingId, SeatId, SeatLabel, ShowId};
use crate::Timestamp;

/// Who has a seat, as recorded by its events.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum SeatState {
    /// Nobody.
    #[default]
    Available,
    /// Held for a booking until a time; from then on it counts as available.
    Held {
        /// The booking that holds it.
        booking_id: BookingId,
        /// When the hold lapses.
        expires_at: Timestamp,
    },
    /// Sold to a booking.
    Booked {
        /// The booking that bought it.
        booking_id: BookingId,
    },
}

/// What a reader sees of a seat at a given time: an expired hold is available.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SeatStatus {
    /// Free to hold or book.
    Available,
    /// Held by a live hold.
    Held,
    /// Sold.
    Booked,
}

/// Why a seat was given up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReleaseReason {
    /// Its booking was cancelled.
    Cancelled,
    /// Its booking's hold lapsed.
    Expired,
}

/// The `Seat` aggregate.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Seat {
    state: SeatState,
}

/// Why a seat command was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SeatError {
    /// Another booking holds or owns the seat.
    #[error("seat {label} is not available")]
    Taken {
        /// The seat.
        label: SeatLabel,
    },
    /// The booking's hold on this seat has lapsed.
    #[error("the hold on seat {label} has expired")]
    HoldExpired {
        /// The seat.
        label: SeatLabel,
    },
    /// The booking does not hold this seat.
    #[error("seat {label} is not held by booking {booking_id}")]
    NotHeldBy {
        /// The seat.
        label: SeatLabel,
        /// The booking that asked.
        booking_id: BookingId,
    },
}

/// Commands to a `Seat`. Each names the seat, so a new stream knows who it is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SeatCommand {
    /// Hold the seat for a booking until `expires_at`.
    Hold {
        /// The seat.
        seat: SeatId,
        /// The booking that wants it.
        booking_id: BookingId,
        /// When the hold lapses.
        expires_at: Timestamp,
        /// The time of the request.
        now: Timestamp,
    },
    /// Sell the seat to a booking at once.
    Book {
        /// The seat.
        seat: SeatId,
        /// The booking that buys it.
        booking_id: BookingId,
        /// The time of the request.
        now: Timestamp,
    },
    /// Turn the booking's live hold into a sale.
    Confirm {
        /// The seat.
        seat: SeatId,
        /// The booking that holds it.
        booking_id: BookingId,
        /// The time of the request.
        now: Timestamp,
    },
    /// Give the seat up if, and only if, this booking has it.
    Release {
        /// The seat.
        seat: SeatId,
        /// The booking giving it up.
        booking_id: BookingId,
        /// Why.
        reason: ReleaseReason,
    },
}

/// Facts about a `Seat`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SeatEvent {
    /// The seat was held for a booking.
    SeatHeld {
        /// The show.
        show_id: ShowId,
        /// The seat.
        label: SeatLabel,
        /// The booking that holds it.
        booking_id: BookingId,
        /// When the hold lapses.
        expires_at: Timestamp,
    },
    /// The seat was sold to a booking.
    SeatBooked {
        /// The show.
        show_id: ShowId,
        /// The seat.
        label: SeatLabel,
        /// The booking that bought it.
        booking_id: BookingId,
    },
    /// The booking gave the seat up; it is available again.
    SeatReleased {
        /// The show.
        show_id: ShowId,
        /// The seat.
        label: SeatLabel,
        /// The booking that had it.
        booking_id: BookingId,
        /// Why.
        reason: ReleaseReason,
    },
}

impl DomainEvent for SeatEvent {
    fn event_type(&self) -> String {
        match self {
            Self::SeatHeld { .. } => "SeatHeld",
            Self::SeatBooked { .. } => "SeatBooked",
            Self::SeatReleased { .. } => "SeatReleased",
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

impl SeatEvent {
    /// The show this event belongs to.
    pub fn show_id(&self) -> ShowId {
        match self {
            Self::SeatHeld { show_id, .. }
            | Self::SeatBooked { show_id, .. }
            | Self::SeatReleased { show_id, .. } => *show_id,
        }
    }

    /// The seat this event belongs to.
    pub fn label(&self) -> &SeatLabel {
        match self {
            Self::SeatHeld { label, .. }
            | Self::SeatBooked { label, .. }
            | Self::SeatReleased { label, .. } => label,
        }
    }
}

impl Seat {
    /// The state its events recorded, regardless of time.
    pub fn state(&self) -> SeatState {
        self.state
    }

    /// The booking that has the seat at `now`: a lapsed hold has no owner.
    pub fn owner_at(&self, now: Timestamp) -> Option<BookingId> {
        match self.state {
            SeatState::Available => None,
            SeatState::Held {
                booking_id,
                expires_at,
            } => (now < expires_at).then_some(booking_id),
            SeatState::Booked { booking_id } => Some(booking_id),
        }
    }

    /// What a reader sees at `now`.
    pub fn status_at(&self, now: Timestamp) -> SeatStatus {
        match (self.state, self.owner_at(now)) {
            (_, None) => SeatStatus::Available,
            (SeatState::Booked { .. }, Some(_)) => SeatStatus::Booked,
            (_, Some(_)) => SeatStatus::Held,
        }
    }

    /// The booking whose hold on this seat has lapsed by `now`, if any.
    pub fn lapsed_hold_at(&self, now: Timestamp) -> Option<BookingId> {
        match self.state {
            SeatState::Held {
                booking_id,
                expires_at,
            } if expires_at <= now => Some(booking_id),
            _ => None,
        }
    }

    /// Decides a command's events without changing the seat.
    ///
    /// Holding or booking a seat whose hold has lapsed first releases it as
    /// expired, in the same step, so the log never shows a seat passing from
    /// one booking to another without being freed.
    ///
    /// # Errors
    /// [`SeatError::Taken`] when another booking has the seat,
    /// [`SeatError::HoldExpired`] when confirming a lapsed hold,
    /// [`SeatError::NotHeldBy`] when confirming a seat the booking does not hold.
    pub fn decide(&self, command: SeatCommand) -> Result<Vec<SeatEvent>, SeatError> {
        match command {
            SeatCommand::Hold {
                seat,
                booking_id,
                expires_at,
                now,
            } => self.acquire(seat, booking_id, now, Take::Hold { expires_at }),
            SeatCommand::Book {
                seat,
                booking_id,
                now,
            } => self.acquire(seat, booking_id, now, Take::Book),
            SeatCommand::Confirm {
                seat,
                booking_id,
                now,
            } => match self.state {
                SeatState::Booked { booking_id: owner } if owner == booking_id => Ok(vec![]),
                SeatState::Held {
                    booking_id: holder,
                    expires_at,
                } if holder == booking_id => {
                    if expires_at <= now {
                        Err(SeatError::HoldExpired { label: seat.label })
                    } else {
                        Ok(vec![SeatEvent::SeatBooked {
                            show_id: seat.show_id,
                            label: seat.label,
                            booking_id,
                        }])
                    }
                }
                _ => Err(SeatError::NotHeldBy {
                    label: seat.label,
                    booking_id,
                }),
            },
            SeatCommand::Release {
                seat,
                booking_id,
                reason,
            } => match self.state {
                SeatState::Held { booking_id: b, .. } | SeatState::Booked { booking_id: b }
                    if b == booking_id =>
                {
                    Ok(vec![SeatEvent::SeatReleased {
                        show_id: seat.show_id,
                        label: seat.label,
                        booking_id,
                        reason,
                    }])
                }
                // Not this booking's seat (any more): freeing it would free someone else's.
                _ => Ok(vec![]),
            },
        }
    }

    fn acquire(
        &self,
        seat: SeatId,
        booking_id: BookingId,
        now: Timestamp,
        take: Take,
    ) -> Result<Vec<SeatEvent>, SeatError> {
        let taken = |seat: SeatId| match take {
            Take::Hold { expires_at } => SeatEvent::SeatHeld {
                show_id: seat.show_id,
                label: seat.label,
                booking_id,
                expires_at,
            },
            Take::Book => SeatEvent::SeatBooked {
                show_id: seat.show_id,
                label: seat.label,
                booking_id,
            },
        };
        match self.owner_at(now) {
            Some(owner) if owner != booking_id => Err(SeatError::Taken { label: seat.label }),
            Some(_) => match (self.state, take) {
                (SeatState::Held { .. }, Take::Book) => Ok(vec![taken(seat)]),
                // Taking again what this booking already has: a retry, nothing new.
                _ => Ok(vec![]),
            },
            None => {
                let mut events = Vec::with_capacity(2);
                if let Some(lapsed) = self.lapsed_hold_at(now) {
                    events.push(SeatEvent::SeatReleased {
                        show_id: seat.show_id,
                        label: seat.label.clone(),
                        booking_id: lapsed,
                        reason: ReleaseReason::Expired,
                    });
                }
                events.push(taken(seat));
                Ok(events)
            }
        }
    }
}

/// How a booking wants to take a seat.
#[derive(Debug, Clone, Copy)]
enum Take {
    Hold { expires_at: Timestamp },
    Book,
}

impl Aggregate for Seat {
    const TYPE: &'static str = "Seat";
    type Command = SeatCommand;
    type Event = SeatEvent;
    type Error = SeatError;
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
        self.state = match event {
            SeatEvent::SeatHeld {
                booking_id,
                expires_at,
                ..
            } => SeatState::Held {
                booking_id,
                expires_at,
            },
            SeatEvent::SeatBooked { booking_id, .. } => SeatState::Booked { booking_id },
            SeatEvent::SeatReleased { .. } => SeatState::Available,
        };
    }
}
