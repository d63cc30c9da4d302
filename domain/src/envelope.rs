//! The published event contract: what every Kafka consumer of this system
//! reads. Version 1 of the envelope, on one topic, keyed by show.
//!
//! One topic keyed by `show_id` keeps every event of a show (its creation,
//! its seats, its bookings) on one partition in log order, so a consumer sees
//! a show's history exactly as it was written. The envelope's fields and the
//! event type names are a contract: add fields and versions, never rename.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::booking::{Booking, BookingEvent};
use crate::ids::ShowId;
use crate::seat::{Seat, SeatEvent};
use crate::show::{Show, ShowEvent};
use crate::Timestamp;
use cqrs_es::{Aggregate, DomainEvent};

/// The topic every domain event is published to.
pub const EVENTS_TOPIC: &str = "ticketing.events.v1";

/// The envelope's own version; bumped only on a breaking change to it.
pub const ENVELOPE_VERSION: u32 = 1;

/// One committed domain event as published: JSON in the Kafka message body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PublishedEvent {
    /// [`ENVELOPE_VERSION`] when written.
    pub envelope_version: u32,
    /// `Show`, `Seat` or `Booking`.
    pub aggregate_type: String,
    /// The stream id: a show id, `{show_id}:{label}`, or a booking id.
    pub aggregate_id: String,
    /// The event's position in its stream, from 1.
    pub sequence: u64,
    /// The event's type name, such as `SeatHeld`.
    pub event_type: String,
    /// The version of that event type's payload.
    pub event_version: String,
    /// The event's position in the whole log (gaps are possible, order is not broken).
    pub global_position: i64,
    /// The show the event belongs to; also the message key.
    pub show_id: ShowId,
    /// When the event was committed.
    pub recorded_at: Timestamp,
    /// The event itself, as stored (`{"SeatHeld": {...}}`).
    pub payload: serde_json::Value,
    /// Context such as the request id; free-form.
    pub metadata: BTreeMap<String, String>,
}

/// A decoded domain event of any aggregate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AnyEvent {
    /// An event of a `Show` stream.
    Show(ShowEvent),
    /// An event of a `Seat` stream.
    Seat(SeatEvent),
    /// An event of a `Booking` stream.
    Booking(BookingEvent),
}

/// Why a stored or published event could not be read.
#[derive(Debug, thiserror::Error)]
pub enum EnvelopeError {
    /// No aggregate of this type exists.
    #[error("unknown aggregate type {0:?}")]
    UnknownAggregateType(String),
    /// The payload does not match its aggregate's events.
    #[error("payload of a {aggregate_type} event does not decode")]
    BadPayload {
        /// The aggregate type.
        aggregate_type: String,
        /// The decoding error.
        #[source]
        source: serde_json::Error,
    },
    /// Its version cannot be brought to the current shape.
    #[error(transparent)]
    Version(#[from] crate::versions::VersionError),
}

impl AnyEvent {
    /// Decodes a payload stored for `aggregate_type`.
    ///
    /// # Errors
    /// [`EnvelopeError::UnknownAggregateType`], [`EnvelopeError::BadPayload`]
    /// or [`EnvelopeError::Version`].
    pub fn decode(
        aggregate_type: &str,
        event_version: &str,
        payload: &serde_json::Value,
    ) -> Result<Self, EnvelopeError> {
        let bad = |source| EnvelopeError::BadPayload {
            aggregate_type: aggregate_type.to_owned(),
            source,
        };
        let payload = &*crate::versions::upcast_ref(event_version, payload)?;
        match aggregate_type {
            Show::TYPE => ShowEvent::deserialize(payload).map(Self::Show).map_err(bad),
            Seat::TYPE => SeatEvent::deserialize(payload).map(Self::Seat).map_err(bad),
            Booking::TYPE => BookingEvent::deserialize(payload)
                .map(Self::Booking)
                .map_err(bad),
            other => Err(EnvelopeError::UnknownAggregateType(other.to_owned())),
        }
    }

    /// The show the event belongs to.
    pub fn show_id(&self) -> ShowId {
        match self {
            Self::Show(e) => e.show_id(),
            Self::Seat(e) => e.show_id(),
            Self::Booking(e) => e.show_id(),
        }
    }

    /// The event's type name.
    pub fn event_type(&self) -> String {
        match self {
            Self::Show(e) => e.event_type(),
            Self::Seat(e) => e.event_type(),
            Self::Booking(e) => e.event_type(),
        }
    }
}

impl PublishedEvent {
    /// The Kafka message key: the show id, so a show's events stay in order.
    pub fn key(&self) -> String {
        self.show_id.to_string()
    }

    /// Decodes the payload.
    ///
    /// # Errors
    /// As [`AnyEvent::decode`].
    pub fn decode(&self) -> Result<AnyEvent, EnvelopeError> {
        AnyEvent::decode(&self.aggregate_type, &self.event_version, &self.payload)
    }
}
