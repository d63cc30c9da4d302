//! Fixtures shared by the domain's test files: a small show, fixed times and ids.

#![allow(dead_code)] // each test file uses its own share of these

use chrono::{DateTime, Duration};
use domain::{
    Cents, Row, RowName, SeatLabel, SeatMap, Section, SectionName, Show, ShowCommand, ShowDetails,
    ShowId, ShowName, Timestamp, VenueName,
};
use uuid::Uuid;

/// 2027-03-01T18:00:00Z plus `minutes`.
pub fn at(minutes: i64) -> Timestamp {
    DateTime::from_timestamp(1_803_924_000, 0).expect("a valid instant")
        + Duration::minutes(minutes)
}

pub fn show_id() -> ShowId {
    ShowId::from_uuid(Uuid::from_u128(0x5eed_0000_0000_4000_8000_0000_0000_0001))
}

pub fn uuid(n: u128) -> Uuid {
    Uuid::from_u128(n)
}

pub fn label(text: &str) -> SeatLabel {
    text.parse().expect("a valid seat label")
}

pub fn row(name: &str, seats: u32) -> Row {
    Row {
        row: RowName::new(name).expect("a valid row"),
        seats,
    }
}

pub fn section(name: &str, price: i64, rows: Vec<Row>) -> Section {
    Section {
        name: SectionName::new(name).expect("a valid section name"),
        price_cents: Cents::new(price).expect("a valid price"),
        rows,
    }
}

/// VIP: row A, 3 seats at 225.00; Floor: rows B and C, 3 seats each at 90.00.
pub fn small_show_details() -> ShowDetails {
    ShowDetails {
        show_id: show_id(),
        name: ShowName::new("Jazz Night").expect("a valid name"),
        venue: VenueName::new("Blue Note").expect("a valid venue"),
        starts_at: at(120),
        seat_map: SeatMap::new(vec![
            section("VIP", 22_500, vec![row("A", 3)]),
            section("Floor", 9_000, vec![row("B", 3), row("C", 3)]),
        ])
        .expect("a valid seat map"),
        max_seats_per_user: None,
    }
}

pub fn small_show() -> Show {
    let show = Show::default();
    let events = show
        .decide(ShowCommand::CreateShow(small_show_details()))
        .expect("a new show can be created");
    let mut show = show;
    for event in events {
        cqrs_es::Aggregate::apply(&mut show, event);
    }
    show
}
