//! The seat map page in a real browser (Debian's headless Chromium): it
//! draws the show, turns a seat booked through the API to its booked
//! colour without a reload, and books a seat a visitor clicks, through
//! command-api from query-api's origin.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{ensure, Context};
use reqwest::StatusCode;
use serde_json::{json, Value};
use ticketing_tests::browser::Browser;
use ticketing_tests::http::Answer;
use ticketing_tests::system::{System, SystemSettings};

const WAIT: Duration = Duration::from_secs(15);

/// Finds the seat `arguments[0]`.
const SEAT_FIRST_LINE: &str =
    "const seat = document.querySelector(`[data-label=\"${arguments[0]}\"]`);";

/// The status and colour a seat shows, once it has a status.
const SEAT: &str = "const seat = document.querySelector(`[data-label=\"${arguments[0]}\"]`);
    if (!seat || !seat.dataset.status) return null;
    return [seat.dataset.status, getComputedStyle(seat).backgroundColor];";

async fn seat(browser: &Browser, label: &str) -> anyhow::Result<(String, String)> {
    let shown = browser
        .wait_for(&format!("seat {label} drawn"), SEAT, json!([label]), WAIT)
        .await?;
    Ok(serde_json::from_value(shown)?)
}

/// Waits until `label` shows `status`; returns its colour then.
async fn wait_for_seat(browser: &Browser, label: &str, status: &str) -> anyhow::Result<String> {
    let shown = browser
        .wait_for(&format!("{label} {status}"), SEAT, json!([label]), WAIT)
        .await?;
    let (now, colour): (String, String) = serde_json::from_value(shown)?;
    if now == status {
        return Ok(colour);
    }
    let script = format!("{SEAT_FIRST_LINE} return seat.dataset.status === {status:?} ? getComputedStyle(seat).backgroundColor : null;");
    let colour = browser
        .wait_for(&format!("{label} {status}"), &script, json!([label]), WAIT)
        .await?;
    colour.as_str().map(str::to_owned).context("no colour")
}

#[tokio::test]
async fn the_seat_map_follows_bookings_and_books_a_clicked_seat() -> anyhow::Result<()> {
    let system = System::start(SystemSettings::default()).await?;
    let created = Answer::of(
        system
            .http
            .post(format!("{}/shows", system.command_url))
            .json(&json!({"name": "Seat Map Night", "venue": "Hall", "starts_at": "2027-05-01T19:00:00Z",
                "sections": [
                    {"name": "Stalls", "price_cents": 5000, "rows": [{"row": "A", "seats": 12}, {"row": "B", "seats": 12}]},
                    {"name": "Circle", "price_cents": 3000, "rows": [{"row": "C", "seats": 8}]}
                ]}))
            .send()
            .await?,
    )
    .await?;
    ensure!(
        created.status == StatusCode::CREATED,
        "POST /shows: {}",
        created.body
    );
    let show = created.body["show_id"]
        .as_str()
        .context("no show_id")?
        .to_owned();
    let page = format!("{}/shows/{show}/seatmap", system.query_url);
    let started = std::time::Instant::now();
    while system.http.get(&page).send().await?.status() != StatusCode::OK {
        ensure!(started.elapsed() < WAIT, "the page never answered 200");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let unknown = Answer::of(
        system
            .http
            .get(format!(
                "{}/shows/{}/seatmap",
                system.query_url,
                uuid::Uuid::new_v4()
            ))
            .send()
            .await?,
    )
    .await?;
    unknown.is_problem(StatusCode::NOT_FOUND, "not-found")?;

    let browser = Browser::start().await?;
    let result = check_page(&system, &browser, &show, &page).await;
    let screenshot = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/seatmap.png");
    let saved = browser.screenshot(&screenshot).await;
    let quit = browser.quit().await;
    result?;
    saved?;
    quit?;
    ensure!(
        std::fs::metadata(&screenshot)?.len() > 1000,
        "an empty screenshot"
    );
    system.stop().await
}

async fn check_page(
    system: &System,
    browser: &Browser,
    show: &str,
    page: &str,
) -> anyhow::Result<()> {
    browser.goto(page).await?;
    let seats: Value = browser
        .wait_for(
            "every seat drawn",
            "const n = document.querySelectorAll('.seat[data-status]').length; return document.body.dataset.stream === 'live' && n === 32 ? n : null;",
            json!([]),
            WAIT,
        )
        .await?;
    ensure!(seats == 32, "{seats} seats drawn, not 32");
    let (status, free) = seat(browser, "A2").await?;
    ensure!(status == "available", "A2 shows {status}");
    // A mark that a reload would wipe.
    browser
        .run("window.notReloaded = true; return true;", json!([]))
        .await?;

    // Booked through the API: the seat turns without a reload.
    system.book(show, &["A2", "A3"], false).await?;
    let colour = wait_for_seat(browser, "A2", "booked").await?;
    ensure!(colour != free, "A2 kept its colour {colour} once booked");
    system.book(show, &["C1"], true).await?;
    let held_colour = wait_for_seat(browser, "C1", "held").await?;
    ensure!(
        held_colour != free && held_colour != colour,
        "held and booked look alike"
    );
    let counts = browser
        .run(
            "return document.getElementById('counts').textContent",
            json!([]),
        )
        .await?;
    ensure!(
        counts
            .as_str()
            .is_some_and(|c| c.starts_with("29 of 32 available")),
        "the counts read {counts}"
    );

    // A visitor pastes a token, picks two seats and books them.
    let buyer = uuid::Uuid::new_v4();
    let token = ticketing_tests::auth::token(buyer, &[]);
    browser.type_into("#token", &token).await?;
    browser.click("[data-label=\"B7\"]").await?;
    browser.click("[data-label=\"B8\"]").await?;
    browser.click("#submit").await?;
    let said = browser
        .wait_for(
            "the booking's answer",
            "const r = document.getElementById('result'); return r.textContent.startsWith('confirmed') || r.className === 'error' ? [r.className, r.textContent] : null;",
            json!([]),
            WAIT,
        )
        .await?;
    ensure!(said[0] == "", "the page's booking failed: {said}");
    wait_for_seat(browser, "B7", "booked").await?;
    wait_for_seat(browser, "B8", "booked").await?;
    // The booking document lands just after the seats: read until it is
    // there, with the token the page booked with.
    let started = std::time::Instant::now();
    loop {
        let mine = Answer::of(
            reqwest::Client::new()
                .get(format!("{}/users/{buyer}/bookings", system.query_url))
                .header("Authorization", ticketing_tests::auth::bearer(&token))
                .send()
                .await?,
        )
        .await?;
        if mine.body.to_string().contains("B7") {
            break;
        }
        ensure!(
            started.elapsed() < WAIT,
            "the buyer's bookings: {}",
            mine.body
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A seat picked here and sold elsewhere meanwhile: shown taken, and
    // no longer picked.
    browser.click("[data-label=\"B9\"]").await?;
    let picked = browser
        .run(
            "return document.getElementById('picked').textContent",
            json!([]),
        )
        .await?;
    ensure!(picked == "1", "B9 was not picked: {picked}");
    system.book(show, &["B9"], false).await?;
    wait_for_seat(browser, "B9", "booked").await?;
    let picked = browser
        .run(
            "return document.getElementById('picked').textContent",
            json!([]),
        )
        .await?;
    ensure!(
        picked == "0",
        "a seat sold to someone else stayed picked: {picked}"
    );
    let still = browser
        .run("return window.notReloaded === true", json!([]))
        .await?;
    ensure!(still == true, "the page reloaded");
    Ok(())
}
