//! Waiting for a consistency token without each request polling MongoDB.
//!
//! A read that sends `X-Consistency-Token` waits until the documents it
//! reads hold the write's sequences. Each document being waited for has one
//! watcher in this process: a task that reads just the fields its waiters
//! need (the union of them) every [`POLL`], from whatever generation is
//! current at that moment, and hands the result to every waiter at once.
//! A thousand buyers waiting on one show cost one small read per poll, not
//! a thousand; the watcher ends with its last waiter. The number of waiters
//! is capped (`CONSISTENCY_MAX_WAITERS`); beyond it a read is a 503.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mongodb::bson::{doc, Document};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::problem::QueryError;
use crate::startup::Reads;

/// How often a watcher reads its document.
pub const POLL: Duration = Duration::from_millis(20);

/// Which document is waited for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Watched {
    /// A show document, by show id.
    Show(String),
    /// A block of seats, by block id.
    Block(String),
    /// A booking document, by booking id.
    Booking(String),
}

/// What a watcher last saw.
#[derive(Debug, Clone)]
enum Seen {
    /// Nothing yet.
    Nothing,
    /// The document's watched fields (`None`: no such document yet).
    Found(Option<Arc<Document>>),
    /// The read failed; the next poll tries again.
    Failed(String),
}

struct Watcher {
    /// Fields wanted, with how many waiters want each.
    fields: HashMap<String, usize>,
    waiters: usize,
    seen: watch::Sender<Seen>,
}

/// The watchers of one process.
#[derive(Clone)]
pub struct Waits {
    watchers: Arc<Mutex<HashMap<Watched, Watcher>>>,
    waiting: Arc<AtomicUsize>,
    max_waiters: usize,
}

impl std::fmt::Debug for Waits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Waits")
            .field("waiting", &self.waiting.load(Ordering::Relaxed))
            .field("max_waiters", &self.max_waiters)
            .finish_non_exhaustive()
    }
}

/// A waiter's registration, undone when dropped.
struct Registered {
    waits: Waits,
    watched: Watched,
    fields: Vec<String>,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.waits.waiting.fetch_sub(1, Ordering::Relaxed);
        let Ok(mut watchers) = self.waits.watchers.lock() else {
            return;
        };
        if let Some(watcher) = watchers.get_mut(&self.watched) {
            watcher.waiters = watcher.waiters.saturating_sub(1);
            for field in &self.fields {
                if let Some(count) = watcher.fields.get_mut(field) {
                    *count = count.saturating_sub(1);
                    if *count == 0 {
                        watcher.fields.remove(field);
                    }
                }
            }
        }
    }
}

impl Waits {
    /// No watchers yet; at most `max_waiters` waiting at once.
    pub fn new(max_waiters: usize) -> Self {
        Self {
            watchers: Arc::default(),
            waiting: Arc::default(),
            max_waiters,
        }
    }

    /// Requests waiting now.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    /// Waits until `reached` holds of `watched`'s `fields` (as read from the
    /// current generation), or until `deadline`.
    ///
    /// # Errors
    /// [`QueryError::Busy`] over the cap; [`QueryError::NotYetConsistent`]
    /// at the deadline, or [`QueryError::Unavailable`] if the last reads
    /// failed.
    pub async fn until(
        &self,
        reads: &Reads,
        watched: Watched,
        fields: Vec<String>,
        deadline: Instant,
        reached: impl Fn(Option<&Document>) -> bool,
    ) -> Result<(), QueryError> {
        if self.waiting.fetch_add(1, Ordering::Relaxed) >= self.max_waiters {
            self.waiting.fetch_sub(1, Ordering::Relaxed);
            return Err(QueryError::Busy);
        }
        let (registered, mut seen) = match self.register(reads, watched, fields) {
            Ok(registered) => registered,
            Err(error) => {
                self.waiting.fetch_sub(1, Ordering::Relaxed);
                return Err(error);
            }
        };
        let mut last_failure = None;
        loop {
            match &*seen.borrow_and_update() {
                Seen::Found(document) => {
                    last_failure = None;
                    if reached(document.as_deref()) {
                        drop(registered);
                        return Ok(());
                    }
                }
                Seen::Failed(error) => last_failure = Some(error.clone()),
                Seen::Nothing => {}
            }
            match tokio::time::timeout_at(deadline, seen.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => {
                    return Err(QueryError::Unavailable(
                        "the watcher of the document stopped".to_owned(),
                    ))
                }
                Err(_) => {
                    return Err(match last_failure {
                        Some(error) => QueryError::Unavailable(error),
                        None => {
                            QueryError::NotYetConsistent(reads.consistency_wait.as_secs().max(1))
                        }
                    })
                }
            }
        }
    }

    fn register(
        &self,
        reads: &Reads,
        watched: Watched,
        fields: Vec<String>,
    ) -> Result<(Registered, watch::Receiver<Seen>), QueryError> {
        let mut watchers = self
            .watchers
            .lock()
            .map_err(|_| QueryError::Unavailable("the watchers are poisoned".to_owned()))?;
        let watcher = watchers.entry(watched.clone()).or_insert_with(|| {
            let (seen, _) = watch::channel(Seen::Nothing);
            tokio::spawn(watch_document(self.clone(), reads.clone(), watched.clone()));
            Watcher {
                fields: HashMap::new(),
                waiters: 0,
                seen,
            }
        });
        watcher.waiters += 1;
        for field in &fields {
            *watcher.fields.entry(field.clone()).or_default() += 1;
        }
        let receiver = watcher.seen.subscribe();
        Ok((
            Registered {
                waits: self.clone(),
                watched,
                fields,
            },
            receiver,
        ))
    }

    /// The fields to read for `watched`; `None` (and the watcher removed)
    /// once nobody waits.
    fn wanted(&self, watched: &Watched) -> Option<Vec<String>> {
        let mut watchers = self.watchers.lock().ok()?;
        let watcher = watchers.get(watched)?;
        if watcher.waiters == 0 {
            watchers.remove(watched);
            return None;
        }
        Some(watcher.fields.keys().cloned().collect())
    }

    fn publish(&self, watched: &Watched, seen: Seen) {
        if let Ok(watchers) = self.watchers.lock() {
            if let Some(watcher) = watchers.get(watched) {
                watcher.seen.send_replace(seen);
            }
        }
    }
}

/// The watcher of one document: reads the wanted fields every [`POLL`]
/// until nobody waits.
async fn watch_document(waits: Waits, reads: Reads, watched: Watched) {
    while let Some(fields) = waits.wanted(&watched) {
        let seen = match read_fields(&reads, &watched, &fields).await {
            Ok(document) => Seen::Found(document.map(Arc::new)),
            Err(error) => Seen::Failed(error.to_string()),
        };
        waits.publish(&watched, seen);
        tokio::time::sleep(POLL).await;
    }
}

async fn read_fields(
    reads: &Reads,
    watched: &Watched,
    fields: &[String],
) -> Result<Option<Document>, QueryError> {
    let generation = reads.generation()?;
    let mut projection = doc! { "_id": 1 };
    for field in fields {
        projection.insert(field.clone(), 1);
    }
    let (collection, id) = match watched {
        Watched::Show(id) => (reads.shows(generation).clone_with_type::<Document>(), id),
        Watched::Block(id) => (reads.blocks(generation).clone_with_type::<Document>(), id),
        Watched::Booking(id) => (reads.bookings(generation).clone_with_type::<Document>(), id),
    };
    reads
        .bounded(
            collection
                .find_one(doc! { "_id": id.as_str() })
                .projection(projection),
        )
        .await
}
