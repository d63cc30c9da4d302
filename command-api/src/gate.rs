//! The seat gate: in this process, one booking command at a time per seat
//! goes to Postgres; the others for that seat wait here, holding no pooled
//! connection, and most of them are answered without one.
//!
//! Postgres' stream locks decide who gets a seat, across every process; the
//! gate only keeps a hot seat from filling the pool with commands queued on
//! one lock (each holding a connection, so that one show's on-sale starved
//! every other show's buyers into 503s). It also remembers, per seat, when a
//! command of this process last took it: a command that was already waiting
//! then may be refused at once, since the seat was someone else's at a
//! moment of its own lifetime, exactly what a refusal from Postgres would
//! rest on. A command that arrives after that moment learns nothing from it
//! (the seat may have been freed since, in another process) and asks
//! Postgres.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Mutex, OwnedMutexGuard};
use tokio::time::Instant;

/// How many stripes the seats are spread over; two seats that share one
/// only queue behind each other.
const STRIPES: usize = 4096;

/// Longer than any command waits: what a command that took a seat longer
/// ago than this left behind can be forgotten.
const REMEMBERED: Duration = Duration::from_secs(120);

/// The gate of one process.
#[derive(Debug, Clone)]
pub struct SeatGate {
    stripes: Arc<[Arc<Mutex<Stripe>>]>,
}

#[derive(Debug, Default)]
struct Stripe {
    /// Per seat stream key, when a command of this process last took it.
    taken: HashMap<i64, Instant>,
}

/// The right of way for some seats, until dropped.
#[derive(Debug)]
pub struct Pass {
    /// The stripes' guards, by stripe index.
    guards: Vec<(usize, OwnedMutexGuard<Stripe>)>,
    seats: Vec<i64>,
}

impl Default for SeatGate {
    fn default() -> Self {
        Self {
            stripes: (0..STRIPES).map(|_| Arc::default()).collect(),
        }
    }
}

fn stripe_of(seat: i64) -> usize {
    usize::try_from(seat.unsigned_abs() % STRIPES as u64).unwrap_or(0)
}

impl SeatGate {
    /// The stripes of `seats`, each once, in ascending order: every command
    /// takes them in the same order, so two never wait for each other.
    fn stripes_of(&self, seats: &[i64]) -> Vec<(usize, Arc<Mutex<Stripe>>)> {
        let mut indexes: Vec<usize> = seats.iter().copied().map(stripe_of).collect();
        indexes.sort_unstable();
        indexes.dedup();
        indexes
            .into_iter()
            .filter_map(|i| Some((i, self.stripes.get(i)?.clone())))
            .collect()
    }

    /// The pass for `seats` (stream keys) if nobody in this process has one
    /// of them now.
    pub fn try_enter(&self, seats: &[i64]) -> Option<Pass> {
        let guards = self
            .stripes_of(seats)
            .into_iter()
            .map(|(i, stripe)| Some((i, stripe.try_lock_owned().ok()?)))
            .collect::<Option<Vec<_>>>()?;
        Some(Pass {
            guards,
            seats: seats.to_vec(),
        })
    }

    /// The pass for `seats`, waiting at most `wait` for the commands ahead.
    pub async fn enter(&self, seats: &[i64], wait: Duration) -> Option<Pass> {
        let stripes = self.stripes_of(seats);
        let guards = tokio::time::timeout(wait, async move {
            let mut guards = Vec::with_capacity(stripes.len());
            for (i, stripe) in stripes {
                guards.push((i, stripe.lock_owned().await));
            }
            guards
        })
        .await
        .ok()?;
        Some(Pass {
            guards,
            seats: seats.to_vec(),
        })
    }
}

impl Pass {
    fn stripe(&mut self, seat: i64) -> Option<&mut Stripe> {
        let index = stripe_of(seat);
        self.guards
            .iter_mut()
            .find(|(i, _)| *i == index)
            .map(|(_, guard)| &mut **guard)
    }

    /// The seats a command of this process took at or after `arrived`.
    pub fn taken_since(&mut self, arrived: Instant) -> Vec<i64> {
        let seats = self.seats.clone();
        seats
            .into_iter()
            .filter(|seat| {
                self.stripe(*seat)
                    .and_then(|stripe| stripe.taken.get(seat))
                    .is_some_and(|at| *at >= arrived)
            })
            .collect()
    }

    /// Notes that this command took its seats, just now.
    pub fn took(&mut self) {
        let now = Instant::now();
        for (_, stripe) in &mut self.guards {
            stripe
                .taken
                .retain(|_, at| now.duration_since(*at) < REMEMBERED);
        }
        for seat in self.seats.clone() {
            if let Some(stripe) = self.stripe(seat) {
                stripe.taken.insert(seat, now);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::time::Instant;

    use super::{SeatGate, STRIPES};

    #[tokio::test]
    async fn one_pass_per_seat_and_waiters_learn_what_was_taken() {
        let gate = SeatGate::default();
        let arrived = Instant::now();
        let mut first = gate.try_enter(&[1, 2]).expect("a free gate");
        assert!(gate.try_enter(&[2, 3]).is_none(), "seat 2 is in use");
        assert!(gate.try_enter(&[3]).is_some(), "seat 3 is not");
        assert!(gate.enter(&[2], Duration::from_millis(20)).await.is_none());
        first.took();
        drop(first);
        let mut second = gate
            .enter(&[2, 1], Duration::from_millis(20))
            .await
            .expect("free again");
        assert_eq!(second.taken_since(arrived), vec![2, 1]);
        assert!(second.taken_since(Instant::now()).is_empty());
    }

    #[tokio::test]
    async fn seats_that_share_a_stripe_queue_but_are_remembered_apart() {
        let gate = SeatGate::default();
        let arrived = Instant::now();
        let (a, b) = (5, 5 + STRIPES as i64);
        let mut first = gate.try_enter(&[a]).expect("a free gate");
        assert!(gate.try_enter(&[b]).is_none(), "same stripe");
        first.took();
        drop(first);
        let mut other = gate.try_enter(&[b]).expect("free again");
        assert!(other.taken_since(arrived).is_empty(), "b was not taken");
    }
}
