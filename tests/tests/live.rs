//! Live availability end to end: the release binaries, a stream opened on
//! query-api, bookings made on command-api. What a browser keeps from the
//! stream must equal what `GET /shows/{id}/availability` answers.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use reqwest::StatusCode;
use ticketing_tests::http::Answer;
use ticketing_tests::sse::{EventStream, SeatMap, SseEvent};
use ticketing_tests::system::{System, SystemSettings};

const WAIT: Duration = Duration::from_secs(10);

async fn get(system: &System, path: &str) -> anyhow::Result<Answer> {
    Answer::of(
        system
            .http
            .get(format!("{}{path}", system.query_url))
            .send()
            .await?,
    )
    .await
}

/// The seats `GET /shows/{id}/availability` answers now.
async fn seats_now(
    system: &System,
    show: &str,
    section: Option<&str>,
) -> anyhow::Result<BTreeMap<String, String>> {
    let path = match section {
        Some(section) => format!("/shows/{show}/availability?section={section}"),
        None => format!("/shows/{show}/availability"),
    };
    let answer = get(system, &path).await?;
    ensure!(
        answer.status == StatusCode::OK,
        "{path}: {} {}",
        answer.status,
        answer.body
    );
    serde_json::from_value(answer.body["seats"].clone()).context("no seats")
}

/// A client for streams: `system.http` ends every answer after 30 s, body
/// included.
fn streams() -> reqwest::Client {
    reqwest::Client::new()
}

fn stream_url(system: &System, show: &str) -> String {
    format!("{}/shows/{show}/availability/stream", system.query_url)
}

/// Reads `stream` into `map` until `done` holds of it.
async fn read_until(
    stream: &mut EventStream,
    map: &mut SeatMap,
    what: &str,
    done: impl Fn(&SeatMap) -> bool,
) -> anyhow::Result<Vec<SseEvent>> {
    let mut events = Vec::new();
    let started = Instant::now();
    while !done(map) {
        ensure!(
            started.elapsed() < WAIT,
            "{what}: not within {WAIT:?}; have {:?}",
            map.seats
        );
        let event = stream.must_next(WAIT).await.context(what.to_owned())?;
        map.apply(&event)?;
        events.push(event);
    }
    Ok(events)
}

fn is(map: &SeatMap, label: &str, status: &str) -> bool {
    map.seats.get(label).is_some_and(|s| s == status)
}

#[tokio::test]
async fn every_subscriber_gets_each_change_once_the_reads_have_it() -> anyhow::Result<()> {
    let system = System::start(SystemSettings::default()).await?;
    let show = system
        .create_show(&[("VIP", &[("A", 10)]), ("Floor", &[("B", 20), ("C", 20)])])
        .await?;
    let url = stream_url(&system, &show);

    // Refusals come before any stream, as problems.
    for (path, kind) in [
        (
            format!("/shows/{}/availability/stream", uuid::Uuid::new_v4()),
            "not-found",
        ),
        (
            "/shows/not-a-uuid/availability/stream".to_owned(),
            "not-found",
        ),
        (
            format!("/shows/{show}/availability/stream?section=Balcony"),
            "not-found",
        ),
    ] {
        let refused = EventStream::open(&streams(), &format!("{}{path}", system.query_url), None)
            .await?
            .err()
            .with_context(|| format!("{path} opened a stream"))?;
        refused.is_problem(StatusCode::NOT_FOUND, kind)?;
    }

    let mut whole = Vec::new();
    for _ in 0..3 {
        let mut stream = EventStream::must_open(&streams(), &url, None).await?;
        let snapshot = stream.must_next(WAIT).await?;
        ensure!(snapshot.event == "snapshot", "first event {snapshot:?}");
        ensure!(snapshot.id.is_some(), "a snapshot without an id");
        let mut map = SeatMap::default();
        map.apply(&snapshot)?;
        let body = snapshot.json()?;
        let read = get(&system, &format!("/shows/{show}/availability"))
            .await?
            .body;
        ensure!(body == read, "the snapshot {body} is not the GET {read}");
        whole.push((stream, map));
    }
    let mut floor =
        EventStream::must_open(&streams(), &format!("{url}?section=Floor"), None).await?;
    let mut floor_map = SeatMap::default();
    let snapshot = floor.must_next(WAIT).await?;
    floor_map.apply(&snapshot)?;
    ensure!(
        snapshot.json()?
            == get(
                &system,
                &format!("/shows/{show}/availability?section=Floor")
            )
            .await?
            .body,
        "the Floor snapshot is not the Floor GET"
    );
    ensure!(
        floor_map.seats.len() == 40 && !floor_map.seats.contains_key("A1"),
        "Floor only"
    );

    system.book(&show, &["A1", "A2"], false).await?;
    for (stream, map) in &mut whole {
        let events = read_until(stream, map, "A1 and A2 booked", |m| {
            is(m, "A1", "booked") && is(m, "A2", "booked")
        })
        .await?;
        // Changes carry only what changed (the two seats may come in one
        // change or two), with the counts after them.
        let mut carried = BTreeMap::new();
        for event in &events {
            ensure!(event.event == "change", "not a change: {event:?}");
            let seats: BTreeMap<String, String> =
                serde_json::from_value(event.json()?["seats"].clone())?;
            carried.extend(seats);
        }
        ensure!(
            carried.keys().map(String::as_str).eq(["A1", "A2"]),
            "changes carried {carried:?}"
        );
        let change = events.last().context("no change")?.json()?;
        ensure!(
            change["booked"] == 2 && change["available"] == 48 && change["total"] == 50,
            "counts {change}"
        );
        ensure!(
            change["sections"]
                .as_array()
                .is_some_and(|s| s.len() == 1 && s[0]["name"] == "VIP"),
            "sections {change}"
        );
        // Pushed once the read models hold it: a GET now sees it.
        let read = seats_now(&system, &show, None).await?;
        ensure!(
            read["A1"] == "booked" && read["A2"] == "booked",
            "a GET after the change: {read:?}"
        );
    }
    // The Floor subscriber hears nothing of VIP, then its own seats.
    system.book(&show, &["B5"], true).await?;
    let events = read_until(&mut floor, &mut floor_map, "B5 held", |m| {
        is(m, "B5", "held")
    })
    .await?;
    ensure!(
        events.iter().all(|e| !e.data.contains("\"A1\"")),
        "Floor heard of VIP: {events:?}"
    );
    ensure!(
        floor_map.seats.len() == 40,
        "Floor grew: {:?}",
        floor_map.seats.keys()
    );

    for (stream, map) in &mut whole {
        read_until(stream, map, "B5 held", |m| is(m, "B5", "held")).await?;
        ensure!(
            map.seats == seats_now(&system, &show, None).await?,
            "a stream's map is not the GET"
        );
    }
    ensure!(
        floor_map.seats == seats_now(&system, &show, Some("Floor")).await?,
        "Floor map"
    );
    let ready = Answer::of(
        system
            .http
            .get(format!("{}/readyz", system.query_url))
            .send()
            .await?,
    )
    .await?;
    ensure!(
        ready.body["live_subscribers"] == 4 && ready.body["live_shows"] == 1,
        "one feed for four streams: {}",
        ready.body
    );
    system.stop().await
}

#[tokio::test]
async fn a_client_that_resumes_misses_nothing() -> anyhow::Result<()> {
    let system = System::start(SystemSettings::default()).await?;
    let show = system
        .create_show(&[("Stalls", &[("A", 20), ("B", 20)])])
        .await?;
    let url = stream_url(&system, &show);
    let mut stream = EventStream::must_open(&streams(), &url, None).await?;
    let mut map = SeatMap::default();
    map.apply(&stream.must_next(WAIT).await?)?;
    system.book(&show, &["A1"], false).await?;
    read_until(&mut stream, &mut map, "A1", |m| is(m, "A1", "booked")).await?;
    let last = map.last_id.clone().context("no id")?;
    drop(stream);

    // Missed while away: bookings, a hold, a cancel.
    system.book(&show, &["A2", "A3"], false).await?;
    let held = system.book(&show, &["B1"], true).await?;
    system.book(&show, &["B2"], false).await?;
    let id = held.body["booking_id"].as_str().context("no booking_id")?;
    let cancelled = system
        .http
        .post(format!("{}/bookings/{id}/cancel", system.command_url))
        .send()
        .await?;
    ensure!(
        cancelled.status() == StatusCode::OK,
        "cancel: {}",
        cancelled.status()
    );
    // Until the read side has all of it.
    let started = Instant::now();
    loop {
        let read = seats_now(&system, &show, None).await?;
        if read["B2"] == "booked" && read["B1"] == "available" {
            break;
        }
        ensure!(started.elapsed() < WAIT, "the reads never caught up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let mut resumed = EventStream::must_open(&streams(), &url, Some(&last)).await?;
    let first = resumed.must_next(WAIT).await?;
    ensure!(
        first.event == "change",
        "a resume from a kept id sent {first:?}"
    );
    map.apply(&first)?;
    read_until(&mut resumed, &mut map, "everything missed", |m| {
        is(m, "A3", "booked") && is(m, "B2", "booked") && is(m, "B1", "available")
    })
    .await?;
    ensure!(
        map.seats == seats_now(&system, &show, None).await?,
        "the resumed map is not the GET"
    );
    // The same from the query, for a client that cannot send the header.
    let mut by_query =
        EventStream::must_open(&streams(), &format!("{url}?last_event_id={last}"), None).await?;
    let first = by_query.must_next(WAIT).await?;
    ensure!(
        first.event == "change",
        "a resume named in the query sent {first:?}"
    );

    // An id that is not ours, or of a future this feed has not reached
    // (a client of another replica, a forged id): a fresh snapshot, never
    // a refusal, which a browser would not retry.
    let feed = last.split('.').next().context("an id without a feed")?;
    for garbage in [
        "garbage",
        "12",
        "1.5",
        "-1.5.0",
        "1.2.-5",
        "1.2.3.4",
        "",
        "7.99999999999.0",
    ] {
        let mut fresh = EventStream::must_open(&streams(), &url, Some(garbage)).await?;
        let first = fresh.must_next(WAIT).await?;
        ensure!(
            first.event == "snapshot",
            "Last-Event-ID {garbage:?} sent {first:?}"
        );
        let mut fresh_map = SeatMap::default();
        fresh_map.apply(&first)?;
        ensure!(
            fresh_map.seats == map.seats,
            "the snapshot after {garbage:?} differs"
        );
    }
    let future = format!("{feed}.99999999999.0");
    let mut fresh = EventStream::must_open(&streams(), &url, Some(&future)).await?;
    let first = fresh.must_next(WAIT).await?;
    ensure!(
        first.event == "snapshot",
        "a future id of this feed sent {first:?}"
    );
    system.stop().await
}

#[tokio::test]
async fn ids_grow_and_a_quiet_stream_gets_heartbeats() -> anyhow::Result<()> {
    let system = System::start(SystemSettings {
        env: vec![("LIVE_HEARTBEAT_SECS", "1".to_owned())],
        ..SystemSettings::default()
    })
    .await?;
    let show = system.create_show(&[("Stalls", &[("A", 20)])]).await?;
    let mut stream = EventStream::must_open(&streams(), &stream_url(&system, &show), None).await?;
    let mut map = SeatMap::default();
    let snapshot = stream.must_next(WAIT).await?;
    map.apply(&snapshot)?;
    let mut ids = vec![snapshot.id.clone().context("no id")?];
    for n in 1..=6 {
        let seat = format!("A{n}");
        system.book(&show, &[&seat], n % 2 == 0).await?;
        for event in
            read_until(&mut stream, &mut map, &seat, |m| !is(m, &seat, "available")).await?
        {
            ids.push(event.id.context("a change without an id")?);
        }
    }
    // `E.V.T`: one feed, and (V, T) strictly growing.
    let parsed: Vec<(String, u64, i64)> = ids
        .iter()
        .map(|id| {
            let parts: Vec<&str> = id.split('.').collect();
            anyhow::ensure!(parts.len() == 3, "id {id}");
            Ok((parts[0].to_owned(), parts[1].parse()?, parts[2].parse()?))
        })
        .collect::<anyhow::Result<_>>()?;
    ensure!(
        parsed.iter().all(|p| p.0 == parsed[0].0),
        "ids of several feeds: {ids:?}"
    );
    ensure!(
        parsed
            .windows(2)
            .all(|w| (w[0].1, w[0].2) < (w[1].1, w[1].2)),
        "ids do not grow: {ids:?}"
    );
    // Quiet for 2.5 s: only heartbeats.
    let quiet = stream.next(Duration::from_millis(2500)).await;
    ensure!(quiet.is_err(), "an event on a quiet stream: {quiet:?}");
    ensure!(
        stream.comments >= 2,
        "{} heartbeats in 2.5 s",
        stream.comments
    );
    system.stop().await
}

#[tokio::test]
async fn a_lapsed_hold_shows_available_within_a_second() -> anyhow::Result<()> {
    // The sweeper is off: the stream itself must show the lapse, as the
    // GETs do, not wait for the sweeper's event.
    let system = System::start(SystemSettings {
        // Long enough that the hold is shown held first, even with the
        // projection slowed by tests running beside this one.
        hold_secs: 8,
        env: vec![("SWEEP_EVERY_SECS", "3600".to_owned())],
    })
    .await?;
    let show = system.create_show(&[("Stalls", &[("A", 10)])]).await?;
    let url = stream_url(&system, &show);
    let mut stream = EventStream::must_open(&streams(), &url, None).await?;
    let mut map = SeatMap::default();
    map.apply(&stream.must_next(WAIT).await?)?;
    let held = system.book(&show, &["A4", "A5"], true).await?;
    let expires_at = held.body["expires_at"].as_str().context("no expires_at")?;
    let expires_at = chrono::DateTime::parse_from_rfc3339(expires_at)?.with_timezone(&chrono::Utc);
    read_until(&mut stream, &mut map, "A4 held", |m| is(m, "A4", "held")).await?;
    read_until(&mut stream, &mut map, "A4 and A5 lapsed", |m| {
        is(m, "A4", "available") && is(m, "A5", "available")
    })
    .await?;
    let late = chrono::Utc::now() - expires_at;
    ensure!(
        late < chrono::TimeDelta::seconds(1) && late > chrono::TimeDelta::milliseconds(-100),
        "the lapse came {late} after expires_at"
    );
    ensure!(
        map.seats == seats_now(&system, &show, None).await?,
        "the map is not the GET"
    );
    system.stop().await
}
