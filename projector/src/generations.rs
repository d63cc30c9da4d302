//! Who may write which read-model generation, and how far each has got.
//!
//! All of it lives in MongoDB, next to the read models, so that it is
//! wiped, backed up and restored together with them:
//!
//! - the pointer document (`read_model_generations`, `_id: "current"`):
//!   the generation the query side reads (`current`), the one a replay is
//!   building (`building`, a claim with an expiry, `ready` once built), the
//!   one the last switch left behind (`previous`, kept for a grace period),
//!   and the live projector's lease (`lease`: holder, fencing `epoch`,
//!   expiry). Only the lease holder switches generations, with one
//!   conditional update that also checks the claim and the lease;
//! - one offsets document per generation (`read_model_offsets`,
//!   `_id: "g{n}"`): the next Kafka offset of every partition whose events
//!   the generation holds, and the epoch of the writer that saved them.
//!   Saving is fenced (a writer whose epoch is below the stored one changes
//!   nothing) and monotonic (`$max` per partition), so two projectors, or a
//!   paused one waking up, can never move a generation's offsets back or
//!   past events it does not hold.
//!
//! Times are the projectors' own clocks: the lease expires `LEASE_TTL` after
//! it was last renewed, and a standby takes over once it has expired. Hosts
//! whose clocks disagree by more than that could both think they hold it;
//! the epoch still keeps the offsets right.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use domain::read_model::{self, GENERATIONS, GENERATION_POINTER, OFFSETS, UNPARKS};
use mongodb::bson::{doc, Bson, DateTime, Document};
use mongodb::options::ReturnDocument;
use mongodb::{Collection, Database};

use crate::store::StoreError;

/// How long a lease or a replay's claim lasts unless renewed.
pub const LEASE_TTL: Duration = Duration::from_secs(5);

/// How often a holder renews its lease or claim.
pub const RENEW_EVERY: Duration = Duration::from_secs(1);

/// The pointer document, as far as a writer needs it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pointer {
    /// The generation the query side reads.
    pub current: u32,
    /// A generation a replay builds.
    pub building: Option<Building>,
    /// The generation the last switch replaced, until it is dropped.
    pub previous: Option<Previous>,
    /// The live projector's lease.
    pub lease: Option<Lease>,
}

/// A replay's claim on the next generation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Building {
    /// The generation being built.
    pub generation: u32,
    /// Who builds it.
    pub claim: String,
    /// When the claim lapses unless renewed.
    pub until: DateTime,
    /// Whether it is built and caught up, waiting for the switch.
    pub ready: bool,
    /// How long the generation it replaces is kept after the switch.
    pub keep: Duration,
}

/// The generation a switch replaced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Previous {
    /// Its number.
    pub generation: u32,
    /// When requests that might still read it have certainly finished.
    pub keep_until: DateTime,
}

/// The live projector's lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// Who holds it.
    pub holder: String,
    /// Fencing epoch: raised by every take-over.
    pub epoch: i64,
    /// When it lapses unless renewed.
    pub until: DateTime,
}

/// A generation's progress through the topic.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Offsets {
    /// Epoch of the last writer.
    pub epoch: i64,
    /// Next offset per partition.
    pub next: BTreeMap<i32, i64>,
    /// Shows whose events are parked (see [`crate::store`]): every later
    /// event of theirs is parked too, so that none is applied out of order.
    pub parked_shows: BTreeSet<String>,
    /// How many times the document was saved: each save expects the count
    /// its writer last saw, so a document restored from a backup, or saved
    /// by anyone else, sends the writer back to what MongoDB holds.
    pub saves: i64,
}

/// The part of a save's filter that expects `saves` saves before it.
fn saves_filter(saves: i64) -> Document {
    if saves == 0 {
        // Documents of an older release kept no count.
        doc! { "$or": [ { "saves": 0_i64 }, { "saves": { "$exists": false } } ] }
    } else {
        doc! { "saves": saves }
    }
}

/// What saving offsets found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Saved {
    /// Saved; the document's save count is now this.
    Saved(i64),
    /// A writer with a higher epoch saved them: this one must stop.
    Fenced,
    /// The document is gone (the database was wiped): start over from what
    /// MongoDB holds.
    Vanished,
    /// The document is not the one this writer last saw (restored from a
    /// backup, or saved by another): start over from what MongoDB holds.
    Moved,
}

/// The generations' bookkeeping in one database.
#[derive(Debug, Clone)]
pub struct Generations {
    database: Database,
}

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

fn later(duration: Duration) -> DateTime {
    DateTime::from_millis(
        DateTime::now()
            .timestamp_millis()
            .saturating_add(millis(duration)),
    )
}

fn generation_of(value: Option<&Bson>) -> Option<u32> {
    mongodb::bson::from_bson::<read_model::GenerationNumber>(value?.clone())
        .ok()
        .map(|n| n.0)
}

fn int_of(value: Option<&Bson>) -> Option<i64> {
    match value? {
        Bson::Int32(n) => Some(i64::from(*n)),
        Bson::Int64(n) => Some(*n),
        _ => None,
    }
}

impl Pointer {
    /// Reads the stored document; tolerant of the shape older releases
    /// wrote (`building` as a bare number: a replay of an older build,
    /// treated as a lapsed claim).
    pub fn of(document: &Document) -> Self {
        let building = document.get_document("building").ok().and_then(|b| {
            Some(Building {
                generation: generation_of(b.get("generation"))?,
                claim: b.get_str("claim").ok()?.to_owned(),
                until: *b.get_datetime("until").ok()?,
                ready: b.get_bool("ready").unwrap_or(false),
                keep: Duration::from_millis(
                    int_of(b.get("keep_ms"))
                        .and_then(|ms| u64::try_from(ms).ok())
                        .unwrap_or(30_000),
                ),
            })
        });
        let building = building.or_else(|| {
            generation_of(document.get("building")).map(|generation| Building {
                generation,
                claim: String::new(),
                until: DateTime::MIN,
                ready: false,
                keep: Duration::ZERO,
            })
        });
        let previous = document.get_document("previous").ok().and_then(|p| {
            Some(Previous {
                generation: generation_of(p.get("generation"))?,
                keep_until: *p.get_datetime("keep_until").ok()?,
            })
        });
        let lease = document.get_document("lease").ok().and_then(|l| {
            Some(Lease {
                holder: l.get_str("holder").ok()?.to_owned(),
                epoch: int_of(l.get("epoch"))?,
                until: *l.get_datetime("until").ok()?,
            })
        });
        Self {
            current: generation_of(document.get("current")).unwrap_or(1),
            building,
            previous,
            lease,
        }
    }

    /// Whether a live projector holds the lease now.
    pub fn leased(&self) -> bool {
        self.lease
            .as_ref()
            .is_some_and(|lease| lease.until > DateTime::now())
    }
}

impl Generations {
    /// The bookkeeping of `database`.
    pub fn new(database: Database) -> Self {
        Self { database }
    }

    fn pointers(&self) -> Collection<Document> {
        self.database.collection(GENERATIONS)
    }

    fn offsets(&self) -> Collection<Document> {
        self.database.collection(OFFSETS)
    }

    fn unparks(&self) -> Collection<Document> {
        self.database.collection(UNPARKS)
    }

    /// Asks the live projector of `generation` to apply its parked events
    /// again; the request's id, to wait for with [`Generations::unpark_done`].
    ///
    /// # Errors
    /// MongoDB errors.
    pub async fn request_unpark(&self, generation: u32) -> Result<String, StoreError> {
        let id = uuid::Uuid::new_v4().to_string();
        self.unparks()
            .insert_one(doc! {
                "_id": &id, "generation": i64::from(generation),
                "requested_at": DateTime::now(), "done_at": Bson::Null,
            })
            .await?;
        Ok(id)
    }

    /// The unparks of `generation` that wait to be carried out.
    ///
    /// # Errors
    /// MongoDB errors.
    pub async fn pending_unparks(&self, generation: u32) -> Result<Vec<String>, StoreError> {
        let mut cursor = self
            .unparks()
            .find(doc! { "generation": i64::from(generation), "done_at": Bson::Null })
            .await?;
        let mut ids = Vec::new();
        while cursor.advance().await? {
            if let Ok(id) = cursor.current().get_str("_id") {
                ids.push(id.to_owned());
            }
        }
        Ok(ids)
    }

    /// Answers the unpark requests `ids` with `outcome`.
    ///
    /// # Errors
    /// MongoDB errors.
    pub async fn finish_unparks(
        &self,
        ids: &[String],
        outcome: Document,
    ) -> Result<(), StoreError> {
        let mut done = outcome;
        done.insert("done_at", DateTime::now());
        self.unparks()
            .update_many(doc! { "_id": { "$in": ids } }, doc! { "$set": done })
            .await?;
        // Answers are read by the `projector unpark` waiting for them, within
        // minutes: a day later they are only clutter.
        let day_ago = DateTime::from_millis(DateTime::now().timestamp_millis() - 86_400_000);
        self.unparks()
            .delete_many(doc! { "done_at": { "$lt": day_ago } })
            .await?;
        Ok(())
    }

    /// The outcome of unpark request `id` once carried out, else `None`.
    ///
    /// # Errors
    /// MongoDB errors.
    pub async fn unpark_done(&self, id: &str) -> Result<Option<Document>, StoreError> {
        Ok(self
            .unparks()
            .find_one(doc! { "_id": id, "done_at": { "$ne": Bson::Null } })
            .await?)
    }

    /// Saves `parked_shows` as the whole set of `generation`'s parked
    /// shows (after an unpark took some off), as the writer of `epoch`
    /// that saw `saves` saves; fenced and counted like
    /// [`Generations::save_offsets`].
    ///
    /// # Errors
    /// MongoDB errors.
    pub async fn save_parked_shows(
        &self,
        generation: u32,
        epoch: i64,
        parked_shows: &BTreeSet<String>,
        saves: i64,
    ) -> Result<Saved, StoreError> {
        let shows: Vec<&String> = parked_shows.iter().collect();
        let mut filter = doc! { "_id": offsets_id(generation), "epoch": { "$lte": epoch } };
        filter.extend(saves_filter(saves));
        let result = self
            .offsets()
            .update_one(
                filter,
                doc! { "$set": { "epoch": epoch, "parked_shows": shows },
                "$inc": { "saves": 1_i64 } },
            )
            .await?;
        if result.matched_count == 1 {
            return Ok(Saved::Saved(saves + 1));
        }
        self.why_not_saved(generation, epoch).await
    }

    /// The pointer, created at generation 1 when there is none.
    ///
    /// # Errors
    /// MongoDB errors.
    pub async fn pointer(&self) -> Result<Pointer, StoreError> {
        let pointers = self.pointers();
        if let Some(found) = pointers
            .find_one(doc! { "_id": GENERATION_POINTER })
            .await?
        {
            return Ok(Pointer::of(&found));
        }
        let document = pointers
            .find_one_and_update(
                doc! { "_id": GENERATION_POINTER },
                doc! { "$setOnInsert": { "current": 1_i64 } },
            )
            .upsert(true)
            .return_document(ReturnDocument::After)
            .await?;
        Ok(document.as_ref().map(Pointer::of).unwrap_or(Pointer {
            current: 1,
            ..Pointer::default()
        }))
    }

    /// Takes the live projector's lease for `holder` if nobody holds it
    /// (or it lapsed), with an epoch above every earlier one. `None` while
    /// another holds it.
    ///
    /// # Errors
    /// MongoDB errors.
    pub async fn take_lease(&self, holder: &str) -> Result<Option<Lease>, StoreError> {
        self.pointer().await?;
        let now = DateTime::now();
        let taken = self
            .pointers()
            .find_one_and_update(
                doc! { "_id": GENERATION_POINTER,
                "$or": [ { "lease": { "$exists": false } },
                         { "lease.until": { "$lt": now } } ] },
                doc! { "$set": { "lease.holder": holder, "lease.until": later(LEASE_TTL) },
                "$inc": { "lease.epoch": 1_i64 } },
            )
            .return_document(ReturnDocument::After)
            .await?;
        let Some(lease) = taken.and_then(|d| Pointer::of(&d).lease) else {
            return Ok(None);
        };
        // A pointer re-created after a wipe starts its epochs again, while
        // offsets saved in between may carry higher ones: the new epoch
        // must be above every epoch any offsets carry, or it would be
        // fenced out of them.
        let floor = self.highest_epoch().await?;
        if lease.epoch > floor {
            return Ok(Some(lease));
        }
        let raised = self
            .pointers()
            .find_one_and_update(
                doc! { "_id": GENERATION_POINTER, "lease.holder": holder,
                "lease.epoch": lease.epoch },
                doc! { "$set": { "lease.epoch": floor + 1 } },
            )
            .return_document(ReturnDocument::After)
            .await?;
        Ok(raised.and_then(|d| Pointer::of(&d).lease))
    }

    /// The highest epoch of any offsets document.
    async fn highest_epoch(&self) -> Result<i64, StoreError> {
        let highest = self
            .offsets()
            .find_one(doc! {})
            .sort(doc! { "epoch": -1 })
            .projection(doc! { "epoch": 1 })
            .await?;
        Ok(highest.and_then(|d| int_of(d.get("epoch"))).unwrap_or(0))
    }

    /// Renews `lease`. False when it was lost (taken over, or the pointer
    /// is gone).
    ///
    /// # Errors
    /// MongoDB errors.
    pub async fn renew_lease(&self, lease: &Lease) -> Result<bool, StoreError> {
        let renewed = self
            .pointers()
            .update_one(
                doc! { "_id": GENERATION_POINTER, "lease.holder": &lease.holder,
                "lease.epoch": lease.epoch },
                doc! { "$set": { "lease.until": later(LEASE_TTL) } },
            )
            .await?;
        Ok(renewed.matched_count == 1)
    }

    /// Gives `lease` up, so that a standby takes over at once.
    ///
    /// # Errors
    /// MongoDB errors.
    pub async fn release_lease(&self, lease: &Lease) -> Result<(), StoreError> {
        self.pointers()
            .update_one(
                doc! { "_id": GENERATION_POINTER, "lease.holder": &lease.holder,
                "lease.epoch": lease.epoch },
                // The epoch's first moment: long past, and a date every
                // server can store.
                doc! { "$set": { "lease.until": DateTime::from_millis(0) } },
            )
            .await?;
        Ok(())
    }

    /// Claims the building slot for `claim`: the next generation, above
    /// every one that exists, whose predecessor is to be kept `keep` after
    /// the switch. `Err(StoreError::Busy)` while another replay's claim is
    /// in force.
    ///
    /// # Errors
    /// [`StoreError::Busy`], MongoDB errors.
    pub async fn claim_building(
        &self,
        claim: &str,
        keep: Duration,
    ) -> Result<(Pointer, u32), StoreError> {
        let pointer = self.pointer().await?;
        if let Some(building) = &pointer.building {
            if building.until > DateTime::now() {
                return Err(StoreError::Busy(format!(
                    "another replay is building generation {} (its claim runs until {})",
                    building.generation,
                    building.until.try_to_rfc3339_string().unwrap_or_default()
                )));
            }
        }
        let highest = self.highest_generation().await?;
        let generation = [
            pointer.current,
            pointer.building.as_ref().map_or(0, |b| b.generation),
            pointer.previous.as_ref().map_or(0, |p| p.generation),
            highest,
        ]
        .into_iter()
        .max()
        .unwrap_or(0)
            + 1;
        let now = DateTime::now();
        let claimed = self
            .pointers()
            .update_one(
                doc! { "_id": GENERATION_POINTER, "current": i64::from(pointer.current),
                "$or": [ { "building": { "$exists": false } },
                         { "building": { "$type": "number" } },
                         { "building.until": { "$lt": now } } ] },
                doc! { "$set": { "building": { "generation": i64::from(generation), "claim": claim,
                "until": later(LEASE_TTL), "ready": false,
                "keep_ms": millis(keep) } } },
            )
            .await?;
        if claimed.matched_count != 1 {
            return Err(StoreError::Busy(
                "another replay claimed the next generation first".to_owned(),
            ));
        }
        Ok((pointer, generation))
    }

    /// Renews a building claim; `ready` marks the generation built. False
    /// when the claim was lost.
    ///
    /// # Errors
    /// MongoDB errors.
    pub async fn renew_claim(&self, claim: &str, ready: bool) -> Result<bool, StoreError> {
        let mut set = doc! { "building.until": later(LEASE_TTL) };
        if ready {
            set.insert("building.ready", true);
        }
        let renewed = self
            .pointers()
            .update_one(
                doc! { "_id": GENERATION_POINTER, "building.claim": claim },
                doc! { "$set": set },
            )
            .await?;
        Ok(renewed.matched_count == 1)
    }

    /// Gives a claim up (a replay that failed), leaving `current` as it is.
    /// Whether the claim was still there to give up: once it is gone no
    /// switch to its generation can happen; if it was not, a switch may
    /// have consumed it.
    ///
    /// # Errors
    /// MongoDB errors.
    pub async fn abandon_claim(&self, claim: &str) -> Result<bool, StoreError> {
        let abandoned = self
            .pointers()
            .update_one(
                doc! { "_id": GENERATION_POINTER, "building.claim": claim },
                doc! { "$unset": { "building": "" } },
            )
            .await?;
        Ok(abandoned.matched_count == 1)
    }

    /// Points the query side from `from` to `to`, if `to` is the ready
    /// generation being built and `lease` is still held. `keep` is how long
    /// `from` must outlive the switch. Whether it switched.
    ///
    /// # Errors
    /// MongoDB errors.
    pub async fn switch(
        &self,
        from: u32,
        to: u32,
        lease: &Lease,
        keep: Duration,
    ) -> Result<bool, StoreError> {
        let switched = self
            .pointers()
            .update_one(
                doc! { "_id": GENERATION_POINTER, "current": i64::from(from),
                "building.generation": i64::from(to), "building.ready": true,
                "lease.holder": &lease.holder, "lease.epoch": lease.epoch },
                doc! { "$set": { "current": i64::from(to),
                          "previous": { "generation": i64::from(from),
                                        "keep_until": later(keep) } },
                "$unset": { "building": "" } },
            )
            .await?;
        Ok(switched.matched_count == 1)
    }

    /// Forgets `previous` once it is dropped.
    ///
    /// # Errors
    /// MongoDB errors.
    pub async fn forget_previous(&self, generation: u32) -> Result<(), StoreError> {
        self.pointers()
            .update_one(
                doc! { "_id": GENERATION_POINTER, "previous.generation": i64::from(generation) },
                doc! { "$unset": { "previous": "" } },
            )
            .await?;
        Ok(())
    }

    /// The highest generation number among the read-model collections.
    ///
    /// # Errors
    /// MongoDB errors.
    pub async fn highest_generation(&self) -> Result<u32, StoreError> {
        Ok(self
            .existing_generations()
            .await?
            .into_iter()
            .max()
            .unwrap_or(0))
    }

    /// Every generation some collection belongs to.
    ///
    /// # Errors
    /// MongoDB errors.
    pub async fn existing_generations(&self) -> Result<BTreeSet<u32>, StoreError> {
        let names = self.database.list_collection_names().await?;
        Ok(names
            .iter()
            .filter_map(|name| read_model::generation_of_collection(name))
            .collect())
    }

    /// The offsets of `generation`, if it has any.
    ///
    /// # Errors
    /// MongoDB errors.
    pub async fn offsets_of(&self, generation: u32) -> Result<Option<Offsets>, StoreError> {
        let found = self
            .offsets()
            .find_one(doc! { "_id": offsets_id(generation) })
            .await?;
        Ok(found.map(|document| {
            let next = document
                .get_document("next")
                .map(|next| {
                    next.iter()
                        .filter_map(|(partition, offset)| {
                            Some((partition.parse().ok()?, int_of(Some(offset))?))
                        })
                        .collect()
                })
                .unwrap_or_default();
            let parked_shows = document
                .get_array("parked_shows")
                .map(|shows| {
                    shows
                        .iter()
                        .filter_map(|s| s.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default();
            Offsets {
                epoch: int_of(document.get("epoch")).unwrap_or(0),
                next,
                parked_shows,
                saves: int_of(document.get("saves")).unwrap_or(0),
            }
        }))
    }

    /// Saves `next` (and any newly parked shows) for `generation` as
    /// written by `epoch`, if the document is still the one its writer last
    /// saw (`saves`: its save count then; `None`: there was none, so it is
    /// created).
    ///
    /// # Errors
    /// MongoDB errors.
    pub async fn save_offsets(
        &self,
        generation: u32,
        epoch: i64,
        next: &BTreeMap<i32, i64>,
        parked_shows: &BTreeSet<String>,
        saves: Option<i64>,
    ) -> Result<Saved, StoreError> {
        let Some(saves) = saves else {
            let mut positions = Document::new();
            for (partition, offset) in next {
                positions.insert(partition.to_string(), *offset);
            }
            let created = doc! {
                "_id": offsets_id(generation), "epoch": epoch, "saves": 1_i64,
                "next": positions,
                "parked_shows": parked_shows.iter().collect::<Vec<_>>(),
            };
            return match self.offsets().insert_one(created).await {
                Ok(_) => Ok(Saved::Saved(1)),
                Err(error) if crate::store::is_duplicate_key(&error) => {
                    self.why_not_saved(generation, epoch).await
                }
                Err(error) => Err(error.into()),
            };
        };
        let mut max = Document::new();
        for (partition, offset) in next {
            max.insert(read_model::paths::next_offset(*partition), *offset);
        }
        let mut update = doc! { "$set": { "epoch": epoch }, "$inc": { "saves": 1_i64 } };
        if !max.is_empty() {
            update.insert("$max", max);
        }
        if !parked_shows.is_empty() {
            let shows: Vec<&String> = parked_shows.iter().collect();
            update.insert("$addToSet", doc! { "parked_shows": { "$each": shows } });
        }
        let mut filter = doc! { "_id": offsets_id(generation), "epoch": { "$lte": epoch } };
        filter.extend(saves_filter(saves));
        let result = self.offsets().update_one(filter, update).await?;
        if result.matched_count == 1 {
            return Ok(Saved::Saved(saves + 1));
        }
        self.why_not_saved(generation, epoch).await
    }

    async fn why_not_saved(&self, generation: u32, epoch: i64) -> Result<Saved, StoreError> {
        Ok(match self.offsets_of(generation).await? {
            None => Saved::Vanished,
            Some(found) if found.epoch > epoch => Saved::Fenced,
            Some(_) => Saved::Moved,
        })
    }

    /// Raises `generation`'s offsets to `epoch` without moving them, so that
    /// no writer of an older epoch, nor one that saw them before, can save
    /// them any more. False if a writer of a higher epoch saved them.
    ///
    /// # Errors
    /// MongoDB errors.
    pub async fn fence(&self, generation: u32, epoch: i64) -> Result<bool, StoreError> {
        let fenced = self
            .offsets()
            .update_one(
                doc! { "_id": offsets_id(generation), "epoch": { "$lte": epoch } },
                doc! { "$set": { "epoch": epoch }, "$inc": { "saves": 1_i64 } },
            )
            .await?;
        Ok(fenced.matched_count == 1 || self.offsets_of(generation).await?.is_none())
    }

    /// Forgets the offsets of a dropped generation.
    ///
    /// # Errors
    /// MongoDB errors.
    pub async fn drop_offsets(&self, generation: u32) -> Result<(), StoreError> {
        self.offsets()
            .delete_one(doc! { "_id": offsets_id(generation) })
            .await?;
        Ok(())
    }
}

/// `_id` of a generation's offsets document: its collections' prefix.
fn offsets_id(generation: u32) -> String {
    read_model::generation_prefix(generation)
}

#[cfg(test)]
mod tests {
    use mongodb::bson::doc;

    use super::{offsets_id, Pointer};

    #[test]
    fn pointers_of_older_releases_read_as_lapsed_claims() {
        let old = Pointer::of(&doc! { "_id": "current", "current": 3, "building": 4 });
        assert_eq!(old.current, 3);
        let building = old.building.clone().expect("the old claim");
        assert_eq!(building.generation, 4);
        assert!(building.until < mongodb::bson::DateTime::now());
        assert!(!old.leased());
        assert_eq!(offsets_id(12), "g12");
    }
}
