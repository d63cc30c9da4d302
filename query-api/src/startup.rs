//! Wiring: settings, the MongoDB handle, the generation being read, the
//! router and the server.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use domain::read_model::{
    self, BookingDoc, ShowDoc, BOOKINGS, GENERATIONS, GENERATION_POINTER, SHOWS,
};
use mongodb::bson::{doc, Document};
use mongodb::options::ClientOptions;
use mongodb::{Client, Collection, Database};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;
use utoipa::OpenApi;

use crate::problem::QueryError;
use crate::routes;

/// Settings, from the command line or the environment.
#[derive(Debug, Clone, clap::Parser)]
#[command(version, about)]
pub struct Settings {
    /// MongoDB holding the read models.
    #[arg(long, env = "MONGODB_URI", default_value = "mongodb://127.0.0.1:27017")]
    pub mongodb_uri: String,
    /// Database of the read models.
    #[arg(long, env = "MONGODB_DATABASE", default_value = "ticketing")]
    pub mongodb_database: String,
    /// Address to listen on.
    #[arg(long, env = "QUERY_API_ADDR", default_value = "127.0.0.1:8082")]
    pub addr: SocketAddr,
    /// How long to wait for MongoDB at start-up before giving up.
    #[arg(long, env = "STARTUP_TIMEOUT_SECS", default_value_t = 10)]
    pub startup_timeout_secs: u64,
    /// How long a request waits for MongoDB before answering 503, in ms.
    #[arg(long, env = "MONGODB_TIMEOUT_MS", default_value_t = 2000)]
    pub mongodb_timeout_ms: u64,
    /// How long a read waits for its `X-Consistency-Token`, in ms.
    #[arg(long, env = "CONSISTENCY_WAIT_MS", default_value_t = 5000)]
    pub consistency_wait_ms: u64,
    /// Log as JSON lines instead of text.
    #[arg(long, env = "LOG_JSON", default_value_t = false)]
    pub log_json: bool,
}

/// What every handler reads from: the database and the generation the
/// projector last pointed the query side at.
#[derive(Debug, Clone)]
pub struct Reads {
    database: Database,
    generation: Arc<AtomicU32>,
    /// Longest wait for a consistency token.
    pub consistency_wait: Duration,
}

impl Reads {
    /// The generation to read now.
    pub fn generation(&self) -> u32 {
        self.generation.load(Ordering::Relaxed)
    }

    /// Show documents of `generation`.
    pub fn shows(&self, generation: u32) -> Collection<ShowDoc> {
        self.database
            .collection(&read_model::collection_name(generation, SHOWS))
    }

    /// Booking documents of `generation`.
    pub fn bookings(&self, generation: u32) -> Collection<BookingDoc> {
        self.database
            .collection(&read_model::collection_name(generation, BOOKINGS))
    }

    /// Reads the generation pointer once. No pointer yet: generation 1.
    ///
    /// # Errors
    /// MongoDB errors.
    pub async fn refresh(&self) -> Result<u32, QueryError> {
        let pointer: Option<Document> = self
            .database
            .collection::<Document>(GENERATIONS)
            .find_one(doc! { "_id": GENERATION_POINTER })
            .await?;
        let generation = pointer
            .and_then(|p| {
                p.get_i32("current").ok().or_else(|| {
                    p.get_i64("current")
                        .ok()
                        .and_then(|g| i32::try_from(g).ok())
                })
            })
            .and_then(|g| u32::try_from(g).ok())
            .unwrap_or(1);
        self.generation.store(generation, Ordering::Relaxed);
        Ok(generation)
    }
}

/// How often the generation pointer is read. A replay keeps the old
/// generation well beyond this after switching, so no read finds it gone.
pub const GENERATION_REFRESH: Duration = Duration::from_millis(200);

/// The routes, for the server and for tests.
pub fn router(reads: Reads) -> Router {
    Router::new()
        .route("/shows", get(routes::list_shows))
        .route("/shows/{id}", get(routes::show))
        .route("/shows/{id}/availability", get(routes::availability))
        .route("/bookings/{id}", get(routes::booking))
        .route("/users/{id}/bookings", get(routes::user_bookings))
        .route("/healthz", get(|| async { StatusCode::OK }))
        .route("/readyz", get(readyz))
        .route(
            "/openapi.json",
            get(|| async { Json(routes::ApiDoc::openapi()) }),
        )
        .fallback(|| async { QueryError::NotFound("resource") })
        .layer(TimeoutLayer::with_status_code(
            StatusCode::SERVICE_UNAVAILABLE,
            Duration::from_secs(30),
        ))
        .layer(TraceLayer::new_for_http())
        .with_state(reads)
}

/// `GET /readyz`: 200 while MongoDB answers, else 503.
async fn readyz(
    axum::extract::State(reads): axum::extract::State<Reads>,
) -> Result<Json<serde_json::Value>, QueryError> {
    let generation = reads.refresh().await?;
    Ok(Json(
        serde_json::json!({ "mongodb": "up", "generation": generation }),
    ))
}

/// A bound, ready-to-run query-api.
pub struct App {
    listener: TcpListener,
    reads: Reads,
}

impl App {
    /// Connects to MongoDB (failing with the host named when it does not
    /// answer) and binds the address.
    ///
    /// # Errors
    /// Unreachable MongoDB, malformed URI, address in use.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let mut options = ClientOptions::parse(&settings.mongodb_uri)
            .await
            .context("MONGODB_URI is not a MongoDB URI")?;
        let hosts: Vec<String> = options.hosts.iter().map(ToString::to_string).collect();
        options.server_selection_timeout = Some(Duration::from_millis(settings.mongodb_timeout_ms));
        options.connect_timeout = Some(Duration::from_millis(settings.mongodb_timeout_ms));
        let database = Client::with_options(options)
            .context("invalid MongoDB client options")?
            .database(&settings.mongodb_database);
        let reads = Reads {
            database,
            generation: Arc::new(AtomicU32::new(1)),
            consistency_wait: Duration::from_millis(settings.consistency_wait_ms),
        };
        let startup = Duration::from_secs(settings.startup_timeout_secs);
        let mut connected = reads.refresh().await;
        let started = std::time::Instant::now();
        while connected.is_err() && started.elapsed() < startup {
            tokio::time::sleep(Duration::from_millis(200)).await;
            connected = reads.refresh().await;
        }
        connected.with_context(|| format!("mongodb at {} is unreachable", hosts.join(",")))?;
        tracing::info!(hosts = %hosts.join(","), "connected to mongodb");
        let listener = TcpListener::bind(settings.addr)
            .await
            .with_context(|| format!("cannot listen on {}", settings.addr))?;
        Ok(Self { listener, reads })
    }

    /// The bound address.
    ///
    /// # Errors
    /// When the socket has none.
    pub fn addr(&self) -> anyhow::Result<SocketAddr> {
        Ok(self.listener.local_addr()?)
    }

    /// Serves until `stop`, letting requests in flight finish.
    ///
    /// # Errors
    /// Server failures.
    pub async fn run_until(self, stop: CancellationToken) -> anyhow::Result<()> {
        let reads = self.reads.clone();
        let refresher_stop = stop.clone();
        let refresher = tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = refresher_stop.cancelled() => return,
                    () = tokio::time::sleep(GENERATION_REFRESH) => {}
                }
                if let Err(error) = reads.refresh().await {
                    tracing::debug!(%error, "cannot read the generation pointer");
                }
            }
        });
        tracing::info!(addr = %self.addr()?, "query-api listening");
        axum::serve(self.listener, router(self.reads))
            .with_graceful_shutdown(stop.cancelled_owned())
            .await
            .context("server failed")?;
        refresher.abort();
        Ok(())
    }
}
