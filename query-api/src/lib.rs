//! The query side: HTTP reads answered from the MongoDB read models the
//! projector builds. `startup` holds the wiring, `routes` the endpoints,
//! `live` the stream of seat changes and `seatmap` the page that shows it.

pub mod live;
pub mod problem;
pub mod routes;
pub mod seatmap;
pub mod startup;
pub mod waits;
