//! Pins the stored and published JSON of every event type. These shapes are
//! the contract with the event log and every Kafka consumer: a failure here
//! means a breaking change, which needs a new event version and an upcaster,
//! not an edit of the expected JSON.

mod common;

use std::collections::BTreeMap;

use common::{at, label, show_id, small_show_details, uuid};
use cqrs_es::DomainEvent;
use domain::{
    AnyEvent, BookedSeat, BookingDetails, BookingEvent, BookingId, CancelledBy, Cents,
    PublishedEvent, ReleaseReason, SeatEvent, ShowEvent, UserId,
};
use serde_json::{json, Value};

const SHOW: &str = "5eed0000-0000-4000-8000-000000000001";
const BOOKING: &str = "00000000-0000-0000-0000-000000000b01";
const USER: &str = "00000000-0000-0000-0000-000000000abc";

fn booking_id() -> BookingId {
    BookingId::from_uuid(uuid(0xb01))
}

fn details() -> BookingDetails {
    BookingDetails::new(
        booking_id(),
        show_id(),
        UserId::from_uuid(uuid(0xabc)),
        vec![
            BookedSeat {
                label: label("A1"),
                price_cents: Cents::new(22_500).expect("price"),
            },
            BookedSeat {
                label: label("B2"),
                price_cents: Cents::new(9_000).expect("price"),
            },
        ],
    )
}

/// Every event type, with the JSON it must serialize to. The `match` in
/// `every_event_type_is_pinned` fails to compile when a variant is added
/// without being pinned here.
fn pinned() -> Vec<(AnyEvent, Value)> {
    vec![
        (
            AnyEvent::Show(ShowEvent::ShowCreated(small_show_details())),
            json!({"ShowCreated": {
                "show_id": SHOW, "name": "Jazz Night", "venue": "Blue Note",
                "starts_at": "2027-03-01T20:00:00Z",
                "seat_map": [
                    {"name": "VIP", "price_cents": 22500, "rows": [{"row": "A", "seats": 3}]},
                    {"name": "Floor", "price_cents": 9000,
                     "rows": [{"row": "B", "seats": 3}, {"row": "C", "seats": 3}]}
                ]
            }}),
        ),
        (
            AnyEvent::Seat(SeatEvent::SeatHeld {
                show_id: show_id(),
                label: label("A1"),
                booking_id: booking_id(),
                expires_at: at(10),
            }),
            json!({"SeatHeld": {"show_id": SHOW, "label": "A1", "booking_id": BOOKING,
                                "expires_at": "2027-03-01T18:10:00Z"}}),
        ),
        (
            AnyEvent::Seat(SeatEvent::SeatBooked {
                show_id: show_id(),
                label: label("A1"),
                booking_id: booking_id(),
            }),
            json!({"SeatBooked": {"show_id": SHOW, "label": "A1", "booking_id": BOOKING}}),
        ),
        (
            AnyEvent::Seat(SeatEvent::SeatReleased {
                show_id: show_id(),
                label: label("A1"),
                booking_id: booking_id(),
                reason: ReleaseReason::Expired,
            }),
            json!({"SeatReleased": {"show_id": SHOW, "label": "A1", "booking_id": BOOKING,
                                    "reason": "expired"}}),
        ),
        (
            AnyEvent::Booking(BookingEvent::BookingHeld {
                details: details(),
                expires_at: at(10),
                held_at: at(0),
            }),
            json!({"BookingHeld": {
                "booking_id": BOOKING, "show_id": SHOW, "user_id": USER,
                "seats": [{"label": "A1", "price_cents": 22500}, {"label": "B2", "price_cents": 9000}],
                "total_cents": 31500,
                "expires_at": "2027-03-01T18:10:00Z", "held_at": "2027-03-01T18:00:00Z"
            }}),
        ),
        (
            AnyEvent::Booking(BookingEvent::BookingPlaced {
                details: details(),
                placed_at: at(0),
            }),
            json!({"BookingPlaced": {
                "booking_id": BOOKING, "show_id": SHOW, "user_id": USER,
                "seats": [{"label": "A1", "price_cents": 22500}, {"label": "B2", "price_cents": 9000}],
                "total_cents": 31500, "placed_at": "2027-03-01T18:00:00Z"
            }}),
        ),
        (
            AnyEvent::Booking(BookingEvent::BookingConfirmed {
                booking_id: booking_id(),
                show_id: show_id(),
                confirmed_at: at(5),
            }),
            json!({"BookingConfirmed": {"booking_id": BOOKING, "show_id": SHOW,
                                        "confirmed_at": "2027-03-01T18:05:00Z"}}),
        ),
        (
            AnyEvent::Booking(BookingEvent::BookingCancelled {
                booking_id: booking_id(),
                show_id: show_id(),
                cancelled_at: at(5),
                cancelled_by: CancelledBy::Staff {
                    user_id: UserId::from_uuid(uuid(0x5af)),
                },
            }),
            json!({"BookingCancelled": {"booking_id": BOOKING, "show_id": SHOW,
                                        "cancelled_at": "2027-03-01T18:05:00Z",
                                        "cancelled_by": {"staff": {"user_id": uuid(0x5af)}}}}),
        ),
        (
            AnyEvent::Booking(BookingEvent::BookingExpired {
                booking_id: booking_id(),
                show_id: show_id(),
                expired_at: at(10),
            }),
            json!({"BookingExpired": {"booking_id": BOOKING, "show_id": SHOW,
                                      "expired_at": "2027-03-01T18:10:00Z"}}),
        ),
    ]
}

fn to_json(event: &AnyEvent) -> (Value, String, String) {
    let encode = |value: Result<Value, _>| value.expect("events serialize");
    match event {
        AnyEvent::Show(e) => (
            encode(serde_json::to_value(e)),
            e.event_type(),
            e.event_version(),
        ),
        AnyEvent::Seat(e) => (
            encode(serde_json::to_value(e)),
            e.event_type(),
            e.event_version(),
        ),
        AnyEvent::Booking(e) => (
            encode(serde_json::to_value(e)),
            e.event_type(),
            e.event_version(),
        ),
    }
}

fn aggregate_type(event: &AnyEvent) -> &'static str {
    match event {
        AnyEvent::Show(_) => "Show",
        AnyEvent::Seat(_) => "Seat",
        AnyEvent::Booking(_) => "Booking",
    }
}

#[test]
fn every_event_serializes_to_its_pinned_json() {
    for (event, expected) in pinned() {
        let (json, event_type, event_version) = to_json(&event);
        assert_eq!(json, expected, "the JSON of {event_type} changed");
        let tag = expected
            .as_object()
            .and_then(|o| o.keys().next())
            .expect("tagged");
        assert_eq!(&event_type, tag, "event_type must equal the JSON tag");
        let version = if event_type == "BookingCancelled" {
            "2"
        } else {
            "1"
        };
        assert_eq!(
            event_version, version,
            "the version of {event_type} changed"
        );
        let decoded = AnyEvent::decode(aggregate_type(&event), &event_version, &expected)
            .expect("pinned JSON decodes");
        assert_eq!(
            decoded, event,
            "the pinned JSON of {event_type} no longer decodes to the same event"
        );
        assert_eq!(decoded.show_id(), show_id());
    }
}

#[test]
fn every_event_type_is_pinned() {
    let mut pinned_types: Vec<String> = pinned().iter().map(|(e, _)| e.event_type()).collect();
    pinned_types.sort();
    for (event, _) in pinned() {
        // Exhaustive on purpose: a new variant does not compile until pinned above.
        match event {
            AnyEvent::Show(ShowEvent::ShowCreated(_))
            | AnyEvent::Seat(
                SeatEvent::SeatHeld { .. }
                | SeatEvent::SeatBooked { .. }
                | SeatEvent::SeatReleased { .. },
            )
            | AnyEvent::Booking(
                BookingEvent::BookingHeld { .. }
                | BookingEvent::BookingPlaced { .. }
                | BookingEvent::BookingConfirmed { .. }
                | BookingEvent::BookingCancelled { .. }
                | BookingEvent::BookingExpired { .. },
            ) => {}
        }
    }
    assert_eq!(pinned_types.len(), 9);
    pinned_types.dedup();
    assert_eq!(pinned_types.len(), 9, "each event type is pinned once");
}

#[test]
fn the_published_envelope_is_pinned() {
    let payload = json!({"SeatBooked": {"show_id": SHOW, "label": "A1", "booking_id": BOOKING}});
    let envelope = PublishedEvent {
        envelope_version: domain::envelope::ENVELOPE_VERSION,
        aggregate_type: "Seat".into(),
        aggregate_id: format!("{SHOW}:A1"),
        sequence: 2,
        event_type: "SeatBooked".into(),
        event_version: "1".into(),
        global_position: 42,
        show_id: show_id(),
        recorded_at: at(1),
        payload: payload.clone(),
        metadata: BTreeMap::from([("request_id".to_owned(), "r-1".to_owned())]),
    };
    assert_eq!(
        serde_json::to_value(&envelope).expect("envelopes serialize"),
        json!({
            "envelope_version": 1, "aggregate_type": "Seat", "aggregate_id": format!("{SHOW}:A1"),
            "sequence": 2, "event_type": "SeatBooked", "event_version": "1", "global_position": 42,
            "show_id": SHOW, "recorded_at": "2027-03-01T18:01:00Z", "payload": payload,
            "metadata": {"request_id": "r-1"}
        })
    );
    assert_eq!(envelope.key(), SHOW);
    assert_eq!(domain::EVENTS_TOPIC, "ticketing.events.v1");
    assert!(matches!(
        envelope.decode(),
        Ok(AnyEvent::Seat(SeatEvent::SeatBooked { .. }))
    ));
}

/// Version 1 of `BookingCancelled`, as the first release wrote it: still
/// in every log, read as cancelled by someone unrecorded. Without the
/// upcaster it does not decode.
#[test]
fn a_version_1_cancellation_still_decodes() {
    let v1 = json!({"BookingCancelled": {"booking_id": BOOKING, "show_id": SHOW,
                                         "cancelled_at": "2027-03-01T18:05:00Z"}});
    assert_eq!(
        AnyEvent::decode("Booking", "1", &v1).ok(),
        Some(AnyEvent::Booking(BookingEvent::BookingCancelled {
            booking_id: booking_id(),
            show_id: show_id(),
            cancelled_at: at(5),
            cancelled_by: CancelledBy::Unrecorded,
        }))
    );
    assert!(serde_json::from_value::<BookingEvent>(v1.clone()).is_err());
    // A version this release does not know yet is an error, not a guess.
    assert!(AnyEvent::decode("Booking", "3", &v1).is_err());
}

#[test]
fn unknown_aggregates_and_malformed_payloads_are_errors() {
    assert!(AnyEvent::decode("Concert", "1", &json!({})).is_err());
    assert!(AnyEvent::decode("Seat", "1", &json!({"SeatHeld": {"label": "A1"}})).is_err());
    assert!(AnyEvent::decode("Seat", "1", &json!({"SeatHeld": {
        "show_id": SHOW, "label": "A0", "booking_id": BOOKING, "expires_at": "2027-03-01T18:10:00Z"}}))
        .is_err());
}
