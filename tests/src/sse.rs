//! A reader of Server-Sent Events for the tests: the stream of
//! `GET /shows/{id}/availability/stream`, event by event.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{bail, Context};
use reqwest::StatusCode;
use serde_json::Value;

use crate::http::Answer;

/// One event of a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    /// Its `event:` (`message` when it has none).
    pub event: String,
    /// Its `id:`.
    pub id: Option<String>,
    /// Its `data:` lines, joined.
    pub data: String,
}

impl SseEvent {
    /// Its data as JSON.
    ///
    /// # Errors
    /// When it is not JSON.
    pub fn json(&self) -> anyhow::Result<Value> {
        serde_json::from_str(&self.data).with_context(|| format!("not JSON: {}", self.data))
    }
}

/// An open stream.
#[derive(Debug)]
pub struct EventStream {
    response: reqwest::Response,
    buffer: String,
    /// Comment lines read so far (the server's heartbeats).
    pub comments: usize,
    /// Whether the server ended the stream.
    pub ended: bool,
}

impl EventStream {
    /// Opens `url`, resuming after `last_event_id` when given. A refusal
    /// is returned as the answer it was.
    ///
    /// # Errors
    /// When the server cannot be reached.
    pub async fn open(
        http: &reqwest::Client,
        url: &str,
        last_event_id: Option<&str>,
    ) -> anyhow::Result<Result<Self, Answer>> {
        let mut request = http.get(url).header("Accept", "text/event-stream");
        if let Some(id) = last_event_id {
            request = request.header("Last-Event-ID", id);
        }
        let response = request.send().await.context("opening the stream")?;
        if response.status() != StatusCode::OK {
            return Ok(Err(Answer::of(response).await?));
        }
        Ok(Ok(Self {
            response,
            buffer: String::new(),
            comments: 0,
            ended: false,
        }))
    }

    /// Opens `url` and fails unless it is a stream.
    ///
    /// # Errors
    /// When it cannot be opened or is refused.
    pub async fn must_open(
        http: &reqwest::Client,
        url: &str,
        last_event_id: Option<&str>,
    ) -> anyhow::Result<Self> {
        match Self::open(http, url, last_event_id).await? {
            Ok(stream) => Ok(stream),
            Err(answer) => bail!("{url}: {} {}", answer.status, answer.body),
        }
    }

    /// The next event, `None` when the stream ended.
    ///
    /// # Errors
    /// When nothing comes within `wait`, or the body cannot be read.
    pub async fn next(&mut self, wait: Duration) -> anyhow::Result<Option<SseEvent>> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Some(event) = self.take_event() {
                return Ok(Some(event));
            }
            if self.ended {
                return Ok(None);
            }
            let chunk = tokio::time::timeout_at(deadline, self.response.chunk())
                .await
                .with_context(|| format!("no event within {wait:?}"))?;
            match chunk {
                Ok(Some(bytes)) => self.buffer.push_str(&String::from_utf8_lossy(&bytes)),
                // A connection cut while a chunk is read ends the stream too.
                Ok(None) | Err(_) => self.ended = true,
            }
        }
    }

    /// The next event, which must come.
    ///
    /// # Errors
    /// When the stream ends or nothing comes within `wait`.
    pub async fn must_next(&mut self, wait: Duration) -> anyhow::Result<SseEvent> {
        self.next(wait).await?.context("the stream ended")
    }

    fn take_event(&mut self) -> Option<SseEvent> {
        loop {
            let normalized = self.buffer.replace("\r\n", "\n");
            if normalized.len() != self.buffer.len() {
                self.buffer = normalized;
            }
            let end = self.buffer.find("\n\n")?;
            let block: String = self.buffer.drain(..end + 2).collect();
            match parse_block(&block) {
                Parsed::Event(event) => return Some(event),
                Parsed::Comment => self.comments += 1,
                Parsed::Nothing => {}
            }
        }
    }
}

/// What one block of lines (up to a blank line) is.
enum Parsed {
    Event(SseEvent),
    Comment,
    Nothing,
}

fn parse_block(block: &str) -> Parsed {
    let mut event = SseEvent {
        event: "message".to_owned(),
        id: None,
        data: String::new(),
    };
    let mut comment = false;
    for line in block.lines() {
        if line.starts_with(':') {
            comment = true;
            continue;
        }
        let (name, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match name {
            "event" => value.clone_into(&mut event.event),
            "id" => event.id = Some(value.to_owned()),
            "data" => {
                if !event.data.is_empty() {
                    event.data.push('\n');
                }
                event.data.push_str(value);
            }
            _ => {}
        }
    }
    if !event.data.is_empty() || event.id.is_some() {
        Parsed::Event(event)
    } else if comment {
        Parsed::Comment
    } else {
        Parsed::Nothing
    }
}

/// The events of a whole stream body, read at once.
pub fn events_of(body: &str) -> Vec<SseEvent> {
    body.replace("\r\n", "\n")
        .split("\n\n")
        .filter_map(|block| match parse_block(block) {
            Parsed::Event(event) => Some(event),
            _ => None,
        })
        .collect()
}

/// A seat map kept from a stream's events: what a browser would show.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SeatMap {
    /// Each seat's status.
    pub seats: BTreeMap<String, String>,
    /// The id of the last event applied.
    pub last_id: Option<String>,
}

impl SeatMap {
    /// Applies a `snapshot` (every seat) or a `change` (the seats in it).
    ///
    /// # Errors
    /// An event of another kind, or data without a `seats` map.
    pub fn apply(&mut self, event: &SseEvent) -> anyhow::Result<()> {
        let body = event.json()?;
        let seats: BTreeMap<String, String> = serde_json::from_value(body["seats"].clone())
            .with_context(|| format!("no seats in {}", event.data))?;
        match event.event.as_str() {
            "snapshot" => self.seats = seats,
            "change" => self.seats.extend(seats),
            other => bail!("unexpected event {other:?}"),
        }
        if event.id.is_some() {
            self.last_id.clone_from(&event.id);
        }
        Ok(())
    }
}
