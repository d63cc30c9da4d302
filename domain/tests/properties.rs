//! Properties of the domain over random histories: many bookings racing for a
//! few seats under a moving clock, with holds, confirmations, cancellations
//! and expiries in any order.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use chrono::Duration;
use common::{at, show_id, small_show, uuid};
use cqrs_es::event_sink::EventSink;
use cqrs_es::Aggregate;
use domain::box_office::{self, BookingRequest, Purchase, Streams};
use domain::{
    BookedSeat, Booking, BookingCommand, BookingDetails, BookingEvent, BookingId, BookingState,
    BoxOfficeError, Cents, Changes, ReleaseReason, Seat, SeatCommand, SeatEvent, SeatId, SeatLabel,
    SeatState, Show, Timestamp, UserId,
};
use proptest::prelude::*;
use serde::de::DeserializeOwned;
use serde::Serialize;

const CASES: u32 = 256;

/// The seats of `small_show`, in order.
fn all_labels() -> Vec<SeatLabel> {
    small_show()
        .details()
        .expect("created")
        .seat_map
        .labels()
        .map(|(_, l)| l)
        .collect()
}

/// One step of a random history.
#[derive(Debug, Clone)]
enum Step {
    /// A new booking asks for these seats (indices into `all_labels`, maybe
    /// repeated), held for `hold_minutes` or bought at once.
    Place {
        seats: Vec<usize>,
        hold_minutes: Option<i64>,
    },
    Confirm(usize),
    Cancel(usize),
    Expire(usize),
    /// The clock moves on.
    Wait(i64),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => (prop::collection::vec(0usize..9, 1..4), prop::option::of(1i64..15))
            .prop_map(|(seats, hold_minutes)| Step::Place { seats, hold_minutes }),
        2 => any::<usize>().prop_map(Step::Confirm),
        1 => any::<usize>().prop_map(Step::Cancel),
        1 => any::<usize>().prop_map(Step::Expire),
        2 => (0i64..12).prop_map(Step::Wait),
    ]
}

/// Every stream, kept both as live aggregates and as the JSON log they were
/// built from.
struct World {
    show: Show,
    now: Timestamp,
    seats: BTreeMap<SeatLabel, Seat>,
    bookings: BTreeMap<BookingId, Booking>,
    placed: Vec<BookingId>,
    seat_log: BTreeMap<SeatLabel, Vec<serde_json::Value>>,
    booking_log: BTreeMap<BookingId, Vec<serde_json::Value>>,
}

impl World {
    fn new() -> Self {
        Self {
            show: small_show(),
            now: at(0),
            seats: BTreeMap::new(),
            bookings: BTreeMap::new(),
            placed: Vec::new(),
            seat_log: BTreeMap::new(),
            booking_log: BTreeMap::new(),
        }
    }

    fn streams(&self) -> Streams<'_> {
        Streams {
            seats: &self.seats,
            bookings: &self.bookings,
        }
    }

    fn commit(&mut self, changes: Changes) {
        for (id, events) in changes.bookings {
            let booking = self.bookings.entry(id).or_default();
            for event in events {
                self.booking_log.entry(id).or_default().push(json(&event));
                booking.apply(event);
            }
        }
        for (id, events) in changes.seats {
            let seat = self.seats.entry(id.label.clone()).or_default();
            for event in events {
                self.seat_log
                    .entry(id.label.clone())
                    .or_default()
                    .push(json(&event));
                seat.apply(event);
            }
        }
    }

    fn owner_of(&self, label: &SeatLabel) -> Option<BookingId> {
        self.seats.get(label).and_then(|s| s.owner_at(self.now))
    }

    fn pick(&self, n: usize) -> Option<BookingId> {
        (!self.placed.is_empty()).then(|| self.placed[n % self.placed.len()])
    }

    fn run(&mut self, step: Step) -> Result<(), TestCaseError> {
        match step {
            Step::Wait(minutes) => self.now += Duration::minutes(minutes),
            Step::Place {
                seats,
                hold_minutes,
            } => self.place(seats, hold_minutes)?,
            Step::Confirm(n) => {
                if let Some(id) = self.pick(n) {
                    let state = self.bookings[&id].state_at(self.now);
                    let result = box_office::confirm(&self.bookings[&id], self.streams(), self.now);
                    let may = matches!(state, Some(BookingState::Held | BookingState::Confirmed));
                    prop_assert_eq!(result.is_ok(), may, "confirm of {:?}: {:?}", state, result);
                    if let Ok(changes) = result {
                        self.commit(changes);
                        for seat in seats_of(&self.bookings[&id]) {
                            prop_assert_eq!(
                                self.seats[&seat].state(),
                                SeatState::Booked { booking_id: id }
                            );
                        }
                    }
                }
            }
            Step::Cancel(n) => {
                if let Some(id) = self.pick(n) {
                    let state = self.bookings[&id].state_at(self.now);
                    let result =
                        box_office::cancel(&self.bookings[&id], self.streams(), self.now, None);
                    let may = matches!(
                        state,
                        Some(
                            BookingState::Held | BookingState::Confirmed | BookingState::Cancelled
                        )
                    );
                    prop_assert_eq!(result.is_ok(), may, "cancel of {:?}: {:?}", state, result);
                    if let Ok(changes) = result {
                        self.frees_exactly_its_seats(id, changes, ReleaseReason::Cancelled)?;
                    }
                }
            }
            Step::Expire(n) => {
                if let Some(id) = self.pick(n) {
                    let state = self.bookings[&id].state_at(self.now);
                    let result = box_office::expire(&self.bookings[&id], self.streams(), self.now);
                    prop_assert_eq!(
                        result.is_ok(),
                        state == Some(BookingState::Expired),
                        "expire of {:?}: {:?}",
                        state,
                        result
                    );
                    if let Ok(changes) = result {
                        self.frees_exactly_its_seats(id, changes, ReleaseReason::Expired)?;
                    }
                }
            }
        }
        self.check_invariants()
    }

    fn place(&mut self, picks: Vec<usize>, hold_minutes: Option<i64>) -> Result<(), TestCaseError> {
        let labels = all_labels();
        let id = BookingId::from_uuid(uuid(0xb000 + self.placed.len() as u128));
        let seats: Vec<SeatLabel> = picks.iter().map(|&i| labels[i].clone()).collect();
        let request = BookingRequest {
            booking_id: id,
            show_id: show_id(),
            user_id: UserId::from_uuid(uuid(7)),
            seats: seats.clone(),
            purchase: match hold_minutes {
                Some(m) => Purchase::Hold {
                    expires_at: self.now + Duration::minutes(m),
                },
                None => Purchase::Book,
            },
        };
        let taken: Vec<SeatLabel> = seats
            .iter()
            .filter(|l| self.owner_of(l).is_some())
            .cloned()
            .collect();
        let duplicate = seats.iter().collect::<BTreeSet<_>>().len() < seats.len();
        let result = box_office::place(
            &self.show,
            request,
            &Booking::default(),
            self.streams(),
            self.now,
        );
        match result {
            Ok(changes) => {
                prop_assert!(!duplicate && taken.is_empty(), "placed over {:?}", taken);
                self.commit(changes);
                self.placed.push(id);
                for label in &seats {
                    prop_assert_eq!(self.owner_of(label), Some(id), "{} not taken", label);
                }
            }
            Err(BoxOfficeError::DuplicateSeat { .. }) => prop_assert!(duplicate),
            Err(BoxOfficeError::Unavailable { labels }) => {
                prop_assert!(!duplicate);
                // Every loser learns exactly which seats someone else has.
                prop_assert_eq!(labels, taken);
            }
            Err(other) => return Err(TestCaseError::fail(format!("unexpected {other:?}"))),
        }
        Ok(())
    }

    fn frees_exactly_its_seats(
        &mut self,
        id: BookingId,
        changes: Changes,
        reason: ReleaseReason,
    ) -> Result<(), TestCaseError> {
        let before = self.seats.clone();
        let was_ending = !changes.is_empty();
        self.commit(changes);
        let mine = seats_of(&self.bookings[&id]);
        for (label, seat) in &before {
            let after = &self.seats[label];
            let had_it = matches!(seat.state(),
                SeatState::Held { booking_id, .. } | SeatState::Booked { booking_id } if booking_id == id);
            if was_ending && had_it {
                prop_assert!(mine.contains(label));
                prop_assert_eq!(
                    after.state(),
                    SeatState::Available,
                    "{} not freed ({:?})",
                    label,
                    reason
                );
            } else {
                prop_assert_eq!(
                    after,
                    seat,
                    "{} changed though it was not the booking's",
                    label
                );
            }
        }
        Ok(())
    }

    /// No seat is claimed by two live bookings; a live booking has every one
    /// of its seats (booked, if it is confirmed); a seat's owner is a live
    /// booking that lists it.
    fn check_invariants(&self) -> Result<(), TestCaseError> {
        let mut claimed: BTreeMap<SeatLabel, BookingId> = BTreeMap::new();
        for (id, booking) in &self.bookings {
            if !booking.is_live_at(self.now) {
                continue;
            }
            for label in seats_of(booking) {
                if let Some(other) = claimed.insert(label.clone(), *id) {
                    return Err(TestCaseError::fail(format!(
                        "{label} claimed by {other} and {id}"
                    )));
                }
                prop_assert_eq!(self.owner_of(&label), Some(*id));
                if booking.state_at(self.now) == Some(BookingState::Confirmed) {
                    prop_assert_eq!(
                        self.seats[&label].state(),
                        SeatState::Booked { booking_id: *id }
                    );
                }
            }
        }
        for label in self.seats.keys() {
            prop_assert_eq!(
                self.owner_of(label),
                claimed.get(label).copied(),
                "orphan on {}",
                label
            );
        }
        Ok(())
    }

    /// Rebuilding every stream from its stored JSON gives the live aggregates.
    fn check_replay(&self) -> Result<(), TestCaseError> {
        for (label, log) in &self.seat_log {
            prop_assert_eq!(&replay::<Seat>(log), &self.seats[label]);
        }
        for (id, log) in &self.booking_log {
            prop_assert_eq!(&replay::<Booking>(log), &self.bookings[id]);
        }
        Ok(())
    }
}

fn seats_of(booking: &Booking) -> Vec<SeatLabel> {
    booking
        .details()
        .map(|d| d.seats.iter().map(|s| s.label.clone()).collect())
        .unwrap_or_default()
}

fn json<T: Serialize>(value: &T) -> serde_json::Value {
    serde_json::to_value(value).expect("events serialize")
}

fn replay<A: Aggregate>(log: &[serde_json::Value]) -> A {
    let mut aggregate = A::default();
    for event in log {
        aggregate.apply(serde_json::from_value(event.clone()).expect("stored events decode"));
    }
    aggregate
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    #[test]
    fn no_seat_is_ever_owned_by_two_live_bookings(steps in prop::collection::vec(step(), 1..60)) {
        let mut world = World::new();
        for step in steps {
            world.run(step)?;
        }
        world.check_replay()?;
    }
}

// ---- replay determinism through cqrs-es' own `handle` ----

fn timestamp() -> impl Strategy<Value = Timestamp> {
    (0i64..120).prop_map(at)
}

fn label() -> impl Strategy<Value = SeatLabel> {
    ("[A-Z]{1,3}", 1u32..500).prop_map(|(row, n)| format!("{row}{n}").parse().expect("valid label"))
}

fn booking_id() -> impl Strategy<Value = BookingId> {
    (0u128..4).prop_map(|n| BookingId::from_uuid(uuid(0xb000 + n)))
}

fn seat_command(seat: SeatId) -> impl Strategy<Value = SeatCommand> {
    let (s1, s2, s3, s4) = (seat.clone(), seat.clone(), seat.clone(), seat);
    prop_oneof![
        (booking_id(), timestamp(), timestamp()).prop_map(move |(booking_id, expires_at, now)| {
            SeatCommand::Hold {
                seat: s1.clone(),
                booking_id,
                expires_at,
                now,
            }
        }),
        (booking_id(), timestamp()).prop_map(move |(booking_id, now)| SeatCommand::Book {
            seat: s2.clone(),
            booking_id,
            now
        }),
        (booking_id(), timestamp()).prop_map(move |(booking_id, now)| SeatCommand::Confirm {
            seat: s3.clone(),
            booking_id,
            now
        }),
        (booking_id(), any::<bool>()).prop_map(move |(booking_id, cancelled)| {
            SeatCommand::Release {
                seat: s4.clone(),
                booking_id,
                reason: if cancelled {
                    ReleaseReason::Cancelled
                } else {
                    ReleaseReason::Expired
                },
            }
        }),
    ]
}

fn booking_details() -> impl Strategy<Value = BookingDetails> {
    (
        booking_id(),
        prop::collection::vec((label(), 0i64..100_000), 1..5),
    )
        .prop_map(|(id, seats)| {
            BookingDetails::new(
                id,
                show_id(),
                UserId::from_uuid(uuid(7)),
                seats
                    .into_iter()
                    .map(|(label, price)| BookedSeat {
                        label,
                        price_cents: Cents::new(price).expect("price"),
                    })
                    .collect(),
            )
        })
}

fn booking_command() -> impl Strategy<Value = BookingCommand> {
    prop_oneof![
        (booking_details(), timestamp(), timestamp()).prop_map(|(details, expires_at, now)| {
            BookingCommand::Hold {
                details,
                expires_at,
                now,
            }
        }),
        (booking_details(), timestamp())
            .prop_map(|(details, now)| BookingCommand::Place { details, now }),
        timestamp().prop_map(|now| BookingCommand::Confirm { now }),
        timestamp().prop_map(|now| BookingCommand::Cancel { now, by: None }),
        timestamp().prop_map(|now| BookingCommand::Expire { now }),
    ]
}

/// Runs commands through `Aggregate::handle` (which applies each event to the
/// aggregate as it is written), keeping every emitted event, then checks that
/// replaying those events, decoded from their stored JSON, into a fresh
/// aggregate gives the aggregate that emitted them.
fn handled_equals_replayed<A>(commands: Vec<A::Command>) -> Result<(), TestCaseError>
where
    A: Aggregate<Services = ()> + PartialEq + std::fmt::Debug,
{
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a test runtime");
    let mut aggregate = A::default();
    let mut log = Vec::new();
    for command in commands {
        let sink = EventSink::<A>::default();
        let mut attempt = serde_json::from_value::<A>(json(&aggregate)).expect("state round-trips");
        if runtime
            .block_on(attempt.handle(command, &(), &sink))
            .is_ok()
        {
            aggregate = attempt;
            log.extend(runtime.block_on(sink.collect()).iter().map(json));
        }
    }
    prop_assert_eq!(replay::<A>(&log), aggregate);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    #[test]
    fn a_seat_replays_to_the_state_that_emitted_its_events(
        commands in prop::collection::vec(seat_command(SeatId::new(show_id(), "A1".parse().expect("label"))), 0..30)
    ) {
        handled_equals_replayed::<Seat>(commands)?;
    }

    #[test]
    fn a_booking_replays_to_the_state_that_emitted_its_events(
        commands in prop::collection::vec(booking_command(), 0..20)
    ) {
        handled_equals_replayed::<Booking>(commands)?;
    }
}

// ---- serde round-trips of every event and command ----

fn seat_event() -> impl Strategy<Value = SeatEvent> {
    (label(), booking_id(), timestamp(), 0u8..3, any::<bool>()).prop_map(
        |(label, booking_id, t, kind, c)| {
            let show_id = show_id();
            match kind {
                0 => SeatEvent::SeatHeld {
                    show_id,
                    label,
                    booking_id,
                    expires_at: t,
                },
                1 => SeatEvent::SeatBooked {
                    show_id,
                    label,
                    booking_id,
                },
                _ => SeatEvent::SeatReleased {
                    show_id,
                    label,
                    booking_id,
                    reason: if c {
                        ReleaseReason::Cancelled
                    } else {
                        ReleaseReason::Expired
                    },
                },
            }
        },
    )
}

fn booking_event() -> impl Strategy<Value = BookingEvent> {
    (booking_details(), timestamp(), timestamp(), 0u8..5).prop_map(|(details, t1, t2, kind)| {
        let (booking_id, show_id) = (details.booking_id, details.show_id);
        match kind {
            0 => BookingEvent::BookingHeld {
                details,
                expires_at: t1,
                held_at: t2,
            },
            1 => BookingEvent::BookingPlaced {
                details,
                placed_at: t1,
            },
            2 => BookingEvent::BookingConfirmed {
                booking_id,
                show_id,
                confirmed_at: t1,
            },
            3 => BookingEvent::BookingCancelled {
                booking_id,
                show_id,
                cancelled_at: t1,
                cancelled_by: domain::CancelledBy::Buyer,
            },
            _ => BookingEvent::BookingExpired {
                booking_id,
                show_id,
                expired_at: t1,
            },
        }
    })
}

/// Random valid seat maps: 1 to 3 sections of 1 to 3 rows, rows named
/// uniquely across the show.
fn show_details() -> impl Strategy<Value = domain::ShowDetails> {
    let section = (0i64..50_000, prop::collection::vec(1u32..200, 1..4));
    (prop::collection::vec(section, 1..4), timestamp()).prop_map(|(sections, starts_at)| {
        let mut next_row = 0u8;
        let sections = sections
            .into_iter()
            .enumerate()
            .map(|(i, (price, rows))| {
                let rows = rows
                    .into_iter()
                    .map(|seats| {
                        next_row += 1;
                        common::row(&char::from(b'A' + next_row).to_string(), seats)
                    })
                    .collect();
                common::section(&format!("Section {i}"), price, rows)
            })
            .collect();
        domain::ShowDetails {
            starts_at,
            seat_map: domain::SeatMap::new(sections).expect("generated maps are valid"),
            ..common::small_show_details()
        }
    })
}

fn round_trips<T>(value: &T) -> Result<(), TestCaseError>
where
    T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let text = serde_json::to_string(value).expect("serializes");
    let back: T =
        serde_json::from_str(&text).map_err(|e| TestCaseError::fail(format!("{e}: {text}")))?;
    prop_assert_eq!(&back, value);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    #[test]
    fn seat_events_and_commands_round_trip(
        event in seat_event(),
        command in seat_command(SeatId::new(show_id(), "B7".parse().expect("label"))),
    ) {
        round_trips(&event)?;
        round_trips(&command)?;
        prop_assert_eq!(
            domain::AnyEvent::decode("Seat", "1", &json(&event)).ok(),
            Some(domain::AnyEvent::Seat(event))
        );
    }

    #[test]
    fn booking_events_and_commands_round_trip(event in booking_event(), command in booking_command()) {
        round_trips(&event)?;
        round_trips(&command)?;
    }

    #[test]
    fn show_events_and_seat_labels_round_trip(details in show_details(), label in label()) {
        round_trips(&domain::ShowEvent::ShowCreated(details.clone()))?;
        round_trips(&domain::ShowCommand::CreateShow(details))?;
        round_trips(&label)?;
        prop_assert_eq!(label.to_string().parse::<SeatLabel>().ok(), Some(label));
    }
}

/// `small_show` with a per-buyer limit of `limit` (none for `None`).
fn limited_show(limit: Option<i64>) -> Show {
    let details = domain::ShowDetails {
        max_seats_per_user: limit.map(|l| domain::SeatLimit::new(l).expect("a valid limit")),
        ..common::small_show_details()
    };
    let mut show = Show::default();
    show.apply(domain::ShowEvent::ShowCreated(details));
    show
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    /// A buyer may take seats exactly while the seats it has and asks for
    /// stay within the show's limit; a show without a limit never refuses.
    #[test]
    fn the_seat_limit_refuses_exactly_what_would_go_over(
        limit in proptest::option::of(1_i64..=100),
        current in 0_u32..=120,
        asked in 1_usize..=10,
    ) {
        let decided = box_office::check_seat_limit(&limited_show(limit), current, asked);
        match limit {
            None => prop_assert_eq!(decided, Ok(())),
            Some(limit) if i64::from(current) + asked as i64 <= limit => {
                prop_assert_eq!(decided, Ok(()));
            }
            Some(limit) => prop_assert_eq!(
                decided,
                Err(BoxOfficeError::SeatLimit { limit: limit as u32, current, asked })
            ),
        }
    }

    /// Limits and prices are taken exactly within their bounds.
    #[test]
    fn limits_and_prices_have_bounds(value in -5_i64..=1_000_000_005) {
        prop_assert_eq!(
            domain::SeatLimit::new(value).is_ok(),
            (1..=i64::from(domain::show::MAX_SEATS_PER_USER)).contains(&value)
        );
        prop_assert_eq!(
            Cents::new(value).is_ok(),
            (0..=domain::show::MAX_PRICE_CENTS).contains(&value)
        );
    }
}
