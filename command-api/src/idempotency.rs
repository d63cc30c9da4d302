//! `Idempotency-Key`, the way pretix does it: the first answer to a key is
//! kept and replayed to retries with the same request.
//!
//! A request with a key first takes the key's advisory lock in its
//! transaction, which writes nothing (no transaction id is handed out before
//! the command's stream locks are held), and looks for a stored answer. A
//! retry arriving while the first request is in flight waits on that lock,
//! then finds the answer the first one committed. The key's row is written
//! with the answer, in the same transaction as the events it describes, so
//! a key and its events commit together or not at all: a crash or a 5xx
//! leaves no key behind, and the retry runs the command afresh.
//!
//! Keys belong to their user: two clients that happen to pick the same key
//! never meet. The stored `route` column holds the route and the user
//! (`POST /bookings by <sub>`), which also keys the advisory lock; with
//! `AUTH_DISABLED` it holds the route alone, as in version 1.0.

use std::collections::HashMap;

use axum::http::HeaderMap;
use sqlx::postgres::PgRow;
use sqlx::{PgConnection, PgPool, Row};

use service_kit::auth::Caller;

use crate::error::ApiError;
use crate::reply::Reply;

/// Header carrying the key.
pub const HEADER: &str = "idempotency-key";

/// Longest accepted key, in bytes.
pub const MAX_KEY_LEN: usize = 255;

/// How long a retry waits for an in-flight first request before 409, in ms.
const IN_FLIGHT_WAIT_MS: i32 = 5_000;

/// A request that carries a key.
#[derive(Debug, Clone)]
pub struct Keyed {
    /// The route and the key's user: what the key is unique within.
    route: String,
    key: String,
    request: Vec<u8>,
}

impl Keyed {
    /// Reads the key, if any, of `caller`'s request to `route` whose
    /// canonical form is `request` (the parsed body re-serialized, so that
    /// formatting does not make two equal requests differ).
    ///
    /// # Errors
    /// 422 when the key is empty, too long or not visible ASCII.
    pub fn from_headers(
        headers: &HeaderMap,
        route: &'static str,
        caller: &Caller,
        request: &impl serde::Serialize,
    ) -> Result<Option<Self>, ApiError> {
        let Some(value) = headers.get(HEADER) else {
            return Ok(None);
        };
        let key = value
            .to_str()
            .ok()
            .filter(|k| !k.is_empty() && k.len() <= MAX_KEY_LEN)
            .ok_or_else(|| {
                ApiError::invalid(
                    format!("Idempotency-Key must be 1 to {MAX_KEY_LEN} visible ASCII characters"),
                    serde_json::Map::new(),
                )
            })?;
        let request = serde_json::to_vec(request).map_err(|e| ApiError::Internal(e.into()))?;
        let route = match caller.user() {
            Some(user) => format!("{route} by {user}"),
            None => route.to_owned(),
        };
        Ok(Some(Self {
            route,
            key: key.to_owned(),
            request,
        }))
    }
}

/// What the key says about this request.
#[derive(Debug)]
pub enum Claim {
    /// First time: run the command.
    Fresh,
    /// Seen before with the same request: answer this.
    Replay(Reply),
}

/// Claims the key in the caller's transaction.
///
/// # Errors
/// [`ApiError::IdempotencyMismatch`] when the key was used with another
/// request, [`ApiError::InProgress`] when the first request is still running
/// after a wait, store errors otherwise.
pub async fn claim(conn: &mut PgConnection, keyed: &Keyed) -> Result<Claim, ApiError> {
    let stored = sqlx::query(
        "SELECT request, status, headers, body FROM claim_idempotency_key($1, $2, $3, $4, $5)",
    )
    .bind(keyed.lock_key().0)
    .bind(keyed.lock_key().1)
    .bind(IN_FLIGHT_WAIT_MS)
    .bind(&keyed.route)
    .bind(&keyed.key)
    .fetch_optional(&mut *conn)
    .await;
    match stored {
        Ok(Some(row)) => keyed.replay(&row).map(Claim::Replay),
        Ok(None) => Ok(Claim::Fresh),
        Err(e) => Err(in_flight_or(e)),
    }
}

/// The answer to a request refused without its stream locks: the key's
/// stored answer if it has one (its first request may have won the very
/// seats), else `refusal`, stored for the key's retries. One round trip,
/// outside any transaction of the caller.
///
/// # Errors
/// As [`claim`].
pub async fn refuse(pool: &PgPool, keyed: &Keyed, refusal: &Reply) -> Result<Reply, ApiError> {
    let row = sqlx::query(
        "SELECT request, status, headers, body
           FROM refuse_with_idempotency_key($1, $2, $3, $4, $5, $6, $7, $8, $9)",
    )
    .bind(keyed.lock_key().0)
    .bind(keyed.lock_key().1)
    .bind(IN_FLIGHT_WAIT_MS)
    .bind(&keyed.route)
    .bind(&keyed.key)
    .bind(&keyed.request)
    .bind(i16::try_from(refusal.status.as_u16()).unwrap_or(i16::MAX))
    .bind(refusal.stored_headers())
    .bind(&refusal.body)
    .fetch_one(pool)
    .await
    .map_err(in_flight_or)?;
    keyed.replay(&row)
}

/// The stored answers of `keys`, by route and key, read in the caller's
/// transaction (which holds the keys' locks).
///
/// # Errors
/// Store errors.
pub async fn stored_answers(
    conn: &mut PgConnection,
    keys: &[&Keyed],
) -> Result<HashMap<(String, String), PgRow>, ApiError> {
    if keys.is_empty() {
        return Ok(HashMap::new());
    }
    let rows = sqlx::query(
        "SELECT k.route, k.key, k.request, k.status, k.headers, k.body
           FROM idempotency_keys AS k
           JOIN unnest($1::text[], $2::text[]) AS u(route, key)
             ON k.route = u.route AND k.key = u.key",
    )
    .bind(keys.iter().map(|k| k.route.as_str()).collect::<Vec<_>>())
    .bind(keys.iter().map(|k| k.key.as_str()).collect::<Vec<_>>())
    .fetch_all(conn)
    .await?;
    let mut stored = HashMap::new();
    for row in rows {
        let route: String = row.try_get("route")?;
        let key: String = row.try_get("key")?;
        stored.insert((route, key), row);
    }
    Ok(stored)
}

fn in_flight_or(error: sqlx::Error) -> ApiError {
    match &error {
        // 55P03: lock_timeout while waiting for the in-flight first request.
        sqlx::Error::Database(e) if e.code().as_deref() == Some("55P03") => ApiError::InProgress,
        _ => error.into(),
    }
}

impl Keyed {
    /// The key's advisory lock, in the two-key space (which never meets
    /// the stream locks' one-key space).
    pub fn lock_key(&self) -> (i32, i32) {
        let hash = crate::event_log::stream_key(&self.route, &self.key).to_be_bytes();
        let half =
            |at: usize| i32::from_be_bytes([hash[at], hash[at + 1], hash[at + 2], hash[at + 3]]);
        (half(0), half(4))
    }

    /// The route and key, which name its stored answer.
    pub(crate) fn name(&self) -> (&str, &str) {
        (&self.route, &self.key)
    }

    /// The stored answer of `row`, for this request.
    pub(crate) fn replay(&self, row: &PgRow) -> Result<Reply, ApiError> {
        let request: Vec<u8> = row.try_get("request")?;
        if request != self.request {
            return Err(ApiError::IdempotencyMismatch);
        }
        let status: i16 = row.try_get("status")?;
        let headers: serde_json::Value = row.try_get("headers")?;
        let body: Vec<u8> = row.try_get("body")?;
        u16::try_from(status)
            .ok()
            .and_then(|status| Reply::from_stored(status, &headers, body))
            .ok_or_else(|| {
                ApiError::Internal(anyhow::anyhow!("stored answer for a key is unreadable"))
            })
    }
}

/// A first answer to keep for a key, written with the events it describes.
#[derive(Debug, Clone)]
pub struct Stored {
    /// The key's route and user.
    pub route: String,
    /// The key.
    pub key: String,
    /// The canonical request.
    pub request: Vec<u8>,
    /// The answer's status.
    pub status: i16,
    /// The answer's headers, as stored.
    pub headers: serde_json::Value,
    /// The answer's body.
    pub body: Vec<u8>,
}

impl Keyed {
    /// `reply` as the first answer to this key.
    pub fn stored(&self, reply: &Reply) -> Stored {
        Stored {
            route: self.route.clone(),
            key: self.key.clone(),
            request: self.request.clone(),
            status: i16::try_from(reply.status.as_u16()).unwrap_or(i16::MAX),
            headers: reply.stored_headers(),
            body: reply.body.clone(),
        }
    }
}

/// Stores the answer to a fresh key, in the same transaction as its events
/// (under the key's lock, taken by [`claim`]).
///
/// # Errors
/// Store errors.
pub async fn remember(
    conn: &mut PgConnection,
    keyed: &Keyed,
    reply: &Reply,
) -> Result<(), ApiError> {
    sqlx::query(
        "INSERT INTO idempotency_keys (route, key, request, status, headers, body)
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(&keyed.route)
    .bind(&keyed.key)
    .bind(&keyed.request)
    .bind(i16::try_from(reply.status.as_u16()).unwrap_or(i16::MAX))
    .bind(reply.stored_headers())
    .bind(&reply.body)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Deletes keys older than `keep`.
///
/// # Errors
/// Store errors.
pub async fn forget_older_than(
    conn: &mut PgConnection,
    keep: std::time::Duration,
) -> Result<u64, sqlx::Error> {
    let done = sqlx::query(
        "DELETE FROM idempotency_keys WHERE created_at < now() - make_interval(secs => $1)",
    )
    .bind(keep.as_secs_f64())
    .execute(conn)
    .await?;
    Ok(done.rows_affected())
}
