//! The live projection: one active projector applies the event topic to the
//! current read-model generation, and switches to a new one when a replay
//! has built it.
//!
//! One writer: a projector writes only while it holds the lease in the
//! pointer document (see [`crate::generations`]); the others wait as
//! standbys and take over within seconds of the holder's lease lapsing.
//! Every save of offsets carries the lease's epoch, so a holder that was
//! paused past its lease and wakes up cannot move anything back.
//!
//! Per batch: collect up to `batch` messages (or what arrives within
//! `linger`), apply them in one MongoDB round of writes, and only then save
//! the offsets, in MongoDB, in the generation's own offsets document. A
//! crash between the write and the save replays the batch, which per-stream
//! sequences make harmless. MongoDB down: the batch is retried with backoff
//! and nothing is saved until it lands. A write MongoDB refuses for good
//! parks that show's events and the others go on.
//!
//! The offsets live with the read models, not in Kafka: a database wiped or
//! restored from a backup resumes from what it holds (from the start of the
//! topic when it holds nothing) instead of from offsets past events it
//! never saw.
//!
//! The switch to a generation a replay built (`building.ready` in the
//! pointer) is the live projector's: it stops applying to generation n at
//! the offsets it saved, applies to n+1 from where the replay left it until
//! n+1 has reached those offsets, then moves the pointer in one conditional
//! write. Until then the query side reads n, frozen; from then on n+1,
//! which holds at least every event n held. No read goes back in time.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use domain::PublishedEvent;
use mongodb::bson::doc;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde::Serialize;
use service_kit::backoff::{pause, Backoff};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::generations::{Generations, Lease, Offsets, Saved, LEASE_TTL, RENEW_EVERY};
use crate::store::{ReadStore, Received, StoreError};

/// Settings of the consumer.
#[derive(Debug, Clone, clap::Args)]
pub struct ConsumerSettings {
    /// Kafka bootstrap brokers, comma-separated.
    #[arg(long, env = "KAFKA_BROKERS", default_value = "127.0.0.1:9092")]
    pub kafka_brokers: String,
    /// The event topic.
    #[arg(long, env = "PROJECTOR_TOPIC", default_value = domain::EVENTS_TOPIC)]
    pub topic: String,
    /// Kafka consumer group id. The projector assigns itself every
    /// partition and keeps its offsets in MongoDB, so the group only names
    /// the client to the broker (a consumer without one receives nothing
    /// from Tansu).
    #[arg(long, env = "PROJECTOR_GROUP", default_value = "ticketing-projector")]
    pub group: String,
    /// Most events applied in one batch.
    #[arg(long, env = "PROJECTOR_BATCH", default_value_t = 500)]
    pub batch: usize,
    /// How long a batch waits for more events once it has one, in ms.
    #[arg(long, env = "PROJECTOR_LINGER_MS", default_value_t = 20)]
    pub linger_ms: u64,
    /// Longest the broker may hold a fetch with nothing new, in ms. Tansu
    /// answers a waiting fetch only when this runs out, so it bounds how
    /// stale the read side is when idle (librdkafka's default is 500).
    #[arg(long, env = "PROJECTOR_FETCH_WAIT_MS", default_value_t = 20)]
    pub fetch_wait_ms: u64,
}

/// What the projector is doing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Starting.
    #[default]
    Starting,
    /// Waiting for the lease another projector holds.
    Standby,
    /// Holding the lease and applying the topic.
    Active,
    /// Bringing a rebuilt generation up to the current one, to switch.
    Switching,
}

/// What `/readyz` shows of the projection.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    /// Active, standby, switching.
    pub role: Role,
    /// The generation being written.
    pub generation: u32,
    /// The lease's epoch while active.
    pub epoch: i64,
    /// Events applied since start (duplicates included).
    pub events: u64,
    /// Events refused as inconsistent with the read models, or whose
    /// payload does not decode (parked).
    pub rejected: u64,
    /// Events parked since start.
    pub parked: u64,
    /// Shows whose events are parked: not current on the read side.
    pub parked_shows: BTreeSet<String>,
    /// Events on the topic past those applied, measured at most once a
    /// second while following the topic; `None` before the first measure.
    pub lag_events: Option<i64>,
    /// The last error, if the last attempt failed.
    pub last_error: Option<String>,
}

/// Events applied to the read models (not parked, not refused), counted.
pub const APPLIED: &str = "projector_events_applied_total";
/// [`Report::lag_events`].
pub const LAG_EVENTS: &str = "projector_lag_events";
/// How often the live run measures its lag: a broker round trip.
const LAG_EVERY: Duration = Duration::from_secs(1);
/// Longest a lag measure waits for the broker.
const LAG_TIMEOUT: Duration = Duration::from_secs(1);

/// Shared view of the projection's progress.
#[derive(Debug, Clone, Default)]
pub struct Status(Arc<Mutex<Report>>);

impl Status {
    /// A copy of the report.
    pub fn report(&self) -> Report {
        self.0.lock().map(|r| r.clone()).unwrap_or_default()
    }

    fn update(&self, change: impl FnOnce(&mut Report)) {
        if let Ok(mut report) = self.0.lock() {
            change(&mut report);
        }
    }
}

/// What [`Projection::project`] runs until.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Goal {
    /// The live run: until the pointer moves away from the generation, or a
    /// rebuilt generation is ready to take over.
    FollowPointer,
    /// Until every partition is at or past these next offsets.
    Reach(BTreeMap<i32, i64>),
}

/// Why [`Projection::project`] returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    /// Stopped, or the lease was lost.
    Stopped,
    /// The goal's offsets are reached.
    Reached,
    /// A rebuilt generation is ready: switch to it.
    Ready(u32),
    /// The pointer or the offsets changed under it (another switch, a
    /// wiped database): start over from what MongoDB holds.
    Restart,
    /// A writer of a higher epoch saved the offsets: this one must stop.
    Fenced,
}

/// The projection of the event topic into the read models.
#[derive(Debug, Clone)]
pub struct Projection {
    settings: ConsumerSettings,
    store: ReadStore,
    generations: Generations,
    status: Status,
    holder: String,
    /// No switch is tried before this: after one that failed, the current
    /// generation is projected meanwhile rather than left frozen.
    switch_after: Arc<Mutex<Instant>>,
    /// A lag measure is running (on a blocking thread, off the live run).
    measuring_lag: Arc<AtomicBool>,
}

const IDLE: Duration = Duration::from_millis(500);
const KAFKA_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the live run looks at the pointer while batches keep coming.
const POINTER_EVERY: Duration = Duration::from_millis(100);
/// Longest a switch spends bringing the rebuilt generation up to the
/// current one before it gives up this attempt.
const SWITCH_CATCH_UP: Duration = Duration::from_secs(60);
/// How long the current generation is projected after a switch that did
/// not happen, before the next try.
const SWITCH_BACKOFF: Duration = Duration::from_secs(10);

impl Projection {
    /// A projection with these settings into `store`.
    pub fn new(settings: ConsumerSettings, store: ReadStore) -> Self {
        Self::named(
            settings,
            store,
            format!("projector-{}", uuid::Uuid::new_v4()),
        )
    }

    /// A projection that holds leases as `holder`.
    pub fn named(settings: ConsumerSettings, store: ReadStore, holder: String) -> Self {
        Self {
            generations: store.generations(),
            settings,
            store,
            status: Status::default(),
            holder,
            switch_after: Arc::new(Mutex::new(Instant::now())),
            measuring_lag: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Puts the next switch off by [`SWITCH_BACKOFF`].
    fn put_switch_off(&self) {
        if let Ok(mut after) = self.switch_after.lock() {
            *after = Instant::now() + SWITCH_BACKOFF;
        }
    }

    /// Whether a switch may be tried now.
    fn may_switch(&self) -> bool {
        self.switch_after
            .lock()
            .map_or(true, |after| Instant::now() >= *after)
    }

    /// Its progress.
    pub fn status(&self) -> Status {
        self.status.clone()
    }

    /// Projects into whatever generation is current while holding the
    /// lease, waiting as a standby while another projector holds it, until
    /// `stop`.
    ///
    /// # Errors
    /// Only settings errors; store and broker failures are retried.
    pub async fn run(&self, stop: CancellationToken) -> anyhow::Result<()> {
        while !stop.is_cancelled() {
            match self.older_shape().await {
                Ok(None) => {}
                Ok(Some(generation)) => {
                    let message = format!(
                        "generation {generation} was written by an older release (every seat \
                         of a show in one document, blocks or tallies without write numbers, or \
                         blocks of another size); run `projector replay` to build the read \
                         models anew, this projector writes nothing until then"
                    );
                    tracing::error!(generation, "{message}");
                    self.status.update(|r| {
                        r.role = Role::Standby;
                        r.lag_events = None;
                        r.last_error = Some(message);
                    });
                    metrics::gauge!(LAG_EVENTS).set(0.0);
                    pause(&stop, Duration::from_secs(5)).await;
                    continue;
                }
                Err(error) => {
                    self.failed(&error);
                    pause(&stop, Duration::from_secs(1)).await;
                    continue;
                }
            }
            let lease = match self.generations.take_lease(&self.holder).await {
                Ok(Some(lease)) => lease,
                Ok(None) => {
                    self.status.update(|r| {
                        r.role = Role::Standby;
                        r.lag_events = None;
                    });
                    // The holder's gauge tells the lag; not a figure from
                    // when this one held the lease.
                    metrics::gauge!(LAG_EVENTS).set(0.0);
                    pause(&stop, RENEW_EVERY).await;
                    continue;
                }
                Err(error) => {
                    self.failed(&error);
                    pause(&stop, Duration::from_secs(1)).await;
                    continue;
                }
            };
            tracing::info!(epoch = lease.epoch, holder = %self.holder, "took the projector lease");
            let lost = stop.child_token();
            // Joined, not spawned: whatever ends this task ends the renewals
            // with it, as a crash of the process would.
            let (led, ()) = tokio::join!(
                async {
                    let led = self.lead(&lease, &lost).await;
                    lost.cancel();
                    led
                },
                keep_lease(self.generations.clone(), lease.clone(), lost.clone()),
            );
            if stop.is_cancelled() {
                if let Err(error) = self.generations.release_lease(&lease).await {
                    tracing::warn!(%error, "could not give the lease up; it lapses by itself");
                }
            } else {
                tracing::warn!(epoch = lease.epoch, "lost the projector lease; standing by");
            }
            led?;
        }
        Ok(())
    }

    /// The current generation, if an older release wrote it.
    async fn older_shape(&self) -> Result<Option<u32>, StoreError> {
        let generation = self.generations.pointer().await?.current;
        Ok(self
            .store
            .of_an_older_shape(generation)
            .await?
            .then_some(generation))
    }

    /// The live run under `lease`, until it is lost.
    async fn lead(&self, lease: &Lease, lost: &CancellationToken) -> anyhow::Result<()> {
        while !lost.is_cancelled() {
            let (generation, offsets) = match self.current().await {
                Ok(found) => found,
                Err(error) => {
                    self.failed(&error);
                    pause(lost, Duration::from_secs(1)).await;
                    continue;
                }
            };
            self.status.update(|r| {
                r.role = Role::Active;
                r.generation = generation;
                r.epoch = lease.epoch;
                r.parked_shows = offsets
                    .as_ref()
                    .map(|o| o.parked_shows.clone())
                    .unwrap_or_default();
            });
            tracing::info!(generation, epoch = lease.epoch, "projecting");
            match self
                .project(generation, offsets, lease.epoch, Goal::FollowPointer, lost)
                .await?
            {
                Ended::Ready(to) => match self.switch_over(generation, to, lease, lost).await {
                    Ok(true) => {}
                    Ok(false) => {
                        self.status.update(|r| {
                            r.last_error =
                                Some(format!("the switch to generation {to} did not happen"));
                        });
                        self.put_switch_off();
                    }
                    Err(error) => {
                        tracing::warn!(to, error = %format_args!("{error:#}"), "switching generations failed; retrying");
                        self.status
                            .update(|r| r.last_error = Some(format!("{error:#}")));
                        self.put_switch_off();
                    }
                },
                Ended::Fenced => return Ok(()),
                Ended::Stopped | Ended::Restart | Ended::Reached => {}
            }
        }
        Ok(())
    }

    /// The current generation, prepared, and its offsets.
    async fn current(&self) -> Result<(u32, Option<Offsets>), StoreError> {
        let generation = self.generations.pointer().await?.current;
        self.store.prepare(generation).await?;
        let offsets = self.generations.offsets_of(generation).await?;
        Ok((generation, offsets))
    }

    /// Switches the query side from `from` to the rebuilt `to`: applies to
    /// `to` until it holds every event `from` holds, then moves the
    /// pointer, if `to` is still the ready generation and `lease` still
    /// held. Whether it switched.
    ///
    /// # Errors
    /// Store and consumer errors; the pointer then stays at `from`.
    pub async fn switch_over(
        &self,
        from: u32,
        to: u32,
        lease: &Lease,
        stop: &CancellationToken,
    ) -> anyhow::Result<bool> {
        self.status.update(|r| r.role = Role::Switching);
        // No writer of an older epoch (one paused past its lease, say) may
        // save `from` after this, and the target covers whatever such a
        // writer may have applied without saving: `from` never holds an
        // event beyond where the topic ends now.
        anyhow::ensure!(
            self.generations.fence(from, lease.epoch).await?,
            "generation {from} is written by a projector of a later epoch"
        );
        let mut target = self
            .generations
            .offsets_of(from)
            .await?
            .map(|o| o.next)
            .unwrap_or_default();
        for (partition, end) in self.topic_end().await? {
            let at = target.entry(partition).or_insert(end);
            *at = (*at).max(end);
        }
        let keep = self
            .generations
            .pointer()
            .await?
            .building
            .filter(|b| b.generation == to)
            .map_or(Duration::from_secs(30), |b| b.keep);
        self.store.prepare(to).await?;
        let start = self.generations.offsets_of(to).await?;
        tracing::info!(
            from,
            to,
            "bringing the rebuilt generation up to the current one"
        );
        // Bounded: a target the feed cannot reach (a broker whose end lies
        // past its last readable message) must not hold the lease and the
        // old generation forever; the next attempt goes on from here.
        let Ok(ended) = tokio::time::timeout(
            SWITCH_CATCH_UP,
            self.project(to, start, lease.epoch, Goal::Reach(target), stop),
        )
        .await
        else {
            tracing::warn!(
                from,
                to,
                "the rebuilt generation did not reach the current one in time; trying again"
            );
            return Ok(false);
        };
        match ended? {
            Ended::Reached => {}
            Ended::Fenced => {
                anyhow::bail!("generation {to} is written by a projector of a later epoch")
            }
            Ended::Stopped | Ended::Ready(_) | Ended::Restart => return Ok(false),
        }
        let switched = self.generations.switch(from, to, lease, keep).await?;
        if switched {
            tracing::info!(from, to, "query side switched to the rebuilt generation");
            self.status.update(|r| r.generation = to);
        } else {
            tracing::warn!(
                from,
                to,
                "the switch did not happen (the claim or the lease changed)"
            );
        }
        Ok(switched)
    }

    /// Consumes into `generation` from `start` (the start of every
    /// partition where it has no offset) until `goal`, saving offsets as
    /// `epoch`.
    ///
    /// # Errors
    /// Consumer set-up errors; store and broker failures are retried.
    pub async fn project(
        &self,
        generation: u32,
        start: Option<Offsets>,
        epoch: i64,
        goal: Goal,
        stop: &CancellationToken,
    ) -> anyhow::Result<Ended> {
        let mut saves = start.as_ref().map(|o| o.saves);
        let mut state = start.unwrap_or_default();
        let Some(feed) = Feed::open(&self.settings, &mut state.next, stop).await? else {
            return Ok(Ended::Stopped);
        };
        let mut pointer_seen = Instant::now()
            .checked_sub(POINTER_EVERY)
            .unwrap_or_else(Instant::now);
        let mut lag_seen = Instant::now()
            .checked_sub(LAG_EVERY)
            .unwrap_or_else(Instant::now);
        loop {
            if stop.is_cancelled() {
                return Ok(Ended::Stopped);
            }
            if let Goal::Reach(target) = &goal {
                if reached(&state.next, target) {
                    return Ok(Ended::Reached);
                }
            }
            let batch = feed.collect(&self.settings).await;
            if goal == Goal::FollowPointer
                && (batch.received.is_empty() || pointer_seen.elapsed() >= POINTER_EVERY)
            {
                pointer_seen = Instant::now();
                match self.generations.pointer().await {
                    Ok(pointer) if pointer.current != generation => return Ok(Ended::Restart),
                    Ok(pointer) => {
                        if let Some(building) =
                            pointer.building.filter(|b| b.ready && self.may_switch())
                        {
                            // The batch is not applied; it is read again
                            // after the switch, from the saved offsets.
                            return Ok(Ended::Ready(building.generation));
                        }
                    }
                    Err(error) => self.failed(&error),
                }
            }
            if goal == Goal::FollowPointer && lag_seen.elapsed() >= LAG_EVERY {
                lag_seen = Instant::now();
                self.measure_lag(&feed, &state.next);
                // Between batches, so that no batch parks or applies the
                // same shows meanwhile.
                if let Some(saved) = self
                    .serve_unparks(generation, epoch, &mut state.parked_shows, saves)
                    .await
                {
                    if let Some(ended) = after_save(Some(saved), &mut saves, generation, epoch) {
                        return Ok(ended);
                    }
                }
            }
            if batch.offsets.is_empty() {
                continue;
            }
            let before = state.parked_shows.len();
            let applying = Instant::now();
            let span = batch.span(generation);
            if !self
                .apply(generation, &batch, &mut state.parked_shows, stop)
                .instrument(span.clone())
                .await
            {
                return Ok(Ended::Stopped);
            }
            let applied_in = applying.elapsed();
            for (partition, offset) in &batch.offsets {
                state.next.insert(*partition, offset + 1);
            }
            let newly: BTreeSet<String> = if state.parked_shows.len() > before {
                state.parked_shows.clone()
            } else {
                BTreeSet::new()
            };
            let saved = self
                .save(generation, epoch, &state.next, &newly, saves, stop)
                .instrument(span.clone())
                .await;
            if let Some(ended) = after_save(saved, &mut saves, generation, epoch) {
                return Ok(ended);
            }
            span.in_scope(|| {
                tracing::debug!(
                    apply_ms = applied_in.as_secs_f64() * 1e3,
                    save_ms = (applying.elapsed() - applied_in).as_secs_f64() * 1e3,
                    "batch applied"
                );
            });
            let parked = state.parked_shows.clone();
            self.status.update(|r| r.parked_shows = parked);
        }
    }

    /// The next offset past the end of every partition of the topic now.
    ///
    /// # Errors
    /// When the broker cannot say.
    pub async fn topic_end(&self) -> anyhow::Result<BTreeMap<i32, i64>> {
        let consumer = Closing::new(consumer_config(&self.settings).create()?);
        let topic = self.settings.topic.clone();
        tokio::task::spawn_blocking(move || {
            let mut end = BTreeMap::new();
            for partition in partitions_of(consumer.as_ref(), &topic)? {
                let (_, high) = consumer.fetch_watermarks(&topic, partition, KAFKA_TIMEOUT)?;
                end.insert(partition, high);
            }
            Ok(end)
        })
        .await
        .context("watermark task failed")?
    }

    /// Applies a batch, retrying with backoff while MongoDB is unreachable.
    /// False when stopped first.
    async fn apply(
        &self,
        generation: u32,
        batch: &Batch,
        parked_shows: &mut BTreeSet<String>,
        stop: &CancellationToken,
    ) -> bool {
        let mut backoff = Backoff::default();
        loop {
            // Parked before the batch counts as applied: a message lost here
            // would be lost for good once the offsets move past it.
            let parked = match self.park_undecodable(generation, batch).await {
                Ok(()) => {
                    self.store
                        .apply_parking(generation, &batch.received, parked_shows)
                        .await
                }
                Err(error) => Err(error),
            };
            match parked {
                Ok(applied) => {
                    let undecodable = batch.undecodable.len();
                    // Refused events are parked, and counted there;
                    // undecodable messages are not among those received.
                    metrics::counter!(APPLIED)
                        .increment(batch.received.len().saturating_sub(applied.parked) as u64);
                    self.status.update(|r| {
                        r.events += batch.received.len() as u64;
                        r.rejected += applied.rejected as u64;
                        r.parked += (applied.parked + undecodable) as u64;
                        r.last_error = None;
                    });
                    return true;
                }
                Err(error) => {
                    self.failed(&error);
                    if !backoff.wait(stop).await {
                        return false;
                    }
                }
            }
        }
    }

    /// Carries out the `projector unpark` requests waiting for
    /// `generation` ([`ReadStore::unpark`]), and saves the parked shows
    /// left when that changed them; what the save found, if it saved.
    async fn serve_unparks(
        &self,
        generation: u32,
        epoch: i64,
        parked_shows: &mut BTreeSet<String>,
        saves: Option<i64>,
    ) -> Option<Saved> {
        // Nothing is parked before the generation's first save.
        let saves = saves?;
        let requests = match self.generations.pending_unparks(generation).await {
            Ok(requests) if !requests.is_empty() => requests,
            Ok(_) => return None,
            Err(error) => {
                self.failed(&error);
                return None;
            }
        };
        let before = parked_shows.clone();
        let outcome = match self.store.unpark(generation, parked_shows).await {
            Ok(unparked) => {
                tracing::info!(
                    generation,
                    applied = unparked.applied,
                    still_parked = unparked.still_parked,
                    "parked events applied again"
                );
                metrics::counter!(APPLIED).increment(unparked.applied as u64);
                let count = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
                doc! {
                    "applied": count(unparked.applied),
                    "still_parked": count(unparked.still_parked),
                }
            }
            // Left waiting: the next pass tries again (what was applied
            // stays applied, and is found so).
            Err(error) if error.is_transient() => {
                *parked_shows = before;
                self.failed(&error);
                return None;
            }
            Err(error) => {
                tracing::warn!(%error, generation, "unparking failed; what was applied stays");
                doc! { "error": error.to_string() }
            }
        };
        let mut saved = None;
        if *parked_shows != before {
            match self
                .generations
                .save_parked_shows(generation, epoch, parked_shows, saves)
                .await
            {
                Ok(Saved::Saved(count)) => saved = Some(Saved::Saved(count)),
                // Not this writer's to save any more: the next writer
                // carries the request out (what was applied stays).
                Ok(other) => return Some(other),
                Err(error) => {
                    // Not saved: those shows' later events go on being
                    // parked (safe), and the next unpark applies them.
                    self.failed(&error);
                    *parked_shows = before;
                    return None;
                }
            }
        }
        let shows = parked_shows.clone();
        self.status.update(|r| r.parked_shows = shows);
        if let Err(error) = self.generations.finish_unparks(&requests, outcome).await {
            self.failed(&error);
        }
        saved
    }

    /// Counts the events on the topic past `next`, for `/readyz` and
    /// [`LAG_EVENTS`], on a blocking thread of its own: a broker slow to
    /// answer must not hold the live run. At most one measure at a time;
    /// a broker that does not answer leaves the last measure.
    fn measure_lag(&self, feed: &Feed, next: &BTreeMap<i32, i64>) {
        if self.measuring_lag.swap(true, Ordering::AcqRel) {
            return;
        }
        let consumer = feed.consumer.clone();
        let topic = self.settings.topic.clone();
        let next = next.clone();
        let status = self.status.clone();
        let measuring = Arc::clone(&self.measuring_lag);
        tokio::task::spawn_blocking(move || {
            let deadline = Instant::now() + LAG_TIMEOUT;
            let mut lag = Some(0);
            for (partition, offset) in next {
                let left = deadline.saturating_duration_since(Instant::now());
                match consumer.fetch_watermarks(&topic, partition, left) {
                    Ok((_, end)) => lag = lag.map(|sum| sum + (end - offset).max(0)),
                    Err(error) => {
                        tracing::debug!(%error, partition, "lag not measured");
                        lag = None;
                        break;
                    }
                }
            }
            if let Some(lag) = lag {
                #[allow(clippy::cast_precision_loss)] // a count of events
                metrics::gauge!(LAG_EVENTS).set(lag as f64);
                status.update(|r| r.lag_events = Some(lag));
            }
            measuring.store(false, Ordering::Release);
        });
    }

    /// Parks the messages of `batch` that are not events at all.
    ///
    /// # Errors
    /// MongoDB errors: the batch is then tried again.
    async fn park_undecodable(&self, generation: u32, batch: &Batch) -> Result<(), StoreError> {
        for (partition, offset, reason, message) in &batch.undecodable {
            self.store
                .park_message(generation, *partition, *offset, reason, message)
                .await?;
        }
        Ok(())
    }

    /// Saves offsets, retrying while MongoDB is unreachable. `None` when
    /// stopped first.
    async fn save(
        &self,
        generation: u32,
        epoch: i64,
        next: &BTreeMap<i32, i64>,
        parked_shows: &BTreeSet<String>,
        saves: Option<i64>,
        stop: &CancellationToken,
    ) -> Option<Saved> {
        let mut backoff = Backoff::default();
        loop {
            match self
                .generations
                .save_offsets(generation, epoch, next, parked_shows, saves)
                .await
            {
                Ok(saved) => return Some(saved),
                Err(error) => {
                    self.failed(&error);
                    if !backoff.wait(stop).await {
                        return None;
                    }
                }
            }
        }
    }

    fn failed(&self, error: &StoreError) {
        tracing::warn!(%error, "read models unavailable; retrying");
        self.status
            .update(|r| r.last_error = Some(error.to_string()));
    }
}

/// Renews `lease` until `lost` is cancelled; cancels it when the lease is
/// taken over, or when it could not be renewed for as long as it lasts.
pub(crate) async fn keep_lease(generations: Generations, lease: Lease, lost: CancellationToken) {
    let mut renewed = Instant::now();
    while pause(&lost, RENEW_EVERY).await {
        match generations.renew_lease(&lease).await {
            Ok(true) => renewed = Instant::now(),
            Ok(false) => {
                tracing::warn!(epoch = lease.epoch, "the projector lease was taken over");
                lost.cancel();
            }
            Err(error) if renewed.elapsed() >= LEASE_TTL => {
                tracing::warn!(%error, "the projector lease could not be renewed in time");
                lost.cancel();
            }
            Err(error) => tracing::warn!(%error, "renewing the projector lease failed; retrying"),
        }
    }
}

fn consumer_config(settings: &ConsumerSettings) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &settings.kafka_brokers)
        .set("group.id", &settings.group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("fetch.wait.max.ms", settings.fetch_wait_ms.to_string());
    config
}

/// A consumer assigned every partition of the topic at given offsets.
struct Feed {
    consumer: Closing,
}

/// What a live run does after saving: go on (`None`, with `saves` moved
/// on) or end.
fn after_save(
    saved: Option<Saved>,
    saves: &mut Option<i64>,
    generation: u32,
    epoch: i64,
) -> Option<Ended> {
    match saved {
        Some(Saved::Saved(count)) => {
            *saves = Some(count);
            None
        }
        Some(Saved::Fenced) => {
            tracing::warn!(
                generation,
                epoch,
                "a projector of a later epoch writes this generation; stopping"
            );
            Some(Ended::Fenced)
        }
        Some(Saved::Vanished) => {
            tracing::warn!(
                generation,
                "the generation's offsets vanished (database wiped); \
                 starting over from what MongoDB holds"
            );
            Some(Ended::Restart)
        }
        Some(Saved::Moved) => {
            tracing::warn!(
                generation,
                "the generation's offsets are not those saved here (database \
                 restored, or another writer); starting over from what MongoDB holds"
            );
            Some(Ended::Restart)
        }
        None => Some(Ended::Stopped),
    }
}

/// A consumer closed on a thread of its own when dropped: rdkafka closes a
/// consumer with a `group.id` by polling until the broker confirms, with
/// no time limit, on the dropping thread. On a tokio worker (or a blocking
/// task, which the runtime waits for when it shuts down) a broker that
/// never confirms froze the projector.
struct Closing(Option<Arc<StreamConsumer>>);

impl Closing {
    fn new(consumer: StreamConsumer) -> Self {
        Self(Some(Arc::new(consumer)))
    }
}

impl Clone for Closing {
    /// Another handle, closed on a thread of its own too, whichever is last.
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl std::ops::Deref for Closing {
    type Target = Arc<StreamConsumer>;

    fn deref(&self) -> &Self::Target {
        // Taken only by `drop`.
        self.0.as_ref().expect("a consumer until dropped")
    }
}

impl Drop for Closing {
    fn drop(&mut self) {
        if let Some(consumer) = self.0.take() {
            let closing = std::thread::Builder::new()
                .name("kafka-close".to_owned())
                .spawn(move || drop(consumer));
            if let Err(error) = closing {
                tracing::warn!(%error, "no thread to close a Kafka consumer on; closing it here");
            }
        }
    }
}

impl Feed {
    /// Assigns every partition at `next` (the partition's first offset
    /// where `next` has none, which is then filled in), waiting for the
    /// topic to exist. `None` when stopped first.
    ///
    /// One projector reads the whole topic, so it assigns the partitions to
    /// itself rather than joining a group: Tansu 0.6.0 keeps a SIGKILLed
    /// member as the group's leader, and a projector restarted after one was
    /// assigned no partition and never resumed (observed for minutes).
    async fn open(
        settings: &ConsumerSettings,
        next: &mut BTreeMap<i32, i64>,
        stop: &CancellationToken,
    ) -> anyhow::Result<Option<Self>> {
        let consumer = Closing::new(
            consumer_config(settings)
                .create()
                .context("invalid Kafka consumer settings")?,
        );
        loop {
            let found = {
                let consumer = consumer.clone();
                let topic = settings.topic.clone();
                let known = next.clone();
                tokio::task::spawn_blocking(move || -> anyhow::Result<BTreeMap<i32, i64>> {
                    let mut start = BTreeMap::new();
                    for partition in partitions_of(consumer.as_ref(), &topic)? {
                        let offset = match known.get(&partition) {
                            Some(offset) => *offset,
                            None => {
                                consumer
                                    .fetch_watermarks(&topic, partition, KAFKA_TIMEOUT)
                                    .context("reading a partition's first offset")?
                                    .0
                            }
                        };
                        start.insert(partition, offset);
                    }
                    Ok(start)
                })
                .await
                .context("metadata task failed")?
            };
            match found {
                Ok(start) if !start.is_empty() => {
                    let mut list = TopicPartitionList::new();
                    for (partition, offset) in &start {
                        list.add_partition_offset(
                            &settings.topic,
                            *partition,
                            Offset::Offset(*offset),
                        )?;
                    }
                    consumer
                        .assign(&list)
                        .context("cannot assign the event topic's partitions")?;
                    for (partition, offset) in start {
                        next.entry(partition).or_insert(offset);
                    }
                    return Ok(Some(Self { consumer }));
                }
                Ok(_) => tracing::warn!(topic = %settings.topic, "no such topic yet; waiting"),
                Err(error) => {
                    tracing::warn!(error = %format_args!("{error:#}"), "cannot read the event topic's partitions")
                }
            }
            if !pause(stop, Duration::from_secs(1)).await {
                return Ok(None);
            }
        }
    }

    /// Up to `batch` messages: waits [`IDLE`] for the first, then `linger`.
    async fn collect(&self, settings: &ConsumerSettings) -> Batch {
        let mut batch = Batch::default();
        match tokio::time::timeout(IDLE, self.consumer.recv()).await {
            Err(_) => return batch,
            Ok(Err(error)) => {
                tracing::warn!(%error, "kafka consumer error");
                tokio::time::sleep(Duration::from_millis(200)).await;
                return batch;
            }
            Ok(Ok(message)) => batch.add(&message),
        }
        let deadline = Instant::now() + Duration::from_millis(settings.linger_ms);
        while batch.offsets.len() < settings.batch.max(1)
            && batch.received.len() < settings.batch.max(1)
        {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.consumer.recv()).await {
                Ok(Ok(message)) => batch.add(&message),
                Ok(Err(error)) => {
                    tracing::warn!(%error, "kafka consumer error");
                    break;
                }
                Err(_) => break,
            }
        }
        batch
    }
}

/// The partitions of `topic`; none while it does not exist. Blocking.
///
/// # Errors
/// When the broker cannot be asked.
pub fn partitions_of<C, X>(consumer: &C, topic: &str) -> anyhow::Result<Vec<i32>>
where
    C: Consumer<X>,
    X: rdkafka::consumer::ConsumerContext,
{
    let metadata = consumer
        .fetch_metadata(Some(topic), KAFKA_TIMEOUT)
        .context("reading the event topic's partitions")?;
    Ok(metadata
        .topics()
        .iter()
        .filter(|t| t.name() == topic && t.error().is_none())
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect())
}

/// Whether `next` is at or past `target` on every partition.
pub fn reached(next: &BTreeMap<i32, i64>, target: &BTreeMap<i32, i64>) -> bool {
    target
        .iter()
        .all(|(partition, end)| next.get(partition).copied().unwrap_or(0) >= *end)
}

/// Messages of one batch: the decodable events with where they were, the
/// last offset seen per partition, and what did not decode.
#[derive(Debug, Default)]
struct Batch {
    received: Vec<Received>,
    offsets: BTreeMap<i32, i64>,
    /// Messages that are not envelopes: partition, offset, why, bytes.
    undecodable: Vec<(i32, i64, String, Vec<u8>)>,
}

impl Batch {
    /// The span of the batch's work: its generation, how many events, and
    /// the offsets it holds of each partition (`partition:first-last`).
    fn span(&self, generation: u32) -> tracing::Span {
        let mut first: BTreeMap<i32, i64> = BTreeMap::new();
        let held = self
            .received
            .iter()
            .map(|r| (r.partition, r.offset))
            .chain(self.undecodable.iter().map(|(p, o, _, _)| (*p, *o)));
        for (partition, offset) in held {
            let lowest = first.entry(partition).or_insert(offset);
            *lowest = (*lowest).min(offset);
        }
        let offsets = self
            .offsets
            .iter()
            .map(|(partition, last)| {
                let from = first.get(partition).copied().unwrap_or(*last);
                format!("{partition}:{from}-{last}")
            })
            .collect::<Vec<_>>()
            .join(",");
        tracing::info_span!("batch", generation, events = self.received.len(), offsets)
    }

    fn add(&mut self, message: &impl Message) {
        let (partition, offset) = (message.partition(), message.offset());
        self.offsets.insert(partition, offset);
        match message
            .payload()
            .map(serde_json::from_slice::<PublishedEvent>)
        {
            Some(Ok(event)) => self.received.push(Received {
                event,
                partition,
                offset,
            }),
            Some(Err(error)) => {
                tracing::error!(partition, offset, %error,
                    "a message on the event topic is not an event envelope; parked");
                self.undecodable.push((
                    partition,
                    offset,
                    format!("not an event envelope ({error})"),
                    message.payload().map(<[u8]>::to_vec).unwrap_or_default(),
                ));
            }
            None => {
                tracing::error!(
                    partition,
                    offset,
                    "an empty message on the event topic; parked"
                );
                self.undecodable.push((
                    partition,
                    offset,
                    "an empty message".to_owned(),
                    Vec::new(),
                ));
            }
        }
    }
}
