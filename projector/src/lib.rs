//! The projector: builds the MongoDB read models from the event topic
//! (`live`), rebuilds them from the Postgres log (`replay`), and stores them
//! in generations (`store`). The folding rules themselves are pure and live
//! in `domain::read_model`.

pub mod generations;
pub mod health;
pub mod live;
pub mod replay;
pub mod startup;
pub mod store;
