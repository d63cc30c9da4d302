//! Group commit: booking commands that arrive together are decided and
//! written in one transaction, in five or six round trips for the whole
//! group instead of five or six for each command.
//!
//! A group is gathered for at most `COMMAND_BATCH_WINDOW_US` after its first
//! command, or until `COMMAND_BATCH_MAX` wait, when another group is in
//! flight; with none, it goes at once with whatever is queued. While the
//! groups run, the next gathers what arrives meanwhile. Then, in one transaction:
//!
//! 1. every lock of every command (seats, the new booking, its idempotency
//!    key) is tried at once, never waited for, so a group can never wait
//!    for another transaction while holding locks;
//! 2. the seats of the commands that got all their locks, and the stored
//!    answers of their keys, are read (after the locks, so they are the
//!    committed state);
//! 3. each command is decided by the box office, in arrival order, and its
//!    answer built; the events, pending holds and key answers of all of
//!    them are appended in one statement;
//! 4. the transaction commits, and only then is anybody answered.
//!
//! Each command is all-or-nothing on its own: its streams are disjoint from
//! every other command's in the group (one that shares a stream waits for
//! the next group, which starts only once this one has committed), so its
//! events stand or fall with nobody else's decision. A command that cannot
//! be decided within the group (a lock busy, a lapsed hold on its seats
//! whose booking must be locked too) is handed back and runs on its own,
//! with waits. A group whose write or
//! commit fails changes nothing, and each of its commands runs again on its
//! own.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use domain::{Booking, SeatId, Show};
use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot, Notify, Semaphore};

use crate::error::ApiError;
use crate::event_log::{self, Append, Loaded, LockKey, Versions};
use crate::idempotency::{self, Keyed};
use crate::reply::Reply;
use crate::sales::{self, Decided, Order, Placed, Sales};

/// Builds a command's answer once it is decided (the same function whichever
/// way the command runs, so a key's stored answer is the one sent).
pub type ReplyOf = Arc<dyn Fn(&Decided) -> Result<Reply, ApiError> + Send + Sync>;

/// A booking command for a group.
#[derive(Clone)]
pub struct Placement {
    /// The show.
    pub show: Arc<Show>,
    /// What is asked for.
    pub order: Order,
    /// Its idempotency key, if any.
    pub keyed: Option<Keyed>,
    /// Its answer.
    pub reply: ReplyOf,
    /// Its seats were picked by best available from a snapshot: a seat
    /// taken meanwhile is not the buyer's refusal but the picker's cue to
    /// pick again, so it is handed back as `Err(Unavailable)` and not kept
    /// for the key.
    pub picked: bool,
    /// The request it comes from, for its events' metadata: the group
    /// appends on another request's task.
    pub cause: crate::cause::Cause,
}

/// A refusal decided before any lock (from a snapshot, or while waiting),
/// to keep for its idempotency key: it takes the key's lock and writes the
/// key's row in a group, like a booking.
#[derive(Clone)]
pub struct Refusal {
    /// The key.
    pub keyed: Keyed,
    /// The answer.
    pub reply: Reply,
}

/// What a group runs.
#[derive(Clone)]
pub enum Command {
    /// A booking.
    Place(Placement),
    /// A refusal for a key.
    Refuse(Refusal),
    /// A booking that met another for its seats in this process: refused
    /// if a seat is someone else's as of the committed state (and the
    /// refusal kept for its key), else handed back to wait its turn.
    Check(Placement),
}

/// How a command fared in its group.
#[derive(Debug)]
pub enum Outcome {
    /// Decided, and committed when it wrote anything.
    Answered(Result<Reply, ApiError>),
    /// Not decided here: run it on its own.
    OnItsOwn,
    /// A picked placement without a key whose seats another transaction
    /// has locked (a booking in flight elsewhere): the picker picks another
    /// block rather than waiting for these.
    Busy,
}

/// Settings of group commit.
#[derive(Debug, Clone, Copy)]
pub struct Grouping {
    /// Most commands in a group.
    pub max: usize,
    /// How long a group waits for more after its first command.
    pub window: Duration,
    /// Groups running at once (each on one connection).
    pub concurrent: usize,
    /// Whether a group waits out the window even with no other group in
    /// flight. Off in the service (a buyer alone never waits); on where
    /// commands must be gathered deterministically.
    pub wait_when_idle: bool,
}

struct Job {
    command: Command,
    done: oneshot::Sender<Outcome>,
}

/// The way into group commit; the groups run on a task of their own, which
/// ends when every handle is dropped.
#[derive(Clone)]
pub struct GroupCommit {
    queue: mpsc::UnboundedSender<Job>,
}

impl std::fmt::Debug for GroupCommit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupCommit").finish_non_exhaustive()
    }
}

impl GroupCommit {
    /// Starts gathering groups on `pool`; `commits` is signalled after
    /// each commit (for the relay).
    pub fn start(pool: PgPool, grouping: Grouping, commits: Arc<Notify>) -> Self {
        let (queue, jobs) = mpsc::unbounded_channel();
        tokio::spawn(gather(pool, grouping, jobs, commits));
        Self { queue }
    }

    /// Runs `command` in the next group.
    pub async fn submit(&self, command: Command) -> Outcome {
        let (done, outcome) = oneshot::channel();
        if self.queue.send(Job { command, done }).is_err() {
            return Outcome::OnItsOwn;
        }
        outcome.await.unwrap_or(Outcome::OnItsOwn)
    }
}

async fn gather(
    pool: PgPool,
    grouping: Grouping,
    mut jobs: mpsc::UnboundedReceiver<Job>,
    commits: Arc<Notify>,
) {
    let running = Arc::new(Semaphore::new(grouping.concurrent.max(1)));
    let mut carried: Vec<Job> = Vec::new();
    loop {
        let Ok(permit) = Arc::clone(&running).acquire_owned().await else {
            return;
        };
        let mut group = std::mem::take(&mut carried);
        if group.is_empty() {
            match jobs.recv().await {
                Some(job) => group.push(job),
                None => return,
            }
        }
        // With no other group in flight nothing is arriving faster than one
        // transaction takes, so the group goes at once with what is queued:
        // a buyer alone never waits for the window (measured: one client's
        // p50 rose from 1.8 to 4.5 ms when every group waited it out, the
        // timer's millisecond granularity on top of the window).
        let idle = !grouping.wait_when_idle
            && running.available_permits() + 1 >= grouping.concurrent.max(1);
        let deadline = tokio::time::Instant::now() + grouping.window;
        while group.len() < grouping.max {
            match jobs.try_recv() {
                Ok(job) => group.push(job),
                Err(mpsc::error::TryRecvError::Disconnected) => break,
                Err(mpsc::error::TryRecvError::Empty) if idle => break,
                Err(mpsc::error::TryRecvError::Empty) => {
                    match tokio::time::timeout_at(deadline, jobs.recv()).await {
                        Ok(Some(job)) => group.push(job),
                        Ok(None) | Err(_) => break,
                    }
                }
            }
        }
        let (group, later) = disjoint(group);
        let (pool, commits) = (pool.clone(), Arc::clone(&commits));
        let running = tokio::spawn(async move {
            run(&pool, group, &commits).await;
            drop(permit);
        });
        if !later.is_empty() {
            // They share a stream with a command of this group: decided
            // after it, so not before it has committed.
            let _ = running.await;
        }
        carried = later;
    }
}

/// The locks of a command: its seats, its booking, its buyer's allowance
/// (when the show limits seats per buyer), its key.
fn keys_of(command: &Command) -> Vec<LockKey> {
    let key = |keyed: &Keyed| {
        let (high, low) = keyed.lock_key();
        LockKey::Key(high, low)
    };
    match command {
        Command::Place(placement) => {
            let order = &placement.order;
            order
                .seats
                .iter()
                .map(|label| LockKey::Stream(event_log::seat_key(order.show_id, label)))
                .chain(std::iter::once(LockKey::Stream(event_log::booking_key(
                    order.booking_id,
                ))))
                .chain(
                    order
                        .buyer(&placement.show)
                        .map(|user| LockKey::Stream(event_log::buyer_key(order.show_id, user))),
                )
                .chain(placement.keyed.as_ref().map(key))
                .collect()
        }
        Command::Refuse(refusal) => vec![key(&refusal.keyed)],
        Command::Check(placement) => placement.keyed.iter().map(key).collect(),
    }
}

fn keyed_of(command: &Command) -> Option<&Keyed> {
    match command {
        Command::Place(placement) | Command::Check(placement) => placement.keyed.as_ref(),
        Command::Refuse(refusal) => Some(&refusal.keyed),
    }
}

/// Splits a gathered group: commands whose streams no earlier one in it
/// shares, and the rest, for the next group (in arrival order). A deferred
/// command's streams count as taken too: a later command that shares one
/// of them only with it must not be decided before it.
fn disjoint(group: Vec<Job>) -> (Vec<Job>, Vec<Job>) {
    let mut taken = HashSet::new();
    let (mut now, mut later) = (Vec::new(), Vec::new());
    for job in group {
        let keys = keys_of(&job.command);
        let deferred = keys.iter().any(|k| taken.contains(k));
        taken.extend(keys);
        if deferred {
            later.push(job);
        } else {
            now.push(job);
        }
    }
    (now, later)
}

async fn run(pool: &PgPool, group: Vec<Job>, commits: &Notify) {
    let commands: Vec<&Command> = group.iter().map(|job| &job.command).collect();
    match decide_and_commit(pool, &commands).await {
        Ok(outcomes) => {
            for (job, outcome) in group.into_iter().zip(outcomes) {
                let _ = job.done.send(outcome);
            }
            commits.notify_one();
        }
        Err(error) => {
            tracing::warn!(
                commands = group.len(),
                error = %format_args!("{error:#}"),
                "a group failed, its commands run again on their own"
            );
            for job in group {
                let _ = job.done.send(Outcome::OnItsOwn);
            }
        }
    }
}

/// Steps 1 to 4 of the module's description, for one group. Errors mean
/// nothing was committed.
async fn decide_and_commit(pool: &PgPool, group: &[&Command]) -> anyhow::Result<Vec<Outcome>> {
    let mut tx = pool.begin().await?;
    let keys: Vec<Vec<LockKey>> = group.iter().map(|c| keys_of(c)).collect();
    let flat: Vec<LockKey> = keys.iter().flatten().copied().collect();
    let got = event_log::try_locks(&mut tx, &flat).await?;
    let mut at = 0;
    let locked: Vec<bool> = keys
        .iter()
        .map(|k| {
            let own = got
                .get(at..at + k.len())
                .is_some_and(|g| g.iter().all(|one| *one));
            at += k.len();
            own
        })
        .collect();
    let ready: Vec<&Command> = group
        .iter()
        .zip(&locked)
        .filter(|(_, locked)| **locked)
        .map(|(c, _)| *c)
        .collect();
    let seat_ids: Vec<SeatId> = ready
        .iter()
        .filter_map(|c| match c {
            Command::Place(p) | Command::Check(p) => Some(p),
            Command::Refuse(_) => None,
        })
        .flat_map(|p| {
            p.order
                .seats
                .iter()
                .map(|label| SeatId::new(p.order.show_id, label.clone()))
        })
        .collect();
    let mut seats = if seat_ids.is_empty() {
        BTreeMap::new()
    } else {
        event_log::load::<domain::Seat, SeatId>(&mut tx, &seat_ids).await?
    };
    let keyed: Vec<&Keyed> = ready.iter().filter_map(|c| keyed_of(c)).collect();
    let stored = idempotency::stored_answers(&mut tx, &keyed).await?;
    let now = Sales::now();
    // No two commands of the group share a buyer (their allowance locks
    // are streams too), so each is decided on its buyer's count alone.
    let buyers: Vec<_> = ready
        .iter()
        .filter_map(|c| match c {
            Command::Place(p) => p.order.buyer(&p.show).map(|u| (p.order.show_id, u)),
            _ => None,
        })
        .collect();
    let live = event_log::live_seats(&mut tx, &buyers, now).await?;
    let mut append = Append::default();
    let mut versions = Versions::default();
    let mut outcomes = Vec::with_capacity(group.len());
    for (command, locked) in group.iter().zip(locked) {
        if !locked {
            outcomes.push(match command {
                Command::Place(p) if p.picked && p.keyed.is_none() => Outcome::Busy,
                _ => Outcome::OnItsOwn,
            });
            continue;
        }
        if let Some(keyed) = keyed_of(command) {
            let (route, key) = keyed.name();
            if let Some(answer) = stored.get(&(route.to_owned(), key.to_owned())) {
                outcomes.push(Outcome::Answered(keyed.replay(answer)));
                continue;
            }
        }
        let placement = match command {
            Command::Place(placement) => placement,
            Command::Refuse(refusal) => {
                append.answers.push(refusal.keyed.stored(&refusal.reply));
                outcomes.push(Outcome::Answered(Ok(refusal.reply.clone())));
                continue;
            }
            Command::Check(placement) => {
                let order = &placement.order;
                let taken: Vec<_> = order
                    .seats
                    .iter()
                    .filter(|label| {
                        seats
                            .get(&SeatId::new(order.show_id, (*label).clone()))
                            .is_some_and(|seat| seat.state.owner_at(now).is_some())
                    })
                    .cloned()
                    .collect();
                if taken.is_empty() {
                    outcomes.push(Outcome::OnItsOwn);
                    continue;
                }
                let refusal = ApiError::Unavailable { seats: taken };
                let outcome = match &placement.keyed {
                    Some(keyed) => {
                        let reply = refusal.to_reply();
                        append.answers.push(keyed.stored(&reply));
                        Ok(reply)
                    }
                    None => Err(refusal),
                };
                outcomes.push(Outcome::Answered(outcome));
                continue;
            }
        };
        let order = &placement.order;
        let own: BTreeMap<_, Loaded<domain::Seat>> = order
            .seats
            .iter()
            .filter_map(|label| {
                let loaded = seats.remove(&SeatId::new(order.show_id, label.clone()))?;
                Some((label.clone(), loaded))
            })
            .collect();
        let buyer_seats = live
            .get(&(order.show_id, order.user_id))
            .copied()
            .unwrap_or(0);
        let reply = match sales::decide_place(&placement.show, order, &own, buyer_seats, now) {
            Ok(Placed::Decided { changes, booking }) => {
                let none = BTreeMap::<domain::BookingId, Loaded<Booking>>::new();
                let token = sales::token_for(order.show_id, &changes, &own, &none);
                let decided = Decided {
                    booking,
                    token,
                    now,
                };
                match (placement.reply)(&decided) {
                    Ok(reply) => {
                        sales::add_versions(&mut versions, order.show_id, &own, &none);
                        append.caused_by(&changes, &placement.cause);
                        append.changes.bookings.extend(changes.bookings);
                        append.changes.seats.extend(changes.seats);
                        reply
                    }
                    Err(error) => {
                        outcomes.push(Outcome::Answered(Err(error)));
                        continue;
                    }
                }
            }
            Ok(Placed::NeedsLapsedHolders) => {
                outcomes.push(Outcome::OnItsOwn);
                continue;
            }
            Err(error) if error.is_server_error() => {
                outcomes.push(Outcome::Answered(Err(error)));
                continue;
            }
            Err(taken @ ApiError::Unavailable { .. }) if placement.picked => {
                outcomes.push(Outcome::Answered(Err(taken)));
                continue;
            }
            // A refusal is an answer too, kept for the key.
            Err(refusal) => refusal.to_reply(),
        };
        if let Some(keyed) = &placement.keyed {
            append.answers.push(keyed.stored(&reply));
        }
        outcomes.push(Outcome::Answered(Ok(reply)));
    }
    event_log::append(&mut tx, &append, &versions).await?;
    tx.commit().await?;
    Ok(outcomes)
}
