//! Expires lapsed holds in the log, so that read models catch up (reads
//! already treat a lapsed hold as available), and forgets old idempotency keys.

use std::time::Duration;

use domain::BookingId;
use tokio_util::sync::CancellationToken;

use crate::error::ApiError;
use crate::idempotency;
use crate::sales::{Sales, Settle};

/// Most holds expired per pass; the next pass takes the rest at once.
const BATCH: i64 = 200;

/// Runs passes every `every` until `stop` is cancelled.
pub async fn run(sales: Sales, every: Duration, keep_keys: Duration, stop: CancellationToken) {
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticks.tick() => {}
        }
        match expire_lapsed(&sales).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(expired = n, "expired lapsed holds"),
            Err(error) => {
                tracing::warn!(%error, "sweeping lapsed holds failed; retrying next pass")
            }
        }
        match forget_keys(&sales, keep_keys).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(forgotten = n, "forgot old idempotency keys"),
            Err(error) => tracing::warn!(%error, "forgetting idempotency keys failed"),
        }
    }
}

/// Expires every hold that has lapsed, one transaction per booking.
///
/// # Errors
/// Store errors; holds already expired are counted as done.
pub async fn expire_lapsed(sales: &Sales) -> Result<usize, ApiError> {
    let mut expired = 0;
    loop {
        let due: Vec<uuid::Uuid> = sqlx::query_scalar(
            "SELECT booking_id FROM pending_holds WHERE expires_at <= $1 ORDER BY expires_at LIMIT $2",
        )
        .bind(Sales::now())
        .bind(BATCH)
        .fetch_all(sales.pool())
        .await?;
        let batch = due.len();
        for id in due {
            let booking_id = BookingId::from_uuid(id);
            sales
                .transact(None, |conn| {
                    Box::pin(async move {
                        Sales::settle(conn, booking_id, Settle::Expire, Sales::now()).await?;
                        Ok(crate::reply::Reply::json(axum::http::StatusCode::OK, &()))
                    })
                })
                .await?;
            expired += 1;
        }
        if batch < usize::try_from(BATCH).unwrap_or(usize::MAX) {
            return Ok(expired);
        }
    }
}

async fn forget_keys(sales: &Sales, keep: Duration) -> Result<u64, sqlx::Error> {
    let mut conn = sales.pool().acquire().await?;
    idempotency::forget_older_than(&mut conn, keep).await
}
