//! Live availability: `GET /shows/{id}/availability/stream`, Server-Sent
//! Events of a show's seats as they change.
//!
//! - One feed per watched show in each process reads the read models and
//!   fans its changes out through a broadcast channel: 5,000 watchers of a
//!   show cost one reader, not 5,000 cursors. A subscriber that falls
//!   [`LiveSettings::lag_events`] behind is dropped (its client resumes with
//!   `Last-Event-ID`); the channel never waits for anyone.
//! - The feed finds writes through the show's tallies. A tally carries the
//!   write number `w` of its block and lands after the block in one ordered
//!   bulk write, so a block whose tally moved is read whole and holds at
//!   least that write. A change is sent only once read back from the read
//!   models: a GET after it sees at least its state.
//! - A seat is only ever replaced by a later state of its stream (by `q`),
//!   whatever generation was read, so no seat goes back in time, even when
//!   a replay's generation becomes current a moment behind the old one.
//! - Nothing is written when a hold lapses (the sweeper records it seconds
//!   later), so the feed shows a held seat as available when its time
//!   passes, as the GETs do.
//! - An event id is `E.V.T`: `E` names the feed (random, so that no two
//!   feeds, in this process or another, share it), `V` is the sum of the
//!   seats' stream sequences (it grows with every seat event read), `T` the
//!   time in ms of the last lapse shown. A client resuming from an id of
//!   this feed that it still has the changes after gets those changes. Any
//!   other id gets a snapshot read after the client came back, so that it
//!   holds at least every state the client was shown.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::convert::Infallible;
use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use chrono::{DateTime, Utc};
use domain::read_model::{self, BlockDoc, Counts, ShowDoc};
use domain::SeatStatus;
use futures::{Stream, StreamExt, TryStreamExt};
use mongodb::bson::doc;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::problem::QueryError;
use crate::routes::{find_show, Availability, Path, SectionCounts};
use crate::startup::Reads;

/// How live streams behave.
#[derive(Debug, Clone, clap::Args)]
pub struct LiveSettings {
    /// How often a watched show's read models are looked at, in ms.
    #[arg(long = "live-poll-ms", env = "LIVE_POLL_MS", default_value_t = 50)]
    pub poll_ms: u64,
    /// Changes kept per show for clients that resume with `Last-Event-ID`.
    #[arg(
        long = "live-resume-events",
        env = "LIVE_RESUME_EVENTS",
        default_value_t = 1024
    )]
    pub resume_events: usize,
    /// Changes a subscriber may fall behind before it is dropped.
    #[arg(
        long = "live-lag-events",
        env = "LIVE_LAG_EVENTS",
        default_value_t = 256
    )]
    pub lag_events: usize,
    /// Most open streams; more are 503.
    #[arg(
        long = "live-max-subscribers",
        env = "LIVE_MAX_SUBSCRIBERS",
        default_value_t = 10_000
    )]
    pub max_subscribers: usize,
    /// Most shows read for streams at once; a stream of one more is 503.
    #[arg(
        long = "live-max-shows",
        env = "LIVE_MAX_SHOWS",
        default_value_t = 1_000
    )]
    pub max_shows: usize,
    /// Seconds without an event after which a comment line keeps proxies
    /// from closing the stream (1 to 15).
    #[arg(long = "live-heartbeat-secs", env = "LIVE_HEARTBEAT_SECS", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(1..=15))]
    pub heartbeat_secs: u64,
}

impl Default for LiveSettings {
    fn default() -> Self {
        Self {
            poll_ms: 50,
            resume_events: 1024,
            lag_events: 256,
            max_subscribers: 10_000,
            max_shows: 1_000,
            heartbeat_secs: 10,
        }
    }
}

/// How long a feed nobody watches keeps reading, so that a client that
/// reconnects finds the changes it missed.
const IDLE: Duration = Duration::from_secs(10);

/// How often a feed reads every block's write number rather than the
/// tallies', so that a tally left behind (a writer stopped between a block
/// and its tally, until the projector's restart mends it) hides a change
/// for no longer than this. Not more often: on SecantusDB that read of a
/// 100,000-seat show's 400 blocks costs as much as the blocks themselves,
/// and at once a second it put 600 ms on the p99 of every change.
const BLOCK_MARKS_EVERY: Duration = Duration::from_secs(10);

/// Most seats in the changes a feed keeps for resuming clients: a
/// generation switch can make changes of a whole show.
const RECENT_SEATS: usize = 200_000;

/// The place of an event in a feed's history. Ordered within one feed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct EventId {
    /// Sum of the seats' stream sequences.
    version: u64,
    /// When the last lapse shown was seen, in ms since the epoch.
    lapses: i64,
}

/// An event id as sent: `E.V.T`, the feed and the place in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamId {
    feed: u64,
    at: EventId,
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.feed, self.at.version, self.at.lapses)
    }
}

impl FromStr for StreamId {
    type Err = ();

    fn from_str(text: &str) -> Result<Self, ()> {
        let mut parts = text.trim().split('.');
        let mut next = || parts.next().ok_or(());
        let feed = next()?.parse().map_err(|_| ())?;
        let version = next()?.parse().map_err(|_| ())?;
        let lapses: i64 = next()?.parse().map_err(|_| ())?;
        if lapses < 0 || parts.next().is_some() {
            return Err(());
        }
        Ok(Self {
            feed,
            at: EventId { version, lapses },
        })
    }
}

/// One seat as the feed knows it.
#[derive(Debug, Clone)]
struct Seat {
    section: u32,
    recorded: SeatStatus,
    sequence: i64,
    expires_at: Option<DateTime<Utc>>,
    /// What subscribers were last told: `recorded`, or available once a
    /// hold's time has passed.
    shown: SeatStatus,
}

impl Seat {
    fn shown_at(&self, now: DateTime<Utc>) -> SeatStatus {
        match (self.recorded, self.expires_at) {
            (SeatStatus::Held, Some(at)) if at <= now => SeatStatus::Available,
            (status, _) => status,
        }
    }

    /// The entry of the lapse queue it needs: a hold still shown as held.
    fn lapse_entry(&self, label: &str) -> Option<(DateTime<Utc>, String)> {
        match (self.shown, self.expires_at) {
            (SeatStatus::Held, Some(at)) => Some((at, label.to_owned())),
            _ => None,
        }
    }
}

/// A change sent to subscribers.
#[derive(Debug)]
pub struct Change {
    id: EventId,
    /// The seats that changed, with their sections and new statuses.
    seats: Vec<(String, u32, SeatStatus)>,
    /// The whole show's counts after it.
    total: Counts,
    /// The counts of the sections it touched, after it.
    sections: Vec<(u32, Counts)>,
    /// Its data for a subscriber of the whole show.
    data: String,
}

/// The data of a `change` event.
#[derive(Serialize)]
struct ChangeBody<'a> {
    seats: BTreeMap<&'a str, SeatStatus>,
    total: i64,
    available: i64,
    held: i64,
    booked: i64,
    sections: Vec<SectionCounts>,
}

impl Change {
    /// Its data for a subscriber of section `only` (or the whole show), or
    /// `None` when nothing of that section changed.
    fn data_for(&self, show: &ShowDoc, only: Option<u32>) -> Option<String> {
        let Some(only) = only else {
            return Some(self.data.clone());
        };
        if !self.sections.iter().any(|(section, _)| *section == only) {
            return None;
        }
        Some(change_data(
            show,
            self.seats.iter().filter(|(_, section, _)| *section == only),
            &self.total,
            self.sections.iter().filter(|(section, _)| *section == only),
        ))
    }
}

fn change_data<'a>(
    show: &ShowDoc,
    seats: impl Iterator<Item = &'a (String, u32, SeatStatus)>,
    total: &Counts,
    sections: impl Iterator<Item = &'a (u32, Counts)>,
) -> String {
    let body = ChangeBody {
        seats: seats
            .map(|(label, _, status)| (label.as_str(), *status))
            .collect(),
        total: total.total,
        available: total.available,
        held: total.held,
        booked: total.booked,
        sections: sections
            .filter_map(|(index, counts)| {
                let section = show.sections.get(*index as usize)?;
                Some(SectionCounts::of(section, counts))
            })
            .collect(),
    };
    // Our own types with string keys always serialize.
    serde_json::to_string(&body).unwrap_or_default()
}

/// What a feed knows of its show.
#[derive(Debug, Default)]
struct View {
    /// The generation read last; `None` before the first reading.
    generation: Option<u32>,
    /// The write number of each block as last read.
    writes: HashMap<String, i64>,
    seats: HashMap<String, Seat>,
    /// Holds shown as held, by when they lapse.
    lapses: BTreeSet<(DateTime<Utc>, String)>,
    /// Counts per section, as shown.
    sections: Vec<Counts>,
    /// Sum of the seats' sequences.
    version: u64,
    /// When the last lapse shown was seen, in ms.
    lapsed_at: i64,
    /// The number of the last reading that succeeded (see `Feed::begun`).
    read_through: u64,
    /// The latest changes, oldest first, and how many seats they hold.
    recent: VecDeque<Arc<Change>>,
    recent_seats: usize,
    /// The state the oldest of `recent` followed.
    oldest: EventId,
}

impl View {
    fn id(&self) -> EventId {
        EventId {
            version: self.version,
            lapses: self.lapsed_at,
        }
    }

    fn total(&self) -> Counts {
        let mut total = Counts::default();
        for counts in &self.sections {
            total.plus(counts);
        }
        total
    }

    fn count(&mut self, section: u32, status: SeatStatus, n: i64) {
        if let Some(counts) = self.sections.get_mut(section as usize) {
            counts.add(status, n);
        }
    }

    /// Takes a seat's state as read, if it is later than the one known.
    /// Returns the status shown before (`None` for a seat not known yet).
    fn take(
        &mut self,
        label: &str,
        section: u32,
        read: &read_model::SeatDoc,
        now: DateTime<Utc>,
    ) -> Option<Option<SeatStatus>> {
        let old = self.seats.get(label);
        if old.is_some_and(|old| old.sequence >= read.sequence) {
            return None;
        }
        let mut seat = Seat {
            section,
            recorded: read.status,
            sequence: read.sequence,
            expires_at: read.expires_at.as_deref().and_then(read_model::parse_time),
            shown: SeatStatus::Available,
        };
        seat.shown = seat.shown_at(now);
        let before = match self.seats.insert(label.to_owned(), seat.clone()) {
            Some(old) => {
                if let Some(entry) = old.lapse_entry(label) {
                    self.lapses.remove(&entry);
                }
                let grown = seat.sequence.abs_diff(old.sequence);
                self.version = self.version.saturating_add(grown);
                self.count(old.section, old.shown, -1);
                Some(old.shown)
            }
            None => {
                self.version = self
                    .version
                    .saturating_add(u64::try_from(seat.sequence).unwrap_or(0));
                if let Some(counts) = self.sections.get_mut(section as usize) {
                    counts.total += 1;
                }
                None
            }
        };
        self.count(section, seat.shown, 1);
        if let Some(entry) = seat.lapse_entry(label) {
            self.lapses.insert(entry);
        }
        Some(before)
    }

    /// Shows every hold whose time has passed as available; returns their
    /// labels and statuses before.
    fn lapse(&mut self, now: DateTime<Utc>) -> Vec<(String, SeatStatus)> {
        let mut lapsed = Vec::new();
        while let Some((at, label)) = self.lapses.first().cloned() {
            if at > now {
                break;
            }
            self.lapses.pop_first();
            let Some(seat) = self.seats.get_mut(&label) else {
                continue;
            };
            let before = seat.shown;
            seat.shown = SeatStatus::Available;
            let section = seat.section;
            self.count(section, before, -1);
            self.count(section, SeatStatus::Available, 1);
            lapsed.push((label, before));
        }
        if !lapsed.is_empty() {
            self.lapsed_at = now.timestamp_millis().max(self.lapsed_at + 1);
        }
        lapsed
    }

    /// The answer of `GET /shows/{id}/availability` for what it shows now.
    fn availability(&self, show: &ShowDoc, only: Option<u32>) -> Availability {
        let seats = self
            .seats
            .iter()
            .filter(|(_, seat)| only.is_none_or(|only| only == seat.section))
            .map(|(label, seat)| (label.clone(), seat.shown))
            .collect();
        Availability::of(show, only, &self.total(), &self.sections, seats)
    }

    /// Sends what changed since `before` (each moved seat's status shown
    /// then) as one change, and keeps it for resuming clients.
    fn publish(
        &mut self,
        show: &ShowDoc,
        before: BTreeMap<String, (u32, Option<SeatStatus>)>,
        sender: &broadcast::Sender<Arc<Change>>,
        keep: usize,
    ) {
        let seats: Vec<(String, u32, SeatStatus)> = before
            .into_iter()
            .filter_map(|(label, (section, was))| {
                let shown = self.seats.get(&label)?.shown;
                // A seat first seen free (its block read late) is what a
                // client assumes of a seat it has not been told about.
                (was.unwrap_or(SeatStatus::Available) != shown).then_some((label, section, shown))
            })
            .collect();
        if seats.is_empty() {
            return;
        }
        let touched: BTreeSet<u32> = seats.iter().map(|(_, section, _)| *section).collect();
        let sections: Vec<(u32, Counts)> = touched
            .into_iter()
            .filter_map(|section| Some((section, *self.sections.get(section as usize)?)))
            .collect();
        let total = self.total();
        let data = change_data(show, seats.iter(), &total, sections.iter());
        let change = Arc::new(Change {
            id: self.id(),
            seats,
            total,
            sections,
            data,
        });
        self.recent_seats += change.seats.len();
        self.recent.push_back(Arc::clone(&change));
        while self.recent.len() > keep.max(1) || self.recent_seats > RECENT_SEATS {
            let Some(dropped) = self.recent.pop_front() else {
                break;
            };
            self.recent_seats -= dropped.seats.len();
            self.oldest = dropped.id;
        }
        // Sent under the view's lock: a subscriber that reads the view and
        // makes its receiver under the same lock gets exactly what follows.
        // No receiver is not an error: the feed reads on for clients that
        // come back.
        let _ = sender.send(change);
    }
}

/// The write number of a block, as it or its tally carries it.
#[derive(Debug, Deserialize)]
struct WriteMark {
    #[serde(rename = "_id")]
    block_id: String,
    #[serde(default)]
    w: i64,
}

/// One show's source of changes.
#[derive(Debug)]
struct Feed {
    /// Names this feed in event ids.
    epoch: u64,
    show: Arc<ShowDoc>,
    view: RwLock<View>,
    sender: broadcast::Sender<Arc<Change>>,
    /// The last snapshot built, by section asked for: clients that connect
    /// at once share one.
    snapshots: Mutex<Snapshots>,
    /// Readings begun so far: a reading numbered above the count when a
    /// client arrived read the read models after it arrived.
    begun: AtomicU64,
}

/// The last snapshot built for each section asked for (`None`: the show).
type Snapshots = HashMap<Option<u32>, (EventId, Arc<String>)>;

impl Feed {
    fn read_view(&self) -> std::sync::RwLockReadGuard<'_, View> {
        // A panic while the view was written leaves it whole enough to
        // read: every write to it is a handful of map updates.
        self.view
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn write_view(&self) -> std::sync::RwLockWriteGuard<'_, View> {
        self.view
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn id(&self, at: EventId) -> StreamId {
        StreamId {
            feed: self.epoch,
            at,
        }
    }

    /// Reads what changed in the read models since the last reading and
    /// sends it. `every_block` reads the blocks' own write numbers rather
    /// than the tallies'.
    async fn poll(&self, reads: &Reads, keep: usize, every_block: bool) -> Result<(), QueryError> {
        let show = &self.show;
        let reading = self.begun.fetch_add(1, Ordering::SeqCst) + 1;
        let generation = reads.generation()?;
        let (known, writes) = {
            let view = self.read_view();
            (view.generation, view.writes.clone())
        };
        let every = doc! { "show_id": &show.show_id };
        let blocks = if known == Some(generation) {
            let mut marks = self.marks(reads, reads.tallies(generation), &every).await?;
            if every_block || marks.len() as u64 != show.blocks_outside(None) {
                // A tally missing or left behind (a writer stopped between a
                // block and its tally, until the projector mends it).
                marks = self.marks(reads, reads.blocks(generation), &every).await?;
            }
            let moved: Vec<&String> = marks
                .iter()
                .filter(|mark| writes.get(&mark.block_id).is_none_or(|w| mark.w > *w))
                .map(|mark| &mark.block_id)
                .collect();
            if moved.is_empty() {
                Vec::new()
            } else {
                self.blocks(reads, generation, doc! { "_id": { "$in": moved } })
                    .await?
            }
        } else {
            self.blocks(reads, generation, every).await?
        };
        let mut view = self.write_view();
        // After the lock: the lapse ticker may have shown lapses up to a
        // time this reading must not be before.
        let now = Utc::now();
        if view.generation != Some(generation) {
            view.writes.clear();
            if view.generation.is_none() {
                view.sections = vec![Counts::default(); show.sections.len()];
            }
        }
        let first = view.generation.is_none();
        view.generation = Some(generation);
        view.read_through = view.read_through.max(reading);
        let mut before: BTreeMap<String, (u32, Option<SeatStatus>)> = BTreeMap::new();
        for block in &blocks {
            let written = view.writes.entry(block.block_id.clone()).or_insert(0);
            *written = (*written).max(block.writes);
            for (label, seat) in &block.seats {
                if let Some(was) = view.take(label, block.section, seat, now) {
                    before.entry(label.clone()).or_insert((block.section, was));
                }
            }
        }
        if first {
            view.lapse(now);
            view.oldest = view.id();
            return Ok(());
        }
        view.publish(show, before, &self.sender, keep);
        Ok(())
    }

    /// Shows the holds whose time has passed as available. Apart from the
    /// readings, so that a slow or failing read delays no lapse.
    fn lapse(&self, keep: usize) {
        let now = Utc::now();
        {
            let view = self.read_view();
            let due = view.lapses.first().is_some_and(|(at, _)| *at <= now);
            if view.generation.is_none() || !due {
                return;
            }
        }
        let mut view = self.write_view();
        let lapsed = view.lapse(now);
        let before = lapsed
            .into_iter()
            .filter_map(|(label, was)| {
                let section = view.seats.get(&label)?.section;
                Some((label, (section, Some(was))))
            })
            .collect();
        view.publish(&self.show, before, &self.sender, keep);
    }

    async fn marks(
        &self,
        reads: &Reads,
        collection: mongodb::Collection<BlockDoc>,
        filter: &mongodb::bson::Document,
    ) -> Result<Vec<WriteMark>, QueryError> {
        reads
            .bounded(async {
                collection
                    .clone_with_type::<WriteMark>()
                    .find(filter.clone())
                    .projection(doc! { "w": 1 })
                    .await?
                    .try_collect()
                    .await
            })
            .await
    }

    async fn blocks(
        &self,
        reads: &Reads,
        generation: u32,
        filter: mongodb::bson::Document,
    ) -> Result<Vec<BlockDoc>, QueryError> {
        reads
            .bounded(async {
                reads
                    .blocks(generation)
                    .find(filter)
                    .await?
                    .try_collect()
                    .await
            })
            .await
    }

    /// The snapshot of `view` for section `only`, shared with the clients
    /// that ask for the same one, and built outside the view's lock.
    fn snapshot(
        &self,
        view: std::sync::RwLockReadGuard<'_, View>,
        only: Option<u32>,
    ) -> Arc<String> {
        let id = view.id();
        let cached = self.snapshots.lock().ok().and_then(|cache| {
            cache
                .get(&only)
                .filter(|(at, _)| *at == id)
                .map(|(_, data)| Arc::clone(data))
        });
        if let Some(data) = cached {
            return data;
        }
        let answer = view.availability(&self.show, only);
        drop(view);
        // Our own types with string keys always serialize.
        let data = Arc::new(serde_json::to_string(&answer).unwrap_or_default());
        if let Ok(mut cache) = self.snapshots.lock() {
            if cache.get(&only).is_none_or(|(at, _)| *at < id) {
                cache.insert(only, (id, Arc::clone(&data)));
            }
        }
        data
    }
}

/// Every feed of this process, and the open streams.
#[derive(Debug, Clone)]
pub struct Live {
    inner: Arc<LiveInner>,
}

#[derive(Debug)]
struct LiveInner {
    reads: Reads,
    settings: LiveSettings,
    feeds: Mutex<HashMap<String, Arc<Feed>>>,
    subscribers: AtomicUsize,
    /// Ends every stream, so that a graceful shutdown does not wait for
    /// clients that never hang up.
    stop: CancellationToken,
}

/// Counts an open stream while it lives.
struct Subscription {
    live: Arc<LiveInner>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.live.subscribers.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Where a new stream starts.
enum Start {
    /// The changes after the client's id.
    Replay(Vec<Arc<Change>>),
    /// A snapshot at this id.
    Snapshot(EventId, Arc<String>),
}

/// A stream about to start: where, and a receiver of what follows.
struct Opened {
    feed: Arc<Feed>,
    start: Start,
    receiver: broadcast::Receiver<Arc<Change>>,
}

impl Live {
    /// No feed yet: each starts with its first subscriber.
    pub fn new(reads: Reads, settings: LiveSettings) -> Self {
        Self {
            inner: Arc::new(LiveInner {
                reads,
                settings,
                feeds: Mutex::default(),
                subscribers: AtomicUsize::new(0),
                stop: CancellationToken::new(),
            }),
        }
    }

    /// Streams open now.
    pub fn subscribers(&self) -> usize {
        self.inner.subscribers.load(Ordering::Relaxed)
    }

    /// Shows with a feed now.
    pub fn feeds(&self) -> usize {
        self.inner.feeds.lock().map_or(0, |feeds| feeds.len())
    }

    /// Ends every stream and feed.
    pub fn close(&self) {
        self.inner.stop.cancel();
    }

    fn poll_interval(&self) -> Duration {
        Duration::from_millis(self.inner.settings.poll_ms.max(1))
    }

    /// The feed of `show`, started if there is none, and a receiver of its
    /// changes. The receiver is made under the feeds' lock, where a feed
    /// decides to leave, so no feed leaves while a subscriber waits for it.
    ///
    /// # Errors
    /// [`QueryError::TooManySubscribers`] when `LIVE_MAX_SHOWS` shows have
    /// feeds already.
    fn feed(
        &self,
        show: &Arc<ShowDoc>,
    ) -> Result<(Arc<Feed>, broadcast::Receiver<Arc<Change>>), QueryError> {
        let mut feeds = self
            .inner
            .feeds
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(feed) = feeds.get(&show.show_id) {
            return Ok((Arc::clone(feed), feed.sender.subscribe()));
        }
        if feeds.len() >= self.inner.settings.max_shows {
            return Err(QueryError::TooManySubscribers);
        }
        let (sender, receiver) = broadcast::channel(self.inner.settings.lag_events.max(1));
        let feed = Arc::new(Feed {
            epoch: uuid::Uuid::new_v4().as_u64_pair().0,
            show: Arc::clone(show),
            view: RwLock::default(),
            sender,
            snapshots: Mutex::default(),
            begun: AtomicU64::new(0),
        });
        feeds.insert(show.show_id.clone(), Arc::clone(&feed));
        tokio::spawn(self.clone().run(Arc::clone(&feed)));
        Ok((feed, receiver))
    }

    /// Reads `feed`'s show until nobody has watched it for [`IDLE`], and
    /// shows its lapses meanwhile.
    async fn run(self, feed: Arc<Feed>) {
        let leave = self.inner.stop.child_token();
        let keep = self.inner.settings.resume_events;
        let poll = self.poll_interval();
        let lapses = tokio::spawn({
            let (feed, leave) = (Arc::clone(&feed), leave.clone());
            async move {
                while service_kit::backoff::pause(&leave, poll).await {
                    feed.lapse(keep);
                }
            }
        });
        let mut idle_since: Option<Instant> = None;
        let mut blocks_read = Instant::now();
        let mut failing = false;
        loop {
            let every_block = blocks_read.elapsed() >= BLOCK_MARKS_EVERY;
            if every_block {
                blocks_read = Instant::now();
            }
            match feed.poll(&self.inner.reads, keep, every_block).await {
                Ok(()) => failing = false,
                Err(error) if !failing => {
                    failing = true;
                    tracing::warn!(%error, show_id = %feed.show.show_id, "cannot read a watched show");
                }
                Err(_) => {}
            }
            if !service_kit::backoff::pause(&leave, poll).await {
                break;
            }
            if feed.sender.receiver_count() > 0 {
                idle_since = None;
                continue;
            }
            let since = *idle_since.get_or_insert_with(Instant::now);
            if since.elapsed() < IDLE {
                continue;
            }
            // Decided under the feeds' lock, where every new subscriber
            // makes its receiver: none can join a feed that is leaving.
            let mut feeds = self
                .inner
                .feeds
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            if feed.sender.receiver_count() == 0 {
                feeds.remove(&feed.show.show_id);
                break;
            }
        }
        leave.cancel();
        let _ = lapses.await;
    }

    /// Opens a stream of `show` (section `only`) after `resume`.
    async fn subscribe(
        &self,
        show: &Arc<ShowDoc>,
        only: Option<u32>,
        resume: Option<StreamId>,
    ) -> Result<Opened, QueryError> {
        // Held while waiting, so that the feed stays; replaced by an exact
        // one below.
        let (feed, waiting) = self.feed(show)?;
        let arrived = feed.begun.load(Ordering::SeqCst);
        let ours = resume.filter(|id| id.feed == feed.epoch).map(|id| id.at);
        let deadline = Instant::now() + self.inner.reads.consistency_wait;
        // Until the feed has read the show and, for a client shown another
        // feed's states, has read the read models after the client came
        // back and as far as its id: every state the client was shown was
        // in the read models by then. Past the deadline, the snapshot goes
        // out anyway rather than refuse a client that would not retry.
        loop {
            let ready = {
                let view = feed.read_view();
                view.generation.is_some()
                    && (ours.is_some()
                        || resume.is_none_or(|id| {
                            view.read_through > arrived && view.version >= id.at.version
                        }))
            };
            if ready {
                break;
            }
            if Instant::now() >= deadline {
                if feed.read_view().generation.is_some() {
                    break;
                }
                return Err(QueryError::Unavailable(
                    "the show's live view is not ready".to_owned(),
                ));
            }
            tokio::time::sleep(self.poll_interval()).await;
        }
        let view = feed.read_view();
        // Made under the view's read lock, while the feed sends under its
        // write lock: it receives exactly the changes after this view.
        let receiver = feed.sender.subscribe();
        drop(waiting);
        let start = match ours {
            Some(id) if id >= view.oldest && id <= view.id() => {
                let changes = view
                    .recent
                    .iter()
                    .filter(|change| change.id > id)
                    .cloned()
                    .collect();
                drop(view);
                Start::Replay(changes)
            }
            _ => {
                let at = view.id();
                Start::Snapshot(at, feed.snapshot(view, only))
            }
        };
        Ok(Opened {
            feed,
            start,
            receiver,
        })
    }
}

/// `?section=&last_event_id=` of a stream.
#[derive(Debug, Deserialize)]
pub struct StreamQuery {
    /// Narrow the stream to this section.
    pub section: Option<String>,
    /// Where to resume when the `Last-Event-ID` header cannot be sent: a
    /// browser's new `EventSource` after its old one gave up.
    pub last_event_id: Option<String>,
}

/// The id a reconnecting client sent (the header first), when it is one
/// of ours.
fn resume_from(headers: &HeaderMap, query: &StreamQuery) -> Option<StreamId> {
    headers
        .get("last-event-id")
        .and_then(|value| value.to_str().ok())
        .or(query.last_event_id.as_deref())?
        .parse()
        .ok()
}

/// `GET /shows/{id}/availability/stream`.
///
/// # Errors
/// 404 for an unknown show or section, 503 when the read models cannot be
/// read or too many streams are open.
pub async fn stream(
    State(live): State<Live>,
    Path(id): Path<String>,
    query: Result<Query<StreamQuery>, QueryRejection>,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, QueryError> {
    let Query(query) = query?;
    let (_, show, _) = find_show(&live.inner.reads, &id, &headers).await?;
    let only = match &query.section {
        Some(name) => Some(
            show.section_index(name)
                .ok_or(QueryError::NotFound("section"))?,
        ),
        None => None,
    };
    let open = live.inner.subscribers.fetch_add(1, Ordering::Relaxed) + 1;
    let subscription = Subscription {
        live: Arc::clone(&live.inner),
    };
    if open > live.inner.settings.max_subscribers {
        return Err(QueryError::TooManySubscribers);
    }
    let Opened {
        feed,
        start,
        receiver,
    } = live
        .subscribe(&show, only, resume_from(&headers, &query))
        .await?;
    // A client reconnects after a second rather than the browser's default.
    let retry = Duration::from_secs(1);
    let first: Vec<Event> = match start {
        Start::Snapshot(at, data) => vec![Event::default()
            .event("snapshot")
            .id(feed.id(at).to_string())
            .retry(retry)
            .data(data.as_str())],
        Start::Replay(changes) => changes
            .iter()
            .filter_map(|change| {
                let data = change.data_for(&feed.show, only)?;
                Some(
                    Event::default()
                        .event("change")
                        .id(feed.id(change.id).to_string())
                        .data(data),
                )
            })
            .collect(),
    };
    let changes = futures::stream::unfold(
        (receiver, subscription, feed),
        move |(mut receiver, subscription, feed)| async move {
            loop {
                match receiver.recv().await {
                    Ok(change) => {
                        if let Some(data) = change.data_for(&feed.show, only) {
                            let event = Event::default()
                                .event("change")
                                .id(feed.id(change.id).to_string())
                                .data(data);
                            return Some((Ok(event), (receiver, subscription, feed)));
                        }
                    }
                    // Fallen behind (or the feed is gone): ended, so that it
                    // never holds the others back; its client resumes from
                    // its last id.
                    Err(_) => return None,
                }
            }
        },
    );
    let events = futures::stream::iter(first.into_iter().map(Ok))
        .chain(changes)
        .take_until(live.inner.stop.clone().cancelled_owned());
    Ok(
        Sse::new(events).keep_alive(KeepAlive::new().interval(Duration::from_secs(
            live.inner.settings.heartbeat_secs.clamp(1, 15),
        ))),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeDelta;

    fn seat(
        status: SeatStatus,
        sequence: i64,
        expires_at: Option<DateTime<Utc>>,
    ) -> read_model::SeatDoc {
        read_model::SeatDoc {
            status,
            sequence,
            booking_id: None,
            expires_at: expires_at.map(read_model::format_time),
        }
    }

    fn view() -> View {
        View {
            sections: vec![Counts::default(); 2],
            ..View::default()
        }
    }

    #[test]
    fn a_seat_never_takes_an_older_state() {
        let now = Utc::now();
        let mut view = view();
        assert_eq!(
            view.take("A1", 0, &seat(SeatStatus::Booked, 2, None), now),
            Some(None)
        );
        // An older state, read from a generation behind or a block read
        // twice, changes nothing.
        assert_eq!(
            view.take(
                "A1",
                0,
                &seat(SeatStatus::Held, 1, Some(now + TimeDelta::seconds(60))),
                now
            ),
            None
        );
        assert_eq!(
            view.take("A1", 0, &seat(SeatStatus::Available, 2, None), now),
            None
        );
        assert_eq!(view.seats["A1"].shown, SeatStatus::Booked);
        assert_eq!(view.version, 2);
        assert_eq!(
            view.take("A1", 0, &seat(SeatStatus::Available, 3, None), now),
            Some(Some(SeatStatus::Booked))
        );
        assert_eq!(view.version, 3);
        assert_eq!(view.sections[0].available, 1);
        assert_eq!(view.sections[0].booked, 0);
    }

    #[test]
    fn counts_follow_seats_and_lapses() {
        let now = Utc::now();
        let mut view = view();
        view.take(
            "A1",
            0,
            &seat(SeatStatus::Held, 1, Some(now - TimeDelta::seconds(1))),
            now,
        );
        view.take(
            "A2",
            0,
            &seat(SeatStatus::Held, 1, Some(now + TimeDelta::seconds(2))),
            now,
        );
        view.take("B1", 1, &seat(SeatStatus::Booked, 1, None), now);
        // A hold already lapsed when read shows available at once.
        assert_eq!(view.seats["A1"].shown, SeatStatus::Available);
        assert_eq!(
            view.sections[0],
            Counts {
                total: 2,
                available: 1,
                held: 1,
                booked: 0
            }
        );
        assert!(view.lapse(now).is_empty());
        let lapsed = view.lapse(now + TimeDelta::seconds(3));
        assert_eq!(lapsed, vec![("A2".to_owned(), SeatStatus::Held)]);
        assert_eq!(
            view.sections[0],
            Counts {
                total: 2,
                available: 2,
                held: 0,
                booked: 0
            }
        );
        assert_eq!(
            view.total(),
            Counts {
                total: 3,
                available: 2,
                held: 0,
                booked: 1
            }
        );
        // Each lapse moves the id on, even within one millisecond.
        let id = view.id();
        view.take(
            "A2",
            0,
            &seat(SeatStatus::Held, 2, Some(now + TimeDelta::seconds(1))),
            now,
        );
        view.lapse(now + TimeDelta::seconds(3));
        assert!(view.id() > id);
        // A hold replaced before it lapsed leaves no lapse behind.
        view.take(
            "A1",
            0,
            &seat(SeatStatus::Held, 2, Some(now + TimeDelta::seconds(1))),
            now,
        );
        view.take("A1", 0, &seat(SeatStatus::Booked, 3, None), now);
        assert!(view.lapse(now + TimeDelta::seconds(5)).is_empty());
        assert_eq!(view.seats["A1"].shown, SeatStatus::Booked);
    }

    #[test]
    fn kept_changes_are_bounded_and_move_the_oldest_id() {
        let show: ShowDoc = serde_json::from_value(serde_json::json!({
            "_id": "s", "name": "n", "venue": "v", "starts_at": "t", "starts_order": 0,
            "sections": [
                {"name": "A", "price_cents": 1, "rows": [], "total": 0, "blocks": 1},
                {"name": "B", "price_cents": 1, "rows": [], "total": 0, "blocks": 1}
            ]
        }))
        .expect("a show");
        let (sender, mut receiver) = broadcast::channel(16);
        let now = Utc::now();
        let mut view = view();
        let mut ids = Vec::new();
        for n in 1..=5 {
            let label = format!("A{n}");
            let was = view.take(&label, 0, &seat(SeatStatus::Booked, 1, None), now);
            let before = BTreeMap::from([(label, (0, was.flatten()))]);
            view.publish(&show, before, &sender, 3);
            ids.push(view.id());
        }
        assert_eq!(view.recent.len(), 3);
        assert_eq!(view.oldest, ids[1]);
        assert_eq!(view.recent_seats, 3);
        let first = receiver.try_recv().expect("a change");
        assert_eq!(first.id, ids[0]);
        assert!(
            first.data.contains(r#""seats":{"A1":"booked"}"#),
            "{}",
            first.data
        );
        // A seat read again in the same state is no change.
        let before = BTreeMap::from([("A1".to_owned(), (0, Some(SeatStatus::Booked)))]);
        view.publish(&show, before, &sender, 3);
        assert_eq!(view.recent.len(), 3);
        assert_eq!(view.oldest, ids[1]);
        // Filtered by section: B hears nothing of A.
        assert_eq!(first.data_for(&show, Some(1)), None);
        assert!(first.data_for(&show, Some(0)).is_some());
    }

    #[test]
    fn ids_are_read_back_and_anything_else_is_not_an_id() {
        let id = StreamId {
            feed: 42,
            at: EventId {
                version: 7,
                lapses: 1_733_212_345_678,
            },
        };
        assert_eq!(id.to_string(), "42.7.1733212345678");
        assert_eq!(id.to_string().parse::<StreamId>(), Ok(id));
        for garbage in [
            "", "7", "7.0", "a.b.c", "1.2.-3", "1.2.3.4", "-1.2.3", " . . ",
        ] {
            assert_eq!(garbage.parse::<StreamId>(), Err(()), "{garbage:?}");
        }
    }
}
