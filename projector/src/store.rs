//! The read models in MongoDB: generations of collections, and writing a
//! batch of events into one generation.
//!
//! A batch is applied as: load every document it touches (one `$in` query
//! per collection), fold the events in memory with the domain's read-model
//! rules, and write the changed documents back in one `bulkWrite`. Each
//! write is conditional on the version loaded, so two projector instances
//! overlapping during a rebalance cannot overwrite each other: the loser
//! reloads and folds again, and per-stream sequences make that idempotent.
//!
//! A write MongoDB refuses for good (a document over its size limit, say)
//! must not stop every show: the batch is then applied show by show, and
//! the events of a show that still fails are parked in `g{n}_parked` with
//! the reason, together with every later event of that show, while the
//! others go on (see [`ReadStore::apply_parking`]).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use domain::read_model::{self, BookingDoc, Models, ShowDoc, Target, BOOKINGS, SHOWS};
use domain::PublishedEvent;
use mongodb::bson::{doc, DateTime, Document};
use mongodb::options::{ClientOptions, IndexOptions};
use mongodb::{Client, Collection, Database, IndexModel};

use crate::generations::Generations;

/// Collection (per generation) of parked events.
pub const PARKED: &str = "parked";

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
            Self::Busy(_) => false,
        }
    }
}

/// What applying a batch did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Applied {
    /// Events that changed a document.
    pub changed: usize,
    /// Events already applied before (duplicates, replays).
    pub skipped: usize,
    /// Events that contradict the read models (logged, left out).
    pub rejected: usize,
    /// Documents written.
    pub written: usize,
    /// Events parked (their show could not be written, or an earlier
    /// event of it was parked).
    pub parked: usize,
}

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
    database: Database,
}

const MAX_ATTEMPTS: u32 = 8;

impl ReadStore {
    /// Connects (lazily) to `uri`, database `name`. Operations give up after
    /// `timeout` without a server.
    ///
    /// # Errors
    /// A malformed URI.
    pub async fn connect(uri: &str, name: &str, timeout: Duration) -> Result<Self, StoreError> {
        let mut options = ClientOptions::parse(uri).await?;
        options.server_selection_timeout = Some(timeout);
        options.connect_timeout = Some(timeout);
        let client = Client::with_options(options)?;
        let database = client.database(name);
        Ok(Self { client, database })
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
        Ok(())
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
        self.bookings(generation).drop().await?;
        self.parked(generation).drop().await?;
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
        let (held_back, rest): (Vec<&Received>, Vec<&Received>) = received
            .iter()
            .partition(|r| parked_shows.contains(&r.event.show_id.to_string()));
        let mut applied = Applied::default();
        if !held_back.is_empty() {
            self.park(
                generation,
                &held_back,
                "an earlier event of this show is parked",
            )
            .await?;
            applied.parked += held_back.len();
        }
        let events: Vec<PublishedEvent> = rest.iter().map(|r| r.event.clone()).collect();
        let error = match self.apply(generation, &events).await {
            Ok(done) => return Ok(add(applied, done)),
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
                Ok(done) => applied = add(applied, done),
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
                    "_id": format!("{}:{}", r.partition, r.offset),
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
    ) -> Result<(), StoreError> {
        let parked = doc! {
            "_id": format!("{partition}:{offset}"),
            "partition": partition,
            "offset": offset,
            "reason": reason,
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
            let mut models = loaded.clone();
            let mut applied = Applied::default();
            for event in events {
                match models.apply(event) {
                    Ok(true) => applied.changed += 1,
                    Ok(false) => applied.skipped += 1,
                    // Retrying cannot mend a log that contradicts itself;
                    // stopping would starve every other show of updates.
                    Err(error) => {
                        applied.rejected += 1;
                        tracing::error!(%error, position = event.global_position, "event left out of the read models");
                    }
                }
            }
            match self.write(generation, &loaded, models).await? {
                Some(written) => {
                    applied.written = written;
                    return Ok(applied);
                }
                None => continue,
            }
        }
        Err(StoreError::Contended(MAX_ATTEMPTS))
    }

    /// Loads every document `events` touch.
    async fn load(&self, generation: u32, events: &[PublishedEvent]) -> Result<Models, StoreError> {
        let mut models = Models::default();
        for event in events {
            match read_model::target(event) {
                Target::Show(id) => {
                    models.shows.insert(id, None);
                }
                Target::Booking(id) => {
                    models.bookings.insert(id, None);
                }
            }
        }
        if !models.shows.is_empty() {
            let ids: Vec<&String> = models.shows.keys().collect();
            let mut cursor = self
                .shows(generation)
                .find(doc! { "_id": { "$in": ids } })
                .await?;
            let mut found = Vec::new();
            while cursor.advance().await? {
                found.push(cursor.deserialize_current()?);
            }
            for show in found {
                models.shows.insert(show.show_id.clone(), Some(show));
            }
        }
        if !models.bookings.is_empty() {
            let ids: Vec<&String> = models.bookings.keys().collect();
            let mut cursor = self
                .bookings(generation)
                .find(doc! { "_id": { "$in": ids } })
                .await?;
            let mut found = Vec::new();
            while cursor.advance().await? {
                found.push(cursor.deserialize_current()?);
            }
            for booking in found {
                models
                    .bookings
                    .insert(booking.booking_id.clone(), Some(booking));
            }
        }
        Ok(models)
    }

    /// Writes what changed between `loaded` and `models`. `None` when another
    /// writer changed one of the documents first (nothing to undo: each
    /// write that did land is one a retry would make anyway).
    async fn write(
        &self,
        generation: u32,
        loaded: &Models,
        models: Models,
    ) -> Result<Option<usize>, StoreError> {
        let shows = self.shows(generation);
        let bookings = self.bookings(generation);
        let mut writes = Vec::new();
        let mut replaced = 0_i64;
        let mut inserted = 0_i64;
        let changed_shows = changed(&loaded.shows, models.shows);
        let changed_bookings = changed(&loaded.bookings, models.bookings);
        for (before, mut show) in changed_shows {
            show.v = before.map_or(1, |v| v + 1);
            match before {
                Some(v) => {
                    replaced += 1;
                    writes.push(
                        shows
                            .replace_one_model(doc! { "_id": &show.show_id, "v": v }, &show)?
                            .into(),
                    );
                }
                None => {
                    inserted += 1;
                    writes.push(shows.insert_one_model(&show)?.into());
                }
            }
        }
        for (before, mut booking) in changed_bookings {
            booking.v = before.map_or(1, |v| v + 1);
            match before {
                Some(v) => {
                    replaced += 1;
                    writes.push(
                        bookings
                            .replace_one_model(
                                doc! { "_id": &booking.booking_id, "v": v },
                                &booking,
                            )?
                            .into(),
                    );
                }
                None => {
                    inserted += 1;
                    writes.push(bookings.insert_one_model(&booking)?.into());
                }
            }
        }
        if writes.is_empty() {
            return Ok(Some(0));
        }
        let count = writes.len();
        let written: Vec<mongodb::options::WriteModel> = writes;
        match self.client.bulk_write(written).ordered(false).await {
            Ok(result) if result.matched_count == replaced && result.inserted_count == inserted => {
                Ok(Some(count))
            }
            Ok(_) => Ok(None),
            // Another writer inserted the same document first: reload.
            Err(error) if is_duplicate_id(&error) => Ok(None),
            Err(error) => Err(error.into()),
        }
    }
}

/// The documents of `after` that differ from `before`, each with the version
/// it was loaded at (`None`: new).
fn changed<D: PartialEq + Versioned>(
    before: &BTreeMap<String, Option<D>>,
    after: BTreeMap<String, Option<D>>,
) -> Vec<(Option<i64>, D)> {
    after
        .into_iter()
        .filter_map(|(id, doc)| {
            let doc = doc?;
            let loaded = before.get(&id).and_then(Option::as_ref);
            match loaded {
                Some(old) if *old == doc => None,
                Some(old) => Some((Some(old.version()), doc)),
                None => Some((None, doc)),
            }
        })
        .collect()
}

trait Versioned {
    fn version(&self) -> i64;
}

impl Versioned for ShowDoc {
    fn version(&self) -> i64 {
        self.v
    }
}

impl Versioned for BookingDoc {
    fn version(&self) -> i64 {
        self.v
    }
}

fn add(mut total: Applied, more: Applied) -> Applied {
    total.changed += more.changed;
    total.skipped += more.skipped;
    total.rejected += more.rejected;
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
