//! `projector`: keeps the MongoDB read models up to date from the event
//! topic (`projector`, the default), or rebuilds them from the Postgres log
//! (`projector replay`). This file is the wiring: settings in, tasks out.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use projector::live::{ConsumerSettings, Projection};
use projector::replay::{self, ReplaySettings};
use projector::store::ReadStore;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

/// Settings, from the command line or the environment.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Settings {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    consumer: ConsumerSettings,
    /// MongoDB holding the read models.
    #[arg(long, env = "MONGODB_URI", default_value = "mongodb://127.0.0.1:27017")]
    mongodb_uri: String,
    /// Database of the read models.
    #[arg(long, env = "MONGODB_DATABASE", default_value = "ticketing")]
    mongodb_database: String,
    /// Address of `/healthz` and `/readyz`.
    #[arg(long, env = "PROJECTOR_ADDR", default_value = "127.0.0.1:8083")]
    addr: SocketAddr,
    /// How long to wait for each store at start-up before giving up, and
    /// for MongoDB on each operation afterwards.
    #[arg(long, env = "STARTUP_TIMEOUT_SECS", default_value_t = 10)]
    startup_timeout_secs: u64,
    /// Log as JSON lines instead of text.
    #[arg(long, env = "LOG_JSON", default_value_t = false)]
    log_json: bool,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Project the topic into the current generation (the default).
    Run,
    /// Rebuild every read model from the Postgres log into a new generation,
    /// catch up with the topic, switch the query side to it, then exit.
    Replay(ReplaySettings),
}

#[tokio::main]
async fn main() -> ExitCode {
    let settings = Settings::parse();
    service_kit::init_tracing(settings.log_json);
    match run(settings).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // One line with the whole cause chain, not a backtrace.
            tracing::error!("projector stopped: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(settings: Settings) -> anyhow::Result<()> {
    let timeout = Duration::from_secs(settings.startup_timeout_secs);
    let store = ReadStore::connect(&settings.mongodb_uri, &settings.mongodb_database, timeout)
        .await
        .context("MONGODB_URI is not usable")?;
    store
        .ping()
        .await
        .with_context(|| format!("mongodb at {} is unreachable", settings.mongodb_uri))?;
    let stop = service_kit::stop_on_signal();

    match settings.command {
        Some(Command::Replay(replay_settings)) => {
            let options: PgConnectOptions = replay_settings
                .database_url
                .parse::<PgConnectOptions>()
                .context("DATABASE_URL is not a Postgres URL")?
                // As in command-api: never a stale generic plan on `events`.
                .options([("plan_cache_mode", "force_custom_plan")]);
            let pool = PgPoolOptions::new()
                .max_connections(2)
                .acquire_timeout(timeout)
                .connect_with(options)
                .await
                .context("the Postgres event log is unreachable")?;
            let report =
                replay::replay(&store, &pool, &settings.consumer, &replay_settings, &stop).await?;
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
        Some(Command::Run) | None => {
            let projection = Projection::new(settings.consumer, store.clone());
            let listener = tokio::net::TcpListener::bind(settings.addr)
                .await
                .with_context(|| format!("cannot listen on {}", settings.addr))?;
            let app = projector::health::router(store, projection.status());
            let http_stop = stop.clone();
            let http = tokio::spawn(async move {
                axum::serve(listener, app)
                    .with_graceful_shutdown(http_stop.cancelled_owned())
                    .await
            });
            tracing::info!(addr = %settings.addr, "projector running");
            projection.run(stop.clone()).await?;
            stop.cancel();
            http.await.context("health task failed")??;
            Ok(())
        }
    }
}
