//! Subscribers of the show's live availability during the on-sale: each
//! keeps the seat map a browser would from `snapshot` and `change` events,
//! reconnects with `Last-Event-ID` when its stream ends, and notes when each
//! seat's changes arrive, so that the time from a booking's 201 to its
//! `change` can be measured.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use reqwest::StatusCode;
use serde_json::Value;
use uuid::Uuid;

use crate::Scenario;

/// What one subscriber saw.
#[derive(Debug, Default)]
pub struct Seen {
    /// Each seat's status, as the stream left it.
    pub seats: BTreeMap<String, String>,
    /// When each (seat, status) arrived, in order.
    pub arrivals: BTreeMap<(String, String), Vec<Instant>>,
    /// Streams opened after the first one.
    pub reconnects: u64,
    /// Whether a snapshot has been applied.
    pub ready: bool,
}

/// Every subscriber, and the switch that ends them.
pub struct Watchers {
    pub seen: Vec<Arc<Mutex<Seen>>>,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// Stream openings refused, summed over all subscribers.
    pub refused: Arc<AtomicU64>,
    http: reqwest::Client,
}

impl Watchers {
    /// No subscriber yet.
    pub fn new() -> anyhow::Result<Self> {
        Ok(Self {
            seen: Vec::new(),
            stop: Arc::new(AtomicBool::new(false)),
            tasks: Vec::new(),
            refused: Arc::new(AtomicU64::new(0)),
            http: reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(10))
                .pool_max_idle_per_host(0)
                .build()?,
        })
    }

    /// Opens `count` more subscribers of `show` and waits until each has
    /// its snapshot.
    ///
    /// # Errors
    /// When they are not all ready within a minute.
    pub async fn add(
        &mut self,
        scenario: &Scenario,
        show: &str,
        count: usize,
    ) -> anyhow::Result<()> {
        let url = format!("{}/shows/{show}/availability/stream", scenario.query_url);
        for _ in 0..count {
            let mine = Arc::new(Mutex::new(Seen::default()));
            // A token of its own: open reads without one share an address's
            // rate limit, and 1,000 watchers from one host would meet it.
            let token = scenario.token(Uuid::new_v4(), &[])?;
            self.tasks.push(tokio::spawn(watch(
                self.http.clone(),
                url.clone(),
                token,
                Arc::clone(&mine),
                Arc::clone(&self.stop),
                Arc::clone(&self.refused),
            )));
            self.seen.push(mine);
        }
        let started = Instant::now();
        while !self.seen.iter().all(|s| s.lock().is_ok_and(|s| s.ready)) {
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(60),
                "the subscribers did not all get a snapshot within a minute"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// Ends every subscriber.
    pub async fn close(self) {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            task.abort();
            let _ = task.await;
        }
    }
}

/// One subscriber: a stream, and another after it whenever it ends.
async fn watch(
    http: reqwest::Client,
    url: String,
    token: String,
    seen: Arc<Mutex<Seen>>,
    stop: Arc<AtomicBool>,
    refused: Arc<AtomicU64>,
) {
    let mut last_id: Option<String> = None;
    let mut first = true;
    while !stop.load(Ordering::Relaxed) {
        if !first {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        first = false;
        let mut request = http.get(&url).bearer_auth(&token);
        if let Some(id) = &last_id {
            request = request.header("Last-Event-ID", id);
        }
        let Ok(mut response) = request.send().await else {
            refused.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        if response.status() != StatusCode::OK {
            refused.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let mut buffer = String::new();
        while let Ok(Some(chunk)) = response.chunk().await {
            let arrived = Instant::now();
            buffer.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(end) = buffer.find("\n\n") {
                let block: String = buffer.drain(..end + 2).collect();
                if let Some(id) = apply(&block, &seen, arrived) {
                    last_id = Some(id);
                }
            }
        }
        // The stream ended (dropped for lag, or cut): reopened.
        if let Ok(mut seen) = seen.lock() {
            seen.reconnects += 1;
        }
    }
}

/// Applies one event; returns its id.
fn apply(block: &str, seen: &Mutex<Seen>, arrived: Instant) -> Option<String> {
    let (mut kind, mut id, mut data) = ("message", None, String::new());
    for line in block.lines() {
        if let Some(value) = line.strip_prefix("event:") {
            kind = value.trim_start();
        } else if let Some(value) = line.strip_prefix("id:") {
            id = Some(value.trim_start().to_owned());
        } else if let Some(value) = line.strip_prefix("data:") {
            data.push_str(value.trim_start());
        }
    }
    let body: Value = serde_json::from_str(&data).ok()?;
    let seats: BTreeMap<String, String> = serde_json::from_value(body["seats"].clone()).ok()?;
    let mut seen = seen.lock().ok()?;
    match kind {
        "snapshot" => {
            // A snapshot after a reconnection brings the changes missed
            // meanwhile: they arrive now.
            if seen.ready {
                for (label, status) in &seats {
                    if seen.seats.get(label) != Some(status) {
                        seen.arrivals
                            .entry((label.clone(), status.clone()))
                            .or_default()
                            .push(arrived);
                    }
                }
            }
            seen.seats = seats;
            seen.ready = true;
        }
        "change" => {
            for (label, status) in seats {
                seen.arrivals
                    .entry((label.clone(), status.clone()))
                    .or_default()
                    .push(arrived);
                seen.seats.insert(label, status);
            }
        }
        _ => return None,
    }
    id
}

/// The time from each 201 (`answered`, with the booking's seats and their
/// new status) to the first arrival of that state at each subscriber.
/// A state that arrived before the 201 was read (the client was slower than
/// the system) counts as 0; one that never arrived is returned apart.
pub fn latencies(
    watchers: &Watchers,
    answered: &[(Instant, Vec<String>, &'static str)],
) -> anyhow::Result<(Vec<Duration>, u64)> {
    let mut latencies = Vec::new();
    let mut missing = 0;
    for seen in &watchers.seen {
        let seen = seen.lock().ok().context("a subscriber panicked")?;
        for (at, seats, status) in answered {
            // All seats of a booking change in one write; the last of them
            // to arrive is when the buyer's whole booking shows.
            let mut latest = Duration::ZERO;
            let mut all = true;
            for seat in seats {
                // The arrival that belongs to this 201: the first of this
                // state after the seat last showed another one before the
                // 201 (an earlier arrival of the same state belonged to an
                // older booking of the seat, since released).
                let released = seen
                    .arrivals
                    .range((seat.clone(), String::new())..)
                    .take_while(|((label, _), _)| label == seat)
                    .filter(|((_, other), _)| other != status)
                    .flat_map(|(_, times)| times.iter().filter(|t| **t < *at))
                    .max();
                let arrival = seen
                    .arrivals
                    .get(&(seat.clone(), (*status).to_owned()))
                    .and_then(|times| times.iter().find(|t| released.is_none_or(|r| *t > r)));
                match arrival {
                    Some(t) => latest = latest.max(t.saturating_duration_since(*at)),
                    None => all = false,
                }
            }
            if all {
                latencies.push(latest);
            } else {
                missing += 1;
            }
        }
    }
    Ok((latencies, missing))
}

/// The resident memory of a process, in KiB, from /proc.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}
