//! `command-api`: serves the write API with the relay to Kafka (the
//! default), applies the migrations and exits (`command-api migrate`),
//! runs only the relay (`command-api relay`), has the relay publish again
//! what it has passed (`command-api republish`), or prints a development
//! token (`command-api token`).

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use command_api::republish::{self, Progress, Rewound};
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
    /// Have the relay publish again, in commit order, every event it has
    /// already passed: moves its checkpoint back, then waits until the relay
    /// is back where it was. Consumers deduplicate, so this only fills in
    /// what a topic lacks; see docs/operations.md for when.
    Republish {
        /// Start at the event with this global position (and go on in
        /// commit order) instead of at the start of the log.
        #[arg(long, value_parser = clap::value_parser!(i64).range(1..))]
        from_position: Option<i64>,
        /// How long to wait for the relay, in seconds (0: do not wait). A
        /// wait that runs out leaves the rewind in place; the relay finishes
        /// it.
        #[arg(long, default_value_t = 600,
              value_parser = clap::value_parser!(u64).range(0..=86_400))]
        wait_secs: u64,
    },
    /// Print a bearer token signed with AUTH_JWT_SECRET, for development
    /// and load tests (`scripts/services.sh token` runs this).
    Token {
        /// The user (`sub`): a UUID.
        #[arg(long)]
        sub: uuid::Uuid,
        /// A role to grant; may be given more than once.
        #[arg(long = "role", value_enum)]
        roles: Vec<service_kit::auth::Role>,
        /// How long the token lasts, in seconds.
        #[arg(long, default_value_t = 3600,
              value_parser = clap::value_parser!(u64).range(1..=31_536_000))]
        ttl_secs: u64,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    service_kit::init_tracing(cli.settings.log_json);
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // One line with the whole cause chain, not a backtrace.
            tracing::error!(error = %format_args!("{error:#}"), "command-api stopped");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command.unwrap_or(Command::Serve) {
        Command::Token {
            sub,
            roles,
            ttl_secs,
        } => {
            let token = service_kit::auth::mint(
                &cli.settings.auth,
                sub,
                &roles,
                Duration::from_secs(ttl_secs),
            )?;
            println!("{token}");
            Ok(())
        }
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
        Command::Republish {
            from_position,
            wait_secs,
        } => {
            let pool = startup::connect(&cli.settings).await?;
            startup::migrate(&pool).await?;
            let topic = &cli.settings.relay.relay_topic;
            let rewind = match republish::rewind(&pool, topic, from_position).await? {
                Rewound::Rewound(rewind) => rewind,
                other => {
                    let progress = if other == Rewound::NoCheckpoint {
                        tracing::warn!(%topic, "no relay has published to this topic yet (is RELAY_TOPIC right?); it will publish everything when one does");
                        "no_checkpoint"
                    } else {
                        tracing::info!(%topic, "the relay has not passed that event yet: nothing to publish again");
                        "not_passed"
                    };
                    println!(
                        "{}",
                        serde_json::json!({"topic": topic, "events": 0, "progress": progress})
                    );
                    return Ok(());
                }
            };
            let progress =
                republish::wait_for(&pool, &rewind, Duration::from_secs(wait_secs)).await;
            println!(
                "{}",
                serde_json::json!({"topic": rewind.topic, "from": rewind.from,
                                   "through": rewind.through, "events": rewind.events,
                                   "progress": progress})
            );
            match progress {
                Progress::Republished => Ok(()),
                Progress::Pending if wait_secs == 0 => Ok(()),
                Progress::Pending => anyhow::bail!(
                    "the relay has not published everything again within {wait_secs} s; the \
                     checkpoint stays moved back and the relay carries on (is one running?)"
                ),
                Progress::Superseded => {
                    anyhow::bail!("another republish moved the checkpoint back meanwhile; it carries on from there")
                }
            }
        }
        Command::Serve => {
            let app = App::build(cli.settings).await?;
            let stop = service_kit::stop_on_signal();
            app.run_until(stop).await
        }
    }
}
