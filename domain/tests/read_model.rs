//! The read-model fold: counts follow seat events, lapsed holds read as
//! available, and repeated or replayed events change nothing.

mod common;

use std::collections::BTreeMap;

use common::{at, label, small_show_details, uuid};
use cqrs_es::DomainEvent;
use domain::read_model::{BookingDocStatus, Counts, Models};
use domain::{
    BookedSeat, BookingDetails, BookingEvent, BookingId, BookingState, Cents, PublishedEvent,
    ReleaseReason, SeatEvent, SeatStatus, ShowEvent, UserId,
};
use proptest::prelude::*;
use serde::Serialize;

fn published<E: Serialize + DomainEvent>(
    aggregate_type: &str,
    aggregate_id: String,
    sequence: u64,
    position: i64,
    event: &E,
) -> PublishedEvent {
    PublishedEvent {
        envelope_version: 1,
        aggregate_type: aggregate_type.to_owned(),
        aggregate_id,
        sequence,
        event_type: event.event_type(),
        event_version: event.event_version(),
        global_position: position,
        show_id: small_show_details().show_id,
        recorded_at: at(0),
        payload: serde_json::to_value(event).expect("events serialize"),
        metadata: BTreeMap::new(),
    }
}

/// A small history: the show; booking 1 holds A1, A2 (until minute 10) and
/// is confirmed; booking 2 holds B1 (until minute 5) and lapses, recorded;
/// booking 3 buys B1 and is cancelled.
fn history() -> Vec<PublishedEvent> {
    let details = small_show_details();
    let show = details.show_id;
    let seat = |l: &str| format!("{show}:{l}");
    let booking = |n: u128| BookingId::from_uuid(uuid(0xb00 + n));
    let booking_details = |n: u128, labels: &[&str]| {
        BookingDetails::new(
            booking(n),
            show,
            UserId::from_uuid(uuid(7)),
            labels
                .iter()
                .map(|l| BookedSeat {
                    label: label(l),
                    price_cents: Cents::new(100).expect("a price"),
                })
                .collect(),
        )
    };
    let mut log = Vec::new();
    let mut p = 0;
    let mut push = |e: PublishedEvent| {
        log.push(e);
    };
    let mut next = || {
        p += 1;
        p
    };
    push(published(
        "Show",
        show.to_string(),
        1,
        next(),
        &ShowEvent::ShowCreated(details.clone()),
    ));
    push(published(
        "Booking",
        booking(1).to_string(),
        1,
        next(),
        &BookingEvent::BookingHeld {
            details: booking_details(1, &["A1", "A2"]),
            expires_at: at(10),
            held_at: at(0),
        },
    ));
    for l in ["A1", "A2"] {
        push(published(
            "Seat",
            seat(l),
            1,
            next(),
            &SeatEvent::SeatHeld {
                show_id: show,
                label: label(l),
                booking_id: booking(1),
                expires_at: at(10),
            },
        ));
    }
    push(published(
        "Booking",
        booking(1).to_string(),
        2,
        next(),
        &BookingEvent::BookingConfirmed {
            booking_id: booking(1),
            show_id: show,
            confirmed_at: at(1),
        },
    ));
    for l in ["A1", "A2"] {
        push(published(
            "Seat",
            seat(l),
            2,
            next(),
            &SeatEvent::SeatBooked {
                show_id: show,
                label: label(l),
                booking_id: booking(1),
            },
        ));
    }
    push(published(
        "Booking",
        booking(2).to_string(),
        1,
        next(),
        &BookingEvent::BookingHeld {
            details: booking_details(2, &["B1"]),
            expires_at: at(5),
            held_at: at(2),
        },
    ));
    push(published(
        "Seat",
        seat("B1"),
        1,
        next(),
        &SeatEvent::SeatHeld {
            show_id: show,
            label: label("B1"),
            booking_id: booking(2),
            expires_at: at(5),
        },
    ));
    push(published(
        "Seat",
        seat("B1"),
        2,
        next(),
        &SeatEvent::SeatReleased {
            show_id: show,
            label: label("B1"),
            booking_id: booking(2),
            reason: ReleaseReason::Expired,
        },
    ));
    push(published(
        "Booking",
        booking(2).to_string(),
        2,
        next(),
        &BookingEvent::BookingExpired {
            booking_id: booking(2),
            show_id: show,
            expired_at: at(6),
        },
    ));
    push(published(
        "Booking",
        booking(3).to_string(),
        1,
        next(),
        &BookingEvent::BookingPlaced {
            details: booking_details(3, &["B1"]),
            placed_at: at(6),
        },
    ));
    push(published(
        "Seat",
        seat("B1"),
        3,
        next(),
        &SeatEvent::SeatBooked {
            show_id: show,
            label: label("B1"),
            booking_id: booking(3),
        },
    ));
    push(published(
        "Booking",
        booking(3).to_string(),
        2,
        next(),
        &BookingEvent::BookingCancelled {
            booking_id: booking(3),
            show_id: show,
            cancelled_at: at(7),
        },
    ));
    push(published(
        "Seat",
        seat("B1"),
        4,
        next(),
        &SeatEvent::SeatReleased {
            show_id: show,
            label: label("B1"),
            booking_id: booking(3),
            reason: ReleaseReason::Cancelled,
        },
    ));
    log
}

fn fold(events: &[PublishedEvent]) -> Models {
    let mut models = Models::default();
    for event in events {
        models.apply(event).expect("the history applies");
    }
    models
}

#[test]
fn counts_and_statuses_follow_the_history() {
    let log = history();
    let show_id = small_show_details().show_id.to_string();
    // After the confirmation: two booked seats.
    let after_confirm = fold(&log[..7]);
    let show = after_confirm.shows[&show_id].as_ref().expect("the show");
    let total = show.counts.total;
    assert_eq!(
        show.counts,
        Counts {
            total,
            available: total - 2,
            held: 0,
            booked: 2
        }
    );
    assert_eq!(show.seats["A1"].status, SeatStatus::Booked);
    assert!(show.holds.is_empty());

    // B1 held until minute 5: held at minute 4, available at minute 5.
    let held = fold(&log[..9]);
    let show = held.shows[&show_id].as_ref().expect("the show");
    assert_eq!(show.counts_at(at(4)).0.held, 1);
    assert_eq!(
        show.counts_at(at(5)).0,
        Counts {
            total,
            available: total - 2,
            held: 0,
            booked: 2
        }
    );
    let seat = &show.seats["B1"];
    assert_eq!(
        domain::read_model::ShowDoc::seat_status_at(seat, at(4)),
        SeatStatus::Held
    );
    assert_eq!(
        domain::read_model::ShowDoc::seat_status_at(seat, at(5)),
        SeatStatus::Available
    );
    let b2 = held
        .bookings
        .values()
        .flatten()
        .find(|b| b.seats == ["B1"])
        .expect("booking 2");
    assert_eq!(b2.state_at(at(4)), BookingState::Held);
    assert_eq!(b2.state_at(at(5)), BookingState::Expired);

    // The end: B1 free again, booking 3 cancelled, booking 1 confirmed.
    let end = fold(&log);
    let show = end.shows[&show_id].as_ref().expect("the show");
    assert_eq!(
        show.counts,
        Counts {
            total,
            available: total - 2,
            held: 0,
            booked: 2
        }
    );
    assert_eq!(show.seats["B1"].sequence, 4);
    let sections: i64 = show.sections.iter().map(|s| s.counts.booked).sum();
    assert_eq!(sections, 2);
    let statuses: Vec<BookingDocStatus> =
        end.bookings.values().flatten().map(|b| b.status).collect();
    assert_eq!(statuses.len(), 3);
    assert!(statuses.contains(&BookingDocStatus::Confirmed));
    assert!(statuses.contains(&BookingDocStatus::Expired));
    assert!(statuses.contains(&BookingDocStatus::Cancelled));
}

#[test]
fn a_seat_event_for_a_show_never_created_is_refused() {
    let log = history();
    let mut models = Models::default();
    assert!(models.apply(&log[2]).is_err(), "a seat of an unknown show");
    assert!(
        models.apply(&log[4]).is_err(),
        "a later booking event before the first"
    );
}

proptest! {
    /// Delivering the history again and again, with any earlier event
    /// repeated at any point (what at-least-once delivery and replays do),
    /// gives the same read models as delivering it once.
    #[test]
    fn repeated_events_change_nothing(repeats in prop::collection::vec((0usize..16, 0usize..16), 0..40)) {
        let log = history();
        let mut delivered: Vec<PublishedEvent> = Vec::new();
        for (i, event) in log.iter().enumerate() {
            delivered.push(event.clone());
            for (at, which) in &repeats {
                if *at == i {
                    delivered.push(log[*which % (i + 1)].clone());
                }
            }
        }
        prop_assert_eq!(fold(&delivered), fold(&log));
    }
}
