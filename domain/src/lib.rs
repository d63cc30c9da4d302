//! The ticket-booking domain, free of I/O: the `Show`, `Seat` and `Booking`
//! aggregates (cqrs-es), the box office rules that keep a booking and its
//! seats in step, and the event envelope published to Kafka.
//!
//! Nothing here reads a clock, a database or the network: time comes in as a
//! value, and every decision is a function from current state to events. The
//! services load state, call these functions, and append the events.

#![forbid(unsafe_code)]

pub mod best_available;
pub mod booking;
pub mod box_office;
pub mod consistency;
pub mod envelope;
pub mod ids;
pub mod read_model;
pub mod seat;
pub mod show;
pub mod versions;

pub use booking::{
    BookedSeat, Booking, BookingCommand, BookingDetails, BookingError, BookingEvent, BookingState,
    BookingStatus, CancelledBy,
};
pub use box_office::{BookingRequest, BoxOfficeError, Changes, Purchase, Streams};
pub use consistency::{ConsistencyToken, TokenError, TokenKey, WeakKey, CONSISTENCY_HEADER};
pub use envelope::{AnyEvent, PublishedEvent, EVENTS_TOPIC};
pub use ids::{
    BookingId, IdError, RowName, SeatId, SeatLabel, SectionName, ShowId, ShowName, UserId,
    VenueName,
};
pub use seat::{ReleaseReason, Seat, SeatCommand, SeatError, SeatEvent, SeatState, SeatStatus};
pub use show::{
    Cents, Row, SeatLimit, SeatMap, Section, Show, ShowCommand, ShowDetails, ShowError, ShowEvent,
};

/// A point in time, UTC. Always passed in, never read from a clock here.
pub type Timestamp = chrono::DateTime<chrono::Utc>;

/// The payload version of every event type as first released; what each
/// is written in now is [`versions::current`].
pub const EVENT_VERSION: &str = "1";
