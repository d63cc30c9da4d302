//! Identity end to end (docs/api.md, "Identity" and "Per-user seat limit"):
//! the release binaries, driven over HTTP with real tokens signed as an
//! identity provider signs them. Every refusal is a problem document, and
//! nothing is written by a refused request.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use reqwest::StatusCode;
use serde_json::{json, Value};
use ticketing_tests::auth::{bearer, token, token_until, ADMIN, ORGANIZER};
use ticketing_tests::http::Answer;
use ticketing_tests::system::{System, SystemSettings};
use uuid::Uuid;

/// A request to `url` with `authorization` as it is (any text).
async fn send(
    method: reqwest::Method,
    url: String,
    authorization: Option<&str>,
    body: Option<&Value>,
    key: Option<&str>,
) -> anyhow::Result<Answer> {
    // A client with no default token: the caller's is the only one.
    let mut request = reqwest::Client::new().request(method, url);
    if let Some(authorization) = authorization {
        request = request.header("Authorization", authorization);
    }
    if let Some(body) = body {
        request = request.json(body);
    }
    if let Some(key) = key {
        request = request.header("Idempotency-Key", key);
    }
    Answer::of(request.send().await?).await
}

/// A GET without a token.
async fn anonymous_get(url: String) -> anyhow::Result<Answer> {
    send(reqwest::Method::GET, url, None, None, None).await
}

/// A user of the tests: an id and a token for it.
#[derive(Clone)]
struct User {
    id: Uuid,
    token: String,
}

impl User {
    fn new(roles: &[&str]) -> Self {
        let id = Uuid::new_v4();
        Self {
            id,
            token: token(id, roles),
        }
    }

    fn bearer(&self) -> String {
        bearer(&self.token)
    }

    async fn post(&self, system: &System, path: &str, body: &Value) -> anyhow::Result<Answer> {
        self.post_keyed(system, path, body, None).await
    }

    async fn post_keyed(
        &self,
        system: &System,
        path: &str,
        body: &Value,
        key: Option<&str>,
    ) -> anyhow::Result<Answer> {
        send(
            reqwest::Method::POST,
            format!("{}{path}", system.command_url),
            Some(&self.bearer()),
            Some(body),
            key,
        )
        .await
    }

    /// A read of the query side, waiting for `consistency` when given.
    async fn get(
        &self,
        system: &System,
        path: &str,
        consistency: Option<&str>,
    ) -> anyhow::Result<Answer> {
        let mut request = reqwest::Client::new()
            .get(format!("{}{path}", system.query_url))
            .header("Authorization", self.bearer());
        if let Some(consistency) = consistency {
            request = request.header("X-Consistency-Token", consistency);
        }
        Answer::of(request.send().await?).await
    }
}

async fn events(system: &System) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(system.postgres()?)
        .await?)
}

/// A show of rows A to J, 10 seats each, with `limit` seats per buyer.
async fn create_show(system: &System, limit: Option<u32>) -> anyhow::Result<(String, String)> {
    let organizer = User::new(&[ORGANIZER]);
    let rows: Vec<Value> = ["A", "B", "C", "D", "E", "F", "G", "H", "I", "J"]
        .iter()
        .map(|r| json!({"row": r, "seats": 10}))
        .collect();
    let mut body = json!({
        "name": "Arena Night", "venue": "Arena", "starts_at": "2027-07-01T20:00:00Z",
        "sections": [{ "name": "Floor", "price_cents": 5000, "rows": rows }]
    });
    if let Some(limit) = limit {
        body["max_seats_per_user"] = json!(limit);
    }
    let created = organizer.post(system, "/shows", &body).await?;
    ensure!(created.status == StatusCode::CREATED, "{created:?}");
    let show = created.body["show_id"]
        .as_str()
        .context("show_id")?
        .to_owned();
    Ok((show, created.token().context("a consistency token")?))
}

fn id_of(answer: &Answer) -> anyhow::Result<String> {
    answer.body["booking_id"]
        .as_str()
        .map(str::to_owned)
        .with_context(|| format!("no booking_id: {answer:?}"))
}

/// Checks a 401: a problem with `WWW-Authenticate: Bearer`.
fn unauthenticated(answer: &Answer, what: &str) -> anyhow::Result<()> {
    answer
        .is_problem(StatusCode::UNAUTHORIZED, "unauthenticated")
        .with_context(|| what.to_owned())?;
    ensure!(
        answer.header("www-authenticate") == "Bearer",
        "{what}: WWW-Authenticate {:?}",
        answer.header("www-authenticate")
    );
    Ok(())
}

#[tokio::test]
async fn each_may_do_only_what_is_theirs_and_bad_tokens_write_nothing() -> anyhow::Result<()> {
    let system = System::start(SystemSettings::default()).await?;
    let result = async {
        let (show, _) = create_show(&system, None).await?;
        let (alice, bob, admin) = (User::new(&[]), User::new(&[]), User::new(&[ADMIN]));

        // POST /shows: an organizer only.
        let before = events(&system).await?;
        let refused = bob
            .post(
                &system,
                "/shows",
                &json!({"name": "x", "venue": "y",
                "starts_at": "2027-07-01T20:00:00Z",
                "sections": [{"name": "S", "price_cents": 1, "rows": [{"row": "A", "seats": 1}]}]}),
            )
            .await?;
        refused.is_problem(StatusCode::FORBIDDEN, "forbidden")?;

        // A booking is the token's user's; user_id may be left out.
        let held = alice
            .post(
                &system,
                "/bookings",
                &json!({"show_id": show, "seats": ["A1"], "hold": true}),
            )
            .await?;
        ensure!(held.status == StatusCode::CREATED, "{held:?}");
        ensure!(held.body["user_id"] == alice.id.to_string(), "{held:?}");
        let booking = id_of(&held)?;
        let named = alice
            .post(
                &system,
                "/bookings",
                &json!({"show_id": show, "user_id": alice.id, "seats": ["A2"]}),
            )
            .await?;
        ensure!(named.status == StatusCode::CREATED, "{named:?}");
        let written = events(&system).await?;
        ensure!(written > before, "the bookings wrote nothing");

        // Alice's token with Bob's name, Bob acting on Alice's booking.
        let refusals = [
            (
                "alice books as bob",
                alice
                    .post(
                        &system,
                        "/bookings",
                        &json!({"show_id": show, "user_id": bob.id, "seats": ["A3"]}),
                    )
                    .await?,
            ),
            (
                "bob confirms alice's hold",
                bob.post(&system, &format!("/bookings/{booking}/confirm"), &json!({}))
                    .await?,
            ),
            (
                "bob cancels alice's hold",
                bob.post(&system, &format!("/bookings/{booking}/cancel"), &json!({}))
                    .await?,
            ),
        ];
        for (what, answer) in &refusals {
            answer
                .is_problem(StatusCode::FORBIDDEN, "forbidden")
                .with_context(|| *what)?;
        }
        ensure!(
            events(&system).await? == written,
            "a refused request wrote events"
        );

        // Tokens that are not good: each a 401, nothing written.
        let unsigned = {
            use base64::Engine;
            let b64 =
                |v: &Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
            format!(
                "{}.{}.",
                b64(&json!({"alg": "none", "typ": "JWT"})),
                b64(&json!({"sub": alice.id, "exp": chrono::Utc::now().timestamp() + 600}))
            )
        };
        let other_key = jsonwebtoken::encode(
            &jsonwebtoken::Header::default(),
            &json!({"sub": alice.id, "exp": chrono::Utc::now().timestamp() + 600}),
            &jsonwebtoken::EncodingKey::from_secret(b"another-secret-of-at-least-32-bytes!!"),
        )?;
        let signed = |claims: Value| {
            jsonwebtoken::encode(
                &jsonwebtoken::Header::default(),
                &claims,
                &jsonwebtoken::EncodingKey::from_secret(ticketing_tests::auth::SECRET.as_bytes()),
            )
        };
        let exp = chrono::Utc::now().timestamp() + 600;
        let bad: Vec<(&str, Option<String>)> = vec![
            ("no token", None),
            (
                "expired",
                Some(bearer(&token_until(
                    alice.id,
                    &[],
                    chrono::Utc::now().timestamp() - 120,
                ))),
            ),
            ("another key", Some(bearer(&other_key))),
            ("alg none", Some(bearer(&unsigned))),
            (
                "sub not a UUID",
                Some(bearer(&signed(json!({"sub": "alice", "exp": exp}))?)),
            ),
            (
                "roles of the wrong type",
                Some(bearer(&signed(
                    json!({"sub": alice.id, "exp": exp, "roles": "admin"}),
                )?)),
            ),
            ("not bearer", Some(format!("Basic {}", alice.token))),
            ("a 100 KB token", Some(bearer(&"x".repeat(100 * 1024)))),
        ];
        for (what, authorization) in &bad {
            for (path, body) in [
                (
                    "/bookings".to_owned(),
                    json!({"show_id": show, "seats": ["B1"]}),
                ),
                (format!("/bookings/{booking}/cancel"), json!({})),
            ] {
                let answer = send(
                    reqwest::Method::POST,
                    format!("{}{path}", system.command_url),
                    authorization.as_deref(),
                    Some(&body),
                    None,
                )
                .await?;
                unauthenticated(&answer, &format!("{what}: POST {path}"))?;
            }
            let read = send(
                reqwest::Method::GET,
                format!("{}/users/{}/bookings", system.query_url, alice.id),
                authorization.as_deref(),
                None,
                None,
            )
            .await?;
            unauthenticated(&read, &format!("{what}: GET bookings"))?;
        }
        // A 10 MB header never reaches the services' code: the HTTP layer
        // refuses it (431) before reading it whole.
        let huge = format!("Bearer {}", "x".repeat(10 * 1024 * 1024));
        let answer = send(
            reqwest::Method::POST,
            format!("{}/bookings", system.command_url),
            Some(&huge),
            Some(&json!({"show_id": show, "seats": ["B2"]})),
            None,
        )
        .await;
        // The server may also close the connection before the client has
        // sent it all; either way nothing is written (checked below).
        if let Ok(answer) = answer {
            ensure!(
                answer.status == StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
                    || answer.status == StatusCode::UNAUTHORIZED,
                "a 10 MB header: {}",
                answer.status
            );
        }
        ensure!(
            events(&system).await? == written,
            "a bad token wrote events"
        );

        // The query side: a booking and a user's bookings are the user's
        // (and an admin's); the show's reads are open.
        let consistency = held.token();
        let own = alice
            .get(
                &system,
                &format!("/bookings/{booking}"),
                consistency.as_deref(),
            )
            .await?;
        ensure!(own.status == StatusCode::OK, "{own:?}");
        bob.get(&system, &format!("/bookings/{booking}"), None)
            .await?
            .is_problem(StatusCode::FORBIDDEN, "forbidden")?;
        bob.get(&system, &format!("/users/{}/bookings", alice.id), None)
            .await?
            .is_problem(StatusCode::FORBIDDEN, "forbidden")?;
        // The second booking's token: the list holds it once projected.
        let listed = named.token();
        for reader in [&alice, &admin] {
            let list = reader
                .get(
                    &system,
                    &format!("/users/{}/bookings", alice.id),
                    listed.as_deref(),
                )
                .await?;
            ensure!(list.status == StatusCode::OK, "{list:?}");
            ensure!(
                list.body["bookings"].as_array().map(Vec::len) == Some(2),
                "{list:?}"
            );
        }
        let open = anonymous_get(format!("{}/shows/{show}/availability", system.query_url)).await?;
        ensure!(open.status == StatusCode::OK, "{open:?}");

        // An admin may act on anyone's booking, and book in anyone's name.
        let cancelled = admin
            .post(&system, &format!("/bookings/{booking}/cancel"), &json!({}))
            .await?;
        ensure!(cancelled.status == StatusCode::OK, "{cancelled:?}");
        let for_bob = admin
            .post(
                &system,
                "/bookings",
                &json!({"show_id": show, "user_id": bob.id, "seats": ["C1"]}),
            )
            .await?;
        ensure!(for_bob.body["user_id"] == bob.id.to_string(), "{for_bob:?}");

        // Keys are the user's: the same key from two users is two bookings,
        // and each user's retry gets its own answer back.
        let mut seats = BTreeSet::new();
        for (user, seat) in [(&alice, "D1"), (&bob, "D2"), (&alice, "D1"), (&bob, "D2")] {
            let answer = user
                .post_keyed(
                    &system,
                    "/bookings",
                    &json!({"show_id": show, "seats": [seat]}),
                    Some("checkout-1"),
                )
                .await?;
            ensure!(answer.status == StatusCode::CREATED, "{seat}: {answer:?}");
            ensure!(answer.body["user_id"] == user.id.to_string(), "{answer:?}");
            seats.insert(id_of(&answer)?);
        }
        ensure!(seats.len() == 2, "two users, one key, retried: {seats:?}");
        anyhow::Ok(())
    }
    .await;
    system.stop().await?;
    result
}

/// `count` single-seat requests of `user` at once, seats from `first`.
async fn at_once(
    system: &System,
    user: &User,
    show: &str,
    seats: &[String],
) -> anyhow::Result<Vec<Answer>> {
    let requests = seats.iter().enumerate().map(|(i, seat)| {
        let body = json!({"show_id": show, "seats": [seat], "hold": i % 2 == 0});
        async move { user.post(system, "/bookings", &body).await }
    });
    futures::future::join_all(requests)
        .await
        .into_iter()
        .collect()
}

/// The live seats of every buyer of the system's log as the command side
/// keeps them, and as the log says they must be.
async fn buyer_seats_agree_with_the_log(system: &System) -> anyhow::Result<()> {
    let kept: Vec<(Uuid, i32, Option<chrono::DateTime<chrono::Utc>>)> =
        sqlx::query_as("SELECT booking_id, seats, expires_at FROM buyer_seats ORDER BY booking_id")
            .fetch_all(system.postgres()?)
            .await?;
    let rebuilt: Vec<(Uuid, i32, Option<chrono::DateTime<chrono::Utc>>)> = sqlx::query_as(
        "SELECT booking_id, seats, expires_at FROM buyer_seats_from_log() ORDER BY booking_id",
    )
    .fetch_all(system.postgres()?)
    .await?;
    ensure!(
        kept == rebuilt,
        "buyer_seats {kept:?} but the log says {rebuilt:?}"
    );
    Ok(())
}

#[tokio::test]
async fn a_buyer_never_goes_over_the_limit_and_gets_seats_back() -> anyhow::Result<()> {
    let system = System::start(SystemSettings {
        hold_secs: 3,
        ..SystemSettings::default()
    })
    .await?;
    let result = async {
        let (show, consistency) = create_show(&system, Some(4)).await?;
        let alice = User::new(&[]);
        let shown = alice.get(&system, &format!("/shows/{show}"), Some(&consistency)).await?;
        ensure!(shown.body["max_seats_per_user"] == 4, "{shown:?}");

        // 50 requests of one buyer at once: 4 taken, never more.
        let seats: Vec<String> = (1..=50).map(|n| format!("{}{}", ["A","B","C","D","E"][(n - 1) / 10], (n - 1) % 10 + 1)).collect();
        let answers = at_once(&system, &alice, &show, &seats).await?;
        let mut created = Vec::new();
        for answer in &answers {
            if answer.status == StatusCode::CREATED {
                created.push(answer);
            } else {
                answer.is_problem(StatusCode::CONFLICT, "seat-limit")?;
                ensure!(answer.body["limit"] == 4, "{answer:?}");
                ensure!(answer.body["current"].as_u64().is_some_and(|c| c <= 4), "{answer:?}");
            }
        }
        ensure!(created.len() == 4, "{} of 50 taken", created.len());
        // The other buyers are not held back by alice's limit.
        let bob = User::new(&[]);
        let bobs = bob
            .post(&system, "/bookings", &json!({"show_id": show, "seats": ["F1", "F2", "F3", "F4"]}))
            .await?;
        ensure!(bobs.status == StatusCode::CREATED, "{bobs:?}");
        let over = bob
            .post(&system, "/bookings", &json!({"show_id": show, "seats": ["F5"]}))
            .await?;
        over.is_problem(StatusCode::CONFLICT, "seat-limit")?;
        ensure!(over.body["current"] == 4, "{over:?}");

        // A cancel gives its seat back: one more, and then no more.
        let first = id_of(created[0])?;
        let cancelled = alice
            .post(&system, &format!("/bookings/{first}/cancel"), &json!({}))
            .await?;
        ensure!(cancelled.status == StatusCode::OK, "{cancelled:?}");
        let again = at_once(&system, &alice, &show, &["G1".to_owned(), "G2".to_owned(), "G3".to_owned()]).await?;
        ensure!(
            again.iter().filter(|a| a.status == StatusCode::CREATED).count() == 1,
            "after a cancel: {again:?}"
        );

        // A lapsed hold gives its seats back, before the sweeper or after.
        let carol = User::new(&[]);
        let hold = carol
            .post(&system, "/bookings", &json!({"show_id": show, "seats": ["H1","H2","H3","H4"], "hold": true}))
            .await?;
        ensure!(hold.status == StatusCode::CREATED, "{hold:?}");
        carol
            .post(&system, "/bookings", &json!({"show_id": show, "seats": ["H5"]}))
            .await?
            .is_problem(StatusCode::CONFLICT, "seat-limit")?;
        let expires: chrono::DateTime<chrono::Utc> = hold.body["expires_at"]
            .as_str()
            .context("expires_at")?
            .parse()?;
        let wait = (expires - chrono::Utc::now()).to_std().unwrap_or_default();
        tokio::time::sleep(wait + Duration::from_millis(200)).await;
        let after = carol
            .post(&system, "/bookings", &json!({"show_id": show, "seats": ["I1","I2","I3","I4"]}))
            .await?;
        ensure!(after.status == StatusCode::CREATED, "after the lapse: {after:?}");

        // A confirmed hold keeps counting after its hold time.
        let dave = User::new(&[]);
        let held = dave
            .post(&system, "/bookings", &json!({"show_id": show, "seats": ["J1","J2"], "hold": true}))
            .await?;
        let confirmed = dave
            .post(&system, &format!("/bookings/{}/confirm", id_of(&held)?), &json!({}))
            .await?;
        ensure!(confirmed.status == StatusCode::OK, "{confirmed:?}");
        let deadline = Instant::now() + Duration::from_secs(4);
        while Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let three = dave
            .post(&system, "/bookings", &json!({"show_id": show, "seats": ["J3","J4","J5"]}))
            .await?;
        three.is_problem(StatusCode::CONFLICT, "seat-limit")?;
        ensure!(three.body["current"] == 2, "{three:?}");

        // Over the limit in one request, and limits out of range. The seats
        // are ones nobody asked for: any of alice's 50 may have won.
        let eve = User::new(&[]);
        let five = eve
            .post(&system, "/bookings", &json!({"show_id": show, "seats": ["I6","I7","I8","I9","I10"]}))
            .await?;
        five.is_problem(StatusCode::CONFLICT, "seat-limit")?;
        ensure!(five.body["current"] == 0, "{five:?}");
        let organizer = User::new(&[ORGANIZER]);
        for (limit, price) in [(json!(0), 100), (json!(101), 100), (json!("4"), 100), (json!(4), 1_000_000_001_i64)] {
            let answer = organizer
                .post(&system, "/shows", &json!({"name": "x", "venue": "y",
                    "starts_at": "2027-07-01T20:00:00Z", "max_seats_per_user": limit,
                    "sections": [{"name": "S", "price_cents": price, "rows": [{"row": "A", "seats": 1}]}]}))
                .await?;
            ensure!(
                answer.status == StatusCode::UNPROCESSABLE_ENTITY,
                "limit {limit}, price {price}: {answer:?}"
            );
        }

        buyer_seats_agree_with_the_log(&system).await?;
        anyhow::Ok(())
    }
    .await;
    system.stop().await?;
    result
}

#[tokio::test]
async fn rate_limits_answer_429_with_retry_after() -> anyhow::Result<()> {
    let system = System::start(SystemSettings {
        env: vec![
            ("RATE_LIMIT_USER_PER_SEC", "1".to_owned()),
            ("RATE_LIMIT_USER_BURST", "3".to_owned()),
            ("RATE_LIMIT_ADDRESS_PER_SEC", "1".to_owned()),
            ("RATE_LIMIT_ADDRESS_BURST", "3".to_owned()),
        ],
        ..SystemSettings::default()
    })
    .await?;
    let result = async {
        let (alice, bob) = (User::new(&[]), User::new(&[]));
        let path = format!("/users/{}/bookings", alice.id);
        let mut statuses = Vec::new();
        for _ in 0..4 {
            let answer = alice.get(&system, &path, None).await?;
            statuses.push(answer.status);
            if answer.status == StatusCode::TOO_MANY_REQUESTS {
                answer.is_problem(StatusCode::TOO_MANY_REQUESTS, "rate-limited")?;
                let after: u64 = answer.header("retry-after").parse()?;
                ensure!(after >= 1, "Retry-After {after}");
            }
        }
        ensure!(
            statuses[..3].iter().all(|s| *s == StatusCode::OK)
                && statuses[3] == StatusCode::TOO_MANY_REQUESTS,
            "alice: {statuses:?}"
        );
        // Another user has a bucket of its own.
        let bobs = bob
            .get(&system, &format!("/users/{}/bookings", bob.id), None)
            .await?;
        ensure!(bobs.status == StatusCode::OK, "{bobs:?}");
        // Open reads count by address; probes are never limited.
        let mut open = Vec::new();
        for _ in 0..4 {
            let answer = anonymous_get(format!("{}/shows", system.query_url)).await?;
            open.push(answer.status);
        }
        ensure!(
            open[3] == StatusCode::TOO_MANY_REQUESTS,
            "open reads: {open:?}"
        );
        for _ in 0..10 {
            let probe = anonymous_get(format!("{}/healthz", system.query_url)).await?;
            ensure!(probe.status == StatusCode::OK, "a probe was limited");
        }
        // The bucket fills again.
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let later = alice.get(&system, &path, None).await?;
        ensure!(later.status == StatusCode::OK, "after a second: {later:?}");
        anyhow::Ok(())
    }
    .await;
    system.stop().await?;
    result
}
