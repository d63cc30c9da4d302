//! The GET endpoints of the contract. Each answers from one document fetched
//! by `_id` or one indexed range of the current read-model generation; the
//! only work done per request is reading a lapsed hold as available.

use std::collections::{BTreeMap, BTreeSet};
use std::hash::{DefaultHasher, Hash, Hasher};

use axum::extract::rejection::QueryRejection;
use axum::extract::{FromRequestParts, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use domain::read_model::{
    self, BlockDoc, BookingDoc, Counts, SeatDoc, SectionDoc, ShowDoc, BOOKINGS, SHOWS,
};
use domain::{BookingId, ConsistencyToken, SeatStatus, ShowId, UserId, CONSISTENCY_HEADER};
use futures::TryStreamExt;
use mongodb::bson::{doc, Document};
use mongodb::options::FindOptions;
use mongodb::Collection;
use serde::{Deserialize, Serialize};
use service_kit::auth::{AuthProblems, BearerScheme, Caller, RateProblems, Role};
use service_kit::problem::Problem;
use tokio::time::Instant;
use utoipa::{IntoParams, OpenApi, ToSchema};

use crate::problem::QueryError;
use crate::startup::Reads;
use crate::waits::Watched;

/// Most shows or bookings on one page.
pub const MAX_PAGE: i64 = 500;
/// Shows on a page when `limit` is not given.
pub const DEFAULT_SHOWS_PAGE: i64 = 100;
/// Bookings on a page when `limit` is not given (what a user's list held
/// before it had pages).
pub const DEFAULT_BOOKINGS_PAGE: i64 = 500;

/// The OpenAPI document of the query API.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "ticketing query-api",
        description = "Reads of shows, availability and bookings."
    ),
    modifiers(&BearerScheme),
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
        BookingList,
        Problem
    ))
)]
pub struct ApiDoc;

/// `GET /shows`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ShowList {
    /// Shows by start time (then id).
    pub shows: Vec<ShowSummary>,
    /// The next page, when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
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
    /// Most live seats (held or bought) one buyer may have; absent: no
    /// limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 100)]
    pub max_seats_per_user: Option<u32>,
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

impl Availability {
    /// The answer for `show` (narrowed to section `only`) from its counts,
    /// the counts of each of its sections, and the seats asked for.
    pub fn of(
        show: &ShowDoc,
        only: Option<u32>,
        counts: &Counts,
        section_counts: &[Counts],
        seats: BTreeMap<String, SeatStatus>,
    ) -> Self {
        let sections = show
            .sections
            .iter()
            .zip(section_counts)
            .enumerate()
            .filter(|(index, _)| only.is_none_or(|only| only as usize == *index))
            .map(|(_, (section, counts))| SectionCounts::of(section, counts))
            .collect();
        Self {
            show_id: show.show_id.clone(),
            total: counts.total,
            available: counts.available,
            held: counts.held,
            booked: counts.booked,
            sections,
            seats,
        }
    }
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

impl SectionCounts {
    /// A section of the show and its counts.
    pub fn of(section: &SectionDoc, counts: &Counts) -> Self {
        Self {
            name: section.name.clone(),
            price_cents: section.price_cents,
            total: counts.total,
            available: counts.available,
            held: counts.held,
            booked: counts.booked,
        }
    }
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
    /// Once cancelled: `buyer` (the buyer themselves), `staff` (an admin
    /// for them) or `unrecorded` (tokens not checked, or cancelled before
    /// the box office recorded who).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub cancelled_by: Option<String>,
}

/// `GET /users/{id}/bookings`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct BookingList {
    /// Newest first (then by id), a page of them.
    pub bookings: Vec<BookingView>,
    /// The next page, when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
}

/// `Path` whose rejection (an id that is not UTF-8) is a 404 problem, like
/// any id that names nothing.
#[derive(Debug, FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(QueryError))]
pub struct Path<T>(pub T);

/// The headers every read takes.
#[derive(Debug, IntoParams)]
#[into_params(parameter_in = Header)]
#[allow(dead_code)]
pub struct ReadHeaders {
    /// A token from a command-api answer: the read waits until the read
    /// models hold that write (up to `CONSISTENCY_WAIT_MS`).
    #[param(rename = "X-Consistency-Token")]
    x_consistency_token: Option<String>,
    /// An `ETag` of an earlier answer: 304 when the answer is still the same.
    #[param(rename = "If-None-Match")]
    if_none_match: Option<String>,
}

/// The answers every read may give besides its own.
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)]
pub enum ReadProblems {
    /// The answer is the one the client has.
    #[response(
        status = 304,
        description = "`If-None-Match` holds the answer's `ETag`"
    )]
    NotModified,
    /// A malformed query parameter or consistency token.
    #[response(
        status = 400,
        description = "malformed `limit`, `after` or `X-Consistency-Token`",
        content_type = "application/problem+json"
    )]
    BadRequest(Problem),
    /// The read models are unreachable or slow, or too many reads wait.
    #[response(status = 503, description = "read models unreachable, or too many reads waiting for \
        their writes; retry after `Retry-After`", content_type = "application/problem+json",
        headers(("Retry-After" = u32, description = "seconds")))]
    Unavailable(Problem),
    /// The token's write did not reach the read models in time.
    #[response(status = 504, description = "the read models did not reach the token's write \
        in time; retry after `Retry-After`", content_type = "application/problem+json",
        headers(("Retry-After" = u32, description = "seconds")))]
    NotYetConsistent(Problem),
}

/// `?section=` of the availability.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct SectionFilter {
    /// Narrow `sections` and `seats` to this section.
    pub section: Option<String>,
}

/// `?limit=&after=` of a list: a page after a cursor from an earlier `next`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct Page {
    /// Most items on the page (1 to 500).
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<i64>,
    /// The cursor of the page before, as its `next` link carries it.
    #[param(pattern = r"^[+-]?[0-9]+\.[0-9a-fA-F-]{36}$")]
    pub after: Option<String>,
}

impl Page {
    fn limit(&self, default: i64) -> Result<i64, QueryError> {
        match self.limit {
            None => Ok(default),
            Some(limit) if (1..=MAX_PAGE).contains(&limit) => Ok(limit),
            Some(limit) => Err(QueryError::BadQuery(format!(
                "limit {limit} is not between 1 and {MAX_PAGE}"
            ))),
        }
    }

    /// The cursor: a sort key and an id, as `{key}.{id}`.
    fn after(&self) -> Result<Option<(i64, String)>, QueryError> {
        let Some(after) = &self.after else {
            return Ok(None);
        };
        let bad = || QueryError::BadQuery(format!("after {after:?} is not a page cursor"));
        let (key, id) = after.split_once('.').ok_or_else(bad)?;
        let key: i64 = key.parse().map_err(|_| bad())?;
        // Show and booking ids are both UUIDs; either newtype reads them.
        let id: ShowId = id.parse().map_err(|_| bad())?;
        Ok(Some((key, id.to_string())))
    }
}

/// `GET /shows`: shows by start time, a page at a time.
#[utoipa::path(get, path = "/shows", params(Page, ReadHeaders),
    responses((status = 200, body = ShowList, headers(("ETag" = String, description = "the answer's version, for `If-None-Match`"))),
        ReadProblems, RateProblems))]
pub async fn list_shows(
    State(reads): State<Reads>,
    page: Result<Query<Page>, QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, QueryError> {
    let Query(page) = page?;
    let limit = page.limit(DEFAULT_SHOWS_PAGE)?;
    let after = page.after()?;
    if let Some(token) = token(&reads, &headers)? {
        wait_for_show(&reads, &token).await?;
    }
    let filter = match &after {
        Some((starts, id)) => doc! { "$or": [
        { "starts_order": { "$gt": starts } },
        { "starts_order": starts, "_id": { "$gt": id } } ] },
        None => doc! {},
    };
    let options = FindOptions::builder()
        .sort(doc! { "starts_order": 1, "_id": 1 })
        .limit(limit + 1)
        .build();
    let mut generation = reads.generation()?;
    let mut shows: Vec<ShowDoc> = loop {
        let page: Vec<ShowDoc> = reads
            .bounded(async {
                reads
                    .shows(generation)
                    .find(filter.clone())
                    .with_options(options.clone())
                    .await?
                    .try_collect()
                    .await
            })
            .await?;
        // An empty page from a generation that was just replaced, or from
        // read models that are not there, is no answer.
        if !page.is_empty() {
            break page;
        }
        match reads.after_empty(generation, SHOWS).await? {
            Some(now) => generation = now,
            None => break page,
        }
    };
    let next = page_after(&mut shows, limit, |show| {
        format!(
            "/shows?limit={limit}&after={}.{}",
            show.starts_order, show.show_id
        )
    });
    let ids: Vec<&String> = shows.iter().map(|show| &show.show_id).collect();
    let expected = shows.iter().map(|show| show.blocks_outside(None)).sum();
    let blocks = tallies_where(
        &reads,
        generation,
        doc! { "show_id": { "$in": ids } },
        expected,
        &BTreeSet::new(),
    )
    .await?;
    let now = Utc::now();
    let shows = shows
        .iter()
        .map(|show| {
            let (counts, _) = show.counts_at(&blocks, now);
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
    Ok(tagged(&headers, &ShowList { shows, next }))
}

/// Cuts a page fetched with one extra item to `limit`, and links the page
/// after it when the extra one was there.
fn page_after<T>(items: &mut Vec<T>, limit: i64, link: impl Fn(&T) -> String) -> Option<String> {
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    if items.len() <= limit {
        return None;
    }
    items.truncate(limit);
    items.last().map(link)
}

/// `GET /shows/{id}`: the show with its sections and counts.
#[utoipa::path(get, path = "/shows/{id}", params(("id" = String, Path, format = Uuid), ReadHeaders),
    responses((status = 200, body = ShowView, headers(("ETag" = String, description = "the answer's version, for `If-None-Match`"))),
        (status = 404, description = "unknown show", body = Problem, content_type = "application/problem+json"),
        ReadProblems, RateProblems))]
pub async fn show(
    State(reads): State<Reads>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, QueryError> {
    let (generation, show, waited) = find_show(&reads, &id, &headers).await?;
    let blocks = tallies_where(
        &reads,
        generation,
        doc! { "show_id": &show.show_id },
        show.blocks_outside(None),
        &waited,
    )
    .await?;
    let now = Utc::now();
    let (counts, sections) = show.counts_at(&blocks, now);
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
        max_seats_per_user: show.max_seats_per_user,
    };
    Ok(tagged(&headers, &view))
}

/// `GET /shows/{id}/availability`: counts and every seat's status.
#[utoipa::path(get, path = "/shows/{id}/availability",
    params(("id" = String, Path, format = Uuid), SectionFilter, ReadHeaders),
    responses((status = 200, body = Availability, headers(("ETag" = String, description = "the answer's version, for `If-None-Match`"))),
        (status = 404, description = "unknown show or section", body = Problem, content_type = "application/problem+json"),
        ReadProblems, RateProblems))]
pub async fn availability(
    State(reads): State<Reads>,
    Path(id): Path<String>,
    filter: Result<Query<SectionFilter>, QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, QueryError> {
    let Query(filter) = filter?;
    let (generation, show, waited) = find_show(&reads, &id, &headers).await?;
    let only = match &filter.section {
        Some(name) => Some(
            show.section_index(name)
                .ok_or(QueryError::NotFound("section"))?,
        ),
        None => None,
    };
    // The seats of what is asked for, counted from those seats (so that
    // an answer's counts and seats agree), and with `?section=` the other
    // sections' counts from their tallies, read at once.
    let show_filter = doc! { "show_id": &show.show_id };
    let (seated, others) = match only {
        None => (
            blocks_where(&reads, reads.blocks(generation), show_filter, true).await?,
            Vec::new(),
        ),
        Some(section) => {
            let index = i64::from(section);
            tokio::try_join!(
                blocks_where(
                    &reads,
                    reads.blocks(generation),
                    doc! { "show_id": &show.show_id, "section": index },
                    true
                ),
                tallies_where(
                    &reads,
                    generation,
                    doc! { "show_id": &show.show_id, "section": { "$ne": index } },
                    show.blocks_outside(Some(section)),
                    &waited,
                ),
            )?
        }
    };
    let now = Utc::now();
    let counted: Vec<BlockDoc> = others
        .into_iter()
        .chain(seated.iter().map(|block| BlockDoc {
            block_id: block.block_id.clone(),
            show_id: block.show_id.clone(),
            section: block.section,
            block: block.block,
            counts: block.seat_counts_at(now),
            seats: BTreeMap::new(),
            holds: BTreeMap::new(),
            writes: block.writes,
        }))
        .collect();
    let (counts, section_counts) = show.counts_at(&counted, now);
    let in_scope = |index: usize| only.is_none_or(|only| only as usize == index);
    let seats = seated
        .iter()
        .filter(|block| in_scope(block.section as usize))
        .flat_map(|block| {
            block
                .seats
                .iter()
                .map(|(label, seat): (&String, &SeatDoc)| (label.clone(), seat.status_at(now)))
        })
        .collect();
    let view = Availability::of(&show, only, &counts, &section_counts, seats);
    Ok(tagged(&headers, &view))
}

/// `GET /bookings/{id}`.
#[utoipa::path(get, path = "/bookings/{id}", params(("id" = String, Path, format = Uuid), ReadHeaders),
    responses((status = 200, body = BookingView, headers(("ETag" = String, description = "the answer's version, for `If-None-Match`"))),
        (status = 404, description = "unknown booking", body = Problem, content_type = "application/problem+json"),
        ReadProblems, AuthProblems, RateProblems),
    security(("bearer" = [])))]
pub async fn booking(
    caller: Caller,
    State(reads): State<Reads>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, QueryError> {
    let booking_id: BookingId = id.parse().map_err(|_| QueryError::NotFound("booking"))?;
    if let Some(token) = token(&reads, &headers)? {
        if let Some(sequence) = token.bookings.get(&booking_id) {
            wait_for_bookings(&reads, &BTreeMap::from([(booking_id, *sequence)])).await?;
        }
    }
    let mut generation = reads.generation()?;
    let booking = loop {
        let found = reads
            .bounded(
                reads
                    .bookings(generation)
                    .find_one(doc! { "_id": booking_id.to_string() }),
            )
            .await?;
        match found {
            Some(booking) => break booking,
            None => generation = reads.after_miss(generation, BOOKINGS, "booking").await?,
        }
    };
    // A stored id that does not parse is nobody's: an admin's only.
    let allowed = match booking.user_id.parse::<UserId>() {
        Ok(owner) => caller.acts_for(owner.as_uuid()),
        Err(_) => caller.has(Role::Admin),
    };
    if !allowed {
        return Err(QueryError::Forbidden(
            "only the booking's buyer or an admin may read it",
        ));
    }
    Ok(tagged(&headers, &view_of(&booking)))
}

/// `GET /users/{id}/bookings`: newest first, a page at a time.
#[utoipa::path(get, path = "/users/{id}/bookings",
    params(("id" = String, Path, format = Uuid), Page, ReadHeaders),
    responses((status = 200, body = BookingList, headers(("ETag" = String, description = "the answer's version, for `If-None-Match`"))),
        (status = 404, description = "malformed user id", body = Problem, content_type = "application/problem+json"),
        ReadProblems, AuthProblems, RateProblems),
    security(("bearer" = [])))]
pub async fn user_bookings(
    caller: Caller,
    State(reads): State<Reads>,
    Path(id): Path<String>,
    page: Result<Query<Page>, QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, QueryError> {
    let Query(page) = page?;
    let user_id: UserId = id.parse().map_err(|_| QueryError::NotFound("user"))?;
    if !caller.acts_for(user_id.as_uuid()) {
        return Err(QueryError::Forbidden(
            "only the user or an admin may read a user's bookings",
        ));
    }
    let limit = page.limit(DEFAULT_BOOKINGS_PAGE)?;
    let after = page.after()?;
    if let Some(token) = token(&reads, &headers)? {
        wait_for_bookings(&reads, &token.bookings).await?;
    }
    let user = user_id.to_string();
    let filter = match &after {
        Some((created, id)) => doc! { "user_id": &user, "$or": [
        { "created_order": { "$lt": created } },
        { "created_order": created, "_id": { "$lt": id } } ] },
        None => doc! { "user_id": &user },
    };
    let options = FindOptions::builder()
        .sort(doc! { "created_order": -1, "_id": -1 })
        .limit(limit + 1)
        .build();
    let mut generation = reads.generation()?;
    let mut bookings: Vec<BookingDoc> = loop {
        let page: Vec<BookingDoc> = reads
            .bounded(async {
                reads
                    .bookings(generation)
                    .find(filter.clone())
                    .with_options(options.clone())
                    .await?
                    .try_collect()
                    .await
            })
            .await?;
        if !page.is_empty() {
            break page;
        }
        match reads.after_empty(generation, BOOKINGS).await? {
            Some(now) => generation = now,
            None => break page,
        }
    };
    let next = page_after(&mut bookings, limit, |booking| {
        format!(
            "/users/{user}/bookings?limit={limit}&after={}.{}",
            booking.created_order, booking.booking_id
        )
    });
    let bookings = bookings.iter().map(view_of).collect();
    Ok(tagged(&headers, &BookingList { bookings, next }))
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
        cancelled_by: match (status, &booking.cancelled_by) {
            (_, Some(by)) => Some(by.clone()),
            // A booking a projector before version 2 wrote, until a replay
            // reads its event again.
            (domain::BookingState::Cancelled, None) => Some("unrecorded".to_owned()),
            (_, None) => None,
        },
    }
}

/// The show document and the generation it was read from, waiting for a
/// consistency token first; with the blocks holding the token's seats.
pub(crate) async fn find_show(
    reads: &Reads,
    id: &str,
    headers: &HeaderMap,
) -> Result<(u32, std::sync::Arc<ShowDoc>, BTreeSet<String>), QueryError> {
    let show_id: ShowId = id.parse().map_err(|_| QueryError::NotFound("show"))?;
    let mut waited_for = None;
    if let Some(token) = token(reads, headers)? {
        if token.show_id == show_id {
            wait_for_show(reads, &token).await?;
            waited_for = Some(token);
        }
    }
    let mut generation = reads.generation()?;
    loop {
        match reads.show_in(generation, &show_id.to_string()).await? {
            Some(show) => {
                let waited = waited_for
                    .iter()
                    .flat_map(|token| token.seats.keys())
                    .filter_map(|label| show.block_id_of(label))
                    .collect();
                return Ok((generation, show, waited));
            }
            None => generation = reads.after_miss(generation, SHOWS, "show").await?,
        }
    }
}

/// The counts of the blocks matching `filter` (`expected` of them), each
/// from its tally, or from the block itself where the tally may be behind:
/// the blocks in `waited` (a consistency token waited for their seats, and
/// a tally is written beside its block, not with it), and every block when
/// a tally is missing (a writer stopped between the two).
async fn tallies_where(
    reads: &Reads,
    generation: u32,
    filter: Document,
    expected: u64,
    waited: &BTreeSet<String>,
) -> Result<Vec<BlockDoc>, QueryError> {
    let mut tallies = blocks_where(reads, reads.tallies(generation), filter.clone(), false).await?;
    if tallies.len() as u64 != expected {
        return blocks_where(reads, reads.blocks(generation), filter, false).await;
    }
    let fresh: Vec<&String> = tallies
        .iter()
        .map(|tally| &tally.block_id)
        .filter(|id| waited.contains(*id))
        .collect();
    if fresh.is_empty() {
        return Ok(tallies);
    }
    let blocks = blocks_where(
        reads,
        reads.blocks(generation),
        doc! { "_id": { "$in": fresh } },
        false,
    )
    .await?;
    for block in blocks {
        if let Some(tally) = tallies.iter_mut().find(|t| t.block_id == block.block_id) {
            *tally = block;
        }
    }
    Ok(tallies)
}

/// The blocks (or tallies) of `collection` matching `filter` in section
/// and block order, with their seats or (for counts alone) without.
async fn blocks_where(
    reads: &Reads,
    collection: Collection<BlockDoc>,
    filter: Document,
    seats: bool,
) -> Result<Vec<BlockDoc>, QueryError> {
    let options = FindOptions::builder()
        .sort(doc! { "show_id": 1, "section": 1, "block": 1 })
        .projection((!seats).then(|| doc! { "seats": 0 }))
        .build();
    reads
        .bounded(async {
            collection
                .find(filter)
                .with_options(options)
                .await?
                .try_collect()
                .await
        })
        .await
}

/// The token of the request, if it sent one: signed by command-api.
fn token(reads: &Reads, headers: &HeaderMap) -> Result<Option<ConsistencyToken>, QueryError> {
    let Some(value) = headers.get(CONSISTENCY_HEADER) else {
        return Ok(None);
    };
    let text = value
        .to_str()
        .map_err(|_| QueryError::BadToken("the consistency token is not text".to_owned()))?;
    reads
        .token_key
        .verify(text)
        .map(Some)
        .map_err(|e| QueryError::BadToken(e.to_string()))
}

fn deadline(reads: &Reads) -> Instant {
    Instant::now() + reads.consistency_wait
}

/// Waits until the read models hold the token's show and seat sequences:
/// the show document first (it says which block holds which seat), then
/// each block with the token's seats, watching only those seats.
async fn wait_for_show(reads: &Reads, token: &ConsistencyToken) -> Result<(), QueryError> {
    if token.seats.is_empty() && token.show_sequence == 0 {
        return Ok(());
    }
    let deadline = deadline(reads);
    let show_id = token.show_id.to_string();
    let wanted = token.show_sequence.max(1);
    reads
        .waits
        .until(
            reads,
            Watched::Show(show_id.clone()),
            vec!["q".to_owned()],
            deadline,
            |found| {
                found.is_some_and(|show| {
                    u64::try_from(show.get_i64("q").unwrap_or(1).max(1)).unwrap_or(0) >= wanted
                })
            },
        )
        .await?;
    if token.seats.is_empty() {
        return Ok(());
    }
    let show = reads.show(&show_id).await?;
    let mut by_block: BTreeMap<String, Vec<(&domain::SeatLabel, u64)>> = BTreeMap::new();
    for (label, sequence) in &token.seats {
        // A seat the show does not have cannot be waited for.
        let block = show
            .block_id_of(label)
            .ok_or_else(|| QueryError::BadToken(format!("the show has no seat {label}")))?;
        by_block.entry(block).or_default().push((label, *sequence));
    }
    for (block, seats) in by_block {
        let fields = seats
            .iter()
            .map(|(label, _)| read_model::paths::seat_sequence(label))
            .collect();
        reads
            .waits
            .until(reads, Watched::Block(block), fields, deadline, |found| {
                found.is_some_and(|block| block_reflects(block, &seats))
            })
            .await?;
    }
    Ok(())
}

/// Whether a block (as watched) holds these seats' sequences.
fn block_reflects(block: &Document, seats: &[(&domain::SeatLabel, u64)]) -> bool {
    seats.iter().all(|(label, sequence)| {
        block
            .get_document("seats")
            .ok()
            .and_then(|seats| seats.get_document(label.to_string()).ok())
            .and_then(|seat| match seat.get("q") {
                Some(mongodb::bson::Bson::Int64(q)) => u64::try_from(*q).ok(),
                Some(mongodb::bson::Bson::Int32(q)) => u64::try_from(*q).ok(),
                _ => None,
            })
            .is_some_and(|q| q >= *sequence)
    })
}

/// Waits until every booking document has reached its sequence.
async fn wait_for_bookings(
    reads: &Reads,
    wanted: &BTreeMap<BookingId, u64>,
) -> Result<(), QueryError> {
    let deadline = deadline(reads);
    for (id, sequence) in wanted {
        reads
            .waits
            .until(
                reads,
                Watched::Booking(id.to_string()),
                vec!["q".to_owned()],
                deadline,
                |found| {
                    found
                        .and_then(|booking| booking.get_i64("q").ok())
                        .and_then(|q| u64::try_from(q).ok())
                        .is_some_and(|q| q >= *sequence)
                },
            )
            .await?;
    }
    Ok(())
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
