//! The query side: HTTP reads answered from the MongoDB read models the
//! projector builds. `startup` holds the wiring, `routes` the endpoints.

pub mod problem;
pub mod routes;
pub mod startup;
pub mod waits;
