//! The read models in MongoDB: generations of collections, and writing a
//! batch of events into one generation.
//!
//! A batch is applied as: load what it touches (the shows, cached, since a
//! show document never changes; of each block only the seats the batch
//! changes; the bookings), fold the events in memory with the domain's
//! read-model rules, and write in one `bulkWrite`: new shows and their
//! blocks as inserts, each changed block as one targeted update (`$set` of
//! its changed seats and their holds, `$inc` of its counts) conditional on
//! those seats' sequences as loaded, each changed booking as a replacement
//! conditional on its version. A write that finds a sequence or version
//! moved (another writer got in between) changes nothing; the batch is
//! loaded and folded again, and per-stream sequences make that idempotent.
//! What a booking of two seats costs is two seats, whatever the show's size.
//!
//! A write MongoDB refuses for good (a document over its size limit, say)
//! must not stop every show: the batch is then applied show by show, and
//! the events of a show that still fails are parked in `g{n}_parked` with
//! the reason, together with every later event of that show, while the
//! others go on (see [`ReadStore::apply_parking`]).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use domain::read_model::{
    self, paths, BlockDoc, BookingDoc, Counts, Models, SeatChange, SeatDoc, ShowDoc, Target,
    BLOCKS, BOOKINGS, PARKED, SHOWS, TALLIES,
};
use domain::PublishedEvent;
use mongodb::bson::spec::BinarySubtype;
use mongodb::bson::{doc, Binary, DateTime, Document};
use mongodb::options::IndexOptions;
use mongodb::{Client, Collection, Database, IndexModel};

use crate::generations::Generations;

/// Why a batch could not be written.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// MongoDB failed or could not be reached; try again later.
    #[error("mongodb: {0}")]
    Mongo(#[from] mongodb::error::Error),
    /// Another writer changed a document between load and write, again and
    /// again.
    #[error("documents kept changing under the batch ({0} attempts)")]
    Contended(u32),
    /// Another replay or projector holds what this one needs.
    #[error("{0}")]
    Busy(String),
    /// `MONGODB_URI` is not usable.
    #[error(transparent)]
    Connect(#[from] service_kit::connect::ConnectError),
}

impl StoreError {
    /// Whether the error is about reaching MongoDB (down, restarting,
    /// timing out), which waiting cures, rather than about what was
    /// written, which it does not.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Mongo(error) => mongo_transient(error),
            // Two writers at once (one about to lose its lease): the next
            // attempt, after a pause, finds one of them gone.
            Self::Contended(_) => true,
            Self::Busy(_) | Self::Connect(_) => false,
        }
    }
}

/// What applying a batch did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Applied {
    /// Events that changed a document.
    pub changed: usize,
    /// Events already applied before (duplicates, replays).
    pub skipped: usize,
    /// Events that contradict the read models or do not decode: left
    /// out of the write (and parked by [`ReadStore::apply_parking`]).
    pub rejected: usize,
    /// Of `rejected`, each event's index in the batch and why.
    pub refused: Vec<(usize, String)>,
    /// Documents written.
    pub written: usize,
    /// Events parked (their show could not be written, or an earlier
    /// event of it was parked).
    pub parked: usize,
}

/// An event kept aside in `g{n}_parked`.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Parked {
    /// `partition:offset`.
    pub id: String,
    /// Where it was on the topic.
    pub partition: i32,
    /// Where it was on the topic.
    pub offset: i64,
    /// Its show, when it was an event.
    pub show_id: Option<String>,
    /// Why it is parked (the last attempt's reason).
    pub reason: String,
    /// When it was parked (RFC 3339).
    pub parked_at: Option<String>,
    /// The event's envelope, as JSON, when the message was one.
    pub event: Option<String>,
    /// The message as it was on the topic, when it was not an envelope
    /// (as UTF-8, lossily, for reading; kept whole in MongoDB).
    pub message: Option<String>,
    #[serde(skip)]
    raw: Option<Vec<u8>>,
}

impl Parked {
    fn of(document: &Document) -> Self {
        let text = |key| document.get_str(key).ok().map(str::to_owned);
        let raw = document.get_binary_generic(PARKED_MESSAGE).ok().cloned();
        Self {
            id: text("_id").unwrap_or_default(),
            partition: document.get_i32("partition").unwrap_or_default(),
            offset: document.get_i64("offset").unwrap_or_default(),
            show_id: text("show_id"),
            reason: text("reason").unwrap_or_default(),
            parked_at: document
                .get_datetime("parked_at")
                .ok()
                .and_then(|at| at.try_to_rfc3339_string().ok()),
            event: text("event"),
            message: raw
                .as_deref()
                .map(|bytes| String::from_utf8_lossy(bytes).into_owned()),
            raw,
        }
    }

    /// The event, decoded by this release: the envelope kept, or the
    /// message as it was.
    ///
    /// # Errors
    /// Why it still does not decode.
    pub fn decode(&self) -> Result<PublishedEvent, String> {
        let bytes = match (&self.event, &self.raw) {
            (Some(event), _) => event.as_bytes(),
            (None, Some(raw)) => raw.as_slice(),
            (None, None) => return Err("an empty message".to_owned()),
        };
        serde_json::from_slice(bytes).map_err(|error| format!("not an event envelope ({error})"))
    }
}

/// What [`ReadStore::unpark`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Unparked {
    /// Events applied and no longer parked.
    pub applied: usize,
    /// Events still parked.
    pub still_parked: usize,
}

/// Why an event is parked that could be applied itself.
const HELD_BACK: &str = "an earlier event of this show is parked";

/// The member of a parked message that is not an envelope: its bytes.
const PARKED_MESSAGE: &str = "message";

/// An event from the topic, with where it was.
#[derive(Debug, Clone)]
pub struct Received {
    /// The event.
    pub event: PublishedEvent,
    /// Its partition.
    pub partition: i32,
    /// Its offset.
    pub offset: i64,
}

/// The read-model database.
#[derive(Debug, Clone)]
pub struct ReadStore {
    client: Client,
    hosts: String,
    database: Database,
    /// Show documents by generation and id: written once, read by every
    /// batch that touches their seats.
    shows: Arc<Mutex<ShowCache>>,
    /// The seats of the blocks this writer has read or written, by
    /// generation and block: what a batch needs to know of a seat before
    /// changing it, without a read per batch. Every write is conditional
    /// on the seats' sequences as cached, so a stale entry is found out
    /// (and dropped) rather than written over.
    seats: Arc<Mutex<SeatCache>>,
}

/// Show documents by generation and show id.
type ShowCache = HashMap<(u32, String), Arc<ShowDoc>>;

/// The seats of blocks by generation and block id.
type SeatCache = HashMap<(u32, String), CachedBlock>;

/// What the writer knows of a block: all its seats, and the number of the
/// last write that changed them (what its next write is conditional on).
#[derive(Debug, Clone)]
struct CachedBlock {
    seats: BTreeMap<String, SeatDoc>,
    writes: i64,
}

const MAX_ATTEMPTS: u32 = 8;

impl ReadStore {
    /// Connects (lazily) to `uri`, database `name`. Operations give up after
    /// `timeout` without a server.
    ///
    /// # Errors
    /// A malformed URI.
    pub async fn connect(uri: &str, name: &str, timeout: Duration) -> Result<Self, StoreError> {
        let (client, hosts) = service_kit::connect::mongodb_client(uri, timeout).await?;
        let database = client.database(name);
        Ok(Self {
            client,
            hosts,
            database,
            shows: Arc::default(),
            seats: Arc::default(),
        })
    }

    /// The servers it talks to, for logs (never credentials).
    pub fn hosts(&self) -> &str {
        &self.hosts
    }

    /// The database.
    pub fn database(&self) -> &Database {
        &self.database
    }

    /// Whether the server answers.
    ///
    /// # Errors
    /// The driver's error when it does not.
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.database.run_command(doc! { "ping": 1 }).await?;
        Ok(())
    }

    /// The bookkeeping of generations in this database.
    pub fn generations(&self) -> Generations {
        Generations::new(self.database.clone())
    }

    /// The show documents of `generation`.
    pub fn shows(&self, generation: u32) -> Collection<ShowDoc> {
        self.database
            .collection(&read_model::collection_name(generation, SHOWS))
    }

    /// The block documents of `generation`.
    pub fn blocks(&self, generation: u32) -> Collection<BlockDoc> {
        self.database
            .collection(&read_model::collection_name(generation, BLOCKS))
    }

    /// The tallies of `generation`: each block's counts and holds.
    pub fn tallies(&self, generation: u32) -> Collection<BlockDoc> {
        self.database
            .collection(&read_model::collection_name(generation, TALLIES))
    }

    /// The booking documents of `generation`.
    pub fn bookings(&self, generation: u32) -> Collection<BookingDoc> {
        self.database
            .collection(&read_model::collection_name(generation, BOOKINGS))
    }

    /// Creates the indexes the query side's ranges need (idempotent).
    ///
    /// # Errors
    /// MongoDB errors.
    pub async fn prepare(&self, generation: u32) -> Result<(), StoreError> {
        // Each index holds the whole sort of its list, `_id` included, so a
        // page is one range scan in index order, never an in-memory sort.
        let by_user = IndexModel::builder()
            .keys(doc! { "user_id": 1, "created_order": -1, "_id": -1 })
            .options(
                IndexOptions::builder()
                    .name("by_user_newest".to_owned())
                    .build(),
            )
            .build();
        self.bookings(generation).create_index(by_user).await?;
        let by_start = IndexModel::builder()
            .keys(doc! { "starts_order": 1, "_id": 1 })
            .options(
                IndexOptions::builder()
                    .name("by_start_id".to_owned())
                    .build(),
            )
            .build();
        self.shows(generation).create_index(by_start).await?;
        let by_show = IndexModel::builder()
            .keys(doc! { "show_id": 1, "section": 1, "block": 1 })
            .options(
                IndexOptions::builder()
                    .name("by_show_section".to_owned())
                    .build(),
            )
            .build();
        self.blocks(generation)
            .create_index(by_show.clone())
            .await?;
        self.tallies(generation).create_index(by_show).await?;
        // What the caches hold may be gone (a wiped or restored database):
        // they are filled again from what MongoDB holds.
        if let Ok(mut shows) = self.shows.lock() {
            shows.clear();
        }
        if let Ok(mut seats) = self.seats.lock() {
            seats.clear();
        }
        Ok(())
    }

    /// Whether `generation` was written by an older release: one that kept
    /// every seat of a show in the show's document (its shows are there,
    /// its blocks are not), one whose blocks or tallies have no write
    /// number, or one that cut sections into blocks of another size. Such
    /// a generation is rebuilt by `projector replay`, never written on.
    ///
    /// # Errors
    /// MongoDB errors.
    pub async fn of_an_older_shape(&self, generation: u32) -> Result<bool, StoreError> {
        let blocks = read_model::collection_name(generation, BLOCKS);
        let names = self
            .database
            .list_collection_names()
            .filter(doc! { "name": &blocks })
            .await?;
        if !names.is_empty() {
            if let Some(show) = self.shows(generation).find_one(doc! {}).await? {
                if !show.is_cut_into_blocks_of_this_release() {
                    return Ok(true);
                }
            }
            // Any tally, else any block (the first show's tallies not
            // written yet), with its write number.
            if let Some(tally) = self
                .tallies(generation)
                .clone_with_type::<Document>()
                .find_one(doc! {})
                .await?
            {
                return Ok(!tally.contains_key("w"));
            }
            return Ok(self
                .blocks(generation)
                .clone_with_type::<Document>()
                .find_one(doc! {})
                .await?
                .is_some_and(|block| !block.contains_key("w")));
        }
        Ok(self
            .shows(generation)
            .clone_with_type::<Document>()
            .find_one(doc! {})
            .await?
            .is_some())
    }

    /// The parked events of `generation`.
    pub fn parked(&self, generation: u32) -> Collection<Document> {
        self.database
            .collection(&read_model::collection_name(generation, PARKED))
    }

    /// Drops every collection of `generation`.
    ///
    /// # Errors
    /// MongoDB errors.
    pub async fn drop_generation(&self, generation: u32) -> Result<(), StoreError> {
        self.shows(generation).drop().await?;
        self.blocks(generation).drop().await?;
        self.tallies(generation).drop().await?;
        self.bookings(generation).drop().await?;
        self.parked(generation).drop().await?;
        if let Ok(mut shows) = self.shows.lock() {
            shows.retain(|(g, _), _| *g != generation);
        }
        if let Ok(mut seats) = self.seats.lock() {
            seats.retain(|(g, _), _| *g != generation);
        }
        self.generations().drop_offsets(generation).await?;
        Ok(())
    }

    /// Applies `received` to `generation` like [`ReadStore::apply`], except
    /// that a write MongoDB refuses for good does not fail the batch: the
    /// batch is applied show by show, and the events of a show whose write
    /// still fails are parked with the reason, as are the events of shows
    /// in `parked_shows` (to which the failing shows are added).
    ///
    /// # Errors
    /// [`StoreError`] that waiting cures ([`StoreError::is_transient`]);
    /// the batch is then to be applied again.
    pub async fn apply_parking(
        &self,
        generation: u32,
        received: &[Received],
        parked_shows: &mut BTreeSet<String>,
    ) -> Result<Applied, StoreError> {
        let mut applied = Applied::default();
        // An event of a version this release does not know (written by a
        // later one) is parked with every later event of its show, so that
        // none of them is applied before it.
        let mut held_back = Vec::new();
        let mut rest = Vec::new();
        for one in received {
            let show_id = one.event.show_id.to_string();
            if parked_shows.contains(&show_id) {
                held_back.push(one);
            } else if let Err(error) =
                domain::versions::readable(&one.event.event_type, &one.event.event_version)
            {
                tracing::error!(%error, show_id, generation, offset = one.offset,
                    "an event of a later release; parked with its show's later events");
                self.park(generation, &[one], &error.to_string()).await?;
                applied.parked += 1;
                parked_shows.insert(show_id);
            } else {
                rest.push(one);
            }
        }
        if !held_back.is_empty() {
            self.park(generation, &held_back, HELD_BACK).await?;
            applied.parked += held_back.len();
        }
        let events: Vec<PublishedEvent> = rest.iter().map(|r| r.event.clone()).collect();
        let error = match self.apply(generation, &events).await {
            Ok(done) => {
                let done = self.park_refused(generation, &rest, done).await?;
                return Ok(add(applied, done));
            }
            Err(error) if error.is_transient() => return Err(error),
            Err(error) => error,
        };
        tracing::warn!(%error, generation, "a batch could not be written; applying it show by show");
        let mut by_show: BTreeMap<String, Vec<&Received>> = BTreeMap::new();
        for one in rest {
            by_show
                .entry(one.event.show_id.to_string())
                .or_default()
                .push(one);
        }
        for (show_id, events) in by_show {
            let published: Vec<PublishedEvent> = events.iter().map(|r| r.event.clone()).collect();
            match self.apply(generation, &published).await {
                Ok(done) => {
                    let done = self.park_refused(generation, &events, done).await?;
                    applied = add(applied, done);
                }
                Err(error) if error.is_transient() => return Err(error),
                Err(error) => {
                    tracing::error!(%error, show_id, generation, events = events.len(),
                        "the read models refuse this show's events; parked, the other shows go on");
                    self.park(generation, &events, &error.to_string()).await?;
                    applied.parked += events.len();
                    parked_shows.insert(show_id);
                }
            }
        }
        Ok(applied)
    }

    /// Parks each event of `events` that `applied` says was refused, with
    /// its reason: the rest of the batch is written, and the refused one
    /// waits for `projector unpark`.
    async fn park_refused(
        &self,
        generation: u32,
        events: &[&Received],
        mut applied: Applied,
    ) -> Result<Applied, StoreError> {
        for (index, reason) in &applied.refused {
            if let Some(event) = events.get(*index) {
                self.park(generation, &[event], reason).await?;
                applied.parked += 1;
            }
        }
        log_applied(events, &applied.refused);
        // Indices into `events`: meaningless once added to another batch's.
        applied.refused.clear();
        Ok(applied)
    }

    /// Keeps `events` aside in `g{n}_parked`, with `reason`.
    async fn park(
        &self,
        generation: u32,
        events: &[&Received],
        reason: &str,
    ) -> Result<(), StoreError> {
        let now = DateTime::now();
        let documents: Vec<Document> = events
            .iter()
            .map(|r| {
                doc! {
                    "_id": paths::parked_id(r.partition, r.offset),
                    "show_id": r.event.show_id.to_string(),
                    "partition": r.partition,
                    "offset": r.offset,
                    "reason": reason,
                    "event": serde_json::to_string(&r.event).unwrap_or_default(),
                    "parked_at": now,
                }
            })
            .collect();
        match self
            .parked(generation)
            .insert_many(documents)
            .ordered(false)
            .await
        {
            Ok(_) => Ok(()),
            // Parked before (the batch is being applied again).
            Err(error) if is_duplicate_key(&error) => Ok(()),
            Err(error) => Err(error.into()),
        }
    }

    /// Keeps aside a message that is not an event at all.
    ///
    /// # Errors
    /// MongoDB errors.
    pub async fn park_message(
        &self,
        generation: u32,
        partition: i32,
        offset: i64,
        reason: &str,
        message: &[u8],
    ) -> Result<(), StoreError> {
        let parked = doc! {
            "_id": paths::parked_id(partition, offset),
            "partition": partition,
            "offset": offset,
            "reason": reason,
            PARKED_MESSAGE: Binary { subtype: BinarySubtype::Generic, bytes: message.to_vec() },
            "parked_at": DateTime::now(),
        };
        match self.parked(generation).insert_one(parked).await {
            Ok(_) => Ok(()),
            Err(error) if is_duplicate_key(&error) => Ok(()),
            Err(error) => Err(error.into()),
        }
    }

    /// The generation pointer (see [`crate::generations`]).
    ///
    /// # Errors
    /// MongoDB errors.
    pub async fn pointer(&self) -> Result<crate::generations::Pointer, StoreError> {
        self.generations().pointer().await
    }

    /// The events `generation` has parked, in topic order (by partition,
    /// then offset).
    ///
    /// # Errors
    /// MongoDB errors.
    pub async fn parked_events(&self, generation: u32) -> Result<Vec<Parked>, StoreError> {
        let mut cursor = self
            .parked(generation)
            .find(doc! {})
            .sort(doc! { "partition": 1, "offset": 1 })
            .await?;
        let mut parked = Vec::new();
        while cursor.advance().await? {
            parked.push(Parked::of(&cursor.deserialize_current()?));
        }
        Ok(parked)
    }

    /// Applies the events `generation` has parked again, show by show in
    /// topic order, after a fix (a release that decodes or applies them,
    /// a show's first events arrived late, a document made to fit). Those
    /// that apply leave the parked collection, and a show with none left
    /// leaves `parked_shows`; the others stay, with the new reason.
    ///
    /// # Errors
    /// MongoDB errors; what was applied before one stays applied, and
    /// running it again goes on from there (applying is idempotent).
    pub async fn unpark(
        &self,
        generation: u32,
        parked_shows: &mut BTreeSet<String>,
    ) -> Result<Unparked, StoreError> {
        let mut unparked = Unparked::default();
        let mut by_show: BTreeMap<String, Vec<Received>> = BTreeMap::new();
        // Ids still parked, by the reason: one update for each reason.
        let mut stays: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for parked in self.parked_events(generation).await? {
            let event = match parked.decode() {
                Ok(event) => event,
                Err(reason) => {
                    stays.entry(reason).or_default().push(parked.id.clone());
                    unparked.still_parked += 1;
                    continue;
                }
            };
            by_show
                .entry(event.show_id.to_string())
                .or_default()
                .push(Received {
                    event,
                    partition: parked.partition,
                    offset: parked.offset,
                });
        }
        for events in by_show.into_values() {
            // Up to the first event this release still cannot read: the
            // show's later events go on waiting for it, in order.
            let cut = events
                .iter()
                .position(|r| {
                    domain::versions::readable(&r.event.event_type, &r.event.event_version).is_err()
                })
                .unwrap_or(events.len());
            let (events, waiting) = events.split_at(cut);
            for (index, later) in waiting.iter().enumerate() {
                let reason = match (
                    index,
                    domain::versions::readable(&later.event.event_type, &later.event.event_version),
                ) {
                    (0, Err(error)) => error.to_string(),
                    _ => HELD_BACK.to_owned(),
                };
                let id = paths::parked_id(later.partition, later.offset);
                stays.entry(reason).or_default().push(id);
                unparked.still_parked += 1;
            }
            if events.is_empty() {
                continue;
            }
            let ids: Vec<String> = events
                .iter()
                .map(|r| paths::parked_id(r.partition, r.offset))
                .collect();
            let published: Vec<PublishedEvent> = events.iter().map(|r| r.event.clone()).collect();
            let refused = match self.apply(generation, &published).await {
                Ok(applied) => applied.refused,
                Err(error) if error.is_transient() => return Err(error),
                Err(error) => (0..events.len()).map(|i| (i, error.to_string())).collect(),
            };
            let mut kept = vec![false; ids.len()];
            for (index, reason) in &refused {
                if let Some(id) = ids.get(*index) {
                    stays.entry(reason.clone()).or_default().push(id.clone());
                    kept[*index] = true;
                }
            }
            let applied: Vec<&String> = ids
                .iter()
                .zip(&kept)
                .filter_map(|(id, kept)| (!kept).then_some(id))
                .collect();
            let received: Vec<&Received> = events.iter().collect();
            log_applied(&received, &refused);
            if !applied.is_empty() {
                self.parked(generation)
                    .delete_many(doc! { "_id": { "$in": &applied } })
                    .await?;
            }
            unparked.applied += applied.len();
            unparked.still_parked += refused.len();
        }
        for (reason, ids) in &stays {
            let ids: Vec<&String> = ids.iter().collect();
            self.still_parked(generation, &ids, reason).await?;
        }
        // A show stays held back while it has events parked, and only then:
        // also mends a set an earlier unpark applied but could not save.
        let still: BTreeSet<String> = self
            .parked_events(generation)
            .await?
            .into_iter()
            .filter_map(|parked| parked.show_id)
            .collect();
        parked_shows.retain(|show| still.contains(show));
        Ok(unparked)
    }

    /// Records why parked events are still parked after an attempt.
    async fn still_parked(
        &self,
        generation: u32,
        ids: &[&String],
        reason: &str,
    ) -> Result<(), StoreError> {
        self.parked(generation)
            .update_many(
                doc! { "_id": { "$in": ids } },
                doc! { "$set": { "reason": reason, "retried_at": DateTime::now() } },
            )
            .await?;
        Ok(())
    }

    /// How many events `generation` has parked.
    ///
    /// # Errors
    /// MongoDB errors.
    pub async fn parked_count(&self, generation: u32) -> Result<u64, StoreError> {
        Ok(self.parked(generation).count_documents(doc! {}).await?)
    }

    /// Applies `events` to `generation`, retrying from a fresh load when
    /// another writer got in between.
    ///
    /// # Errors
    /// [`StoreError`]; nothing of the batch is half-applied in a way a retry
    /// would not finish.
    pub async fn apply(
        &self,
        generation: u32,
        events: &[PublishedEvent],
    ) -> Result<Applied, StoreError> {
        for _ in 0..MAX_ATTEMPTS {
            let loaded = self.load(generation, events).await?;
            let mut models = loaded.models.clone();
            let mut applied = Applied::default();
            let mut changed_seats: BTreeMap<String, BTreeMap<String, SeatChange>> = BTreeMap::new();
            for (index, event) in events.iter().enumerate() {
                match models.apply_seat_aware(event) {
                    Ok(Some(Some((block, change)))) => {
                        applied.changed += 1;
                        // The first change of a seat in the batch holds its
                        // state as loaded; the block holds the last.
                        changed_seats
                            .entry(block)
                            .or_default()
                            .entry(change.label.clone())
                            .or_insert(change);
                    }
                    Ok(Some(None)) => applied.changed += 1,
                    Ok(None) => applied.skipped += 1,
                    // Retrying cannot mend a log that contradicts itself;
                    // stopping would starve every other show of updates.
                    Err(error) => {
                        applied.rejected += 1;
                        applied.refused.push((index, error.to_string()));
                        tracing::error!(%error, position = event.global_position, "event left out of the read models");
                    }
                }
            }
            match self
                .write(generation, &loaded, &models, &changed_seats)
                .await?
            {
                Some(written) => {
                    applied.written = written;
                    return Ok(applied);
                }
                None => continue,
            }
        }
        Err(StoreError::Contended(MAX_ATTEMPTS))
    }

    /// The show documents of `ids` in `generation` that exist, from the
    /// cache or MongoDB.
    async fn load_shows(
        &self,
        generation: u32,
        ids: &BTreeSet<String>,
    ) -> Result<BTreeMap<String, Arc<ShowDoc>>, StoreError> {
        let mut found = BTreeMap::new();
        let mut missing = Vec::new();
        if let Ok(cache) = self.shows.lock() {
            for id in ids {
                match cache.get(&(generation, id.clone())) {
                    Some(show) => {
                        found.insert(id.clone(), Arc::clone(show));
                    }
                    None => missing.push(id.clone()),
                }
            }
        }
        if !missing.is_empty() {
            let mut cursor = self
                .shows(generation)
                .find(doc! { "_id": { "$in": &missing } })
                .await?;
            while cursor.advance().await? {
                let show: ShowDoc = cursor.deserialize_current()?;
                let show = Arc::new(show);
                if let Ok(mut cache) = self.shows.lock() {
                    cache.insert((generation, show.show_id.clone()), Arc::clone(&show));
                }
                found.insert(show.show_id.clone(), show);
            }
        }
        Ok(found)
    }

    /// Loads what `events` touch: their shows, of their blocks only the
    /// seats they change, their bookings.
    async fn load(&self, generation: u32, events: &[PublishedEvent]) -> Result<Loaded, StoreError> {
        let mut show_ids = BTreeSet::new();
        let mut seats: Vec<(String, domain::SeatLabel)> = Vec::new();
        let mut booking_ids = BTreeSet::new();
        for event in events {
            match read_model::target(event) {
                Ok(Target::Show(id)) => {
                    show_ids.insert(id);
                }
                Ok(Target::Seat(show, label)) => {
                    show_ids.insert(show.clone());
                    seats.push((show, label));
                }
                Ok(Target::Booking(id)) => {
                    booking_ids.insert(id);
                }
                // Refused when applied.
                Err(_) => {}
            }
        }
        let shows = self.load_shows(generation, &show_ids).await?;
        let mut models = Models::default();
        for id in show_ids {
            let show = shows.get(&id).map(|show| show.as_ref().clone());
            models.shows.insert(id, show);
        }
        // Of each block, just the seats the batch changes: from the cache,
        // or read once (the whole block) and cached.
        let mut wanted: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (show, label) in &seats {
            if let Some(block) = shows.get(show).and_then(|s| s.block_id_of(label)) {
                wanted.entry(block).or_default().insert(label.to_string());
            }
        }
        let missing: Vec<&String> = match self.seats.lock() {
            Ok(cache) => wanted
                .keys()
                .filter(|id| !cache.contains_key(&(generation, (*id).clone())))
                .collect(),
            Err(_) => wanted.keys().collect(),
        };
        if !missing.is_empty() {
            self.load_blocks(generation, &missing).await?;
        }
        if let Ok(cache) = self.seats.lock() {
            for (id, labels) in &wanted {
                let Some(cached) = cache.get(&(generation, id.clone())) else {
                    models.blocks.insert(id.clone(), None);
                    continue;
                };
                let Some((show_id, section, block)) = read_model::parse_block_id(id) else {
                    models.blocks.insert(id.clone(), None);
                    continue;
                };
                let partial = BlockDoc {
                    block_id: id.clone(),
                    show_id,
                    section,
                    block,
                    // Counted from zero: after the fold, the change.
                    counts: Counts::default(),
                    seats: labels
                        .iter()
                        .filter_map(|label| Some((label.clone(), cached.seats.get(label)?.clone())))
                        .collect(),
                    holds: BTreeMap::new(),
                    writes: cached.writes,
                };
                models.blocks.insert(id.clone(), Some(partial));
            }
        }
        if !booking_ids.is_empty() {
            for id in &booking_ids {
                models.bookings.insert(id.clone(), None);
            }
            let ids: Vec<&String> = booking_ids.iter().collect();
            let mut cursor = self
                .bookings(generation)
                .find(doc! { "_id": { "$in": ids } })
                .await?;
            while cursor.advance().await? {
                let booking: BookingDoc = cursor.deserialize_current()?;
                models
                    .bookings
                    .insert(booking.booking_id.clone(), Some(booking));
            }
        }
        Ok(Loaded { models })
    }

    /// Reads the blocks `ids` whole into the cache, and puts right the
    /// tally of any of them that does not copy it: one left behind, missing
    /// or ahead because a writer stopped between the block and its tally
    /// (they are written in one `bulkWrite`, not in a transaction). A block
    /// is read whole after every start and every failed write, so that is
    /// when such a tally is found.
    ///
    /// The tallies are read before the blocks: a writer getting in between
    /// leaves a block newer than its tally as read, never older, and the
    /// repair is conditional on the tally as read, so it never writes over
    /// a newer one.
    async fn load_blocks(&self, generation: u32, ids: &[&String]) -> Result<(), StoreError> {
        let filter = doc! { "_id": { "$in": ids } };
        let mut tallies = HashMap::new();
        let mut cursor = self.tallies(generation).find(filter.clone()).await?;
        while cursor.advance().await? {
            let tally: BlockDoc = cursor.deserialize_current()?;
            tallies.insert(tally.block_id.clone(), tally);
        }
        let mut repairs: Vec<mongodb::options::WriteModel> = Vec::new();
        let mut cursor = self.blocks(generation).find(filter).await?;
        while cursor.advance().await? {
            let block: BlockDoc = cursor.deserialize_current()?;
            let tally = block.tally();
            let replacement =
                mongodb::bson::to_document(&tally).map_err(mongodb::error::Error::from)?;
            match tallies.get(&block.block_id) {
                Some(found) if *found == tally => {}
                Some(found) => repairs.push(
                    mongodb::options::ReplaceOneModel::builder()
                        .namespace(self.tallies(generation).namespace())
                        .filter(doc! { "_id": &block.block_id, "w": found.writes })
                        .replacement(replacement)
                        .build()
                        .into(),
                ),
                None => repairs.push(
                    mongodb::options::InsertOneModel::builder()
                        .namespace(self.tallies(generation).namespace())
                        .document(replacement)
                        .build()
                        .into(),
                ),
            }
            if let Ok(mut cache) = self.seats.lock() {
                cache.insert(
                    (generation, block.block_id.clone()),
                    CachedBlock {
                        seats: block.seats,
                        writes: block.writes,
                    },
                );
            }
        }
        if !repairs.is_empty() {
            tracing::warn!(
                generation,
                tallies = repairs.len(),
                "tallies that did not copy their blocks are written again"
            );
            match self.client.bulk_write(repairs).ordered(false).await {
                // A repair that matched nothing, or a tally inserted
                // meanwhile: another writer's, written after its block.
                Ok(_) => {}
                Err(error) if is_duplicate_id(&error) => {}
                Err(error) => return Err(error.into()),
            }
        }
        Ok(())
    }

    /// Writes what the fold changed: each created block whole, each
    /// changed block's seats, holds and counts as one targeted update
    /// conditional on its write number and those seats' sequences as
    /// loaded, the tally of each block written after it (whole when
    /// created, then its counts and changed holds), changed bookings
    /// conditional on their versions, all in one ordered `bulkWrite`;
    /// then new shows, after their blocks (a show is read only once its
    /// blocks are there). `None` when another writer changed something
    /// first: the batch is applied again from a fresh load, which skips what
    /// did land (its seats' sequences say so).
    ///
    /// No multi-document transaction: every write is one document, whole
    /// by itself, so a writer killed half-way leaves nothing open on the
    /// server (SecantusDB froze when a collection was dropped under the
    /// open transaction of a killed replay).
    async fn write(
        &self,
        generation: u32,
        loaded: &Loaded,
        models: &Models,
        changed_seats: &BTreeMap<String, BTreeMap<String, SeatChange>>,
    ) -> Result<Option<usize>, StoreError> {
        let blocks = self.blocks(generation);
        let tallies = self.tallies(generation);
        let bookings = self.bookings(generation);
        let mut writes: Vec<mongodb::options::WriteModel> = Vec::new();
        let mut new_shows: Vec<mongodb::options::WriteModel> = Vec::new();
        let (mut matched, mut inserted, mut upserts) = (0_i64, 0_i64, 0_i64);
        for (id, show) in &models.shows {
            let Some(show) = show else { continue };
            if loaded.models.shows.get(id).is_some_and(Option::is_some) {
                continue;
            }
            new_shows.push(self.shows(generation).insert_one_model(show)?.into());
        }
        let mut created = Vec::new();
        for (id, block) in &models.blocks {
            let Some(block) = block else { continue };
            if !loaded.models.blocks.get(id).is_some_and(Option::is_some) {
                // Created with its show in this batch: written whole, over
                // what an attempt that did not get as far as the show left
                // (no seat event applies to a show not yet written), never
                // over a block whose seats another writer has since changed
                // (`touched`: the upsert then meets the `_id` and is a
                // duplicate, and the batch is loaded again).
                upserts += 1;
                writes.push(
                    mongodb::options::ReplaceOneModel::builder()
                        .namespace(blocks.namespace())
                        .filter(doc! { "_id": id, "touched": { "$ne": true } })
                        .replacement(
                            mongodb::bson::to_document(block)
                                .map_err(mongodb::error::Error::from)?,
                        )
                        .upsert(true)
                        .build()
                        .into(),
                );
                upserts += 1;
                writes.push(tally_write(
                    &tallies,
                    &block.tally(),
                    doc! { "$lte": 0_i64 },
                )?);
                created.push(id.clone());
                continue;
            }
            let Some(changes) = changed_seats.get(id) else {
                continue;
            };
            let Some(tally) = self.tally_after(generation, block) else {
                // Not cached any more: another batch found it stale.
                self.forget_seats(generation, changed_seats.keys());
                return Ok(None);
            };
            let mut filter = doc! { "_id": id, "w": block.writes };
            let (mut set, mut unset, mut inc) = (Document::new(), Document::new(), Document::new());
            set.insert("touched", true);
            inc.insert("w", 1_i64);
            for (label, change) in changes {
                filter.insert(paths::seat_sequence(label), change.before.sequence);
                let Some(after) = block.seats.get(label) else {
                    continue;
                };
                set.insert(
                    paths::seat(label),
                    mongodb::bson::to_bson(after).map_err(mongodb::error::Error::from)?,
                );
                match block.holds.get(label) {
                    Some(expires_at) => {
                        set.insert(paths::hold(label), expires_at.clone());
                    }
                    None => {
                        unset.insert(paths::hold(label), "");
                    }
                }
            }
            let delta = block.counts;
            for (field, n) in [
                ("counts.available", delta.available),
                ("counts.held", delta.held),
                ("counts.booked", delta.booked),
            ] {
                if n != 0 {
                    inc.insert(field, n);
                }
            }
            let mut update = doc! { "$set": set, "$inc": inc };
            if !unset.is_empty() {
                update.insert("$unset", unset);
            }
            matched += 1;
            writes.push(update_model(&blocks, filter, update));
            // Whole, and only over an older one: a tally at this number
            // already is another writer's whose block write failed, and
            // this write then does not land, so the batch is loaded again
            // and the tally put right from the block.
            upserts += 1;
            writes.push(tally_write(&tallies, &tally, doc! { "$lt": tally.writes })?);
        }
        for (id, booking) in &models.bookings {
            let Some(booking) = booking else { continue };
            let before = loaded.models.bookings.get(id).and_then(Option::as_ref);
            match before {
                Some(old) if old == booking => {}
                Some(old) => {
                    let mut booking = booking.clone();
                    booking.v = old.v + 1;
                    matched += 1;
                    writes.push(
                        bookings
                            .replace_one_model(doc! { "_id": id, "v": old.v }, &booking)?
                            .into(),
                    );
                }
                None => {
                    let mut booking = booking.clone();
                    booking.v = 1;
                    inserted += 1;
                    writes.push(bookings.insert_one_model(&booking)?.into());
                }
            }
        }
        let count = writes.len() + new_shows.len();
        if !writes.is_empty() {
            // In order: a block's tally lands after the block, never before
            // it, which `load_blocks`'s repair relies on; a write refused
            // stops the rest, and the batch is loaded again anyway.
            let landed = match self.client.bulk_write(writes).ordered(true).await {
                Ok(result) => {
                    result.matched_count + result.upserted_count == matched + upserts
                        && result.inserted_count == inserted
                }
                // Another writer inserted the same document first.
                Err(error) if is_duplicate_id(&error) => false,
                Err(error) => {
                    self.forget_seats(generation, changed_seats.keys());
                    return Err(error.into());
                }
            };
            if !landed {
                self.forget_seats(generation, changed_seats.keys());
                return Ok(None);
            }
        }
        if !new_shows.is_empty() {
            let shows = i64::try_from(new_shows.len()).unwrap_or(i64::MAX);
            // The blocks' writes landed: whatever happens to the shows,
            // the seats as cached are those of before them.
            match self.client.bulk_write(new_shows).ordered(false).await {
                Ok(result) if result.inserted_count == shows => {}
                Ok(_) => {
                    self.forget_seats(generation, changed_seats.keys());
                    return Ok(None);
                }
                Err(error) if is_duplicate_id(&error) => {
                    self.forget_seats(generation, changed_seats.keys());
                    return Ok(None);
                }
                Err(error) => {
                    self.forget_seats(generation, changed_seats.keys());
                    return Err(error.into());
                }
            }
        }
        self.remember_seats(generation, models, changed_seats, &created);
        Ok(Some(count))
    }

    /// The tally of `block` (as folded from the seats it changes) once
    /// written: counted from all its seats, those cached overlaid with the
    /// changed ones, with the number of that write.
    fn tally_after(&self, generation: u32, block: &BlockDoc) -> Option<BlockDoc> {
        let cache = self.seats.lock().ok()?;
        let cached = cache.get(&(generation, block.block_id.clone()))?;
        let mut whole = BlockDoc {
            seats: cached.seats.clone(),
            writes: block.writes + 1,
            ..block.clone()
        };
        for (label, seat) in &block.seats {
            whole.seats.insert(label.clone(), seat.clone());
        }
        Some(whole.tally())
    }

    /// Drops cached seats found stale.
    fn forget_seats<'a>(&self, generation: u32, blocks: impl Iterator<Item = &'a String>) {
        if let Ok(mut cache) = self.seats.lock() {
            for id in blocks {
                cache.remove(&(generation, id.clone()));
            }
        }
    }

    /// Keeps in the cache the seats as just written.
    fn remember_seats(
        &self,
        generation: u32,
        models: &Models,
        changed_seats: &BTreeMap<String, BTreeMap<String, SeatChange>>,
        created: &[String],
    ) {
        let Ok(mut cache) = self.seats.lock() else {
            return;
        };
        for id in created {
            if let Some(Some(block)) = models.blocks.get(id) {
                cache.insert(
                    (generation, id.clone()),
                    CachedBlock {
                        seats: block.seats.clone(),
                        writes: block.writes,
                    },
                );
            }
        }
        for (id, changes) in changed_seats {
            // Written whole at its creation, changes included.
            if created.contains(id) {
                continue;
            }
            let (Some(Some(block)), Some(cached)) = (
                models.blocks.get(id),
                cache.get_mut(&(generation, id.clone())),
            ) else {
                continue;
            };
            for label in changes.keys() {
                if let Some(after) = block.seats.get(label) {
                    cached.seats.insert(label.clone(), after.clone());
                }
            }
            cached.writes = block.writes + 1;
        }
    }
}

/// `tally` written whole (inserted if there is none) where the write
/// number of the one there matches `older`.
fn tally_write(
    tallies: &Collection<BlockDoc>,
    tally: &BlockDoc,
    older: Document,
) -> Result<mongodb::options::WriteModel, StoreError> {
    Ok(mongodb::options::ReplaceOneModel::builder()
        .namespace(tallies.namespace())
        .filter(doc! { "_id": &tally.block_id, "w": older })
        .replacement(mongodb::bson::to_document(tally).map_err(mongodb::error::Error::from)?)
        .upsert(true)
        .build()
        .into())
}

fn update_model<T: Send + Sync>(
    collection: &Collection<T>,
    filter: Document,
    update: Document,
) -> mongodb::options::WriteModel {
    mongodb::options::UpdateOneModel::builder()
        .namespace(collection.namespace())
        .filter(filter)
        .update(update)
        .build()
        .into()
}

/// What a batch found in MongoDB before folding.
#[derive(Debug, Clone)]
struct Loaded {
    models: Models,
}

/// What follows a request through: the request ids of the events that
/// reached the read models, one line per batch, and each event at debug
/// level. `refused` are indices into `events` that did not.
fn log_applied(events: &[&Received], refused: &[(usize, String)]) {
    let mut requests = BTreeSet::new();
    for (index, received) in events.iter().enumerate() {
        if refused.iter().any(|(r, _)| *r == index) {
            continue;
        }
        let event = &received.event;
        let metadata = |key| event.metadata.get(key).map(String::as_str);
        if let Some(id) = metadata("correlation_id") {
            requests.insert(id);
        }
        tracing::debug!(
            correlation_id = metadata("correlation_id"),
            user_id = metadata("user_id"),
            stream = %format_args!("{}/{}", event.aggregate_type, event.aggregate_id),
            sequence = event.sequence,
            partition = received.partition,
            offset = received.offset,
            "event applied"
        );
    }
    if !requests.is_empty() {
        let ids: Vec<&str> = requests.into_iter().collect();
        tracing::info!(correlation_ids = %ids.join(","), "events of these requests applied");
    }
}

fn add(mut total: Applied, more: Applied) -> Applied {
    total.changed += more.changed;
    total.skipped += more.skipped;
    total.rejected += more.rejected;
    total.refused.extend(more.refused);
    total.written += more.written;
    total.parked += more.parked;
    total
}

/// Whether `error` is MongoDB refusing a duplicate key.
pub(crate) fn is_duplicate_key(error: &mongodb::error::Error) -> bool {
    write_errors(error).iter().any(|(code, _)| *code == 11000)
}

/// Whether `error` is a duplicate of a document's `_id` only: two writers
/// inserting the same document, which reloading settles. A duplicate in any
/// other unique index is the data's own, and writing again changes nothing.
fn is_duplicate_id(error: &mongodb::error::Error) -> bool {
    let errors = write_errors(error);
    !errors.is_empty()
        && errors
            .iter()
            .all(|(code, message)| *code == 11000 && message.contains("index: _id_ "))
}

/// The per-document write errors of a failed write, of whatever kind:
/// their codes and messages.
fn write_errors(error: &mongodb::error::Error) -> Vec<(i32, &str)> {
    use mongodb::error::{ErrorKind, WriteFailure};
    match error.kind.as_ref() {
        ErrorKind::BulkWrite(bulk) => bulk
            .write_errors
            .values()
            .map(|e| (e.code, e.message.as_str()))
            .collect(),
        ErrorKind::InsertMany(many) => many
            .write_errors
            .iter()
            .flatten()
            .map(|e| (e.code, e.message.as_str()))
            .collect(),
        ErrorKind::Write(WriteFailure::WriteError(e)) => vec![(e.code, e.message.as_str())],
        _ => Vec::new(),
    }
}

/// Whether `error` is about reaching MongoDB rather than about what was
/// written (see [`StoreError::is_transient`]).
fn mongo_transient(error: &mongodb::error::Error) -> bool {
    use mongodb::error::{ErrorKind, WriteFailure};
    if error.contains_label("RetryableWriteError")
        || error.contains_label("TransientTransactionError")
    {
        return true;
    }
    // Not primary, shutting down, interrupted, out of time, write concern
    // not met in time.
    let transient_code = |code: i32| {
        matches!(
            code,
            6 | 7 | 50 | 64 | 89 | 91 | 189 | 262 | 9001 | 10107 | 11600 | 11602 | 13435 | 13436
        )
    };
    let here = match error.kind.as_ref() {
        ErrorKind::Io(_)
        | ErrorKind::ConnectionPoolCleared { .. }
        | ErrorKind::ServerSelection { .. }
        | ErrorKind::Shutdown => true,
        ErrorKind::Command(e) => transient_code(e.code),
        ErrorKind::Write(WriteFailure::WriteConcernError(e)) => transient_code(e.code),
        // Only the write concern failed: every document was written.
        ErrorKind::BulkWrite(bulk) => {
            bulk.write_errors.is_empty()
                && bulk
                    .write_concern_errors
                    .iter()
                    .all(|e| transient_code(e.code))
        }
        ErrorKind::InsertMany(many) => {
            many.write_errors.as_ref().is_none_or(Vec::is_empty)
                && many
                    .write_concern_error
                    .as_ref()
                    .is_some_and(|e| transient_code(e.code))
        }
        _ => false,
    };
    here || std::error::Error::source(error)
        .and_then(|source| source.downcast_ref::<mongodb::error::Error>())
        .is_some_and(mongo_transient)
}
