//! The write side of ticket booking: HTTP commands (shows, bookings,
//! confirmations, cancellations) appended to the Postgres event log, each
//! booking with all its seats in one transaction.
//!
//! `startup` is the one place where the service is wired together.

#![forbid(unsafe_code)]

pub mod best_available;
pub mod cause;
pub mod error;
pub mod event_log;
pub mod gate;
pub mod group_commit;
pub mod idempotency;
pub mod relay;
pub mod reply;
pub mod republish;
pub mod routes;
pub mod sales;
pub mod settings;
pub mod startup;
pub mod sweeper;
