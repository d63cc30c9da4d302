//! The GET endpoints of the contract. Each answers from one document fetched
//! by `_id` or one indexed range of the current read-model generation; the
//! only work done per request is reading a lapsed hold as available.

use std::collections::BTreeMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::time::{Duration, Instant};

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use domain::read_model::{BookingDoc, SeatDoc, ShowDoc};
use domain::{BookingId, ConsistencyToken, SeatStatus, ShowId, UserId, CONSISTENCY_HEADER};
use futures::TryStreamExt;
use mongodb::bson::{doc, Document};
use mongodb::options::FindOptions;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, OpenApi, ToSchema};

use crate::problem::QueryError;
use crate::startup::Reads;

/// Most bookings listed for one user, newest first.
pub const MAX_USER_BOOKINGS: i64 = 500;

/// The OpenAPI document of the query API.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "ticketing query-api",
        description = "Reads of shows, availability and bookings."
    ),
    paths(list_shows, show, availability, booking, user_bookings),
    components(schemas(
        ShowList,
        ShowSummary,
        ShowView,
        SectionView,
        RowView,
        Availability,
        SectionCounts,
        BookingView,
        BookingList
    ))
)]
pub struct ApiDoc;

/// `GET /shows`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ShowList {
    /// Shows by start time.
    pub shows: Vec<ShowSummary>,
}

/// A show in the list.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ShowSummary {
    /// Id.
    pub show_id: String,
    /// Name.
    pub name: String,
    /// Venue.
    pub venue: String,
    /// Start (RFC 3339).
    pub starts_at: String,
    /// Seats in all.
    pub seats: i64,
    /// Seats free now.
    pub available: i64,
}

/// `GET /shows/{id}`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ShowView {
    /// Id.
    pub show_id: String,
    /// Name.
    pub name: String,
    /// Venue.
    pub venue: String,
    /// Start (RFC 3339).
    pub starts_at: String,
    /// Seats in all.
    pub seats: i64,
    /// Free now.
    pub available: i64,
    /// Held by live holds.
    pub held: i64,
    /// Sold.
    pub booked: i64,
    /// Sections in seat-map order.
    pub sections: Vec<SectionView>,
}

/// A section with its rows and counts.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SectionView {
    /// Name.
    pub name: String,
    /// Price of a seat.
    pub price_cents: i64,
    /// Rows.
    pub rows: Vec<RowView>,
    /// Seats in the section.
    pub total: i64,
    /// Free now.
    pub available: i64,
    /// Held.
    pub held: i64,
    /// Sold.
    pub booked: i64,
}

/// A row.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct RowView {
    /// Row name.
    pub row: String,
    /// Seats in it.
    pub seats: u32,
}

/// `GET /shows/{id}/availability`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Availability {
    /// Id.
    pub show_id: String,
    /// Seats in all.
    pub total: i64,
    /// Free now (a lapsed hold is free).
    pub available: i64,
    /// Held by live holds.
    pub held: i64,
    /// Sold.
    pub booked: i64,
    /// Counts per section.
    pub sections: Vec<SectionCounts>,
    /// Every seat's status: `available`, `held` or `booked`.
    #[schema(value_type = BTreeMap<String, String>)]
    pub seats: BTreeMap<String, SeatStatus>,
}

/// A section's counts.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SectionCounts {
    /// Name.
    pub name: String,
    /// Price of a seat.
    pub price_cents: i64,
    /// Seats in the section.
    pub total: i64,
    /// Free now.
    pub available: i64,
    /// Held.
    pub held: i64,
    /// Sold.
    pub booked: i64,
}

/// `GET /bookings/{id}`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct BookingView {
    /// Id.
    pub booking_id: String,
    /// Its show.
    pub show_id: String,
    /// Who booked.
    pub user_id: String,
    /// Seat labels.
    pub seats: Vec<String>,
    /// `held`, `confirmed`, `cancelled` or `expired` (a lapsed hold reads as expired).
    #[schema(value_type = String)]
    pub status: domain::BookingState,
    /// Sum of the seats' prices.
    pub total_cents: i64,
    /// When the hold lapses, while held.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    /// When it was held or placed.
    pub created_at: String,
    /// When it last changed.
    pub updated_at: String,
}

/// `GET /users/{id}/bookings`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct BookingList {
    /// Newest first, at most 500.
    pub bookings: Vec<BookingView>,
}

/// `?section=` of the availability.
#[derive(Debug, Deserialize, IntoParams)]
pub struct SectionFilter {
    /// Narrow `sections` and `seats` to this section.
    pub section: Option<String>,
}

/// `GET /shows`: every show, by start time.
#[utoipa::path(get, path = "/shows", responses((status = 200, body = ShowList),
    (status = 503, description = "read models unreachable")))]
pub async fn list_shows(
    State(reads): State<Reads>,
    headers: HeaderMap,
) -> Result<Response, QueryError> {
    let generation = reads.generation();
    if let Some(token) = token(&headers)? {
        let show_id = token.show_id;
        wait(&reads, || {
            show_reflects(&reads, generation, show_id, &token)
        })
        .await?;
    }
    let options = FindOptions::builder()
        .projection(doc! { "seats": 0 })
        .sort(doc! { "starts_order": 1, "_id": 1 })
        .build();
    let shows: Vec<ShowDoc> = reads
        .shows(generation)
        .find(doc! {})
        .with_options(options)
        .await?
        .try_collect()
        .await?;
    let now = Utc::now();
    let shows = shows
        .iter()
        .map(|show| {
            let (counts, _) = show.counts_at(now);
            ShowSummary {
                show_id: show.show_id.clone(),
                name: show.name.clone(),
                venue: show.venue.clone(),
                starts_at: show.starts_at.clone(),
                seats: counts.total,
                available: counts.available,
            }
        })
        .collect();
    Ok(tagged(&headers, &ShowList { shows }))
}

/// `GET /shows/{id}`: the show with its sections and counts.
#[utoipa::path(get, path = "/shows/{id}", params(("id" = String, Path)),
    responses((status = 200, body = ShowView), (status = 404, description = "unknown show")))]
pub async fn show(
    State(reads): State<Reads>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, QueryError> {
    let show = find_show(&reads, &id, &headers, false).await?;
    let now = Utc::now();
    let (counts, sections) = show.counts_at(now);
    let view = ShowView {
        show_id: show.show_id.clone(),
        name: show.name.clone(),
        venue: show.venue.clone(),
        starts_at: show.starts_at.clone(),
        seats: counts.total,
        available: counts.available,
        held: counts.held,
        booked: counts.booked,
        sections: show
            .sections
            .iter()
            .zip(sections)
            .map(|(section, counts)| SectionView {
                name: section.name.clone(),
                price_cents: section.price_cents,
                rows: section
                    .rows
                    .iter()
                    .map(|r| RowView {
                        row: r.row.clone(),
                        seats: r.seats,
                    })
                    .collect(),
                total: counts.total,
                available: counts.available,
                held: counts.held,
                booked: counts.booked,
            })
            .collect(),
    };
    Ok(tagged(&headers, &view))
}

/// `GET /shows/{id}/availability`: counts and every seat's status.
#[utoipa::path(get, path = "/shows/{id}/availability", params(("id" = String, Path), SectionFilter),
    responses((status = 200, body = Availability), (status = 404, description = "unknown show or section")))]
pub async fn availability(
    State(reads): State<Reads>,
    Path(id): Path<String>,
    Query(filter): Query<SectionFilter>,
    headers: HeaderMap,
) -> Result<Response, QueryError> {
    let show = find_show(&reads, &id, &headers, true).await?;
    let now = Utc::now();
    let (counts, section_counts) = show.counts_at(now);
    let only = match &filter.section {
        Some(name) => Some(
            show.sections
                .iter()
                .position(|s| &s.name == name)
                .ok_or(QueryError::NotFound("section"))?,
        ),
        None => None,
    };
    let in_scope = |index: usize| only.is_none_or(|only| only == index);
    let sections = show
        .sections
        .iter()
        .zip(section_counts)
        .enumerate()
        .filter(|(index, _)| in_scope(*index))
        .map(|(_, (section, counts))| SectionCounts {
            name: section.name.clone(),
            price_cents: section.price_cents,
            total: counts.total,
            available: counts.available,
            held: counts.held,
            booked: counts.booked,
        })
        .collect();
    let seats = show
        .seats
        .iter()
        .filter(|(_, seat)| in_scope(seat.section as usize))
        .map(|(label, seat): (&String, &SeatDoc)| {
            (label.clone(), ShowDoc::seat_status_at(seat, now))
        })
        .collect();
    let view = Availability {
        show_id: show.show_id.clone(),
        total: counts.total,
        available: counts.available,
        held: counts.held,
        booked: counts.booked,
        sections,
        seats,
    };
    Ok(tagged(&headers, &view))
}

/// `GET /bookings/{id}`.
#[utoipa::path(get, path = "/bookings/{id}", params(("id" = String, Path)),
    responses((status = 200, body = BookingView), (status = 404, description = "unknown booking")))]
pub async fn booking(
    State(reads): State<Reads>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, QueryError> {
    let booking_id: BookingId = id.parse().map_err(|_| QueryError::NotFound("booking"))?;
    let generation = reads.generation();
    if let Some(token) = token(&headers)? {
        if let Some(sequence) = token.bookings.get(&booking_id) {
            let wanted = BTreeMap::from([(booking_id, *sequence)]);
            wait(&reads, || bookings_reflect(&reads, generation, &wanted)).await?;
        }
    }
    let booking = reads
        .bookings(generation)
        .find_one(doc! { "_id": booking_id.to_string() })
        .await?
        .ok_or(QueryError::NotFound("booking"))?;
    Ok(tagged(&headers, &view_of(&booking)))
}

/// `GET /users/{id}/bookings`: newest first.
#[utoipa::path(get, path = "/users/{id}/bookings", params(("id" = String, Path)),
    responses((status = 200, body = BookingList), (status = 404, description = "malformed user id")))]
pub async fn user_bookings(
    State(reads): State<Reads>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, QueryError> {
    let user_id: UserId = id.parse().map_err(|_| QueryError::NotFound("user"))?;
    let generation = reads.generation();
    if let Some(token) = token(&headers)? {
        wait(&reads, || {
            bookings_reflect(&reads, generation, &token.bookings)
        })
        .await?;
    }
    let options = FindOptions::builder()
        .sort(doc! { "created_order": -1, "_id": -1 })
        .limit(MAX_USER_BOOKINGS)
        .build();
    let bookings: Vec<BookingDoc> = reads
        .bookings(generation)
        .find(doc! { "user_id": user_id.to_string() })
        .with_options(options)
        .await?
        .try_collect()
        .await?;
    let bookings = bookings.iter().map(view_of).collect();
    Ok(tagged(&headers, &BookingList { bookings }))
}

fn view_of(booking: &BookingDoc) -> BookingView {
    let status = booking.state_at(Utc::now());
    BookingView {
        booking_id: booking.booking_id.clone(),
        show_id: booking.show_id.clone(),
        user_id: booking.user_id.clone(),
        seats: booking.seats.clone(),
        status,
        total_cents: booking.total_cents,
        expires_at: booking.expires_at.clone(),
        created_at: booking.created_at.clone(),
        updated_at: booking.updated_at.clone(),
    }
}

/// The show document, waiting for a consistency token first. Without
/// `seats`, the (possibly large) seat map is not fetched.
async fn find_show(
    reads: &Reads,
    id: &str,
    headers: &HeaderMap,
    seats: bool,
) -> Result<ShowDoc, QueryError> {
    let show_id: ShowId = id.parse().map_err(|_| QueryError::NotFound("show"))?;
    let generation = reads.generation();
    if let Some(token) = token(headers)? {
        if token.show_id == show_id {
            wait(reads, || show_reflects(reads, generation, show_id, &token)).await?;
        }
    }
    let shows = reads.shows(generation);
    let mut find = shows.find_one(doc! { "_id": show_id.to_string() });
    if !seats {
        find = find.projection(doc! { "seats": 0 });
    }
    find.await?.ok_or(QueryError::NotFound("show"))
}

/// The token of the request, if it sent one.
fn token(headers: &HeaderMap) -> Result<Option<ConsistencyToken>, QueryError> {
    let Some(value) = headers.get(CONSISTENCY_HEADER) else {
        return Ok(None);
    };
    let text = value
        .to_str()
        .map_err(|_| QueryError::BadToken("the consistency token is not text".to_owned()))?;
    text.parse()
        .map(Some)
        .map_err(|e: domain::TokenError| QueryError::BadToken(e.to_string()))
}

/// Polls `reflected` until it is true, or answers 504 after
/// `CONSISTENCY_WAIT_MS`.
async fn wait<F, Fut>(reads: &Reads, mut reflected: F) -> Result<(), QueryError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool, QueryError>>,
{
    let deadline = Instant::now() + reads.consistency_wait;
    loop {
        if reflected().await? {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(QueryError::NotYetConsistent(
                reads.consistency_wait.as_secs(),
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Whether the show document holds the token's show and seat sequences.
/// Fetches only the token's seats.
async fn show_reflects(
    reads: &Reads,
    generation: u32,
    show_id: ShowId,
    token: &ConsistencyToken,
) -> Result<bool, QueryError> {
    let mut projection = doc! { "_id": 1 };
    for label in token.seats.keys() {
        projection.insert(format!("seats.{label}.q"), 1);
    }
    let found: Option<Document> = reads
        .shows(generation)
        .clone_with_type::<Document>()
        .find_one(doc! { "_id": show_id.to_string() })
        .projection(projection)
        .await?;
    let Some(found) = found else {
        return Ok(false);
    };
    Ok(token.seats.iter().all(|(label, sequence)| {
        found
            .get_document("seats")
            .ok()
            .and_then(|seats| seats.get_document(label.to_string()).ok())
            .and_then(|seat| seat.get_i64("q").ok())
            .and_then(|q| u64::try_from(q).ok())
            .is_some_and(|q| q >= *sequence)
    }))
}

/// Whether every booking document has reached its sequence.
async fn bookings_reflect(
    reads: &Reads,
    generation: u32,
    wanted: &BTreeMap<BookingId, u64>,
) -> Result<bool, QueryError> {
    if wanted.is_empty() {
        return Ok(true);
    }
    let ids: Vec<String> = wanted.keys().map(ToString::to_string).collect();
    let found: Vec<Document> = reads
        .bookings(generation)
        .clone_with_type::<Document>()
        .find(doc! { "_id": { "$in": ids } })
        .projection(doc! { "q": 1 })
        .await?
        .try_collect()
        .await?;
    let reached: BTreeMap<String, i64> = found
        .iter()
        .filter_map(|d| Some((d.get_str("_id").ok()?.to_owned(), d.get_i64("q").ok()?)))
        .collect();
    Ok(wanted.iter().all(|(id, sequence)| {
        reached
            .get(&id.to_string())
            .and_then(|q| u64::try_from(*q).ok())
            .is_some_and(|q| q >= *sequence)
    }))
}

/// A JSON answer with an `ETag` of its bytes, or 304 when the client has it.
fn tagged(headers: &HeaderMap, body: &impl Serialize) -> Response {
    // Serializing our own view types cannot fail (string keys only).
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    let mut hasher = DefaultHasher::new();
    bytes.hash(&mut hasher);
    let etag = format!("\"{:016x}\"", hasher.finish());
    let etag_value = HeaderValue::from_str(&etag).unwrap_or(HeaderValue::from_static("\"0\""));
    let matches = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|list| {
            list.split(',')
                .map(str::trim)
                .any(|tag| tag == "*" || tag.strip_prefix("W/").unwrap_or(tag) == etag)
        });
    if matches {
        return (StatusCode::NOT_MODIFIED, [(header::ETAG, etag_value)]).into_response();
    }
    (
        StatusCode::OK,
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            ),
            (header::ETAG, etag_value),
        ],
        bytes,
    )
        .into_response()
}
