//! A stadium: a show of the contract's largest size (100,000 seats) is
//! created, projected and read whole and by section, and bookings in a
//! show of 20,000 seats leave read models equal to the fold of the log.

mod common;

use std::time::Duration;

use anyhow::{ensure, Context};
use common::{converge, send, ReadSide, Writes};
use serde_json::{json, Value};

/// `sections` sections of `rows` rows of `seats` seats, rows named per
/// section (`SA`..., `SB`...).
fn stadium(sections: u8, rows: u8, seats: u32) -> Value {
    let sections: Vec<Value> = (0..sections)
        .map(|s| {
            let rows: Vec<Value> = (0..rows)
                .map(|r| {
                    json!({"row": format!("{}{}{}", (b'A' + s) as char, (b'A' + r / 26) as char,
                                          (b'A' + r % 26) as char),
                           "seats": seats})
                })
                .collect();
            json!({"name": format!("S{s}"), "price_cents": 4000 + i64::from(s) * 1000, "rows": rows})
        })
        .collect();
    json!({"name": "Cup Final", "venue": "Stadium", "starts_at": "2027-07-01T18:00:00Z",
           "sections": sections})
}

/// POSTs `plan` as a show; its answer, a 201.
async fn create(
    client: &reqwest::Client,
    writes: &Writes,
    plan: &Value,
) -> anyhow::Result<common::Answer> {
    let created = send(client.post(format!("{}/shows", writes.base)).json(plan)).await?;
    ensure!(created.status == 201, "{created:?}");
    Ok(created)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_show_of_100000_seats_is_created_projected_and_read() -> anyhow::Result<()> {
    let writes = Writes::spawn(600).await?;
    let read = ReadSide::new().await?;
    let projector = read.project(&writes.topic);
    // On SecantusDB, with other tests running, writing the show's 400
    // blocks and 400 tallies can take over 5 s, and reading them whole
    // over 2 s.
    let (query, query_service) = read.serve_waiting(10_000, 30_000).await?;
    let client = ticketing_tests::auth::staff_client().expect("an HTTP client");
    let created = create(&client, &writes, &stadium(5, 100, 200)).await?;
    ensure!(created.body["seats"] == 100_000, "{created:?}");
    let show = created.body["show_id"].as_str().context("show_id")?;
    let token = created.token.context("a token")?;
    let whole = send(
        client
            .get(format!("{query}/shows/{show}/availability"))
            .header("X-Consistency-Token", &token),
    )
    .await?;
    ensure!(whole.status == 200, "{:?}", whole.status);
    ensure!(
        whole.body["seats"].as_object().map(|s| s.len()) == Some(100_000),
        "the whole availability lacks seats"
    );
    ensure!(whole.body["available"] == 100_000 && whole.body["total"] == 100_000);
    let section = send(client.get(format!("{query}/shows/{show}/availability?section=S3"))).await?;
    ensure!(section.status == 200, "{section:?}");
    let seats = section.body["seats"].as_object().context("seats")?;
    ensure!(seats.len() == 20_000, "{} seats in S3", seats.len());
    ensure!(seats.keys().all(|label| label.starts_with('D')));
    ensure!(section.body["total"] == 100_000 && section.body["sections"][0]["total"] == 20_000);
    let listed = send(client.get(format!("{query}/shows/{show}"))).await?;
    ensure!(
        listed.status == 200 && listed.body["seats"] == 100_000,
        "{listed:?}"
    );
    projector.stop().await?;
    query_service.stop().await?;
    read.drop().await?;
    writes.stop().await
}

/// Bookings, holds and cancellations across a 20,000-seat show: the block
/// documents, written seat by seat with targeted updates, equal the fold of
/// the whole log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_20000_seat_show_equals_the_fold_of_its_log() -> anyhow::Result<()> {
    let writes = Writes::spawn(600).await?;
    let read = ReadSide::new().await?;
    let projector = read.project(&writes.topic);
    let client = ticketing_tests::auth::staff_client().expect("an HTTP client");
    let created = create(&client, &writes, &stadium(2, 50, 200)).await?;
    let show = created.body["show_id"]
        .as_str()
        .context("show_id")?
        .to_owned();
    let user = uuid::Uuid::new_v4().to_string();
    for n in 0..60_u32 {
        // Spread over both sections and across block boundaries.
        let section = if n % 2 == 0 { 'A' } else { 'B' };
        // The last seat of a row and the first of the next: every fifth
        // row ends a block, so some bookings span two blocks.
        let row = n % 49;
        let name = |r: u32| {
            format!(
                "{section}{}{}",
                char::from(b'A' + u8::try_from(r / 26).unwrap_or(0)),
                char::from(b'A' + u8::try_from(r % 26).unwrap_or(0))
            )
        };
        let seats = vec![format!("{}200", name(row)), format!("{}1", name(row + 1))];
        let answer =
            send(client.post(format!("{}/bookings", writes.base)).json(
                &json!({"show_id": show, "user_id": user, "seats": seats, "hold": n % 3 == 0}),
            ))
            .await?;
        ensure!(answer.status == 201, "{answer:?}");
        if n % 4 == 0 {
            let id = answer.body["booking_id"].as_str().context("booking_id")?;
            let cancelled =
                send(client.post(format!("{}/bookings/{id}/cancel", writes.base))).await?;
            ensure!(cancelled.status == 200, "{cancelled:?}");
        }
    }
    converge(&writes, &read, Duration::from_secs(60)).await?;
    let blocks = read.store.blocks(read.store.pointer().await?.current);
    let expected = 2 * 10_000_u32.div_ceil(domain::read_model::BLOCK_SEATS);
    ensure!(blocks.count_documents(mongodb::bson::doc! {}).await? == u64::from(expected));
    projector.stop().await?;
    read.drop().await?;
    writes.stop().await
}

/// A show of two sections of 1,500 seats (two blocks each) with one seat
/// booked in each (AAA1, BAA1), projected, the projector stopped.
struct Booked {
    writes: Writes,
    read: ReadSide,
    query: String,
    query_service: common::Service,
    client: reqwest::Client,
    show: String,
}

async fn one_seat_booked_in_each_of_two_sections() -> anyhow::Result<Booked> {
    let writes = Writes::spawn(600).await?;
    let read = ReadSide::new().await?;
    let projector = read.project(&writes.topic);
    let (query, query_service) = read.serve().await?;
    let client = ticketing_tests::auth::staff_client().expect("an HTTP client");
    let created = create(&client, &writes, &stadium(2, 10, 150)).await?;
    let show = created.body["show_id"]
        .as_str()
        .context("show_id")?
        .to_owned();
    let booked = send(client.post(format!("{}/bookings", writes.base)).json(&json!({
        "show_id": show, "user_id": uuid::Uuid::new_v4().to_string(), "seats": ["AAA1", "BAA1"]
    })))
    .await?;
    ensure!(booked.status == 201, "{booked:?}");
    converge(&writes, &read, Duration::from_secs(60)).await?;
    projector.stop().await?;
    Ok(Booked {
        writes,
        read,
        query,
        query_service,
        client,
        show,
    })
}

/// An answer's counts agree with its seats even when a block's tally and
/// its seats disagree as read (a batch committed between the two reads):
/// here the counts of section S0's blocks are made to say one seat more
/// booked than their seats.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answers_counts_agree_with_its_seats() -> anyhow::Result<()> {
    let Booked {
        writes,
        read,
        query,
        query_service,
        client,
        show,
    } = one_seat_booked_in_each_of_two_sections().await?;
    let generation = read.store.pointer().await?.current;
    let skewed = read
        .store
        .blocks(generation)
        .update_many(
            mongodb::bson::doc! { "show_id": &show, "section": 0_i64 },
            mongodb::bson::doc! { "$inc": { "counts.booked": 1_i64, "counts.available": -1_i64 } },
        )
        .await?;
    ensure!(skewed.modified_count > 0, "{skewed:?}");
    for path in ["", "?section=S0", "?section=S1"] {
        let answer = send(client.get(format!("{query}/shows/{show}/availability{path}"))).await?;
        ensure!(answer.status == 200, "{answer:?}");
        let seats = answer.body["seats"].as_object().context("seats")?;
        let count = |status: &str| seats.values().filter(|s| *s == status).count() as u64;
        let sections = answer.body["sections"].as_array().context("sections")?;
        let (counts, of) = if path.is_empty() {
            (&answer.body, "the show")
        } else {
            ensure!(sections.len() == 1, "{sections:?}");
            (&sections[0], "the section")
        };
        for status in ["available", "held", "booked"] {
            ensure!(
                counts[status].as_u64() == Some(count(status)),
                "{path}: {of} counts {} {status} and its seats say {}",
                counts[status],
                count(status)
            );
        }
        ensure!(count("booked") == 1 || path.is_empty(), "{path}: {seats:?}");
    }
    query_service.stop().await?;
    read.drop().await?;
    writes.stop().await
}

/// A writer stopped between a block and its tally (both are written in one
/// `bulkWrite`, not in a transaction) leaves a tally behind, ahead (the
/// tally landed, the block did not) or none at all. A section's answer then
/// counts the sections without a tally from their blocks, and the next
/// writer to read the block (after a start, the redelivered batch) puts the
/// tally right. A generation whose blocks have no write number is one of
/// an older release, which the projector does not write on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tally_left_behind_by_a_stopped_writer_is_put_right() -> anyhow::Result<()> {
    use mongodb::bson::doc;
    let Booked {
        writes,
        read,
        query,
        query_service,
        client,
        show,
    } = one_seat_booked_in_each_of_two_sections().await?;
    let generation = read.store.pointer().await?.current;
    let tallies = read.store.tallies(generation);
    // S0's first block: a later write landed on its tally, not on the
    // block (counts and a hold that are not the block's). S1's first
    // block: its tally never written.
    let ahead = tallies
        .update_one(
            doc! { "_id": format!("{show}:0:0") },
            doc! { "$inc": { "counts.booked": -1_i64, "counts.held": 1_i64, "w": 3_i64 },
            "$set": { "holds.AAA1": "2030-01-01T00:00:00Z" } },
        )
        .await?;
    ensure!(ahead.modified_count == 1, "{ahead:?}");
    let gone = tallies
        .delete_one(doc! { "_id": format!("{show}:1:0") })
        .await?;
    ensure!(gone.deleted_count == 1, "{gone:?}");

    let answer = send(client.get(format!("{query}/shows/{show}/availability?section=S0"))).await?;
    ensure!(answer.status == 200, "{answer:?}");
    ensure!(
        answer.body["booked"] == 2,
        "S1's booked seat counted from its block: booked {}",
        answer.body["booked"]
    );

    // A writer starting afresh, given the batch again.
    let restarted =
        projector::store::ReadStore::connect(&read.uri, &read.database, Duration::from_secs(10))
            .await?;
    let log = writes.log().await?;
    let applied = restarted.apply(generation, &log).await?;
    ensure!(applied.changed == 0, "{applied:?}");
    ensure!(
        read.snapshot().await? == common::expected(&log)?,
        "the tallies copy their blocks again"
    );
    let answer = send(client.get(format!("{query}/shows/{show}/availability?section=S1"))).await?;
    ensure!(
        answer.body["booked"] == 2 && answer.body["held"] == 0,
        "S0's booked seat counted from its tally as put right: booked {}, held {}",
        answer.body["booked"],
        answer.body["held"]
    );

    // Generations of older releases: sections cut into blocks of another
    // size; tallies (and blocks) without write numbers; blocks without
    // write numbers and no tallies.
    ensure!(!restarted.of_an_older_shape(generation).await?);
    let shows = read.store.shows(generation);
    let show_filter = doc! { "_id": &show };
    shows
        .update_one(
            show_filter.clone(),
            doc! { "$inc": { "sections.0.blocks": -1_i64 } },
        )
        .await?;
    ensure!(
        restarted.of_an_older_shape(generation).await?,
        "blocks of another size"
    );
    shows
        .update_one(show_filter, doc! { "$inc": { "sections.0.blocks": 1_i64 } })
        .await?;
    ensure!(!restarted.of_an_older_shape(generation).await?);
    read.store
        .blocks(generation)
        .update_many(doc! {}, doc! { "$unset": { "w": "" } })
        .await?;
    tallies
        .update_many(doc! {}, doc! { "$unset": { "w": "" } })
        .await?;
    ensure!(
        restarted.of_an_older_shape(generation).await?,
        "tallies without w"
    );
    tallies.delete_many(doc! {}).await?;
    ensure!(
        restarted.of_an_older_shape(generation).await?,
        "blocks without w"
    );
    query_service.stop().await?;
    read.drop().await?;
    writes.stop().await
}
