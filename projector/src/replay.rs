//! `projector replay`: rebuilds every read model from the Postgres log into a
//! new generation, catches it up with the topic, and has the live projector
//! switch the query side over. The live projector and the query side keep
//! working on the old generation until the switch.
//!
//! One replay at a time: it claims the building slot of the pointer (a
//! claim that lapses unless renewed, so a replay killed half-way leaves
//! nothing that blocks the next one for more than seconds), and the switch
//! is conditional on that claim.
//!
//! No event can fall between the log and the topic: the replay first reads
//! the offsets the live generation saved, then reads the log. Everything
//! below those offsets was applied by the live projector, so it was
//! committed, so the log read (which comes after) holds it; everything from
//! those offsets on is consumed from the topic. Overlap is harmless.
//!
//! The switch itself is the live projector's (see [`crate::live`]): it
//! brings the new generation up to the offsets it stopped the old one at,
//! so no read ever goes back. With no live projector running, the replay
//! takes the lease and does the same itself.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use domain::PublishedEvent;
use event_feed::Cursor;
use mongodb::bson::DateTime;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::generations::{Generations, LEASE_TTL, RENEW_EVERY};
use crate::live::{keep_lease, ConsumerSettings, Ended, Goal, Projection};
use crate::store::ReadStore;
use service_kit::backoff::pause;

/// Most catch-up rounds before the replay asks for the switch.
const CATCH_UP_ROUNDS: u32 = 20;

/// Settings of a replay.
#[derive(Debug, Clone, clap::Args)]
pub struct ReplaySettings {
    /// The Postgres event log.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/ticketing"
    )]
    pub database_url: String,
    /// Events read from the log per batch.
    #[arg(long, env = "REPLAY_BATCH", default_value_t = 5000,
          value_parser = clap::value_parser!(i64).range(1..))]
    pub replay_batch: i64,
    /// How long the replaced generation is kept after the switch, in
    /// seconds: longer than query-api's longest request, so that no
    /// request still reading it finds it gone.
    #[arg(long, env = "REPLAY_GRACE_SECS", default_value_t = 15)]
    pub grace_secs: u64,
    /// How long to wait for the live projector to switch over, in seconds.
    #[arg(long, env = "REPLAY_SWITCH_WAIT_SECS", default_value_t = 600)]
    pub switch_wait_secs: u64,
}

/// What a replay did.
#[derive(Debug, Clone, Copy, Default)]
pub struct ReplayReport {
    /// The generation replaced.
    pub from: u32,
    /// The generation built and switched to.
    pub to: u32,
    /// Events read from the log and applied: every event up to `through`.
    pub events: u64,
    /// The log's high-water mark: its last event applied.
    pub through: Cursor,
    /// Time spent reading and applying the log.
    pub log_secs: f64,
    /// Time from start to switch.
    pub total_secs: f64,
}

/// Runs a replay to the end.
///
/// # Errors
/// Another replay at work, or any store, log or broker failure: the replay
/// stops, the query side stays on the old generation, and the half-built
/// one is dropped (by this replay, or by the next).
pub async fn replay(
    store: &ReadStore,
    pool: &PgPool,
    consumer: &ConsumerSettings,
    settings: &ReplaySettings,
    stop: &CancellationToken,
) -> anyhow::Result<ReplayReport> {
    let started = Instant::now();
    let generations = store.generations();
    let claim = format!("replay-{}", uuid::Uuid::new_v4());
    let keep = Duration::from_secs(settings.grace_secs);
    let (pointer, to) = generations.claim_building(&claim, keep).await?;
    let from = pointer.current;
    tracing::info!(from, to, "replay started");
    let lost = stop.child_token();
    let ready = Arc::new(AtomicBool::new(false));
    // Joined, not spawned: whatever ends the replay ends the renewals.
    let (built, ()) = tokio::join!(
        async {
            let built = build(
                store, pool, consumer, settings, from, to, &claim, &ready, &lost,
            )
            .await;
            lost.cancel();
            built
        },
        keep_claim(
            generations.clone(),
            claim.clone(),
            to,
            Arc::clone(&ready),
            lost.clone(),
        ),
    );
    let switched_at = Instant::now();
    let (events, through, log_secs) = match built {
        Ok(built) => built,
        Err(error) => {
            // Dropped only once no switch to it can happen any more: the
            // claim given up here, or the pointer elsewhere and nobody
            // building it. A switch may have consumed the claim meanwhile.
            let droppable = match generations.abandon_claim(&claim).await {
                Ok(true) => true,
                Ok(false) => generations.pointer().await.is_ok_and(|p| {
                    p.current != to && p.building.as_ref().is_none_or(|b| b.generation != to)
                }),
                Err(cleanup) => {
                    tracing::warn!(error = %cleanup, "could not give the claim up; it lapses by itself");
                    false
                }
            };
            if droppable {
                if let Err(cleanup) = store.drop_generation(to).await {
                    tracing::warn!(error = %cleanup, "could not drop the half-built generation; the next replay does");
                }
            } else if generations.pointer().await.is_ok_and(|p| p.current == to) {
                tracing::info!(
                    to,
                    "the live projector switched to the rebuilt generation after all"
                );
                return Err(error.context(format!(
                    "the query side does read generation {to}; generation {from} was left in place"
                )));
            }
            return Err(error);
        }
    };
    let total_secs = started.elapsed().as_secs_f64();
    // Requests that read `from` just before the switch finish within the
    // grace; then it goes.
    let remaining = keep.saturating_sub(switched_at.elapsed());
    tokio::time::sleep(remaining).await;
    let now = generations.pointer().await?;
    if now.current != from && now.building.as_ref().is_none_or(|b| b.generation != from) {
        store.drop_generation(from).await?;
        generations.forget_previous(from).await?;
        tracing::info!(generation = from, "dropped the replaced generation");
    }
    Ok(ReplayReport {
        from,
        to,
        events,
        through,
        log_secs,
        total_secs,
    })
}

/// Everything between the claim and the switch: the generation built from
/// the log, caught up with the topic, marked ready and switched to. The
/// log's event count, high-water mark and reading time.
#[allow(clippy::too_many_arguments)]
async fn build(
    store: &ReadStore,
    pool: &PgPool,
    consumer: &ConsumerSettings,
    settings: &ReplaySettings,
    from: u32,
    to: u32,
    claim: &str,
    ready: &AtomicBool,
    lost: &CancellationToken,
) -> anyhow::Result<(u64, Cursor, f64)> {
    let generations = store.generations();
    drop_leftovers(store, &generations, from, to).await?;
    store.drop_generation(to).await?;
    store.prepare(to).await?;

    // Where the live generation stands, before the log is read.
    let start = generations
        .offsets_of(from)
        .await?
        .map(|o| o.next)
        .unwrap_or_default();

    let log_started = Instant::now();
    let mut conn = pool
        .acquire()
        .await
        .context("connecting to the event log")?;
    // Every event up to the high-water mark must have been applied: the
    // reading counts the log below it and fails if that is not what it
    // handed over (a log once read in text order lost a third this way,
    // and the replay said it was done). A refused event means the same: a
    // log read whole and in order contradicts nothing.
    let mut refused = 0_usize;
    let reading = event_feed::read_pages(
        &mut conn,
        Cursor::START,
        None,
        settings.replay_batch,
        async |chunk| {
            if lost.is_cancelled() {
                anyhow::bail!("replay stopped before the switch; generation {from} still answers");
            }
            let published: Vec<PublishedEvent> = chunk.into_iter().map(|c| c.event).collect();
            refused += store.apply(to, &published).await?.rejected;
            Ok(())
        },
    )
    .await
    .with_context(|| format!("replaying the log into generation {to}"))?;
    drop(conn);
    let events = reading.events;
    anyhow::ensure!(
        refused == 0,
        "{refused} of the log's {events} events were refused by the read models or are \
         of a later release (each logged above); generation {from} still answers"
    );
    let log_secs = log_started.elapsed().as_secs_f64();
    tracing::info!(
        events,
        through = %reading.through,
        log_secs,
        "log applied, every event up to its high-water mark; catching up with the topic"
    );
    generations
        .save_offsets(to, 0, &start, &Default::default(), None)
        .await?;

    // Catch up until a round finds the live generation nearly reached: the
    // live projector then closes the last gap at the switch, while the
    // query side still reads the old generation.
    let projection = Projection::named(consumer.clone(), store.clone(), claim.to_owned());
    for rounds in 1.. {
        let round = Instant::now();
        let target = generations
            .offsets_of(from)
            .await?
            .map(|o| o.next)
            .unwrap_or_default();
        let offsets = generations.offsets_of(to).await?;
        match projection
            .project(to, offsets, 0, Goal::Reach(target), lost)
            .await?
        {
            Ended::Reached => {}
            Ended::Stopped => {
                anyhow::bail!("replay stopped before the switch; generation {from} still answers")
            }
            other => anyhow::bail!("catching up generation {to} ended early: {other:?}"),
        }
        // A projector that never gets a second ahead of the live one hands
        // the rest to the switch, which closes the gap however large.
        if round.elapsed() < Duration::from_secs(1) || rounds >= CATCH_UP_ROUNDS {
            break;
        }
    }
    ready.store(true, Ordering::Relaxed);
    anyhow::ensure!(
        generations.renew_claim(claim, true).await?,
        "the claim on generation {to} was lost; generation {from} still answers"
    );
    tracing::info!(to, "generation built and caught up; waiting for the switch");
    wait_for_switch(&generations, &projection, settings, from, to, claim, lost).await?;
    Ok((events, reading.through, log_secs))
}

/// Waits until the query side reads `to`. Without a live projector to do
/// it, takes the lease and switches itself.
async fn wait_for_switch(
    generations: &Generations,
    projection: &Projection,
    settings: &ReplaySettings,
    from: u32,
    to: u32,
    claim: &str,
    lost: &CancellationToken,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(settings.switch_wait_secs);
    loop {
        let pointer = generations.pointer().await?;
        if pointer.current == to {
            return Ok(());
        }
        anyhow::ensure!(
            pointer
                .building
                .as_ref()
                .is_some_and(|b| b.claim == claim && b.generation == to),
            "the claim on generation {to} was lost; generation {} answers",
            pointer.current
        );
        if !pointer.leased() {
            if let Some(lease) = generations.take_lease(claim).await? {
                tracing::info!(
                    from,
                    to,
                    "no live projector holds the lease; switching over here"
                );
                // Renewed while it works, as the live projector's would be.
                let held = lost.child_token();
                let (switched, ()) = tokio::join!(
                    async {
                        let switched = projection.switch_over(from, to, &lease, &held).await;
                        held.cancel();
                        switched
                    },
                    keep_lease(generations.clone(), lease.clone(), held.clone()),
                );
                generations.release_lease(&lease).await?;
                if switched? {
                    return Ok(());
                }
            }
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the live projector did not switch to generation {to} within {} s; generation {from} \
             still answers (see the projector's /readyz)",
            settings.switch_wait_secs
        );
        if !pause(lost, Duration::from_millis(200)).await
            && generations.pointer().await?.current != to
        {
            anyhow::bail!("replay stopped before the switch; generation {from} still answers");
        }
    }
}

/// Drops what earlier replays left: every generation that is neither
/// current, nor being built here, nor a replaced one still in its grace.
async fn drop_leftovers(
    store: &ReadStore,
    generations: &Generations,
    current: u32,
    building: u32,
) -> anyhow::Result<()> {
    let pointer = generations.pointer().await?;
    let kept = pointer
        .previous
        .as_ref()
        .filter(|p| p.keep_until > DateTime::now())
        .map(|p| p.generation);
    for generation in generations.existing_generations().await? {
        if generation == current || generation == building || Some(generation) == kept {
            continue;
        }
        tracing::warn!(
            generation,
            "dropping a generation an earlier replay left behind"
        );
        store.drop_generation(generation).await?;
        generations.forget_previous(generation).await?;
    }
    Ok(())
}

/// Renews the claim on `generation` until `lost`, or until the switch to
/// it consumed the claim; cancels `lost` when the claim is taken over or
/// cannot be renewed in time.
async fn keep_claim(
    generations: Generations,
    claim: String,
    generation: u32,
    ready: Arc<AtomicBool>,
    lost: CancellationToken,
) {
    let mut renewed = Instant::now();
    while pause(&lost, RENEW_EVERY).await {
        match generations
            .renew_claim(&claim, ready.load(Ordering::Relaxed))
            .await
        {
            Ok(true) => renewed = Instant::now(),
            Ok(false) => match generations.pointer().await {
                // Switched to: the claim has done its work.
                Ok(pointer) if pointer.current == generation => return,
                Ok(_) => {
                    tracing::warn!(%claim, "the replay's claim was taken over");
                    lost.cancel();
                }
                Err(error) if renewed.elapsed() >= LEASE_TTL => {
                    tracing::warn!(%error, "the replay's claim could not be checked in time");
                    lost.cancel();
                }
                Err(error) => {
                    tracing::warn!(%error, "checking the replay's claim failed; retrying")
                }
            },
            Err(error) if renewed.elapsed() >= LEASE_TTL => {
                tracing::warn!(%error, "the replay's claim could not be renewed in time");
                lost.cancel();
            }
            Err(error) => tracing::warn!(%error, "renewing the replay's claim failed; retrying"),
        }
    }
}
