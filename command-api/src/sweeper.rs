//! Expires lapsed holds in the log, so that read models catch up (reads
//! already treat a lapsed hold as available), and forgets old idempotency keys.

use std::time::Duration;

use domain::BookingId;
use tokio_util::sync::CancellationToken;

use crate::cause::Cause;
use crate::error::ApiError;
use crate::idempotency;
use crate::sales::Sales;

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
        // The expiries' metadata names the pass, as a request's names the
        // request.
        let sweep = format!("sweep-{}", uuid::Uuid::new_v4());
        let cause = Cause {
            correlation_id: Some(sweep.clone()),
            user_id: None,
        };
        match cause.scope(expire_lapsed(&sales)).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(expired = n, correlation_id = sweep, "expired lapsed holds"),
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

/// Expires the holds that have lapsed, one transaction per booking. A hold
/// whose streams another command (a buyer, another instance's sweeper) is
/// working on is left to it, and one confirmed or cancelled since it was
/// listed is passed over; neither stops the pass.
///
/// # Errors
/// Store errors in listing the due holds; a booking that fails is logged
/// and left to the next pass.
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
        let listed = due.len();
        let mut this_round = 0;
        // Each instance starts somewhere else in the list, so that several
        // sweeping at once mostly meet different holds.
        let mut due = due;
        if !due.is_empty() {
            let start =
                usize::try_from(uuid::Uuid::new_v4().as_u128() % due.len() as u128).unwrap_or(0);
            due.rotate_left(start);
        }
        for id in due {
            match expire_one(sales, BookingId::from_uuid(id)).await {
                Ok(true) => this_round += 1,
                Ok(false) => {}
                Err(error) => {
                    tracing::warn!(%error, booking_id = %id, "expiring a lapsed hold failed; the next pass tries again")
                }
            }
        }
        expired += this_round;
        // A full list may have more behind it, unless all of it was left
        // to others (then the next pass).
        if listed < usize::try_from(BATCH).unwrap_or(usize::MAX) || this_round == 0 {
            return Ok(expired);
        }
    }
}

async fn expire_one(sales: &Sales, booking_id: BookingId) -> Result<bool, ApiError> {
    let mut tx = sales
        .pool()
        .begin()
        .await
        .map_err(crate::event_log::LogError::Unreachable)?;
    let expired = Sales::expire(&mut tx, booking_id).await?;
    tx.commit().await?;
    if expired {
        sales.commits().notify_one();
    }
    Ok(expired)
}

async fn forget_keys(sales: &Sales, keep: Duration) -> Result<u64, sqlx::Error> {
    let mut conn = sales.pool().acquire().await?;
    idempotency::forget_older_than(&mut conn, keep).await
}
