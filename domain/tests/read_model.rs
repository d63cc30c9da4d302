//! The read-model fold: counts follow seat events, lapsed holds read as
//! available, and repeated or replayed events change nothing.

mod common;

use std::collections::BTreeMap;

use common::{at, label, small_show_details, uuid};
use cqrs_es::DomainEvent;
use domain::read_model::{BookingDocStatus, Counts, Models, SeatDoc};
use domain::{
    BookedSeat, BookingDetails, BookingEvent, BookingId, BookingState, Cents, PublishedEvent,
    ReleaseReason, SeatEvent, SeatStatus, ShowDetails, ShowEvent, Timestamp, UserId,
};
use proptest::prelude::*;
use serde::Serialize;
use serde_json::json;

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
            cancelled_by: domain::CancelledBy::Buyer,
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

/// The seat `label` of the show in `models`.
fn seat<'a>(models: &'a Models, show_id: &str, label: &str) -> &'a SeatDoc {
    let show = models.shows[show_id].as_ref().expect("the show");
    let block = show
        .block_id_of(&label.parse().expect("a label"))
        .expect("a seat of the show");
    &models.blocks[&block].as_ref().expect("the block").seats[label]
}

/// The show's counts at `now`, whole and per section.
fn counts(models: &Models, show_id: &str, now: Timestamp) -> (Counts, Vec<Counts>) {
    let show = models.shows[show_id].as_ref().expect("the show");
    show.counts_at(models.blocks.values().flatten(), now)
}

#[test]
fn counts_and_statuses_follow_the_history() {
    let log = history();
    let show_id = small_show_details().show_id.to_string();
    // After the confirmation: two booked seats.
    let after_confirm = fold(&log[..7]);
    let (whole, _) = counts(&after_confirm, &show_id, at(0));
    let total = whole.total;
    assert_eq!(
        whole,
        Counts {
            total,
            available: total - 2,
            held: 0,
            booked: 2
        }
    );
    assert_eq!(
        seat(&after_confirm, &show_id, "A1").status,
        SeatStatus::Booked
    );
    assert!(after_confirm
        .blocks
        .values()
        .flatten()
        .all(|b| b.holds.is_empty()));

    // B1 held until minute 5: held at minute 4, available at minute 5.
    let held = fold(&log[..9]);
    assert_eq!(counts(&held, &show_id, at(4)).0.held, 1);
    assert_eq!(
        counts(&held, &show_id, at(5)).0,
        Counts {
            total,
            available: total - 2,
            held: 0,
            booked: 2
        }
    );
    let b1 = seat(&held, &show_id, "B1");
    assert_eq!(b1.status_at(at(4)), SeatStatus::Held);
    assert_eq!(b1.status_at(at(5)), SeatStatus::Available);
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
    let (whole, sections) = counts(&end, &show_id, at(0));
    assert_eq!(
        whole,
        Counts {
            total,
            available: total - 2,
            held: 0,
            booked: 2
        }
    );
    assert_eq!(seat(&end, &show_id, "B1").sequence, 4);
    let booked: i64 = sections.iter().map(|s| s.booked).sum();
    assert_eq!(booked, 2);
    let statuses: Vec<BookingDocStatus> =
        end.bookings.values().flatten().map(|b| b.status).collect();
    assert_eq!(statuses.len(), 3);
    assert!(statuses.contains(&BookingDocStatus::Confirmed));
    assert!(statuses.contains(&BookingDocStatus::Expired));
    assert!(statuses.contains(&BookingDocStatus::Cancelled));
}

/// A block's tally, counted from its seats alone, is the counts and holds
/// the fold keeps by each seat's move, at every point of the history (a
/// hold, its confirmation, its lapse, a cancellation).
#[test]
fn a_tally_counted_from_the_seats_agrees_with_the_fold() {
    let log = history();
    for end in 1..=log.len() {
        let models = fold(&log[..end]);
        for block in models.blocks.values().flatten() {
            let tally = block.tally();
            assert_eq!(tally.counts, block.counts, "after {end} events");
            assert_eq!(tally.holds, block.holds, "after {end} events");
            assert!(tally.seats.is_empty());
        }
    }
}

/// A stadium's seats are cut into blocks of at most `BLOCK_SEATS` seats,
/// each seat in exactly one, in row order; a section's rows run on across
/// block boundaries.
#[test]
fn a_stadium_is_cut_into_blocks_that_hold_every_seat_once() {
    use domain::read_model::{ShowDoc, BLOCK_SEATS};
    let details: ShowDetails = serde_json::from_value(json!({
        "show_id": ::uuid::Uuid::new_v4(), "name": "Stadium", "venue": "Arena",
        "starts_at": "2027-06-01T19:00:00Z",
        "seat_map": [
            {"name": "North", "price_cents": 5000,
             "rows": (0..30_u8).map(|r| json!({"row": format!("N{}{}", (b'A' + r / 26) as char, (b'A' + r % 26) as char), "seats": 777})).collect::<Vec<_>>()},
            {"name": "Box", "price_cents": 50000, "rows": [{"row": "X", "seats": 3}]}
        ]
    }))
    .expect("a seat map");
    let show = ShowDoc::created(&details, 1);
    let blocks = show.blocks();
    let seats: usize = blocks.iter().map(|b| b.seats.len()).sum();
    assert_eq!(seats, 30 * 777 + 3);
    assert!(blocks
        .iter()
        .all(|b| b.seats.len() <= BLOCK_SEATS as usize && b.counts.total == b.seats.len() as i64));
    assert_eq!(
        show.sections[0].blocks,
        (30 * 777_u32).div_ceil(BLOCK_SEATS)
    );
    for block in &blocks {
        for label in block.seats.keys() {
            let found = show.block_id_of(&label.parse().expect("a label"));
            assert_eq!(found.as_deref(), Some(block.block_id.as_str()), "{label}");
        }
    }
    assert_eq!(show.block_of(&"NAA778".parse().expect("a label")), None);
    assert_eq!(show.block_of(&"Q1".parse().expect("a label")), None);
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

#[test]
fn a_generation_number_is_read_from_any_whole_number_from_one() {
    use domain::read_model::GenerationNumber;
    let read = |json: &str| {
        serde_json::from_str::<GenerationNumber>(json)
            .ok()
            .map(|n| n.0)
    };
    assert_eq!(read("7"), Some(7));
    assert_eq!(read("7.0"), Some(7));
    assert_eq!(read("4294967295"), Some(u32::MAX));
    for refused in [
        "0",
        "-1",
        "0.0",
        "7.5",
        "4294967296",
        "1e12",
        "\"7\"",
        "null",
    ] {
        assert_eq!(read(refused), None, "{refused}");
    }
}

#[test]
fn a_collection_name_gives_its_generation_back() {
    use domain::read_model::{collection_name, generation_of_collection, BLOCKS};
    assert_eq!(
        generation_of_collection(&collection_name(12, BLOCKS)),
        Some(12)
    );
    assert_eq!(generation_of_collection("read_model_offsets"), None);
    assert_eq!(generation_of_collection("gx_blocks"), None);
}
