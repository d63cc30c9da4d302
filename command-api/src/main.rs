//! `command-api`: serves the write API with the relay to Kafka (the
//! default), applies the migrations and exits (`command-api migrate`), or
//! runs only the relay (`command-api relay`).

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use command_api::settings::Settings;
use command_api::startup::{self, App};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    settings: Settings,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the API (the default).
    Serve,
    /// Apply the database migrations and exit.
    Migrate,
    /// Only relay the event log to Kafka (any number may run: one publishes).
    Relay,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.settings.log_json);
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // One line with the whole cause chain, not a backtrace.
            tracing::error!("command-api stopped: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command.unwrap_or(Command::Serve) {
        Command::Migrate => {
            let pool = startup::connect(&cli.settings).await?;
            startup::migrate(&pool).await?;
            tracing::info!("migrations applied");
            Ok(())
        }
        Command::Relay => {
            let stop = CancellationToken::new();
            tokio::spawn(stop_on_signal(stop.clone()));
            startup::run_relay(cli.settings, stop).await
        }
        Command::Serve => {
            let app = App::build(cli.settings).await?;
            let stop = CancellationToken::new();
            tokio::spawn(stop_on_signal(stop.clone()));
            app.run_until(stop).await
        }
    }
}

fn init_tracing(json: bool) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        logs.json().init()
    } else {
        logs.init()
    }
}

/// SIGTERM or Ctrl-C: stop taking requests, finish the ones in flight.
async fn stop_on_signal(stop: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {},
                _ = term.recv() => {},
            }
        }
        Err(error) => {
            tracing::warn!(%error, "cannot watch SIGTERM; stopping on Ctrl-C only");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
    tracing::info!("shutting down: finishing requests in flight");
    stop.cancel();
}
