//! End to end: the release binaries of command-api, the projector and
//! query-api, driven over their public HTTP API only, as a box office and
//! its buyers use them. Each test has its own database, topic, group and
//! read-model database (`ticketing_tests::system`).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use rand::seq::IndexedRandom;
use rand::Rng;
use reqwest::StatusCode;
use serde_json::{json, Value};
use ticketing_tests::http::Answer;
use ticketing_tests::system::{Service, System, SystemSettings};
use uuid::Uuid;

/// `POST /bookings` without an Idempotency-Key.
async fn book(system: &System, body: &Value) -> anyhow::Result<Answer> {
    system.post("/bookings", body, None).await
}

/// The `booking_id` of a 201.
fn booking_id(answer: &Answer) -> anyhow::Result<String> {
    answer.body["booking_id"]
        .as_str()
        .map(str::to_owned)
        .with_context(|| format!("no booking_id in {}", answer.body))
}

async fn get(system: &System, path: &str, token: Option<&str>) -> anyhow::Result<Answer> {
    let mut request = system.http.get(format!("{}{path}", system.query_url));
    if let Some(token) = token {
        request = request.header("X-Consistency-Token", token);
    }
    Answer::of(request.send().await?).await
}

/// The OpenAPI document the service at `base` serves.
async fn openapi_of(system: &System, base: &str) -> anyhow::Result<Value> {
    Ok(system
        .http
        .get(format!("{base}/openapi.json"))
        .send()
        .await?
        .json()
        .await?)
}

/// `rows` of `seats` seats each, in one section per row named after it.
async fn create_show(system: &System, rows: &[(&str, u32)]) -> anyhow::Result<(String, String)> {
    let sections: Vec<Value> = rows
        .iter()
        .map(|(row, seats)| {
            json!({"name": format!("Row {row}"), "price_cents": 5000,
                   "rows": [{"row": row, "seats": seats}]})
        })
        .collect();
    let created = system
        .post(
            "/shows",
            &json!({"name": "Cup Final", "venue": "Stadium", "starts_at": "2027-05-01T15:00:00Z",
                "sections": sections}),
            None,
        )
        .await?;
    ensure!(
        created.status == StatusCode::CREATED,
        "POST /shows: {} {}",
        created.status,
        created.body
    );
    let id = created.body["show_id"]
        .as_str()
        .context("no show_id")?
        .to_owned();
    Ok((id, created.token().context("no consistency token")?))
}

fn booking(show: &str, user: &str, seats: &[&str], hold: bool) -> Value {
    json!({"show_id": show, "user_id": user, "seats": seats, "hold": hold})
}

fn user() -> String {
    Uuid::new_v4().to_string()
}

/// The seat map of `GET /shows/{id}/availability`, read through `token`.
async fn seats(
    system: &System,
    show: &str,
    token: &str,
) -> anyhow::Result<BTreeMap<String, String>> {
    let read = get(system, &format!("/shows/{show}/availability"), Some(token)).await?;
    ensure!(
        read.status == StatusCode::OK,
        "availability: {} {}",
        read.status,
        read.body
    );
    serde_json::from_value(read.body["seats"].clone()).context("seats is not a map")
}

fn seats_with(all: &BTreeMap<String, String>, status: &str) -> BTreeSet<String> {
    all.iter()
        .filter(|(_, s)| s.as_str() == status)
        .map(|(label, _)| label.clone())
        .collect()
}

fn labels(list: &[&str]) -> BTreeSet<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}

/// `POST /bookings/{id}/{action}` twice: the second answers the same 200
/// (confirming or cancelling again changes nothing).
async fn twice(system: &System, id: &str, action: &str) -> anyhow::Result<Answer> {
    let path = format!("/bookings/{id}/{action}");
    let done = system.post(&path, &json!({}), None).await?;
    ensure!(
        done.status == StatusCode::OK,
        "{action}: {} {}",
        done.status,
        done.body
    );
    let again = system.post(&path, &json!({}), None).await?;
    ensure!(
        again.status == StatusCode::OK && again.body["status"] == done.body["status"],
        "{action} again: {} {}",
        again.status,
        again.body
    );
    Ok(done)
}

#[tokio::test]
async fn a_buyer_books_holds_confirms_and_cancels() -> anyhow::Result<()> {
    let system = System::start(SystemSettings::default()).await?;
    let (show, _) = create_show(&system, &[("A", 10), ("B", 20)]).await?;
    let buyer = user();

    let bought = book(&system, &booking(&show, &buyer, &["A1", "A2"], false)).await?;
    assert_eq!(bought.status, StatusCode::CREATED, "{}", bought.body);
    assert_eq!(bought.body["status"], "confirmed");
    assert_eq!(bought.body["total_cents"], 10_000);
    let first = booking_id(&bought)?;
    let read = get(
        &system,
        &format!("/bookings/{first}"),
        bought.token().as_deref(),
    )
    .await?;
    assert_eq!(read.status, StatusCode::OK, "{}", read.body);
    assert_eq!(read.body["status"], "confirmed");
    assert_eq!(read.body["seats"], json!(["A1", "A2"]));

    let held = book(&system, &booking(&show, &buyer, &["B1"], true)).await?;
    assert_eq!(held.status, StatusCode::CREATED, "{}", held.body);
    assert_eq!(held.body["status"], "held");
    assert!(held.body["expires_at"].is_string(), "{}", held.body);
    let second = booking_id(&held)?;
    let now = seats(&system, &show, held.token().as_deref().context("token")?).await?;
    assert_eq!(seats_with(&now, "booked"), labels(&["A1", "A2"]));
    assert_eq!(seats_with(&now, "held"), labels(&["B1"]));
    assert_eq!(now.len(), 30);

    let confirmed = twice(&system, &second, "confirm").await?;
    assert_eq!(confirmed.body["status"], "confirmed");
    let now = seats(
        &system,
        &show,
        confirmed.token().as_deref().context("token")?,
    )
    .await?;
    assert_eq!(seats_with(&now, "booked"), labels(&["A1", "A2", "B1"]));
    assert!(seats_with(&now, "held").is_empty());

    let cancelled = twice(&system, &first, "cancel").await?;
    assert_eq!(cancelled.body["status"], "cancelled");
    let token = cancelled.token().context("token")?;
    let now = seats(&system, &show, &token).await?;
    assert_eq!(seats_with(&now, "booked"), labels(&["B1"]));
    assert_eq!(seats_with(&now, "available").len(), 29);

    let mine = get(&system, &format!("/users/{buyer}/bookings"), Some(&token)).await?;
    assert_eq!(mine.status, StatusCode::OK);
    let statuses: Vec<(&str, &str)> = mine.body["bookings"]
        .as_array()
        .context("bookings")?
        .iter()
        .filter_map(|b| Some((b["booking_id"].as_str()?, b["status"].as_str()?)))
        .collect();
    assert_eq!(
        statuses,
        [
            (second.as_str(), "confirmed"),
            (first.as_str(), "cancelled")
        ],
        "newest first"
    );
    let listed = get(&system, "/shows", Some(&token)).await?;
    let ours = listed.body["shows"]
        .as_array()
        .context("shows")?
        .iter()
        .find(|s| s["show_id"] == show.as_str())
        .context("the show is listed")?;
    assert_eq!(
        (ours["seats"].clone(), ours["available"].clone()),
        (json!(30), json!(29))
    );
    system.stop().await
}

#[tokio::test]
async fn a_lapsed_hold_frees_its_seat_for_the_next_buyer() -> anyhow::Result<()> {
    let system = System::start(SystemSettings {
        hold_secs: 2,
        ..SystemSettings::default()
    })
    .await?;
    let (show, _) = create_show(&system, &[("A", 4)]).await?;

    let held = book(&system, &booking(&show, &user(), &["A1"], true)).await?;
    assert_eq!(held.status, StatusCode::CREATED, "{}", held.body);
    let id = booking_id(&held)?;
    let token = held.token().context("token")?;
    assert_eq!(seats(&system, &show, &token).await?["A1"], "held");
    let rival = book(&system, &booking(&show, &user(), &["A1"], false)).await?;
    assert_eq!(
        rival.status,
        StatusCode::CONFLICT,
        "held seats are not for sale: {}",
        rival.body
    );

    tokio::time::sleep(Duration::from_millis(2_500)).await;
    // Read-time expiry: available at once, whether or not the sweeper ran.
    assert_eq!(seats(&system, &show, &token).await?["A1"], "available");
    let read = get(&system, &format!("/bookings/{id}"), Some(&token)).await?;
    assert_eq!(read.body["status"], "expired", "{}", read.body);
    let late = system
        .post(&format!("/bookings/{id}/confirm"), &json!({}), None)
        .await?;
    assert_eq!(late.status, StatusCode::CONFLICT, "{}", late.body);
    assert_eq!(late.body["booking_status"], "expired");
    assert!(late
        .header("content-type")
        .starts_with("application/problem+json"));
    let cancel = system
        .post(&format!("/bookings/{id}/cancel"), &json!({}), None)
        .await?;
    assert_eq!(cancel.status, StatusCode::CONFLICT, "{}", cancel.body);

    let next = book(&system, &booking(&show, &user(), &["A1"], false)).await?;
    assert_eq!(
        next.status,
        StatusCode::CREATED,
        "the lapsed seat sells: {}",
        next.body
    );
    let now = seats(&system, &show, next.token().as_deref().context("token")?).await?;
    assert_eq!(now["A1"], "booked");
    system.stop().await
}

#[tokio::test]
async fn conflicts_bad_input_and_retries_change_nothing() -> anyhow::Result<()> {
    let system = System::start(SystemSettings::default()).await?;
    let (show, _) = create_show(&system, &[("A", 10)]).await?;

    // Twenty buyers race for the same two seats: one wins, all or nothing.
    let racers = (0..20).map(|_| {
        let body = booking(&show, &user(), &["A1", "A2"], false);
        let system = &system;
        async move {
            system
                .post("/bookings", &body, Some(&Uuid::new_v4().to_string()))
                .await
        }
    });
    let answers = futures::future::try_join_all(racers).await?;
    let won: Vec<&Answer> = answers
        .iter()
        .filter(|a| a.status == StatusCode::CREATED)
        .collect();
    assert_eq!(won.len(), 1, "exactly one buyer gets A1 and A2");
    for lost in answers.iter().filter(|a| a.status != StatusCode::CREATED) {
        assert_eq!(lost.status, StatusCode::CONFLICT, "{}", lost.body);
        assert!(lost
            .header("content-type")
            .starts_with("application/problem+json"));
        assert_eq!(lost.body["unavailable_seats"], json!(["A1", "A2"]));
    }
    let overlap = book(&system, &booking(&show, &user(), &["A2", "A3"], false)).await?;
    assert_eq!(overlap.status, StatusCode::CONFLICT);
    assert_eq!(
        overlap.body["unavailable_seats"],
        json!(["A2"]),
        "A3 is not taken either"
    );

    // A retried booking books once and answers the same.
    let buyer = user();
    let body = booking(&show, &buyer, &["A5"], false);
    let first = system.post("/bookings", &body, Some("retry-1")).await?;
    assert_eq!(first.status, StatusCode::CREATED, "{}", first.body);
    for _ in 0..3 {
        let retry = system.post("/bookings", &body, Some("retry-1")).await?;
        assert_eq!(retry.status, StatusCode::CREATED);
        assert_eq!(retry.body, first.body, "a retry gets the first answer");
    }
    let reused = system
        .post(
            "/bookings",
            &booking(&show, &buyer, &["A6"], false),
            Some("retry-1"),
        )
        .await?;
    assert_eq!(
        reused.status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "{}",
        reused.body
    );
    let token = first.token().context("token")?;
    let mine = get(&system, &format!("/users/{buyer}/bookings"), Some(&token)).await?;
    assert_eq!(
        mine.body["bookings"].as_array().map(Vec::len),
        Some(1),
        "{}",
        mine.body
    );

    // Bad input: a clear 4xx problem document each.
    let url = format!("{}/bookings", system.command_url);
    let raw = |body: &'static str, content_type: &'static str| {
        system
            .http
            .post(&url)
            .header("content-type", content_type)
            .body(body)
            .send()
    };
    const BOOK: (&str, &str, &str) = ("command", "post", "/bookings");
    const CONFIRM: (&str, &str, &str) = ("command", "post", "/bookings/{id}/confirm");
    const BOOKING: (&str, &str, &str) = ("query", "get", "/bookings/{id}");
    const SHOW: (&str, &str, &str) = ("query", "get", "/shows/{id}");
    let cases = [
        (
            BOOK,
            Answer::of(raw("{\"show_id\":", "application/json").await?).await?,
            StatusCode::BAD_REQUEST,
        ),
        (
            BOOK,
            Answer::of(raw("{}", "text/plain").await?).await?,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
        ),
        (
            BOOK,
            book(
                &system,
                &json!({"show_id": show, "user_id": buyer, "seats": ["A7"], "extra": 1}),
            )
            .await?,
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            BOOK,
            book(&system, &booking(&show, &buyer, &["Z9"], false)).await?,
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            BOOK,
            book(&system, &booking(&show, &buyer, &[], false)).await?,
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            BOOK,
            book(&system, &booking(&show, &buyer, &["A7", "A7"], false)).await?,
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            BOOK,
            book(
                &system,
                &booking(&Uuid::new_v4().to_string(), &buyer, &["A7"], false),
            )
            .await?,
            StatusCode::NOT_FOUND,
        ),
        (
            CONFIRM,
            system
                .post(
                    &format!("/bookings/{}/confirm", Uuid::new_v4()),
                    &json!({}),
                    None,
                )
                .await?,
            StatusCode::NOT_FOUND,
        ),
        (
            BOOKING,
            get(&system, &format!("/bookings/{}", Uuid::new_v4()), None).await?,
            StatusCode::NOT_FOUND,
        ),
        (
            SHOW,
            get(&system, &format!("/shows/{show}"), Some("v2;nonsense")).await?,
            StatusCode::BAD_REQUEST,
        ),
    ];
    for (i, (_, answer, expected)) in cases.iter().enumerate() {
        assert_eq!(answer.status, *expected, "case {i}: {}", answer.body);
        assert!(
            answer
                .header("content-type")
                .starts_with("application/problem+json"),
            "case {i}: {}",
            answer.header("content-type")
        );
        assert_eq!(answer.body["status"], expected.as_u16(), "case {i}");
    }
    // Each of those answers is one its operation's OpenAPI document lists.
    let command_doc = openapi_of(&system, &system.command_url).await?;
    let query_doc = openapi_of(&system, &system.query_url).await?;
    for (i, ((side, method, path), _, status)) in cases.iter().enumerate() {
        let doc = if *side == "command" {
            &command_doc
        } else {
            &query_doc
        };
        assert!(
            doc["paths"][*path][*method]["responses"][status.as_str()].is_object(),
            "case {i}: {method} {path} does not list {status} in its OpenAPI document"
        );
    }
    let unknown = book(&system, &booking(&show, &buyer, &["Z9"], false)).await?;
    assert_eq!(unknown.body["unknown_seats"], json!(["Z9"]));

    // None of it changed anything: only the winner's seats and A5 are sold.
    let now = seats(&system, &show, &token).await?;
    assert_eq!(seats_with(&now, "booked"), labels(&["A1", "A2", "A5"]));
    assert!(seats_with(&now, "held").is_empty());
    system.stop().await
}

/// What buyers know of their bookings, kept by the load below.
#[derive(Default)]
struct Ledger {
    /// booking id -> (seats, live: confirmed and not cancelled)
    bookings: BTreeMap<String, (Vec<String>, bool)>,
    created: usize,
    cancelled: usize,
    conflicts: usize,
}

impl Ledger {
    fn expected_booked(&self) -> anyhow::Result<BTreeSet<String>> {
        let mut owned = BTreeSet::new();
        for (id, (seats, live)) in &self.bookings {
            if *live {
                for seat in seats {
                    ensure!(
                        owned.insert(seat.clone()),
                        "{seat} is owned twice (booking {id} too)"
                    );
                }
            }
        }
        Ok(owned)
    }
}

fn lock(ledger: &Mutex<Ledger>) -> anyhow::Result<std::sync::MutexGuard<'_, Ledger>> {
    ledger
        .lock()
        .map_err(|_| anyhow::anyhow!("a buyer panicked"))
}

/// POST until a definitive answer: a connection error or a 5xx (the
/// service being killed or restarting) is retried with the same
/// Idempotency-Key, so a write that committed before the kill is answered,
/// not repeated.
async fn post_until_answered(
    system: &System,
    path: &str,
    body: &Value,
    key: &str,
) -> anyhow::Result<Answer> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match system.post(path, body, Some(key)).await {
            Ok(answer) if !answer.status.is_server_error() => return Ok(answer),
            Ok(_) | Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Ok(answer) => bail!(
                "{path}: still {} after 60 s: {}",
                answer.status,
                answer.body
            ),
            Err(error) => return Err(error.context(format!("{path}: no answer for 60 s"))),
        }
    }
}

/// How many live bookings a buyer keeps: a fourth makes it cancel its
/// oldest, so seats keep turning over and the load never runs out of seats
/// to sell (a drained show answers only 409s).
const BOOKINGS_KEPT: usize = 3;

/// One buyer: books one or two random seats, returning its oldest booking
/// once it has more than `BOOKINGS_KEPT`, until `running` is cleared.
async fn buyer(
    system: Arc<System>,
    show: String,
    seat_labels: Arc<Vec<String>>,
    ledger: Arc<Mutex<Ledger>>,
    running: Arc<AtomicBool>,
) -> anyhow::Result<()> {
    let who = user();
    let mut kept = VecDeque::new();
    while running.load(Ordering::Relaxed) {
        let wanted: Vec<String> = {
            let mut rng = rand::rng();
            let count = rng.random_range(1..=2);
            let wanted: BTreeSet<&String> = seat_labels.choose_multiple(&mut rng, count).collect();
            wanted.into_iter().cloned().collect()
        };
        let body = json!({"show_id": show, "user_id": who, "seats": wanted});
        let made =
            post_until_answered(&system, "/bookings", &body, &Uuid::new_v4().to_string()).await?;
        match made.status {
            StatusCode::CREATED => {
                let id = booking_id(&made)?;
                {
                    let mut ledger = lock(&ledger)?;
                    ledger.bookings.insert(id.clone(), (wanted, true));
                    ledger.created += 1;
                }
                kept.push_back(id);
            }
            StatusCode::CONFLICT => lock(&ledger)?.conflicts += 1,
            other => bail!("POST /bookings: {other} {}", made.body),
        }
        if kept.len() > BOOKINGS_KEPT {
            let Some(id) = kept.pop_front() else { continue };
            let path = format!("/bookings/{id}/cancel");
            let done = post_until_answered(&system, &path, &json!({}), &Uuid::new_v4().to_string())
                .await?;
            ensure!(
                done.status == StatusCode::OK,
                "cancel: {} {}",
                done.status,
                done.body
            );
            let mut ledger = lock(&ledger)?;
            ledger.cancelled += 1;
            if let Some(entry) = ledger.bookings.get_mut(&id) {
                entry.1 = false;
            }
        }
    }
    Ok(())
}

/// Buyers booking and cancelling on one show until `finish`.
struct Load {
    running: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<anyhow::Result<()>>>,
    ledger: Arc<Mutex<Ledger>>,
}

impl Load {
    fn start(system: &Arc<System>, show: &str, seat_labels: Vec<String>, buyers: usize) -> Self {
        let running = Arc::new(AtomicBool::new(true));
        let ledger = Arc::new(Mutex::new(Ledger::default()));
        let seat_labels = Arc::new(seat_labels);
        let tasks = (0..buyers)
            .map(|_| {
                tokio::spawn(buyer(
                    system.clone(),
                    show.to_owned(),
                    seat_labels.clone(),
                    ledger.clone(),
                    running.clone(),
                ))
            })
            .collect();
        Self {
            running,
            tasks,
            ledger,
        }
    }

    /// Definitive answers to bookings so far: sales and conflicts.
    fn answered(&self) -> usize {
        self.ledger.lock().map_or(0, |l| l.created + l.conflicts)
    }

    /// The error of a buyer that has stopped early, if one has.
    async fn failed_buyer(&mut self) -> anyhow::Result<()> {
        if let Some(i) = self.tasks.iter().position(|t| t.is_finished()) {
            self.tasks.swap_remove(i).await??;
            bail!("a buyer stopped before the end");
        }
        Ok(())
    }

    async fn finish(self) -> anyhow::Result<Arc<Mutex<Ledger>>> {
        self.running.store(false, Ordering::Relaxed);
        for task in self.tasks {
            task.await??;
        }
        Ok(self.ledger)
    }
}

fn labels_of(rows: &[(&str, u32)]) -> Vec<String> {
    rows.iter()
        .flat_map(|(row, seats)| (1..=*seats).map(move |n| format!("{row}{n}")))
        .collect()
}

/// Waits until the query side shows exactly the ledger's seats as booked
/// and every booking the buyers made with the status they last saw.
async fn read_side_matches(system: &System, show: &str, ledger: &Ledger) -> anyhow::Result<()> {
    let expected = ledger.expected_booked()?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = String::new();
    while Instant::now() < deadline {
        let read = get(system, &format!("/shows/{show}/availability"), None).await?;
        if read.status == StatusCode::OK {
            let now: BTreeMap<String, String> = serde_json::from_value(read.body["seats"].clone())?;
            let booked = seats_with(&now, "booked");
            if booked == expected && seats_with(&now, "held").is_empty() {
                // The seats and the bookings are separate documents, written
                // one after the other: a booking may trail its seats by a
                // moment, and is looked at again until the deadline.
                let mut behind = None;
                for (id, (_, live)) in &ledger.bookings {
                    let read = get(system, &format!("/bookings/{id}"), None).await?;
                    let status = if *live { "confirmed" } else { "cancelled" };
                    if read.status != StatusCode::OK || read.body["status"] != status {
                        behind = Some(format!("booking {id}: {} {}", read.status, read.body));
                        break;
                    }
                }
                match behind {
                    None => return Ok(()),
                    Some(booking) => last = booking,
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            last = format!(
                "booked but not sold: {:?}; sold but not booked: {:?}",
                booked.difference(&expected).collect::<Vec<_>>(),
                expected.difference(&booked).collect::<Vec<_>>()
            );
        } else {
            last = format!("{} {}", read.status, read.body);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    bail!("the query side never matched what buyers were sold: {last}")
}

fn into_ledger(ledger: Arc<Mutex<Ledger>>) -> anyhow::Result<Ledger> {
    Arc::try_unwrap(ledger)
        .map_err(|_| anyhow::anyhow!("a buyer still holds the ledger"))?
        .into_inner()
        .map_err(|_| anyhow::anyhow!("a buyer panicked"))
}

fn owned(system: Arc<System>) -> anyhow::Result<System> {
    Arc::try_unwrap(system).map_err(|_| anyhow::anyhow!("a task still holds the system"))
}

/// Waits until buyers have had a few more bookings answered.
async fn load_goes_on(load: &mut Load) -> anyhow::Result<()> {
    let before = load.answered();
    let deadline = Instant::now() + Duration::from_secs(60);
    while load.answered() <= before + 5 {
        load.failed_buyer().await?;
        ensure!(Instant::now() < deadline, "no booking answered for 60 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

#[tokio::test]
async fn a_replay_while_buyers_book_keeps_every_answer() -> anyhow::Result<()> {
    let system = Arc::new(System::start(SystemSettings::default()).await?);
    let rows = [("A", 40), ("B", 40)];
    let (show, token) = create_show(&system, &rows).await?;
    // The reader below reads without a token: the show must be there first.
    seats(&system, &show, &token).await?;
    let mut load = Load::start(&system, &show, labels_of(&rows), 4);
    let reading = Arc::new(AtomicBool::new(true));
    let reader = {
        let (system, show, reading) = (system.clone(), show.clone(), reading.clone());
        tokio::spawn(async move {
            let (mut reads, mut not_ok) = (0_u32, Vec::new());
            while reading.load(Ordering::Relaxed) {
                let read = get(&system, &format!("/shows/{show}/availability"), None).await?;
                reads += 1;
                if read.status != StatusCode::OK {
                    not_ok.push(format!("{} {}", read.status, read.body));
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            anyhow::Ok((reads, not_ok))
        })
    };
    load_goes_on(&mut load).await?;
    system.replay().await?;
    // The live projector continues in the new generation's group.
    load_goes_on(&mut load).await?;
    let ledger = into_ledger(load.finish().await?)?;
    read_side_matches(&system, &show, &ledger).await?;
    reading.store(false, Ordering::Relaxed);
    let (reads, not_ok) = reader.await??;
    assert!(reads > 50, "the reader ran throughout ({reads} reads)");
    assert!(
        not_ok.is_empty(),
        "reads failed during the replay: {not_ok:?}"
    );
    owned(system)?.stop().await
}

#[tokio::test]
async fn each_service_killed_under_load_loses_nothing_and_sells_no_seat_twice() -> anyhow::Result<()>
{
    let system = Arc::new(System::start(SystemSettings::default()).await?);
    let rows = [("A", 30), ("B", 30)];
    let (show, _) = create_show(&system, &rows).await?;
    let mut load = Load::start(&system, &show, labels_of(&rows), 6);
    load_goes_on(&mut load).await?;
    for victim in [Service::CommandApi, Service::Projector, Service::QueryApi] {
        system.kill(victim)?;
        // Buyers keep trying while it is dead (keyed retries of writes).
        tokio::time::sleep(Duration::from_millis(700)).await;
        system.start_service(victim).await?;
        load_goes_on(&mut load).await?;
    }
    let ledger = into_ledger(load.finish().await?)?;
    ensure!(
        ledger.created > 20 && ledger.cancelled > 0 && ledger.conflicts > 0,
        "the load booked, cancelled and met conflicts: {} / {} / {}",
        ledger.created,
        ledger.cancelled,
        ledger.conflicts
    );
    read_side_matches(&system, &show, &ledger).await?;
    owned(system)?.stop().await
}
