//! `query-api`: answers the reads of the ticket-booking API from the MongoDB
//! read models. This binary only wires settings to start-up.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use axum::{extract::State, http::StatusCode, routing::get, Router};
use clap::Parser;
use mongodb::bson::doc;
use mongodb::options::ClientOptions;
use mongodb::{Client, Database};
use tracing_subscriber::EnvFilter;

/// Settings, from the command line or the environment.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Settings {
    /// MongoDB holding the read models.
    #[arg(long, env = "MONGODB_URI", default_value = "mongodb://127.0.0.1:27017")]
    mongodb_uri: String,
    /// Database of the read models.
    #[arg(long, env = "MONGODB_DATABASE", default_value = "ticketing")]
    mongodb_database: String,
    /// Address to listen on.
    #[arg(long, env = "QUERY_API_ADDR", default_value = "127.0.0.1:8082")]
    addr: SocketAddr,
    /// How long to wait for MongoDB at start-up before giving up.
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
            tracing::error!("query-api stopped: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(settings: Settings) -> anyhow::Result<()> {
    let mut options = ClientOptions::parse(&settings.mongodb_uri)
        .await
        .context("MONGODB_URI is not a MongoDB URI")?;
    options.server_selection_timeout = Some(Duration::from_secs(settings.startup_timeout_secs));
    let hosts: Vec<String> = options.hosts.iter().map(ToString::to_string).collect();
    let database = Client::with_options(options)
        .context("invalid MongoDB client options")?
        .database(&settings.mongodb_database);
    database
        .run_command(doc! { "ping": 1 })
        .await
        .with_context(|| format!("mongodb at {} is unreachable", hosts.join(",")))?;
    tracing::info!(hosts = %hosts.join(","), "connected to mongodb");

    let app = Router::new()
        .route("/healthz", get(|| async { StatusCode::OK }))
        .route("/readyz", get(readyz))
        .with_state(database);
    let listener = tokio::net::TcpListener::bind(settings.addr)
        .await
        .with_context(|| format!("cannot listen on {}", settings.addr))?;
    tracing::info!(addr = %settings.addr, "query-api listening");
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown_signal())
        .await
        .context("server failed")
}

async fn readyz(State(database): State<Database>) -> StatusCode {
    match database.run_command(doc! { "ping": 1 }).await {
        Ok(_) => StatusCode::OK,
        Err(error) => {
            tracing::warn!(%error, "mongodb not ready");
            StatusCode::SERVICE_UNAVAILABLE
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

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(error) => {
            tracing::warn!(%error, "cannot watch SIGTERM; stopping on Ctrl-C only");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term.recv() => {},
    }
    tracing::info!("shutting down");
}
