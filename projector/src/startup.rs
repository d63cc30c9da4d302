//! Wiring: settings in, a running projection (with its health server) or a
//! replay out. `main.rs` only parses the command line and logs the outcome.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use service_kit::connect::PoolSettings;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::live::{ConsumerSettings, Projection};
use crate::replay::{self, ReplaySettings};
use crate::store::ReadStore;

/// Settings, from the command line or the environment.
#[derive(Debug, Clone, Parser)]
#[command(name = "projector", version, about)]
pub struct Settings {
    /// What to do; projecting the topic when none is named.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// The topic and consumer group.
    #[command(flatten)]
    pub consumer: ConsumerSettings,
    /// MongoDB holding the read models.
    #[arg(long, env = "MONGODB_URI", default_value = "mongodb://127.0.0.1:27017")]
    pub mongodb_uri: String,
    /// Database of the read models.
    #[arg(long, env = "MONGODB_DATABASE", default_value = "ticketing")]
    pub mongodb_database: String,
    /// Address of `/healthz` and `/readyz`.
    #[arg(long, env = "PROJECTOR_ADDR", default_value = "127.0.0.1:8083")]
    pub addr: SocketAddr,
    /// How long to wait for each store at start-up before giving up, and
    /// for MongoDB on each operation afterwards.
    #[arg(long, env = "STARTUP_TIMEOUT_SECS", default_value_t = 10)]
    pub startup_timeout_secs: u64,
    /// Log as JSON lines instead of text.
    #[arg(long, env = "LOG_JSON", default_value_t = false)]
    pub log_json: bool,
}

/// What the process does.
#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// Project the topic into the current generation (the default).
    Run,
    /// Rebuild every read model from the Postgres log into a new generation,
    /// catch up with the topic, switch the query side to it, then exit.
    Replay(ReplaySettings),
    /// List the events the read side set aside (one JSON line each, in
    /// topic order), with why.
    Parked(ParkedSettings),
    /// Ask the live projector to apply the parked events again (after a
    /// fix), wait for it, and print what it did.
    Unpark(UnparkSettings),
}

/// `projector parked`.
#[derive(Debug, Clone, clap::Args)]
pub struct ParkedSettings {
    /// The generation; the one the query side reads when not given.
    #[arg(long)]
    pub generation: Option<u32>,
}

/// `projector unpark`.
#[derive(Debug, Clone, clap::Args)]
pub struct UnparkSettings {
    /// How long to wait for the live projector to carry it out, in seconds.
    #[arg(long, default_value_t = 60)]
    pub wait_secs: u64,
}

impl Settings {
    fn startup_timeout(&self) -> Duration {
        Duration::from_secs(self.startup_timeout_secs)
    }
}

/// The read models' store, once MongoDB has answered.
///
/// # Errors
/// A malformed URI, or MongoDB silent for `startup_timeout_secs`.
pub async fn read_store(settings: &Settings) -> anyhow::Result<ReadStore> {
    let store = ReadStore::connect(
        &settings.mongodb_uri,
        &settings.mongodb_database,
        settings.startup_timeout(),
    )
    .await?;
    store
        .ping()
        .await
        .with_context(|| format!("mongodb at {} is unreachable", store.hosts()))?;
    Ok(store)
}

/// Runs what `settings.command` names until it ends or `stop` fires.
///
/// # Errors
/// An unreachable store, an address in use, a failed replay.
pub async fn run(settings: Settings, stop: CancellationToken) -> anyhow::Result<()> {
    match settings.command.clone() {
        Some(Command::Replay(replay_settings)) => replay(settings, replay_settings, stop).await,
        Some(Command::Parked(parked)) => list_parked(&settings, &parked).await,
        Some(Command::Unpark(unpark)) => request_unpark(&settings, &unpark, &stop).await,
        Some(Command::Run) | None => App::build(settings).await?.run_until(stop).await,
    }
}

/// `projector parked`: prints each parked event as a JSON line on stdout,
/// and how many on stderr.
///
/// # Errors
/// An unreachable store.
pub async fn list_parked(settings: &Settings, parked: &ParkedSettings) -> anyhow::Result<()> {
    use std::io::Write;
    let store = read_store(settings).await?;
    let generation = match parked.generation {
        Some(generation) => generation,
        None => store.pointer().await?.current,
    };
    let events = store.parked_events(generation).await?;
    let mut out = std::io::stdout().lock();
    for event in &events {
        writeln!(out, "{}", serde_json::to_string(event)?)?;
    }
    out.flush()?;
    tracing::info!(generation, parked = events.len(), "parked events listed");
    Ok(())
}

/// `projector unpark`: asks the live projector of the current generation
/// to apply its parked events again, and prints what it did as JSON.
///
/// # Errors
/// An unreachable store; no live projector carrying it out in time.
pub async fn request_unpark(
    settings: &Settings,
    unpark: &UnparkSettings,
    stop: &CancellationToken,
) -> anyhow::Result<()> {
    let store = read_store(settings).await?;
    let generations = store.generations();
    let generation = store.pointer().await?.current;
    let request = generations.request_unpark(generation).await?;
    tracing::info!(
        generation,
        request,
        "unpark requested; waiting for the live projector"
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(unpark.wait_secs);
    loop {
        if let Some(done) = generations.unpark_done(&request).await? {
            if let Ok(error) = done.get_str("error") {
                anyhow::bail!("the live projector could not unpark: {error}");
            }
            let outcome = serde_json::json!({
                "generation": generation,
                "applied": done.get_i64("applied").unwrap_or_default(),
                "still_parked": done.get_i64("still_parked").unwrap_or_default(),
            });
            println!("{outcome}");
            return Ok(());
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "no live projector of generation {generation} carried out the unpark within {} s \
             (is one running?); it stays requested",
            unpark.wait_secs
        );
        tokio::select! {
            () = stop.cancelled() => anyhow::bail!("stopped; the unpark stays requested"),
            () = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
}

/// `projector replay`: rebuilds the read models into a new generation.
///
/// # Errors
/// An unreachable store, or a replay that fails.
pub async fn replay(
    settings: Settings,
    replay_settings: ReplaySettings,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let store = read_store(&settings).await?;
    let pool = service_kit::connect::postgres_pool(
        &replay_settings.database_url,
        PoolSettings {
            max_connections: 2,
            acquire_timeout: settings.startup_timeout(),
            startup_timeout: settings.startup_timeout(),
        },
    )
    .await?;
    let report = replay::replay(&store, &pool, &settings.consumer, &replay_settings, &stop).await?;
    tracing::info!(
        from = report.from,
        to = report.to,
        events = report.events,
        through = %report.through,
        log_secs = report.log_secs,
        total_secs = report.total_secs,
        "replay done"
    );
    Ok(())
}

/// A projection with its health server, bound and ready to run.
pub struct App {
    projection: Projection,
    store: ReadStore,
    listener: TcpListener,
    addr: SocketAddr,
}

impl App {
    /// Connects to MongoDB and binds the health address.
    ///
    /// # Errors
    /// An unreachable MongoDB, an address in use.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let store = read_store(&settings).await?;
        let listener = TcpListener::bind(settings.addr)
            .await
            .with_context(|| format!("cannot listen on {}", settings.addr))?;
        let addr = listener.local_addr()?;
        Ok(Self {
            projection: Projection::new(settings.consumer, store.clone()),
            store,
            listener,
            addr,
        })
    }

    /// The address `/healthz` and `/readyz` answer on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Projects until `stop`, answering health checks meanwhile.
    ///
    /// # Errors
    /// When the projection or the health server fails.
    pub async fn run_until(self, stop: CancellationToken) -> anyhow::Result<()> {
        let health = crate::health::router(self.store, self.projection.status());
        let http_stop = stop.clone();
        let listener = self.listener;
        let http = tokio::spawn(async move {
            axum::serve(listener, health)
                .with_graceful_shutdown(http_stop.cancelled_owned())
                .await
        });
        tracing::info!(addr = %self.addr, "projector running");
        let projected = self.projection.run(stop.clone()).await;
        stop.cancel();
        http.await.context("health task failed")??;
        projected
    }
}
