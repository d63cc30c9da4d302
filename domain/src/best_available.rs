//! Best available: which `count` adjacent seats of a section a buyer who
//! does not pick gets (docs/api.md, "Best available"). The row nearest the
//! stage first (rows in the order the show lists them); within a row, the
//! block whose middle is nearest the row's middle; between two blocks as
//! near, the one with the lower numbers.
//!
//! Pure: the caller says which seats are out of the question (taken, or
//! being tried by another buyer at this moment), by row and number so that
//! looking at a stadium section's seats builds no label, and gets the best
//! block of what is left.

use crate::ids::SeatLabel;
use crate::show::{Row, Section};

/// Most seats one best-available request may ask for (as for any booking).
pub const MAX_COUNT: u32 = crate::box_office::MAX_SEATS_PER_BOOKING as u32;

/// A block of adjacent seats of one row: numbers `first ..= first + count - 1`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Block {
    /// Index of the row in its section.
    pub row_index: usize,
    /// Its first seat's number.
    pub first: u32,
    /// Its seats, in order.
    pub seats: Vec<SeatLabel>,
}

/// How far a block of `count` seats from `first` sits from the middle of a
/// row of `seats` seats, doubled so that it stays a whole number.
fn distance(row_seats: u32, first: u32, count: u32) -> u64 {
    let block_middle = 2 * u64::from(first) + u64::from(count) - 1;
    let row_middle = u64::from(row_seats) + 1;
    block_middle.abs_diff(row_middle)
}

/// The first seat of the best block of `count` seats of `row` none of
/// whose numbers `out` rules out: nearest the middle, then lowest. `None`
/// when the row has no such block.
pub fn best_in_row(row: &Row, count: u32, out: impl Fn(u32) -> bool) -> Option<u32> {
    if count == 0 || count > row.seats {
        return None;
    }
    let mut best: Option<(u64, u32)> = None;
    // The run of usable seats ending at `number`: a block ends wherever the
    // run is at least `count` long.
    let mut run = 0_u32;
    for number in 1..=row.seats {
        run = if out(number) { 0 } else { run + 1 };
        if run >= count {
            let first = number + 1 - count;
            let key = (distance(row.seats, first, count), first);
            if best.is_none_or(|b| key < b) {
                best = Some(key);
            }
        }
    }
    best.map(|(_, first)| first)
}

/// The best block of `count` adjacent seats of `section` none of which
/// `out` rules out (given the row's index in the section and the seat's
/// number), or `None` when no row has one.
pub fn best_block(
    section: &Section,
    count: u32,
    out: impl Fn(usize, u32) -> bool,
) -> Option<Block> {
    best_block_from(section, count, 0, out)
}

/// [`best_block`] for a caller who knows that no row before `first_row`
/// has such a block: the same answer, without looking at those rows.
pub fn best_block_from(
    section: &Section,
    count: u32,
    first_row: usize,
    out: impl Fn(usize, u32) -> bool,
) -> Option<Block> {
    section
        .rows
        .iter()
        .enumerate()
        .skip(first_row)
        .find_map(|(row_index, row)| {
            let first = best_in_row(row, count, |number| out(row_index, number))?;
            let seats = (first..first + count)
                .map(|n| SeatLabel::new(row.row.clone(), n))
                .collect::<Result<Vec<_>, _>>()
                .ok()?;
            Some(Block {
                row_index,
                first,
                seats,
            })
        })
}

/// Whether `a` is a better block than `b` by the stated order (for tests
/// and for checking a choice).
pub fn better(section: &Section, a: &Block, b: &Block) -> bool {
    let key = |block: &Block| {
        let seats = section.rows.get(block.row_index).map_or(0, |r| r.seats);
        (
            block.row_index,
            distance(seats, block.first, block.seats.len() as u32),
            block.first,
        )
    };
    key(a) < key(b)
}
