//! The command endpoints of docs/api.md: request bodies parsed into domain
//! types, commands run through [`Sales`], answers shaped as the contract says.

use axum::extract::{FromRequest, FromRequestParts, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::Extension;
use domain::{
    Booking, BookingId, BookingState, Cents, Row, RowName, SeatLabel, SeatLimit, SeatMap, Section,
    SectionName, ShowDetails, ShowId, ShowName, Timestamp, UserId, VenueName, CONSISTENCY_HEADER,
};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use service_kit::auth::{AuthProblems, BearerScheme, Caller, RateProblems, Role};
use service_kit::problem::Problem;
use std::sync::Arc;
use utoipa::ToSchema;

use crate::error::{member, ApiError};
use crate::event_log::{self, LogError};
use crate::gate::Pass;
use crate::group_commit::ReplyOf;
use crate::idempotency::Keyed;
use crate::relay::RelayStatus;
use crate::reply::Reply;
use crate::sales::{Decided, Order, Sales, Settle};

/// `Json` whose rejection is our problem document.
#[derive(Debug, FromRequest)]
#[from_request(via(axum::Json), rejection(ApiError))]
pub struct Json<T>(pub T);

/// `Path` whose rejection (an id that is not UTF-8) is a 404 problem: a
/// malformed id names no booking.
#[derive(Debug, FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(ApiError))]
pub struct Path<T>(pub T);

/// `POST /shows` body.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewShow {
    /// What the show is called: up to 200 characters, not blank.
    #[schema(min_length = 1, max_length = 200, pattern = r"\S")]
    pub name: String,
    /// Where it takes place: up to 200 characters, not blank.
    #[schema(min_length = 1, max_length = 200, pattern = r"\S")]
    pub venue: String,
    /// When it starts (RFC 3339).
    #[schema(value_type = String, format = DateTime)]
    pub starts_at: Timestamp,
    /// Priced sections with their rows; section names are unique, and so
    /// are row names across the whole show. At most 100,000 seats in all.
    #[schema(min_items = 1)]
    pub sections: Vec<NewSection>,
    /// Most live seats (held or bought) one buyer may have in the show.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 100)]
    pub max_seats_per_user: Option<i64>,
}

/// A section of a new show.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewSection {
    /// The section's name: up to 100 characters, not blank.
    #[schema(min_length = 1, max_length = 100, pattern = r"\S")]
    pub name: String,
    /// Price of each seat, in cents: 0 to 1,000,000,000.
    #[schema(minimum = 0, maximum = 1_000_000_000)]
    pub price_cents: i64,
    /// Its rows.
    #[schema(min_items = 1)]
    pub rows: Vec<NewRow>,
}

/// A row of a new show.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewRow {
    /// Row name: 1 to 8 letters.
    #[schema(pattern = r"^[A-Za-z]{1,8}$")]
    pub row: String,
    /// How many seats, numbered from 1.
    #[schema(minimum = 1, maximum = 100000)]
    pub seats: u32,
}

impl NewShow {
    fn into_details(self, show_id: ShowId) -> Result<ShowDetails, ApiError> {
        let sections = self
            .sections
            .into_iter()
            .map(|section| {
                Ok(Section {
                    name: SectionName::new(&section.name)?,
                    price_cents: Cents::new(section.price_cents)?,
                    rows: section
                        .rows
                        .into_iter()
                        .map(|row| {
                            Ok(Row {
                                row: RowName::new(&row.row)?,
                                seats: row.seats,
                            })
                        })
                        .collect::<Result<_, ApiError>>()?,
                })
            })
            .collect::<Result<_, ApiError>>()?;
        Ok(ShowDetails {
            show_id,
            name: ShowName::new(&self.name)?,
            venue: VenueName::new(&self.venue)?,
            starts_at: self.starts_at,
            seat_map: SeatMap::new(sections)?,
            max_seats_per_user: self.max_seats_per_user.map(SeatLimit::new).transpose()?,
        })
    }
}

/// The answers every write with a body may give besides its own.
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)]
pub enum WriteProblems {
    /// The body is not JSON.
    #[response(
        status = 400,
        description = "the body is not JSON",
        content_type = "application/problem+json"
    )]
    NotJson(Problem),
    /// The body is too big.
    #[response(
        status = 413,
        description = "the body is over 64 KiB",
        content_type = "application/problem+json"
    )]
    TooLarge(Problem),
    /// The body is not declared JSON.
    #[response(
        status = 415,
        description = "the body is not `application/json`",
        content_type = "application/problem+json"
    )]
    NotJsonContent(Problem),
    /// Postgres is unreachable or the write kept meeting others.
    #[response(status = 503, description = "Postgres unreachable, or the write kept meeting others; \
        retry after `Retry-After`", content_type = "application/problem+json",
        headers(("Retry-After" = u32, description = "seconds")))]
    Unavailable(Problem),
}

/// The answers every write on a booking may give besides its own.
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)]
pub enum ActionProblems {
    /// Postgres is unreachable or the write kept meeting others.
    #[response(status = 503, description = "Postgres unreachable, or the write kept meeting others; \
        retry after `Retry-After`", content_type = "application/problem+json",
        headers(("Retry-After" = u32, description = "seconds")))]
    Unavailable(Problem),
}

/// `POST /shows` answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct ShowCreated {
    /// The new show's id.
    pub show_id: String,
    /// How many seats it has.
    pub seats: u32,
}

/// `POST /shows`: creates a show with its seat map.
#[utoipa::path(post, path = "/shows", request_body = NewShow,
    params(("Idempotency-Key" = Option<String>, Header, min_length = 1, max_length = 255,
        description = "retry-safe key, 1 to 255 visible ASCII characters")),
    responses((status = 201, body = ShowCreated, headers(("Location" = String, description = "the show's path"), ("X-Consistency-Token" = String, description = "send it to query-api to read this write"))),
        (status = 409, description = "the same key in flight (`in_progress`)", body = Problem, content_type = "application/problem+json",
            headers(("Retry-After" = u32, description = "seconds"))),
        (status = 422, description = "a member missing, unknown or of the wrong type (`bad-body`); a rule of the \
            seat map broken (`invalid-request`); a malformed `Idempotency-Key`, or one reused with another body", body = Problem, content_type = "application/problem+json"),
        WriteProblems, AuthProblems, RateProblems),
    security(("bearer" = [])))]
#[tracing::instrument(skip_all, fields(show_id = tracing::field::Empty))]
pub async fn create_show(
    caller: Caller,
    State(sales): State<Sales>,
    headers: HeaderMap,
    Json(body): Json<NewShow>,
) -> Result<Reply, ApiError> {
    if !caller.has(Role::Organizer) {
        return Err(ApiError::Forbidden("only an organizer may create shows"));
    }
    let keyed = Keyed::from_headers(&headers, "POST /shows", &caller, &body)?;
    let show_id = ShowId::from_uuid(uuid::Uuid::new_v4());
    tracing::Span::current().record("show_id", tracing::field::display(show_id));
    let details = body.into_details(show_id)?;
    let signer = sales.clone();
    sales
        .transact(keyed.as_ref(), |conn| {
            let (details, signer) = (details.clone(), signer.clone());
            Box::pin(async move {
                let created = ShowCreated {
                    show_id: details.show_id.to_string(),
                    seats: details.seat_map.seat_count(),
                };
                let token = Sales::create_show(conn, details).await?;
                let mut reply = Reply::json(StatusCode::CREATED, &created);
                reply.header(header::LOCATION, location("shows", &created.show_id));
                with_token(&mut reply, &signer.signed(&token));
                Ok(reply)
            })
        })
        .await
}

/// `POST /bookings` body.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewBooking {
    /// The show.
    #[schema(format = Uuid)]
    pub show_id: String,
    /// The buyer: the token's user when left out. Another user's id is
    /// refused (403) unless the token is an admin's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(format = Uuid)]
    pub user_id: Option<String>,
    /// Seat labels such as `A1`: 1 to 10 different seats of the show.
    /// Exactly one of `seats` and `best_available`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Vec<SeatLabelText>>, min_items = 1, max_items = 10)]
    pub seats: Option<Vec<String>>,
    /// Let the box office pick adjacent seats. Exactly one of `seats` and
    /// `best_available`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub best_available: Option<BestAvailable>,
    /// Hold the seats (to confirm later) instead of booking them at once.
    #[serde(default)]
    pub hold: bool,
}

/// `best_available` of a booking: `count` adjacent seats of one row of
/// `section`, the row nearest the stage first, then the block nearest the
/// row's middle.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BestAvailable {
    /// How many seats: 1 to 10.
    #[schema(minimum = 1, maximum = 10)]
    pub count: u32,
    /// The section's name, as the show has it.
    #[schema(min_length = 1, max_length = 100, pattern = r"\S")]
    pub section: String,
}

/// A seat label as the document describes it: a row's letters, then the
/// seat's number from 1, with no leading zero.
#[derive(ToSchema)]
#[schema(as = SeatLabel, pattern = r"^[A-Za-z]{1,8}[1-9][0-9]{0,9}$", example = "A1")]
#[allow(dead_code)]
struct SeatLabelText(String);

/// A booking as the command API answers it.
#[derive(Debug, Serialize, ToSchema)]
pub struct BookingView {
    /// Its id.
    pub booking_id: String,
    /// `held`, `confirmed`, `cancelled` or `expired`.
    pub status: String,
    /// The show.
    pub show_id: String,
    /// The buyer.
    pub user_id: String,
    /// Its seats.
    pub seats: Vec<String>,
    /// What it costs, in cents.
    pub total_cents: u64,
    /// When a hold lapses.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub expires_at: Option<Timestamp>,
}

impl BookingView {
    fn of(booking: &Booking, now: Timestamp) -> Result<Self, ApiError> {
        let details = booking
            .details()
            .ok_or_else(|| ApiError::Internal(anyhow::anyhow!("a booking without details")))?;
        let status = match booking.state_at(now) {
            Some(BookingState::Held) => "held",
            Some(BookingState::Confirmed) => "confirmed",
            Some(BookingState::Cancelled) => "cancelled",
            Some(BookingState::Expired) | None => "expired",
        };
        Ok(Self {
            booking_id: details.booking_id.to_string(),
            status: status.to_owned(),
            show_id: details.show_id.to_string(),
            user_id: details.user_id.to_string(),
            seats: details.seats.iter().map(|s| s.label.to_string()).collect(),
            total_cents: details.total_cents.get(),
            expires_at: match booking.status() {
                Some(domain::BookingStatus::Held { expires_at }) => Some(expires_at),
                _ => None,
            },
        })
    }
}

/// Parses the body's ids and labels, and decides whose booking it is.
/// Labels that cannot be seats of any show are reported with the show's
/// unknown seats, as one list.
fn parse_booking(
    body: &NewBooking,
    caller: &Caller,
) -> Result<(ShowId, UserId, Vec<SeatLabel>, Vec<String>), ApiError> {
    let show_id: ShowId = body.show_id.parse()?;
    let named: Option<UserId> = body.user_id.as_deref().map(str::parse).transpose()?;
    let user_id =
        match (named, caller.user()) {
            (Some(named), _) if caller.acts_for(named.as_uuid()) => named,
            (Some(_), _) => return Err(ApiError::Forbidden(
                "a booking can only be made in one's own name (user_id is not the token's user)",
            )),
            (None, Some(user)) => UserId::from_uuid(user),
            (None, None) => {
                return Err(ApiError::invalid(
                    "user_id is required when authentication is disabled",
                    serde_json::Map::new(),
                ))
            }
        };
    let seats = body.seats.as_deref().unwrap_or_default();
    let mut labels = Vec::with_capacity(seats.len());
    let mut malformed = Vec::new();
    for text in seats {
        match text.parse::<SeatLabel>() {
            Ok(label) => labels.push(label),
            Err(_) => malformed.push(text.clone()),
        }
    }
    Ok((show_id, user_id, labels, malformed))
}

/// `POST /bookings`: books or holds seats, all or nothing.
#[utoipa::path(post, path = "/bookings", request_body = NewBooking,
    params(("Idempotency-Key" = Option<String>, Header, min_length = 1, max_length = 255,
        description = "retry-safe key, 1 to 255 visible ASCII characters")),
    responses((status = 201, body = BookingView, headers(("Location" = String, description = "the booking's path"), ("X-Consistency-Token" = String, description = "send it to query-api to read this write"))),
        (status = 404, description = "unknown show", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "seats unavailable (`unavailable_seats`), no row of the section \
            with `best_available.count` adjacent free seats (`no-adjacent-seats`), over the show's seat \
            limit per buyer (`seat-limit`, with `limit` and `current`), or the same key in flight \
            (`in_progress`, with `Retry-After`)", body = Problem, content_type = "application/problem+json", headers(("Retry-After" = u32, description = "seconds, when in flight"))),
        (status = 422, description = "a member missing, unknown or of the wrong type (`bad-body`); an id that is \
            not a UUID, a seat list that is empty, too long, repeats a seat or names seats the show lacks \
            (`unknown_seats`); both or neither of `seats` and `best_available`, a `best_available.count` \
            outside 1 to 10 or a section the show lacks; a malformed `Idempotency-Key`, or one reused \
            with another body", body = Problem, content_type = "application/problem+json"),
        WriteProblems, AuthProblems, RateProblems),
    security(("bearer" = [])))]
pub async fn place_booking(
    caller: Caller,
    State(sales): State<Sales>,
    headers: HeaderMap,
    body: Result<Json<NewBooking>, ApiError>,
) -> Result<Reply, ApiError> {
    let hold = body.as_ref().is_ok_and(|Json(body)| body.hold);
    let answer = match body {
        Ok(Json(body)) => place(caller, sales, headers, body).await,
        Err(refusal) => Err(refusal),
    };
    metrics::counter!(BOOKINGS, "outcome" => booking_outcome(&answer, hold)).increment(1);
    answer
}

/// Bookings asked for, by `outcome`: `booked`, `held`, `replayed` (a
/// retry answered with its key's first answer) or the refusal's problem
/// type (`seats-unavailable`, `seat-limit`, `unavailable`, ...).
pub const BOOKINGS: &str = "bookings_total";

fn booking_outcome(answer: &Result<Reply, ApiError>, hold: bool) -> String {
    match answer {
        Ok(reply) if reply.replayed => "replayed".to_owned(),
        Ok(reply) if reply.status == StatusCode::CREATED => {
            if hold { "held" } else { "booked" }.to_owned()
        }
        // A refusal kept for an `Idempotency-Key`: its problem's type.
        Ok(reply) => reply.problem_kind().unwrap_or_else(|| "refused".to_owned()),
        Err(refusal) => refusal.kind().to_owned(),
    }
}

#[tracing::instrument(skip_all, fields(show_id = %body.show_id, booking_id = tracing::field::Empty))]
async fn place(
    caller: Caller,
    sales: Sales,
    headers: HeaderMap,
    body: NewBooking,
) -> Result<Reply, ApiError> {
    let keyed = Keyed::from_headers(&headers, "POST /bookings", &caller, &body)?;
    if body.seats.is_some() == body.best_available.is_some() {
        return Err(ApiError::invalid(
            "a booking names its `seats` or asks for `best_available`: exactly one of them",
            serde_json::Map::new(),
        ));
    }
    let (show_id, user_id, labels, malformed) = parse_booking(&body, &caller)?;
    let show = sales.show(show_id).await?;
    let hold_for =
        chrono::Duration::from_std(sales.hold_for).map_err(|e| ApiError::Internal(e.into()))?;
    if let Some(best) = &body.best_available {
        let order = Order {
            booking_id: BookingId::from_uuid(uuid::Uuid::new_v4()),
            show_id,
            user_id,
            seats: Vec::new(),
            hold_for: body.hold.then_some(hold_for),
        };
        tracing::Span::current().record("booking_id", tracing::field::display(order.booking_id));
        return place_best_available(&sales, keyed.as_ref(), show, order, best).await;
    }
    let order = Order {
        booking_id: BookingId::from_uuid(uuid::Uuid::new_v4()),
        show_id,
        user_id,
        seats: labels.clone(),
        hold_for: body.hold.then_some(hold_for),
    };
    tracing::Span::current().record("booking_id", tracing::field::display(order.booking_id));
    if !malformed.is_empty() {
        // Malformed labels are unknown seats too, reported with the show's.
        let mut unknown = malformed;
        if let Some(details) = show.details() {
            unknown.extend(
                labels
                    .iter()
                    .filter(|l| details.seat_map.section_of(l).is_none())
                    .map(ToString::to_string),
            );
        }
        let refusal = ApiError::invalid(
            format!("the show has no seat {}", unknown.join(", ")),
            member(
                "unknown_seats",
                unknown.into_iter().map(Value::from).collect(),
            ),
        );
        return sales.refuse(keyed.as_ref(), refusal).await;
    }
    // Refusals that no state can change come before any wait (and are kept
    // for the key as any first answer).
    if let Err(refusal) = Sales::check(&show, &order) {
        return sales.refuse(keyed.as_ref(), refusal).await;
    }
    let reply_of = booked_reply(&sales);
    let mut pass = match enter_gate(&sales, keyed.as_ref(), &show, &order, &reply_of).await? {
        Gated::Through(pass) => pass,
        Gated::Answered(answer) => return answer,
    };
    let reply = sales.book(keyed.as_ref(), show, order, reply_of).await?;
    // Only a decision just made took the seats now; a replayed 201 tells of
    // one made long ago (the seats may be free again since).
    if reply.status == StatusCode::CREATED && !reply.replayed {
        pass.took();
    }
    Ok(reply)
}

/// The 201 of a booking placed: the booking, where to find it, and the
/// consistency token of its write.
fn booked_reply(sales: &Sales) -> ReplyOf {
    let signer = sales.clone();
    Arc::new(move |decided: &Decided| {
        let view = BookingView::of(&decided.booking, decided.now)?;
        let mut reply = Reply::json(StatusCode::CREATED, &view);
        reply.header(header::LOCATION, location("bookings", &view.booking_id));
        with_token(&mut reply, &signer.signed(&decided.token));
        Ok(reply)
    })
}

/// Books `best.count` adjacent seats the box office picks in
/// `best.section` (see [`crate::best_available`]).
async fn place_best_available(
    sales: &Sales,
    keyed: Option<&Keyed>,
    show: Arc<domain::Show>,
    order: Order,
    best: &BestAvailable,
) -> Result<Reply, ApiError> {
    let max = domain::best_available::MAX_COUNT;
    if !(1..=max).contains(&best.count) {
        return Err(ApiError::invalid(
            format!("best_available.count must be 1 to {max}"),
            serde_json::Map::new(),
        ));
    }
    let wanted = SectionName::new(&best.section)?;
    let section = show
        .details()
        .and_then(|d| d.seat_map.sections().iter().position(|s| s.name == wanted))
        .ok_or_else(|| {
            ApiError::invalid(
                format!("the show has no section {:?}", best.section),
                serde_json::Map::new(),
            )
        })?;
    let reply_of = booked_reply(sales);
    crate::best_available::pick_and_book(sales, keyed, show, order, section, best.count, reply_of)
        .await
}

/// What the seat gate let through.
enum Gated {
    /// The command may go to Postgres.
    Through(Pass),
    /// Answered without a lock (see [`enter_gate`]).
    Answered(Result<Reply, ApiError>),
}

/// Waits for the seat gate (see [`crate::gate`]). A command that meets
/// another for its seats is refused, without a lock, if the seats are taken
/// as of the committed state, or as soon as one taken while it waited is
/// known; the refusal is kept for its `Idempotency-Key`.
async fn enter_gate(
    sales: &Sales,
    keyed: Option<&Keyed>,
    show: &Arc<domain::Show>,
    order: &Order,
    reply_of: &ReplyOf,
) -> Result<Gated, ApiError> {
    let arrived = tokio::time::Instant::now();
    let seats: Vec<i64> = order
        .seats
        .iter()
        .map(|label| event_log::seat_key(order.show_id, label))
        .collect();
    if let Some(pass) = sales.gate.try_enter(&seats) {
        return Ok(Gated::Through(pass));
    }
    if let Some(answer) = sales
        .refused_from_snapshot(keyed, show, order, reply_of)
        .await?
    {
        return Ok(Gated::Answered(Ok(answer)));
    }
    let mut pass = sales
        .gate
        .enter(&seats, sales.command_wait())
        .await
        .ok_or(ApiError::StoreUnavailable(Some(LogError::LockTimeout)))?;
    let taken = pass.taken_since(arrived);
    if taken.is_empty() {
        return Ok(Gated::Through(pass));
    }
    drop(pass);
    let seats = order
        .seats
        .iter()
        .filter(|label| taken.contains(&event_log::seat_key(order.show_id, label)))
        .cloned()
        .collect();
    Ok(Gated::Answered(
        sales.refuse(keyed, ApiError::Unavailable { seats }).await,
    ))
}

/// `POST /bookings/{id}/confirm`: buys a held booking.
#[utoipa::path(post, path = "/bookings/{id}/confirm", params(("id" = String, Path, format = Uuid)),
    responses((status = 200, body = BookingView, headers(("X-Consistency-Token" = String, description = "send it to query-api to read this write"))),
        (status = 404, description = "unknown or malformed booking id", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "expired or cancelled (`booking_status`)", body = Problem, content_type = "application/problem+json"),
        ActionProblems, AuthProblems, RateProblems),
    security(("bearer" = [])))]
#[tracing::instrument(skip_all, fields(booking_id = %id, show_id = tracing::field::Empty))]
pub async fn confirm_booking(
    caller: Caller,
    State(sales): State<Sales>,
    Path(id): Path<String>,
) -> Result<Reply, ApiError> {
    settle(&sales, &caller, &id, Settle::Confirm).await
}

/// `POST /bookings/{id}/cancel`: cancels a booking and frees its seats.
#[utoipa::path(post, path = "/bookings/{id}/cancel", params(("id" = String, Path, format = Uuid)),
    responses((status = 200, body = BookingView, headers(("X-Consistency-Token" = String, description = "send it to query-api to read this write"))),
        (status = 404, description = "unknown or malformed booking id", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "expired (`booking_status`)", body = Problem, content_type = "application/problem+json"),
        ActionProblems, AuthProblems, RateProblems),
    security(("bearer" = [])))]
#[tracing::instrument(skip_all, fields(booking_id = %id, show_id = tracing::field::Empty))]
pub async fn cancel_booking(
    caller: Caller,
    State(sales): State<Sales>,
    Path(id): Path<String>,
) -> Result<Reply, ApiError> {
    let by = caller.user().map(domain::UserId::from_uuid);
    settle(&sales, &caller, &id, Settle::Cancel { by }).await
}

async fn settle(
    sales: &Sales,
    caller: &Caller,
    id: &str,
    action: Settle,
) -> Result<Reply, ApiError> {
    // A malformed id names no booking.
    let booking_id: BookingId = id.parse().map_err(|_| ApiError::NotFound("booking"))?;
    let lock_wait = sales.lock_wait;
    sales
        .transact(None, |conn| {
            let (signer, caller) = (sales.clone(), caller.clone());
            Box::pin(async move {
                let decided = Sales::settle(conn, &caller, booking_id, action, lock_wait).await?;
                let view = BookingView::of(&decided.booking, decided.now)?;
                let mut reply = Reply::json(StatusCode::OK, &view);
                with_token(&mut reply, &signer.signed(&decided.token));
                Ok(reply)
            })
        })
        .await
}

/// Lets the client read its own write from the query side (docs/api.md,
/// "Consistency"). Stored with the answer, so a keyed retry gets it too.
fn with_token(reply: &mut Reply, signed: &str) {
    // Ids, labels, numbers and hex only: always a valid header value.
    if let Ok(value) = HeaderValue::from_str(signed) {
        reply.header(HeaderName::from_static(CONSISTENCY_HEADER), value);
    }
}

fn location(collection: &str, id: &str) -> HeaderValue {
    // Ids are UUIDs: always a valid header value.
    HeaderValue::from_str(&format!("/{collection}/{id}")).unwrap_or(HeaderValue::from_static("/"))
}

/// `GET /readyz`: 200 when Postgres answers, 503 whenever it does not,
/// whatever the failure looks like. Kafka being down does not make the
/// service unready (commands are still taken; the log is the outbox), so the
/// relay's state and lag are detail in the body.
pub async fn readyz(
    State(sales): State<Sales>,
    Extension(relay): Extension<RelayStatus>,
) -> Result<axum::Json<Value>, ApiError> {
    sqlx::query("SELECT 1")
        .execute(sales.pool())
        .await
        .map_err(LogError::Unreachable)?;
    Ok(axum::Json(
        serde_json::json!({ "postgres": "up", "relay": relay.report() }),
    ))
}

/// The OpenAPI document.
#[derive(utoipa::OpenApi)]
#[openapi(
    info(title = "ticketing command-api", version = "1.1"),
    modifiers(&BearerScheme),
    paths(create_show, place_booking, confirm_booking, cancel_booking),
    components(schemas(
        NewShow,
        NewSection,
        NewRow,
        ShowCreated,
        NewBooking,
        BestAvailable,
        BookingView,
        Problem
    ))
)]
pub struct ApiDoc;

#[cfg(test)]
mod tests {
    use super::*;
    use utoipa::OpenApi;

    /// The limits the document states are the ones the domain enforces.
    #[test]
    fn the_document_states_the_limits_the_domain_enforces() {
        let doc = serde_json::to_value(ApiDoc::openapi()).expect("a JSON document");
        let schema = |name: &str| doc["components"]["schemas"][name]["properties"].clone();
        let show = schema("NewShow");
        assert_eq!(show["name"]["maxLength"], ShowName::MAX_CHARS);
        assert_eq!(show["venue"]["maxLength"], VenueName::MAX_CHARS);
        assert_eq!(
            schema("NewSection")["name"]["maxLength"],
            SectionName::MAX_CHARS
        );
        assert_eq!(
            schema("NewRow")["seats"]["maximum"],
            domain::show::MAX_SEATS_PER_SHOW
        );
        assert_eq!(
            schema("NewSection")["price_cents"]["maximum"],
            domain::show::MAX_PRICE_CENTS
        );
        assert_eq!(
            show["max_seats_per_user"]["maximum"],
            domain::show::MAX_SEATS_PER_USER
        );
        assert_eq!(
            schema("NewBooking")["seats"]["maxItems"],
            domain::box_office::MAX_SEATS_PER_BOOKING
        );
        let key = doc["paths"]["/bookings"]["post"]["parameters"]
            .as_array()
            .and_then(|p| p.iter().find(|p| p["name"] == "Idempotency-Key"))
            .cloned()
            .unwrap_or_default();
        assert_eq!(key["schema"]["maxLength"], crate::idempotency::MAX_KEY_LEN);
    }
}
