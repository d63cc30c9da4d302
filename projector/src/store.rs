//! The read models in MongoDB: generations of collections, and writing a
//! batch of events into one generation.
//!
//! A batch is applied as: load every document it touches (one `$in` query
//! per collection), fold the events in memory with the domain's read-model
//! rules, and write the changed documents back in one `bulkWrite`. Each
//! write is conditional on the version loaded, so two projector instances
//! overlapping during a rebalance cannot overwrite each other: the loser
//! reloads and folds again, and per-stream sequences make that idempotent.

use std::collections::BTreeMap;
use std::time::Duration;

use domain::read_model::{
    self, BookingDoc, Models, ShowDoc, Target, BOOKINGS, GENERATIONS, GENERATION_POINTER, SHOWS,
};
use domain::PublishedEvent;
use mongodb::bson::doc;
use mongodb::options::{ClientOptions, IndexOptions};
use mongodb::{Client, Collection, Database, IndexModel};
use serde::{Deserialize, Serialize};

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
}

/// Which generation the query side reads, and which one a replay builds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pointer {
    /// The generation answered from.
    pub current: u32,
    /// A generation being rebuilt, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub building: Option<u32>,
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

    fn pointers(&self) -> Collection<Pointer> {
        self.database.collection(GENERATIONS)
    }

    /// The generation pointer, created at generation 1 if there is none.
    ///
    /// # Errors
    /// MongoDB errors.
    pub async fn pointer(&self) -> Result<Pointer, StoreError> {
        self.pointers()
            .update_one(
                doc! { "_id": GENERATION_POINTER },
                doc! { "$setOnInsert": { "current": 1 } },
            )
            .upsert(true)
            .await?;
        let pointer = self
            .pointers()
            .find_one(doc! { "_id": GENERATION_POINTER })
            .await?;
        Ok(pointer.unwrap_or(Pointer {
            current: 1,
            building: None,
        }))
    }

    /// Records that `generation` is being built.
    ///
    /// # Errors
    /// MongoDB errors.
    pub async fn start_building(&self, generation: u32) -> Result<(), StoreError> {
        self.pointers()
            .update_one(
                doc! { "_id": GENERATION_POINTER },
                doc! { "$set": { "building": generation } },
            )
            .await?;
        Ok(())
    }

    /// Points the query side at `generation`, in one write.
    ///
    /// # Errors
    /// MongoDB errors.
    pub async fn switch_to(&self, generation: u32) -> Result<(), StoreError> {
        self.pointers()
            .update_one(
                doc! { "_id": GENERATION_POINTER },
                doc! { "$set": { "current": generation }, "$unset": { "building": "" } },
            )
            .await?;
        Ok(())
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
        let by_user = IndexModel::builder()
            .keys(doc! { "user_id": 1, "created_order": -1 })
            .options(IndexOptions::builder().name("by_user".to_owned()).build())
            .build();
        self.bookings(generation).create_index(by_user).await?;
        let by_start = IndexModel::builder()
            .keys(doc! { "starts_order": 1 })
            .options(IndexOptions::builder().name("by_start".to_owned()).build())
            .build();
        self.shows(generation).create_index(by_start).await?;
        Ok(())
    }

    /// Drops every collection of `generation`.
    ///
    /// # Errors
    /// MongoDB errors.
    pub async fn drop_generation(&self, generation: u32) -> Result<(), StoreError> {
        self.shows(generation).drop().await?;
        self.bookings(generation).drop().await?;
        Ok(())
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
            Err(error) if is_duplicate_key(&error) => Ok(None),
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

fn is_duplicate_key(error: &mongodb::error::Error) -> bool {
    use mongodb::error::ErrorKind;
    match error.kind.as_ref() {
        ErrorKind::BulkWrite(bulk) => bulk.write_errors.values().any(|e| e.code == 11000),
        ErrorKind::Write(mongodb::error::WriteFailure::WriteError(e)) => e.code == 11000,
        _ => false,
    }
}
