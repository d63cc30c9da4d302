//! The read side end to end on the real servers: command-api and its relay
//! write, the projector builds the read models, query-api answers.

mod common;

use std::time::Duration;

use anyhow::{ensure, Context};
use common::{converge, expected, jazz_night, send, ReadSide, Writes};
use serde_json::{json, Value};

const USER: &str = "6f1c0a52-3c0e-4d8e-9a53-2c1d5f0b7e11";
const OTHER_USER: &str = "0b3c5d7e-1111-4222-8333-944455566677";

struct Script {
    client: reqwest::Client,
    command: String,
    query: String,
}

impl Script {
    async fn post(&self, path: &str, body: Value) -> anyhow::Result<common::Answer> {
        send(
            self.client
                .post(format!("{}{path}", self.command))
                .json(&body),
        )
        .await
    }

    /// A GET that waits for `token`'s write.
    async fn get(&self, path: &str, token: Option<&str>) -> anyhow::Result<common::Answer> {
        let mut request = self.client.get(format!("{}{path}", self.query));
        if let Some(token) = token {
            request = request.header("X-Consistency-Token", token);
        }
        send(request).await
    }

    async fn book(
        &self,
        show: &str,
        user: &str,
        seats: &[&str],
        hold: bool,
    ) -> anyhow::Result<(String, String)> {
        let answer = self
            .post(
                "/bookings",
                json!({ "show_id": show, "user_id": user, "seats": seats, "hold": hold }),
            )
            .await?;
        ensure!(answer.status == 201, "booking {seats:?}: {answer:?}");
        Ok((
            answer.body["booking_id"]
                .as_str()
                .context("booking_id")?
                .to_owned(),
            answer
                .token
                .context("a write carries X-Consistency-Token")?,
        ))
    }
}

fn seat_statuses(availability: &Value) -> Vec<(String, String)> {
    availability["seats"]
        .as_object()
        .map(|seats| {
            seats
                .iter()
                .filter(|(_, s)| s.as_str() != Some("available"))
                .map(|(label, s)| (label.clone(), s.as_str().unwrap_or("?").to_owned()))
                .collect()
        })
        .unwrap_or_default()
}

/// Bookings, a hold that is confirmed, a hold that lapses, a cancellation;
/// after each step every GET of the contract is checked field by field,
/// read through the consistency token of the step's write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_read_model_follows_a_scripted_sequence() -> anyhow::Result<()> {
    let writes = Writes::spawn(3).await?;
    let read = ReadSide::new().await?;
    let projector = read.project(&writes.topic);
    let (query, query_service) = read.serve().await?;
    let s = Script {
        client: ticketing_tests::auth::staff_client().expect("an HTTP client"),
        command: writes.base.clone(),
        query,
    };

    // The show: read at once through its token.
    let created = s.post("/shows", jazz_night()).await?;
    ensure!(created.status == 201, "{created:?}");
    let show = created.body["show_id"]
        .as_str()
        .context("show_id")?
        .to_owned();
    let token = created.token.clone().context("token on POST /shows")?;
    let got = s.get(&format!("/shows/{show}"), Some(&token)).await?;
    ensure!(got.status == 200, "{got:?}");
    assert_eq!(
        got.body,
        json!({
            "show_id": show, "name": "Jazz Night", "venue": "Blue Note",
            "starts_at": "2027-03-01T20:00:00Z", "seats": 50, "available": 50, "held": 0, "booked": 0,
            "sections": [
                { "name": "VIP", "price_cents": 22500, "rows": [ { "row": "A", "seats": 10 } ],
                  "total": 10, "available": 10, "held": 0, "booked": 0 },
                { "name": "Floor", "price_cents": 9000,
                  "rows": [ { "row": "B", "seats": 20 }, { "row": "C", "seats": 20 } ],
                  "total": 40, "available": 40, "held": 0, "booked": 0 }
            ]
        })
    );
    let list = s.get("/shows", Some(&token)).await?;
    assert_eq!(
        list.body,
        json!({ "shows": [ { "show_id": show, "name": "Jazz Night", "venue": "Blue Note",
            "starts_at": "2027-03-01T20:00:00Z", "seats": 50, "available": 50 } ] })
    );

    // Bought outright: A1, A2.
    let (bought, token) = s.book(&show, USER, &["A1", "A2"], false).await?;
    let availability = s
        .get(&format!("/shows/{show}/availability"), Some(&token))
        .await?;
    ensure!(availability.status == 200, "{availability:?}");
    assert_eq!(availability.body["total"], 50);
    assert_eq!(availability.body["available"], 48);
    assert_eq!(availability.body["booked"], 2);
    assert_eq!(availability.body["held"], 0);
    assert_eq!(
        availability.body["sections"],
        json!([
            { "name": "VIP", "price_cents": 22500, "total": 10, "available": 8, "held": 0, "booked": 2 },
            { "name": "Floor", "price_cents": 9000, "total": 40, "available": 40, "held": 0, "booked": 0 }
        ])
    );
    assert_eq!(
        availability.body["seats"].as_object().map(|m| m.len()),
        Some(50)
    );
    assert_eq!(
        seat_statuses(&availability.body),
        vec![
            ("A1".into(), "booked".into()),
            ("A2".into(), "booked".into())
        ]
    );
    let booking = s.get(&format!("/bookings/{bought}"), Some(&token)).await?;
    let b = &booking.body;
    assert_eq!(b["booking_id"], bought.as_str());
    assert_eq!(b["show_id"], show.as_str());
    assert_eq!(b["user_id"], USER);
    assert_eq!(b["seats"], json!(["A1", "A2"]));
    assert_eq!(b["status"], "confirmed");
    assert_eq!(b["total_cents"], 45000);
    assert!(b.get("expires_at").is_none(), "{b}");
    assert_eq!(b["created_at"], b["updated_at"]);
    assert_eq!(
        b.as_object().map(|o| {
            let mut keys: Vec<String> = o.keys().cloned().collect();
            keys.sort();
            keys
        }),
        Some(
            [
                "booking_id",
                "created_at",
                "seats",
                "show_id",
                "status",
                "total_cents",
                "updated_at",
                "user_id"
            ]
            .map(String::from)
            .to_vec()
        ),
        "no other members"
    );

    // A hold on B1, B2, then confirmed.
    let (held, token) = s.book(&show, USER, &["B1", "B2"], true).await?;
    let booking = s.get(&format!("/bookings/{held}"), Some(&token)).await?;
    assert_eq!(booking.body["status"], "held");
    assert!(booking.body["expires_at"].is_string(), "{:?}", booking.body);
    let availability = s
        .get(
            &format!("/shows/{show}/availability?section=Floor"),
            Some(&token),
        )
        .await?;
    assert_eq!(
        availability.body["sections"],
        json!([{ "name": "Floor", "price_cents": 9000, "total": 40, "available": 38, "held": 2, "booked": 0 }])
    );
    assert_eq!(
        availability.body["seats"].as_object().map(|m| m.len()),
        Some(40),
        "Floor only"
    );
    assert_eq!(
        seat_statuses(&availability.body),
        vec![("B1".into(), "held".into()), ("B2".into(), "held".into())]
    );
    let confirmed = s
        .post(&format!("/bookings/{held}/confirm"), json!({}))
        .await?;
    ensure!(confirmed.status == 200, "{confirmed:?}");
    let token = confirmed.token.context("token on confirm")?;
    let booking = s.get(&format!("/bookings/{held}"), Some(&token)).await?;
    assert_eq!(booking.body["status"], "confirmed");
    assert!(booking.body.get("expires_at").is_none());
    assert_ne!(booking.body["created_at"], booking.body["updated_at"]);
    let availability = s
        .get(&format!("/shows/{show}/availability"), Some(&token))
        .await?;
    assert_eq!(
        (
            availability.body["booked"].clone(),
            availability.body["held"].clone()
        ),
        (json!(4), json!(0))
    );

    // A hold on C1 by someone else that lapses: reads as available and
    // expired at once, before or after the sweeper records it.
    let (lapsing, token) = s.book(&show, OTHER_USER, &["C1"], true).await?;
    let availability = s
        .get(&format!("/shows/{show}/availability"), Some(&token))
        .await?;
    assert_eq!(availability.body["held"], 1);
    tokio::time::sleep(Duration::from_secs(4)).await;
    let availability = s.get(&format!("/shows/{show}/availability"), None).await?;
    assert_eq!(availability.body["seats"]["C1"], "available");
    assert_eq!(
        (
            availability.body["available"].clone(),
            availability.body["held"].clone()
        ),
        (json!(46), json!(0))
    );
    let booking = s.get(&format!("/bookings/{lapsing}"), None).await?;
    assert_eq!(booking.body["status"], "expired");

    // Cancel the first booking: its seats are free again.
    let cancelled = s
        .post(&format!("/bookings/{bought}/cancel"), json!({}))
        .await?;
    ensure!(cancelled.status == 200, "{cancelled:?}");
    let token = cancelled.token.context("token on cancel")?;
    let availability = s
        .get(&format!("/shows/{show}/availability"), Some(&token))
        .await?;
    assert_eq!(
        seat_statuses(&availability.body),
        vec![
            ("B1".into(), "booked".into()),
            ("B2".into(), "booked".into())
        ]
    );
    assert_eq!(availability.body["sections"][0]["available"], 10);
    let booking = s.get(&format!("/bookings/{bought}"), Some(&token)).await?;
    assert_eq!(booking.body["status"], "cancelled");

    // A user's bookings, newest first.
    let mine = s
        .get(&format!("/users/{USER}/bookings"), Some(&token))
        .await?;
    let ids: Vec<&str> = mine.body["bookings"]
        .as_array()
        .context("bookings")?
        .iter()
        .filter_map(|b| b["booking_id"].as_str())
        .collect();
    assert_eq!(ids, vec![held.as_str(), bought.as_str()]);
    let theirs = s
        .get(&format!("/users/{OTHER_USER}/bookings"), None)
        .await?;
    assert_eq!(theirs.body["bookings"][0]["status"], "expired");
    let nobody = s
        .get("/users/7d1c0a52-3c0e-4d8e-9a53-2c1d5f0b7e11/bookings", None)
        .await?;
    assert_eq!(nobody.body, json!({ "bookings": [] }));

    // ETag and 304.
    let first = s.get(&format!("/shows/{show}/availability"), None).await?;
    let etag = first.etag.context("an ETag")?;
    let again = send(
        s.client
            .get(format!("{}/shows/{show}/availability", s.query))
            .header("If-None-Match", &etag),
    )
    .await?;
    assert_eq!(again.status, 304);
    assert_eq!(again.etag.as_deref(), Some(etag.as_str()));
    let stale = send(
        s.client
            .get(format!("{}/shows/{show}", s.query))
            .header("If-None-Match", "\"not-it\""),
    )
    .await?;
    assert_eq!(stale.status, 200);

    // Unknown and malformed ids, unknown sections and routes: 404; query
    // parameters that do not parse or are out of range: 400. Each a
    // problem document of its status and type.
    let not_found = |path: String| (path, 404, "/problems/not-found");
    let bad_query = |path: String| (path, 400, "/problems/bad-query");
    for (path, status, kind) in [
        not_found("/shows/1b1c0a52-3c0e-4d8e-9a53-2c1d5f0b7e11".to_owned()),
        not_found("/shows/not-a-uuid".to_owned()),
        not_found("/shows/not-a-uuid/availability".to_owned()),
        not_found(format!("/shows/{show}/availability?section=Balcony")),
        not_found("/bookings/1b1c0a52-3c0e-4d8e-9a53-2c1d5f0b7e11".to_owned()),
        not_found("/bookings/%27%3B--".to_owned()),
        not_found("/users/nobody/bookings".to_owned()),
        not_found("/no/such/route".to_owned()),
        bad_query("/shows?limit=abc".to_owned()),
        bad_query("/shows?limit=0".to_owned()),
        bad_query("/shows?limit=501".to_owned()),
        bad_query("/shows?after=zzz".to_owned()),
        bad_query(format!("/users/{USER}/bookings?limit=-1")),
        bad_query(format!("/users/{USER}/bookings?limit=1.5")),
    ] {
        let answer = s.get(&path, None).await?;
        assert_eq!(answer.status, status, "{path}: {answer:?}");
        assert_eq!(
            answer.content_type.as_deref(),
            Some("application/problem+json"),
            "{path}"
        );
        assert_eq!(answer.body["status"], status, "{path}");
        assert_eq!(answer.body["type"], kind, "{path}");
    }
    let bad = s
        .get(&format!("/shows/{show}"), Some("v1;show=nonsense"))
        .await?;
    assert_eq!(bad.status, 400, "{bad:?}");
    assert_eq!(
        bad.content_type.as_deref(),
        Some("application/problem+json")
    );

    // A well-formed token command-api did not sign: 400, no wait at all.
    let forged = format!("v1;show={show}:0;seat=A5:99");
    let refused = s
        .get(&format!("/shows/{show}/availability"), Some(&forged))
        .await?;
    assert_eq!(refused.status, 400, "{refused:?}");
    assert_eq!(refused.body["type"], "/problems/bad-consistency-token");

    // A token the read side cannot reach in time: 504, not a stale answer.
    let future = common::signed(&format!("v1;show={show}:0;seat=A5:99"))?;
    let waited = s
        .get(&format!("/shows/{show}/availability"), Some(&future))
        .await?;
    assert_eq!(waited.status, 504, "{waited:?}");
    assert_eq!(waited.retry_after.as_deref(), Some("1"));

    // And the documents themselves equal the fold of the whole log.
    converge(&writes, &read, Duration::from_secs(20)).await?;

    let openapi = s.get("/openapi.json", None).await?;
    assert!(openapi.body["paths"]["/shows/{id}/availability"].is_object());
    let problems = ticketing_tests::openapi::parameter_problems(&openapi.body);
    assert!(problems.is_empty(), "{problems:?}");

    projector.stop().await?;
    query_service.stop().await?;
    read.drop().await?;
    writes.stop().await
}

/// Messages delivered again, a whole topic read again by a fresh group, and
/// the log applied again on top change no document (not even its version).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicated_and_replayed_messages_change_nothing() -> anyhow::Result<()> {
    let writes = Writes::spawn(600).await?;
    let read = ReadSide::new().await?;
    let projector = read.project(&writes.topic);
    let s = Script {
        client: ticketing_tests::auth::staff_client().expect("an HTTP client"),
        command: writes.base.clone(),
        query: String::new(),
    };
    let created = s.post("/shows", jazz_night()).await?;
    let show = created.body["show_id"]
        .as_str()
        .context("show_id")?
        .to_owned();
    for (i, row) in ["A", "B", "C"].iter().enumerate() {
        let (id, _) = s
            .book(
                &show,
                USER,
                &[&format!("{row}1"), &format!("{row}2")],
                i % 2 == 0,
            )
            .await?;
        if i == 0 {
            s.post(&format!("/bookings/{id}/cancel"), json!({})).await?;
        }
    }
    converge(&writes, &read, Duration::from_secs(20)).await?;
    let generation = read.store.pointer().await?.current;
    let versions = |read: ReadSide| async move {
        let shows: Vec<mongodb::bson::Document> = futures::TryStreamExt::try_collect(
            read.store
                .shows(generation)
                .clone_with_type()
                .find(mongodb::bson::doc! {})
                .await?,
        )
        .await?;
        let bookings: Vec<mongodb::bson::Document> = futures::TryStreamExt::try_collect(
            read.store
                .bookings(generation)
                .clone_with_type()
                .find(mongodb::bson::doc! {})
                .await?,
        )
        .await?;
        anyhow::Ok((shows, bookings))
    };
    let before = versions(read.clone()).await?;

    // The log again, whole, then in reverse, then every event twice in a row.
    let log = writes.log().await?;
    let applied = read.store.apply(generation, &log).await?;
    assert_eq!((applied.changed, applied.written), (0, 0), "{applied:?}");
    let reversed: Vec<_> = log.iter().rev().cloned().collect();
    let applied = read.store.apply(generation, &reversed).await?;
    assert_eq!((applied.changed, applied.written), (0, 0), "{applied:?}");
    let doubled: Vec<_> = log.iter().flat_map(|e| [e.clone(), e.clone()]).collect();
    let applied = read.store.apply(generation, &doubled).await?;
    assert_eq!(applied.changed, 0, "{applied:?}");
    assert_eq!(versions(read.clone()).await?, before);

    // A second projector of the same read models reading the topic from the
    // start under another group: everything is a repeat.
    let mut again = read.clone();
    again.group = ticketing_tests::unique_name("again");
    let second = again.project(&writes.topic);
    tokio::time::sleep(Duration::from_secs(5)).await;
    second.stop().await?;
    assert_eq!(versions(read.clone()).await?, before);
    assert_eq!(read.snapshot().await?, expected(&log)?);

    projector.stop().await?;
    read.drop().await?;
    writes.stop().await
}
