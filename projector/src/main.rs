//! `projector`: consumes the event topic and maintains the MongoDB read
//! models. This binary only wires settings to start-up.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use mongodb::bson::doc;
use mongodb::options::ClientOptions;
use mongodb::Client;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::ClientConfig;
use tracing_subscriber::EnvFilter;

/// Settings, from the command line or the environment.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Settings {
    /// Kafka bootstrap brokers, comma-separated.
    #[arg(long, env = "KAFKA_BROKERS", default_value = "127.0.0.1:9092")]
    kafka_brokers: String,
    /// Consumer group of the live projector.
    #[arg(long, env = "PROJECTOR_GROUP", default_value = "ticketing-projector")]
    group: String,
    /// MongoDB holding the read models.
    #[arg(long, env = "MONGODB_URI", default_value = "mongodb://127.0.0.1:27017")]
    mongodb_uri: String,
    /// Database of the read models.
    #[arg(long, env = "MONGODB_DATABASE", default_value = "ticketing")]
    mongodb_database: String,
    /// How long to wait for each store at start-up before giving up.
    #[arg(long, env = "STARTUP_TIMEOUT_SECS", default_value_t = 10)]
    startup_timeout_secs: u64,
    /// Log as JSON lines instead of text.
    #[arg(long, env = "LOG_JSON", default_value_t = false)]
    log_json: bool,
}

#[tokio::main]
async fn main() -> ExitCode {
    let settings = Settings::parse();
    init_tracing(settings.log_json);
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

    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &settings.kafka_brokers)
        .set("group.id", &settings.group)
        .create()
        .context("invalid Kafka consumer settings")?;
    // librdkafka connects lazily; fetching metadata proves a broker answers.
    let metadata = tokio::task::spawn_blocking(move || {
        consumer
            .fetch_metadata(None, timeout)
            .map(|m| m.brokers().len())
    })
    .await
    .context("metadata task failed")?
    .with_context(|| format!("kafka at {} is unreachable", settings.kafka_brokers))?;
    tracing::info!(brokers = metadata, "connected to kafka");

    let mut options = ClientOptions::parse(&settings.mongodb_uri)
        .await
        .context("MONGODB_URI is not a MongoDB URI")?;
    options.server_selection_timeout = Some(timeout);
    let hosts: Vec<String> = options.hosts.iter().map(ToString::to_string).collect();
    Client::with_options(options)
        .context("invalid MongoDB client options")?
        .database(&settings.mongodb_database)
        .run_command(doc! { "ping": 1 })
        .await
        .with_context(|| format!("mongodb at {} is unreachable", hosts.join(",")))?;
    tracing::info!(hosts = %hosts.join(","), "connected to mongodb");

    tracing::info!(
        "projector ready; projections arrive with the read-side work, stopping on SIGTERM"
    );
    tokio::signal::ctrl_c()
        .await
        .context("cannot wait for a signal")?;
    Ok(())
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
