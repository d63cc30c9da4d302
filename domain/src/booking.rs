//! The `Booking` aggregate: one stream per booking. It records what was
//! bought, for how much, and where the booking is in its life: held until a
//! time, confirmed, cancelled or expired. Seats themselves are owned by their
//! `Seat` streams; the box office keeps the two in step.

use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use serde::{Deserialize, Serialize};

use crate::ids::{BookingId, SeatLabel, ShowId, UserId};
use crate::show::Cents;
use crate::Timestamp;

/// One seat of a booking and the price it was sold at.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BookedSeat {
    /// The seat.
    pub label: SeatLabel,
    /// Its price when booked.
    pub price_cents: Cents,
}

/// Who cancelled a booking: what a box office asks first when a buyer
/// disputes a cancellation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CancelledBy {
    /// The buyer themselves.
    Buyer,
    /// Someone else for the buyer (an admin's token): who.
    Staff {
        /// The staff member's user id.
        user_id: UserId,
    },
    /// Not known: tokens were not checked, or the event was recorded
    /// before version 2 of `BookingCancelled`.
    Unrecorded,
}

impl CancelledBy {
    /// `buyer`, `staff` or `unrecorded`: what the read side shows.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Buyer => "buyer",
            Self::Staff { .. } => "staff",
            Self::Unrecorded => "unrecorded",
        }
    }

    /// Who `by` is to the buyer `buyer`.
    pub fn of(by: Option<UserId>, buyer: UserId) -> Self {
        match by {
            Some(user) if user == buyer => Self::Buyer,
            Some(user_id) => Self::Staff { user_id },
            None => Self::Unrecorded,
        }
    }
}

/// What a booking is for; fixed when it is placed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BookingDetails {
    /// The booking's id.
    pub booking_id: BookingId,
    /// The show.
    pub show_id: ShowId,
    /// The buyer.
    pub user_id: UserId,
    /// The seats, in the order asked for.
    pub seats: Vec<BookedSeat>,
    /// The sum of the seats' prices.
    pub total_cents: Cents,
}

impl BookingDetails {
    /// Details whose total is the sum of `seats`' prices.
    pub fn new(
        booking_id: BookingId,
        show_id: ShowId,
        user_id: UserId,
        seats: Vec<BookedSeat>,
    ) -> Self {
        let total_cents = seats.iter().fold(Cents::default(), |sum, seat| {
            sum.saturating_add(seat.price_cents)
        });
        Self {
            booking_id,
            show_id,
            user_id,
            seats,
            total_cents,
        }
    }
}

/// Where a booking is in its life, as its events recorded it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum BookingStatus {
    /// Seats held until `expires_at`; after that it is expired even before
    /// the log says so.
    Held {
        /// When the hold lapses.
        expires_at: Timestamp,
    },
    /// Bought.
    Confirmed,
    /// Cancelled; its seats were freed.
    Cancelled,
    /// The hold lapsed; its seats were (or will be) freed.
    Expired,
}

/// What a reader sees of a booking at a given time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BookingState {
    /// Held, hold still live.
    Held,
    /// Bought.
    Confirmed,
    /// Cancelled.
    Cancelled,
    /// The hold lapsed.
    Expired,
}

/// The `Booking` aggregate; empty until placed or held.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Booking {
    details: Option<BookingDetails>,
    status: Option<BookingStatus>,
}

/// Why a booking command was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BookingError {
    /// A booking with this id exists already.
    #[error("booking already exists")]
    AlreadyExists,
    /// No booking has this id.
    #[error("booking not found")]
    NotFound,
    /// The hold lapsed before the command.
    #[error("the booking's hold has expired")]
    Expired,
    /// The booking was cancelled.
    #[error("the booking was cancelled")]
    Cancelled,
    /// Only a lapsed hold can be expired.
    #[error("the booking is {state:?}, only a lapsed hold can expire")]
    NotExpirable {
        /// What it is at the time asked.
        state: BookingState,
    },
}

/// Commands to a `Booking`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum BookingCommand {
    /// Hold seats until `expires_at`.
    Hold {
        /// What the booking is for.
        details: BookingDetails,
        /// When the hold lapses.
        expires_at: Timestamp,
        /// The time of the request.
        now: Timestamp,
    },
    /// Buy seats at once, without a hold.
    Place {
        /// What the booking is for.
        details: BookingDetails,
        /// The time of the request.
        now: Timestamp,
    },
    /// Turn a live hold into a purchase.
    Confirm {
        /// The time of the request.
        now: Timestamp,
    },
    /// Cancel a live hold or a purchase.
    Cancel {
        /// The time of the request.
        now: Timestamp,
        /// The verified user asking; `None` when tokens are not checked.
        by: Option<UserId>,
    },
    /// Record that a hold has lapsed.
    Expire {
        /// The time of the request.
        now: Timestamp,
    },
}

/// Facts about a `Booking`. Every event names its show, so a consumer can
/// route it (the Kafka key) without loading anything.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum BookingEvent {
    /// Seats were held for the booking until `expires_at`.
    BookingHeld {
        /// What the booking is for.
        #[serde(flatten)]
        details: BookingDetails,
        /// When the hold lapses.
        expires_at: Timestamp,
        /// When it was held.
        held_at: Timestamp,
    },
    /// Seats were bought at once, without a hold: the booking is confirmed.
    BookingPlaced {
        /// What the booking is for.
        #[serde(flatten)]
        details: BookingDetails,
        /// When it was placed.
        placed_at: Timestamp,
    },
    /// A held booking was bought.
    BookingConfirmed {
        /// The booking.
        booking_id: BookingId,
        /// Its show.
        show_id: ShowId,
        /// When.
        confirmed_at: Timestamp,
    },
    /// The booking was cancelled and its seats freed. Version 2 (see
    /// [`crate::versions`]): `cancelled_by` added.
    BookingCancelled {
        /// The booking.
        booking_id: BookingId,
        /// Its show.
        show_id: ShowId,
        /// When.
        cancelled_at: Timestamp,
        /// Who: the buyer, or box-office staff for them.
        cancelled_by: CancelledBy,
    },
    /// The booking's hold lapsed.
    BookingExpired {
        /// The booking.
        booking_id: BookingId,
        /// Its show.
        show_id: ShowId,
        /// When the lapse was recorded.
        expired_at: Timestamp,
    },
}

impl DomainEvent for BookingEvent {
    fn event_type(&self) -> String {
        match self {
            Self::BookingHeld { .. } => "BookingHeld",
            Self::BookingPlaced { .. } => "BookingPlaced",
            Self::BookingConfirmed { .. } => "BookingConfirmed",
            Self::BookingCancelled { .. } => "BookingCancelled",
            Self::BookingExpired { .. } => "BookingExpired",
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

impl BookingEvent {
    /// The show this event belongs to.
    pub fn show_id(&self) -> ShowId {
        match self {
            Self::BookingHeld { details, .. } | Self::BookingPlaced { details, .. } => {
                details.show_id
            }
            Self::BookingConfirmed { show_id, .. }
            | Self::BookingCancelled { show_id, .. }
            | Self::BookingExpired { show_id, .. } => *show_id,
        }
    }
}

impl Booking {
    /// What the booking is for, once placed.
    pub fn details(&self) -> Option<&BookingDetails> {
        self.details.as_ref()
    }

    /// Its status as recorded by its events.
    pub fn status(&self) -> Option<BookingStatus> {
        self.status
    }

    /// What a reader sees at `now`: a lapsed hold is expired.
    pub fn state_at(&self, now: Timestamp) -> Option<BookingState> {
        self.status.map(|status| match status {
            BookingStatus::Held { expires_at } if now < expires_at => BookingState::Held,
            BookingStatus::Held { .. } | BookingStatus::Expired => BookingState::Expired,
            BookingStatus::Confirmed => BookingState::Confirmed,
            BookingStatus::Cancelled => BookingState::Cancelled,
        })
    }

    /// Whether the booking has a claim on its seats at `now`.
    pub fn is_live_at(&self, now: Timestamp) -> bool {
        matches!(
            self.state_at(now),
            Some(BookingState::Held | BookingState::Confirmed)
        )
    }

    /// Decides a command's events without changing the booking.
    ///
    /// Confirming a confirmed booking and cancelling a cancelled one succeed
    /// with no events, so clients can retry them safely.
    ///
    /// # Errors
    /// [`BookingError::AlreadyExists`] on holding or placing twice,
    /// [`BookingError::NotFound`] for any other command on an empty stream,
    /// [`BookingError::Expired`] on confirming or cancelling a lapsed hold,
    /// [`BookingError::Cancelled`] on confirming a cancelled booking,
    /// [`BookingError::NotExpirable`] on expiring anything but a lapsed hold.
    pub fn decide(&self, command: BookingCommand) -> Result<Vec<BookingEvent>, BookingError> {
        use BookingCommand::{Cancel, Confirm, Expire, Hold, Place};
        use BookingStatus::{Cancelled, Confirmed, Expired, Held};

        let (details, recorded) = match (&self.details, self.status) {
            (Some(details), Some(status)) => (details, status),
            _ => {
                return match command {
                    Hold {
                        details,
                        expires_at,
                        now,
                    } => Ok(vec![BookingEvent::BookingHeld {
                        details,
                        expires_at,
                        held_at: now,
                    }]),
                    Place { details, now } => Ok(vec![BookingEvent::BookingPlaced {
                        details,
                        placed_at: now,
                    }]),
                    Confirm { .. } | Cancel { .. } | Expire { .. } => Err(BookingError::NotFound),
                }
            }
        };
        let (booking_id, show_id, buyer) = (details.booking_id, details.show_id, details.user_id);
        let lapsed = |now: Timestamp| matches!(recorded, Held { expires_at } if expires_at <= now);
        match (command, recorded) {
            (Hold { .. } | Place { .. }, _) => Err(BookingError::AlreadyExists),
            (Confirm { now }, Held { .. }) if !lapsed(now) => {
                Ok(vec![BookingEvent::BookingConfirmed {
                    booking_id,
                    show_id,
                    confirmed_at: now,
                }])
            }
            (Cancel { now, by }, Held { .. }) if !lapsed(now) => {
                Ok(vec![BookingEvent::BookingCancelled {
                    booking_id,
                    show_id,
                    cancelled_at: now,
                    cancelled_by: CancelledBy::of(by, buyer),
                }])
            }
            (Cancel { now, by }, Confirmed) => Ok(vec![BookingEvent::BookingCancelled {
                booking_id,
                show_id,
                cancelled_at: now,
                cancelled_by: CancelledBy::of(by, buyer),
            }]),
            (Expire { now }, Held { .. }) if lapsed(now) => {
                Ok(vec![BookingEvent::BookingExpired {
                    booking_id,
                    show_id,
                    expired_at: now,
                }])
            }
            (Confirm { .. }, Confirmed) | (Cancel { .. }, Cancelled) | (Expire { .. }, Expired) => {
                Ok(vec![])
            }
            (Confirm { .. }, Cancelled) => Err(BookingError::Cancelled),
            (Confirm { .. } | Cancel { .. }, Held { .. } | Expired) => Err(BookingError::Expired),
            (Expire { now }, Held { .. } | Confirmed | Cancelled) => {
                Err(BookingError::NotExpirable {
                    state: self.state_at(now).unwrap_or(BookingState::Held),
                })
            }
        }
    }
}

impl Aggregate for Booking {
    const TYPE: &'static str = "Booking";
    type Command = BookingCommand;
    type Event = BookingEvent;
    type Error = BookingError;
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
            BookingEvent::BookingHeld {
                details,
                expires_at,
                ..
            } => {
                self.details = Some(details);
                self.status = Some(BookingStatus::Held { expires_at });
            }
            BookingEvent::BookingPlaced { details, .. } => {
                self.details = Some(details);
                self.status = Some(BookingStatus::Confirmed);
            }
            BookingEvent::BookingConfirmed { .. } => self.status = Some(BookingStatus::Confirmed),
            BookingEvent::BookingCancelled { .. } => self.status = Some(BookingStatus::Cancelled),
            BookingEvent::BookingExpired { .. } => self.status = Some(BookingStatus::Expired),
        }
    }
}
