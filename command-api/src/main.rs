//! `command-api`: serves the write API with the relay to Kafka (the
//! default), applies the migrations and exits (`command-api migrate`), or
//! runs only the relay (`command-api relay`).

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use command_api::settings::Settings;
use command_api::startup::{self, App};

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
    service_kit::init_tracing(cli.settings.log_json);
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
            let stop = service_kit::stop_on_signal();
            startup::run_relay(cli.settings, stop).await
        }
        Command::Serve => {
            let app = App::build(cli.settings).await?;
            let stop = service_kit::stop_on_signal();
            app.run_until(stop).await
        }
    }
}
