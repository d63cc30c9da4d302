//! The figures of a run, as text and as JSON, with where they were measured.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::process::Command;
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;

/// Latency (or freshness) percentiles in milliseconds.
#[derive(Debug, Serialize)]
pub struct Percentiles {
    pub count: usize,
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
    pub max: f64,
}

impl Percentiles {
    pub fn of(samples: &[Duration]) -> Self {
        let mut ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e3).collect();
        ms.sort_by(f64::total_cmp);
        // Nearest rank: the smallest sample with at least q of them at or below it.
        let at = |q: f64| {
            if ms.is_empty() {
                return 0.0;
            }
            let rank = (q * ms.len() as f64).ceil() as usize;
            ms[rank.clamp(1, ms.len()) - 1]
        };
        Self {
            count: ms.len(),
            p50: at(0.50),
            p95: at(0.95),
            p99: at(0.99),
            max: ms.last().copied().unwrap_or(0.0),
        }
    }
}

/// The machine the figures were measured on.
#[derive(Debug, Serialize)]
pub struct Machine {
    pub hostname: String,
    pub cores: usize,
    pub cpu: String,
    pub memory_kib: u64,
    pub kernel: String,
}

fn first_line_with(path: &str, prefix: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()?
        .lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_owned())
}

impl Machine {
    pub fn read() -> Self {
        let read = |path: &str| {
            std::fs::read_to_string(path)
                .map(|s| s.trim().to_owned())
                .unwrap_or_default()
        };
        Self {
            hostname: read("/proc/sys/kernel/hostname"),
            cores: std::thread::available_parallelism().map_or(0, usize::from),
            cpu: first_line_with("/proc/cpuinfo", "model name").unwrap_or_default(),
            memory_kib: first_line_with("/proc/meminfo", "MemTotal")
                .and_then(|v| v.trim_end_matches(" kB").trim().parse().ok())
                .unwrap_or(0),
            kernel: read("/proc/sys/kernel/osrelease"),
        }
    }
}

/// The commit measured, with `-dirty` when the tree had changes.
pub fn commit() -> String {
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    match git(&["rev-parse", "HEAD"]) {
        Some(head)
            if git(&["status", "--porcelain", "--untracked-files=no"])
                .is_some_and(|s| !s.is_empty()) =>
        {
            format!("{head}-dirty")
        }
        Some(head) => head,
        None => "unknown".to_owned(),
    }
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub scenario: Value,
    pub machine: Machine,
    pub commit: String,
    pub at: String,
    pub show_id: String,
    pub seconds: f64,
    pub requests: u64,
    pub requests_per_sec: f64,
    pub booking_attempts: u64,
    pub bookings_created: u64,
    pub bookings_per_sec: f64,
    pub conflicts: u64,
    pub conflict_rate: f64,
    /// "kind status" -> count, e.g. "book 409".
    pub statuses: BTreeMap<String, u64>,
    pub latency_ms: BTreeMap<String, Percentiles>,
    pub seats_sold: u64,
    pub seats_held: u64,
    pub oversold_seats: u64,
    pub read_side_sold: u64,
    pub read_side_mismatched_seats: u64,
    pub read_side_caught_up_ms: f64,
    pub freshness_ms: Percentiles,
    /// The baseline of the same run: as many simultaneous `GET /healthz` as
    /// there are clients, each on its own connection: HTTP and this
    /// machine's scheduling, with no booking work at all.
    pub http_floor_ms: Percentiles,
    /// Live availability subscribers, when the run had them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub live: Option<LiveReport>,
}

/// What the subscribers of the show's live availability saw.
#[derive(Debug, Serialize)]
pub struct LiveReport {
    pub subscribers: usize,
    /// Time from a booking's 201 to its `change` at each subscriber.
    pub change_latency_ms: Percentiles,
    /// (booking, subscriber) pairs whose change never arrived.
    pub changes_missed: u64,
    /// Subscribers whose seat map differs from the GET at the end.
    pub maps_differing: u64,
    /// Streams reopened with `Last-Event-ID`, and openings refused.
    pub reconnects: u64,
    pub refused: u64,
    /// query-api's resident memory with the first subscriber (which starts
    /// the show's feed), and what each of the others added (when its pid
    /// is known).
    pub query_rss_kib_before: Option<u64>,
    pub query_rss_kib_per_subscriber: Option<f64>,
}

impl Report {
    pub fn text(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{} on {} ({} cores), commit {}",
            self.scenario["name"].as_str().unwrap_or("onsale"),
            self.machine.hostname,
            self.machine.cores,
            self.commit
        );
        let _ = writeln!(
            out,
            "  {} clients, {} seats: {:.1} s, {} requests = {:.0} req/s; {} bookings = {:.0} bookings/s",
            self.scenario["clients"], self.scenario["seats"], self.seconds, self.requests,
            self.requests_per_sec, self.bookings_created, self.bookings_per_sec
        );
        let _ = writeln!(
            out,
            "  booking attempts {}: 201 {}, 409 {} (conflict rate {:.1}%)",
            self.booking_attempts,
            self.bookings_created,
            self.conflicts,
            self.conflict_rate * 100.0
        );
        let h = &self.http_floor_ms;
        let _ = writeln!(
            out,
            "  http floor, {} simultaneous GET /healthz: p50 {:.1} ms  p95 {:.1} ms  p99 {:.1} ms  max {:.1} ms",
            h.count, h.p50, h.p95, h.p99, h.max
        );
        for (kind, p) in &self.latency_ms {
            let _ = writeln!(
                out,
                "  {kind:<8} n={:<6} p50 {:.1} ms  p95 {:.1} ms  p99 {:.1} ms  max {:.1} ms",
                p.count, p.p50, p.p95, p.p99, p.max
            );
        }
        let f = &self.freshness_ms;
        let _ = writeln!(
            out,
            "  201 -> readable on the query side: n={} p50 {:.1} ms  p95 {:.1} ms  p99 {:.1} ms",
            f.count, f.p50, f.p95, f.p99
        );
        let _ = writeln!(
            out,
            "  seats sold {} (held {}); sold twice: {}; query side: {} sold, {} seats differ from the buyers' answers (after {:.0} ms)",
            self.seats_sold, self.seats_held, self.oversold_seats, self.read_side_sold,
            self.read_side_mismatched_seats, self.read_side_caught_up_ms
        );
        if let Some(live) = &self.live {
            let l = &live.change_latency_ms;
            let _ = writeln!(
                out,
                "  {} live subscribers: 201 -> change n={} p50 {:.1} ms  p95 {:.1} ms  p99 {:.1} ms  max {:.1} ms; missed {}; maps differing from the GET {}; reconnects {}, refused {}",
                live.subscribers, l.count, l.p50, l.p95, l.p99, l.max, live.changes_missed,
                live.maps_differing, live.reconnects, live.refused
            );
            if let (Some(before), Some(each)) =
                (live.query_rss_kib_before, live.query_rss_kib_per_subscriber)
            {
                let _ = writeln!(
                    out,
                    "  query-api memory: {before} KiB with one subscriber, {each:.1} KiB per subscriber more"
                );
            }
        }
        out
    }
}
