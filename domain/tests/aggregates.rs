//! Given/when/then examples of each aggregate's rules, through cqrs-es'
//! `TestFramework` so that `handle` (the path the framework takes) is what runs.

mod common;

use common::{at, label, row, section, show_id, small_show, small_show_details, uuid};
use cqrs_es::test::TestFramework;
use domain::box_office::{self, BookingRequest, Purchase, Streams};
use domain::{
    BookedSeat, Booking, BookingCommand, BookingDetails, BookingError, BookingEvent, BookingId,
    BoxOfficeError, Cents, ReleaseReason, Seat, SeatCommand, SeatError, SeatEvent, SeatId, SeatMap,
    SeatState, SeatStatus, Show, ShowCommand, ShowError, ShowEvent, UserId,
};
use std::collections::BTreeMap;

fn booking(n: u128) -> BookingId {
    BookingId::from_uuid(uuid(n))
}

fn seat(text: &str) -> SeatId {
    SeatId::new(show_id(), label(text))
}

fn held(text: &str, by: u128, until: i64) -> SeatEvent {
    SeatEvent::SeatHeld {
        show_id: show_id(),
        label: label(text),
        booking_id: booking(by),
        expires_at: at(until),
    }
}

fn details(n: u128, seats: &[&str]) -> BookingDetails {
    BookingDetails::new(
        booking(n),
        show_id(),
        UserId::from_uuid(uuid(0xabc)),
        seats
            .iter()
            .map(|s| BookedSeat {
                label: label(s),
                price_cents: Cents::new(9_000).expect("a valid price"),
            })
            .collect(),
    )
}

fn booking_held(n: u128, seats: &[&str], until: i64) -> BookingEvent {
    BookingEvent::BookingHeld {
        details: details(n, seats),
        expires_at: at(until),
        held_at: at(0),
    }
}

#[tokio::test]
async fn a_show_is_created_once() {
    TestFramework::<Show>::with(())
        .given_no_previous_events()
        .when_async(ShowCommand::CreateShow(small_show_details()))
        .await
        .then_expect_events(vec![ShowEvent::ShowCreated(small_show_details())]);
    TestFramework::<Show>::with(())
        .given(vec![ShowEvent::ShowCreated(small_show_details())])
        .when_async(ShowCommand::CreateShow(small_show_details()))
        .await
        .then_expect_error(ShowError::AlreadyCreated);
}

#[test]
fn seat_maps_enforce_the_contract() {
    assert_eq!(SeatMap::new(vec![]), Err(ShowError::NoSections));
    assert!(matches!(
        SeatMap::new(vec![section("VIP", 100, vec![row("A", 0)])]),
        Err(ShowError::EmptyRow { .. })
    ));
    assert!(matches!(
        SeatMap::new(vec![
            section("VIP", 100, vec![row("A", 2)]),
            section("Floor", 100, vec![row("A", 2)]),
        ]),
        Err(ShowError::DuplicateRow { .. })
    ));
    assert!(matches!(
        SeatMap::new(vec![section(
            "VIP",
            100,
            vec![row("A", 60_000), row("B", 40_001)]
        )]),
        Err(ShowError::TooManySeats { seats: 100_001, .. })
    ));
    assert!(SeatMap::new(vec![section(
        "VIP",
        100,
        vec![row("A", 60_000), row("B", 40_000)]
    )])
    .is_ok());
    assert_eq!(Cents::new(-1), Err(ShowError::NegativePrice { cents: -1 }));
}

#[test]
fn a_show_knows_its_seats_and_their_prices() {
    let show = small_show();
    let map = &show.details().expect("created").seat_map;
    assert_eq!(map.seat_count(), 9);
    assert_eq!(
        map.section_of(&label("A3")).map(|s| s.price_cents.get()),
        Some(22_500)
    );
    assert_eq!(
        map.section_of(&label("C1")).map(|s| s.name.as_str()),
        Some("Floor")
    );
    assert!(map.section_of(&label("A4")).is_none());
    assert!(map.section_of(&label("D1")).is_none());
    let labels: Vec<String> = map.labels().map(|(_, l)| l.to_string()).collect();
    assert_eq!(
        labels,
        ["A1", "A2", "A3", "B1", "B2", "B3", "C1", "C2", "C3"]
    );
}

#[tokio::test]
async fn an_available_seat_can_be_held() {
    TestFramework::<Seat>::with(())
        .given_no_previous_events()
        .when_async(SeatCommand::Hold {
            seat: seat("A1"),
            booking_id: booking(1),
            expires_at: at(10),
            now: at(0),
        })
        .await
        .then_expect_events(vec![held("A1", 1, 10)]);
}

#[tokio::test]
async fn a_live_hold_keeps_others_out() {
    TestFramework::<Seat>::with(())
        .given(vec![held("A1", 1, 10)])
        .when_async(SeatCommand::Book {
            seat: seat("A1"),
            booking_id: booking(2),
            now: at(9),
        })
        .await
        .then_expect_error(SeatError::Taken { label: label("A1") });
}

#[tokio::test]
async fn a_lapsed_hold_is_released_before_the_seat_changes_hands() {
    TestFramework::<Seat>::with(())
        .given(vec![held("A1", 1, 10)])
        .when_async(SeatCommand::Hold {
            seat: seat("A1"),
            booking_id: booking(2),
            expires_at: at(25),
            now: at(10),
        })
        .await
        .then_expect_events(vec![
            SeatEvent::SeatReleased {
                show_id: show_id(),
                label: label("A1"),
                booking_id: booking(1),
                reason: ReleaseReason::Expired,
            },
            held("A1", 2, 25),
        ]);
}

#[tokio::test]
async fn confirming_books_a_live_hold_and_refuses_a_lapsed_one() {
    let confirm = |now| SeatCommand::Confirm {
        seat: seat("A1"),
        booking_id: booking(1),
        now: at(now),
    };
    TestFramework::<Seat>::with(())
        .given(vec![held("A1", 1, 10)])
        .when_async(confirm(5))
        .await
        .then_expect_events(vec![SeatEvent::SeatBooked {
            show_id: show_id(),
            label: label("A1"),
            booking_id: booking(1),
        }]);
    TestFramework::<Seat>::with(())
        .given(vec![held("A1", 1, 10)])
        .when_async(confirm(10))
        .await
        .then_expect_error(SeatError::HoldExpired { label: label("A1") });
}

#[tokio::test]
async fn releasing_someone_elses_seat_changes_nothing() {
    TestFramework::<Seat>::with(())
        .given(vec![held("A1", 2, 10)])
        .when_async(SeatCommand::Release {
            seat: seat("A1"),
            booking_id: booking(1),
            reason: ReleaseReason::Cancelled,
        })
        .await
        .then_expect_events(vec![]);
}

#[test]
fn a_seat_reads_as_available_once_its_hold_lapses() {
    let mut seat = Seat::default();
    cqrs_es::Aggregate::apply(&mut seat, held("A1", 1, 10));
    assert_eq!(seat.status_at(at(9)), SeatStatus::Held);
    assert_eq!(seat.status_at(at(10)), SeatStatus::Available);
    assert_eq!(
        seat.state(),
        SeatState::Held {
            booking_id: booking(1),
            expires_at: at(10)
        }
    );
}

#[tokio::test]
async fn a_held_booking_is_confirmed_once() {
    let confirmed = BookingEvent::BookingConfirmed {
        booking_id: booking(1),
        show_id: show_id(),
        confirmed_at: at(5),
    };
    TestFramework::<Booking>::with(())
        .given(vec![booking_held(1, &["B1"], 10)])
        .when_async(BookingCommand::Confirm { now: at(5) })
        .await
        .then_expect_events(vec![confirmed.clone()]);
    TestFramework::<Booking>::with(())
        .given(vec![booking_held(1, &["B1"], 10), confirmed])
        .when_async(BookingCommand::Confirm { now: at(6) })
        .await
        .then_expect_events(vec![]);
}

#[tokio::test]
async fn a_lapsed_hold_can_be_neither_confirmed_nor_cancelled_but_expires() {
    for command in [
        BookingCommand::Confirm { now: at(10) },
        BookingCommand::Cancel {
            now: at(11),
            by: None,
        },
    ] {
        TestFramework::<Booking>::with(())
            .given(vec![booking_held(1, &["B1"], 10)])
            .when_async(command)
            .await
            .then_expect_error(BookingError::Expired);
    }
    TestFramework::<Booking>::with(())
        .given(vec![booking_held(1, &["B1"], 10)])
        .when_async(BookingCommand::Expire { now: at(10) })
        .await
        .then_expect_events(vec![BookingEvent::BookingExpired {
            booking_id: booking(1),
            show_id: show_id(),
            expired_at: at(10),
        }]);
}

#[tokio::test]
async fn a_cancelled_booking_stays_cancelled() {
    let cancelled = BookingEvent::BookingCancelled {
        booking_id: booking(1),
        show_id: show_id(),
        cancelled_at: at(2),
        cancelled_by: domain::CancelledBy::Buyer,
    };
    TestFramework::<Booking>::with(())
        .given(vec![booking_held(1, &["B1"], 10), cancelled.clone()])
        .when_async(BookingCommand::Cancel {
            now: at(3),
            by: None,
        })
        .await
        .then_expect_events(vec![]);
    TestFramework::<Booking>::with(())
        .given(vec![booking_held(1, &["B1"], 10), cancelled])
        .when_async(BookingCommand::Confirm { now: at(3) })
        .await
        .then_expect_error(BookingError::Cancelled);
}

#[tokio::test]
async fn only_a_lapsed_hold_can_expire() {
    TestFramework::<Booking>::with(())
        .given(vec![booking_held(1, &["B1"], 10)])
        .when_async(BookingCommand::Expire { now: at(9) })
        .await
        .then_expect_error(BookingError::NotExpirable {
            state: domain::BookingState::Held,
        });
    TestFramework::<Booking>::with(())
        .given_no_previous_events()
        .when_async(BookingCommand::Confirm { now: at(0) })
        .await
        .then_expect_error(BookingError::NotFound);
}

fn request(n: u128, seats: &[&str], purchase: Purchase) -> BookingRequest {
    BookingRequest {
        booking_id: booking(n),
        show_id: show_id(),
        user_id: UserId::from_uuid(uuid(0xabc)),
        seats: seats.iter().map(|s| label(s)).collect(),
        purchase,
    }
}

fn place(
    seats: &BTreeMap<domain::SeatLabel, Seat>,
    bookings: &BTreeMap<BookingId, Booking>,
    request: BookingRequest,
    now: i64,
) -> Result<domain::Changes, BoxOfficeError> {
    box_office::place(
        &small_show(),
        request,
        &Booking::default(),
        Streams { seats, bookings },
        at(now),
    )
}

#[test]
fn the_box_office_refuses_bad_seat_lists_before_touching_any_stream() {
    let none = BTreeMap::new();
    let no = BTreeMap::new();
    assert_eq!(
        place(&none, &no, request(1, &[], Purchase::Book), 0),
        Err(BoxOfficeError::NoSeats)
    );
    assert_eq!(
        place(&none, &no, request(1, &["A1", "A1"], Purchase::Book), 0),
        Err(BoxOfficeError::DuplicateSeat { label: label("A1") })
    );
    assert_eq!(
        place(
            &none,
            &no,
            request(1, &["A1", "Z9", "A4"], Purchase::Book),
            0
        ),
        Err(BoxOfficeError::UnknownSeats {
            labels: vec![label("Z9"), label("A4")]
        })
    );
    let eleven = [
        "A1", "A2", "A3", "B1", "B2", "B3", "C1", "C2", "C3", "D1", "D2",
    ];
    assert!(matches!(
        place(&none, &no, request(1, &eleven, Purchase::Book), 0),
        Err(BoxOfficeError::TooManySeats { asked: 11, max: 10 })
    ));
    assert_eq!(
        box_office::place(
            &Show::default(),
            request(1, &["A1"], Purchase::Book),
            &Booking::default(),
            Streams {
                seats: &none,
                bookings: &no
            },
            at(0)
        ),
        Err(BoxOfficeError::ShowNotFound)
    );
}

#[test]
fn a_booking_takes_all_its_seats_or_none_and_names_every_taken_one() {
    let mut seats = BTreeMap::new();
    for (text, by) in [("B1", 7), ("B3", 8)] {
        let mut seat = Seat::default();
        cqrs_es::Aggregate::apply(&mut seat, held(text, by, 30));
        seats.insert(label(text), seat);
    }
    let result = place(
        &seats,
        &BTreeMap::new(),
        request(1, &["B1", "B2", "B3"], Purchase::Book),
        0,
    );
    assert_eq!(
        result,
        Err(BoxOfficeError::Unavailable {
            labels: vec![label("B1"), label("B3")]
        })
    );

    let changes = place(
        &seats,
        &BTreeMap::new(),
        request(1, &["A2", "B2"], Purchase::Book),
        0,
    )
    .expect("free seats can be booked");
    assert_eq!(changes.seats.len(), 2);
    let events = &changes.bookings[&booking(1)];
    assert!(
        matches!(&events[..], [BookingEvent::BookingPlaced { details, .. }]
        if details.total_cents.get() == 22_500 + 9_000)
    );
}

#[test]
fn taking_a_lapsed_hold_expires_its_booking_and_frees_all_its_seats() {
    let mut seats = BTreeMap::new();
    for text in ["B1", "B2"] {
        let mut seat = Seat::default();
        cqrs_es::Aggregate::apply(&mut seat, held(text, 7, 10));
        seats.insert(label(text), seat);
    }
    let mut stale = Booking::default();
    cqrs_es::Aggregate::apply(&mut stale, booking_held(7, &["B1", "B2"], 10));
    let bookings = BTreeMap::from([(booking(7), stale)]);

    let changes = place(
        &seats,
        &bookings,
        request(1, &["B1"], Purchase::Hold { expires_at: at(30) }),
        15,
    )
    .expect("a lapsed hold does not block");
    assert_eq!(
        changes.bookings[&booking(7)],
        vec![BookingEvent::BookingExpired {
            booking_id: booking(7),
            show_id: show_id(),
            expired_at: at(15)
        }]
    );
    let released = |text: &str| SeatEvent::SeatReleased {
        show_id: show_id(),
        label: label(text),
        booking_id: booking(7),
        reason: ReleaseReason::Expired,
    };
    assert_eq!(
        changes.seats[&seat("B1")],
        vec![released("B1"), held("B1", 1, 30)]
    );
    assert_eq!(changes.seats[&seat("B2")], vec![released("B2")]);
}

#[test]
fn a_lapsed_holder_that_was_not_loaded_is_a_bug_not_a_silent_skip() {
    let mut seats = BTreeMap::new();
    let mut seat = Seat::default();
    cqrs_es::Aggregate::apply(&mut seat, held("B1", 7, 10));
    seats.insert(label("B1"), seat);
    let result = place(
        &seats,
        &BTreeMap::new(),
        request(1, &["B1"], Purchase::Book),
        15,
    );
    assert!(
        matches!(result, Err(BoxOfficeError::Inconsistent(_))),
        "{result:?}"
    );
}
