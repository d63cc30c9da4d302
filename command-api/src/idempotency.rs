//! `Idempotency-Key`, the way pretix does it: the first answer to a key is
//! kept and replayed to retries with the same request.
//!
//! The key's row is inserted inside the command's own transaction and its
//! answer stored there too, so a key and the events it describes commit
//! together or not at all: a crash or a 5xx leaves no key behind, and the
//! retry runs the command afresh. A retry arriving while the first request
//! is in flight blocks on the uncommitted row (Postgres makes a conflicting
//! insert wait for the inserter), then replays the answer once it commits.

use axum::http::HeaderMap;
use sqlx::{PgConnection, Row};

use crate::error::ApiError;
use crate::reply::Reply;

/// Header carrying the key.
pub const HEADER: &str = "idempotency-key";

/// Longest accepted key, in bytes.
pub const MAX_KEY_LEN: usize = 255;

/// How long a retry waits for an in-flight first request before 409.
const IN_FLIGHT_WAIT: &str = "5s";

/// A request that carries a key.
#[derive(Debug, Clone)]
pub struct Keyed {
    route: &'static str,
    key: String,
    request: Vec<u8>,
}

impl Keyed {
    /// Reads the key, if any, of a request to `route` whose canonical form is
    /// `request` (the parsed body re-serialized, so that formatting does not
    /// make two equal requests differ).
    ///
    /// # Errors
    /// 422 when the key is empty, too long or not visible ASCII.
    pub fn from_headers(
        headers: &HeaderMap,
        route: &'static str,
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
    sqlx::query(&format!("SET LOCAL lock_timeout = '{IN_FLIGHT_WAIT}'"))
        .execute(&mut *conn)
        .await?;
    let inserted = sqlx::query(
        "INSERT INTO idempotency_keys (route, key, request, status, headers, body)
         VALUES ($1, $2, $3, 0, '{}', '') ON CONFLICT DO NOTHING RETURNING 1",
    )
    .bind(keyed.route)
    .bind(&keyed.key)
    .bind(&keyed.request)
    .fetch_optional(&mut *conn)
    .await;
    let inserted = match inserted {
        Ok(row) => row.is_some(),
        // 55P03: lock_timeout while waiting for the in-flight first request.
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("55P03") => {
            return Err(ApiError::InProgress)
        }
        Err(e) => return Err(e.into()),
    };
    sqlx::query("SET LOCAL lock_timeout = 0")
        .execute(&mut *conn)
        .await?;
    if inserted {
        return Ok(Claim::Fresh);
    }
    let row = sqlx::query(
        "SELECT request, status, headers, body FROM idempotency_keys WHERE route = $1 AND key = $2",
    )
    .bind(keyed.route)
    .bind(&keyed.key)
    .fetch_optional(&mut *conn)
    .await?
    // Expired and swept between the insert and this read: treat as a race.
    .ok_or(ApiError::InProgress)?;
    let request: Vec<u8> = row.try_get("request")?;
    if request != keyed.request {
        return Err(ApiError::IdempotencyMismatch);
    }
    let status: i16 = row.try_get("status")?;
    let headers: serde_json::Value = row.try_get("headers")?;
    let body: Vec<u8> = row.try_get("body")?;
    u16::try_from(status)
        .ok()
        .and_then(|status| Reply::from_stored(status, &headers, body))
        .map(Claim::Replay)
        .ok_or_else(|| ApiError::Internal(anyhow::anyhow!("stored answer for a key is unreadable")))
}

/// Stores the answer to a fresh key, in the same transaction as its events.
///
/// # Errors
/// Store errors.
pub async fn remember(
    conn: &mut PgConnection,
    keyed: &Keyed,
    reply: &Reply,
) -> Result<(), ApiError> {
    sqlx::query(
        "UPDATE idempotency_keys SET status = $3, headers = $4, body = $5 WHERE route = $1 AND key = $2",
    )
    .bind(keyed.route)
    .bind(&keyed.key)
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
