//! Best available, checked against every block there is: the choice is
//! free, adjacent, in one row of the section, and no block the stated
//! order prefers was left.

use std::collections::BTreeSet;

use domain::best_available::{best_block, best_block_from, better, Block};
use domain::{Cents, Row, RowName, SeatLabel, Section, SectionName};
use proptest::prelude::*;

fn section(rows: &[u32]) -> Section {
    Section {
        name: SectionName::new("Floor").expect("a name"),
        price_cents: Cents::new(100).expect("a price"),
        rows: rows
            .iter()
            .enumerate()
            .map(|(i, seats)| Row {
                row: RowName::new(&char::from(b'A' + i as u8).to_string()).expect("a row"),
                seats: *seats,
            })
            .collect(),
    }
}

/// Every block of `count` seats of the section none of which is `out`.
fn every_block(section: &Section, count: u32, out: &BTreeSet<SeatLabel>) -> Vec<Block> {
    let mut blocks = Vec::new();
    for (row_index, row) in section.rows.iter().enumerate() {
        for first in 1..=row.seats.saturating_sub(count.saturating_sub(1)) {
            if count == 0 || first + count - 1 > row.seats {
                continue;
            }
            let seats: Vec<SeatLabel> = (first..first + count)
                .map(|n| SeatLabel::new(row.row.clone(), n).expect("a label"))
                .collect();
            if seats.iter().all(|s| !out.contains(s)) {
                blocks.push(Block {
                    row_index,
                    first,
                    seats,
                });
            }
        }
    }
    blocks
}

fn case() -> impl Strategy<Value = (Vec<u32>, u32, Vec<(usize, u32)>)> {
    (
        proptest::collection::vec(1_u32..=30, 1..=6),
        1_u32..=10,
        proptest::collection::vec((0_usize..6, 1_u32..=30), 0..80),
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn the_choice_is_free_adjacent_in_one_row_and_none_better_is_left(
        (rows, count, taken) in case()
    ) {
        let section = section(&rows);
        let out: BTreeSet<SeatLabel> = taken
            .iter()
            .filter_map(|(row, n)| {
                let row = section.rows.get(*row)?;
                (*n <= row.seats).then(|| SeatLabel::new(row.row.clone(), *n).ok()).flatten()
            })
            .collect();
        let all = every_block(&section, count, &out);
        let label = |row: usize, n: u32| SeatLabel::new(section.rows[row].row.clone(), n).expect("a label");
        // Starting at the first row that has a block changes nothing.
        let first_row = all.iter().map(|b| b.row_index).min().unwrap_or(section.rows.len());
        prop_assert_eq!(
            best_block_from(&section, count, first_row, |row, n| out.contains(&label(row, n))),
            best_block(&section, count, |row, n| out.contains(&label(row, n)))
        );
        match best_block(&section, count, |row, n| out.contains(&label(row, n))) {
            None => prop_assert!(all.is_empty(), "no block chosen, but {:?} was free", all.first()),
            Some(block) => {
                let row = &section.rows[block.row_index];
                prop_assert_eq!(block.seats.len(), count as usize);
                for (i, seat) in block.seats.iter().enumerate() {
                    prop_assert_eq!(seat.row(), &row.row);
                    prop_assert_eq!(seat.number(), block.first + i as u32);
                    prop_assert!(seat.number() <= row.seats);
                    prop_assert!(!out.contains(seat), "{} is not free", seat);
                }
                for other in &all {
                    prop_assert!(!better(&section, other, &block), "{:?} beats {:?}", other, block);
                }
            }
        }
    }
}

#[test]
fn pairs_fill_a_row_from_its_middle_outwards_and_rows_front_to_back() {
    let section = section(&[6, 6]);
    let mut taken = BTreeSet::new();
    let mut order = Vec::new();
    while let Some(block) = best_block(&section, 2, |row, n| {
        taken.contains(&SeatLabel::new(section.rows[row].row.clone(), n).expect("a label"))
    }) {
        order.push(
            block
                .seats
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("+"),
        );
        taken.extend(block.seats);
    }
    assert_eq!(
        order,
        ["A3+A4", "A1+A2", "A5+A6", "B3+B4", "B1+B2", "B5+B6"],
        "the order seats go in"
    );
}
