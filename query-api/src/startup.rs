//! Wiring: settings, the MongoDB handle, the generation being read, the
//! router and the server.

use service_kit::auth::Access;
use std::future::IntoFuture;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::extract::State;
use axum::http::StatusCode;
use axum::middleware;
use axum::routing::get;
use axum::{Json, Router};
use domain::read_model::{
    self, BlockDoc, BookingDoc, ShowDoc, BLOCKS, BOOKINGS, GENERATIONS, GENERATION_POINTER, SHOWS,
    TALLIES,
};
use domain::TokenKey;
use mongodb::bson::{doc, Document};
use mongodb::{Collection, Database};
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use utoipa::OpenApi;

use crate::live::{Live, LiveSettings};
use crate::problem::QueryError;
use crate::routes;
use crate::seatmap::SeatMap;
use crate::waits::Waits;

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
    /// How long one MongoDB operation may take before the read answers
    /// 503, in ms.
    #[arg(long, env = "MONGODB_TIMEOUT_MS", default_value_t = 2000)]
    pub mongodb_timeout_ms: u64,
    /// How long a read waits for its `X-Consistency-Token`, in ms.
    #[arg(long, env = "CONSISTENCY_WAIT_MS", default_value_t = 5000)]
    pub consistency_wait_ms: u64,
    /// Most reads waiting for a consistency token at once; more are 503.
    #[arg(long, env = "CONSISTENCY_MAX_WAITERS", default_value_t = 10_000)]
    pub consistency_max_waiters: usize,
    /// Secret shared with command-api that signs consistency tokens (at
    /// least 16 bytes).
    #[arg(long, env = "CONSISTENCY_KEY", default_value = domain::consistency::DEVELOPMENT_KEY,
          hide_default_value = true)]
    pub consistency_key: String,
    /// How bearer tokens are verified.
    #[command(flatten)]
    pub auth: service_kit::auth::AuthSettings,
    /// How fast each user and address may call.
    #[command(flatten)]
    pub rates: service_kit::rate_limit::RateSettings,
    /// How live availability streams behave.
    #[command(flatten)]
    pub live: LiveSettings,
    /// Where browsers reach command-api: the seat map page books there.
    #[arg(long, env = "COMMAND_API_URL", default_value = "http://127.0.0.1:8081")]
    pub command_api_url: String,
    /// Log as JSON lines instead of text.
    #[arg(long, env = "LOG_JSON", default_value_t = false)]
    pub log_json: bool,
}

/// What every handler reads from: the database, the generation the
/// projector last pointed the query side at, and the waits.
#[derive(Debug, Clone)]
pub struct Reads {
    database: Database,
    generation: Arc<AtomicU32>,
    /// When the pointer was last read, in ms since `epoch`.
    pointer_read: Arc<AtomicU64>,
    /// Refreshes started so far.
    refreshes: Arc<AtomicU64>,
    /// The latest refresh that stored its reading, and that reading.
    seen: Arc<std::sync::Mutex<(u64, u32)>>,
    epoch: Instant,
    /// Longest wait for a consistency token.
    pub consistency_wait: Duration,
    /// Longest MongoDB operation.
    pub mongodb_timeout: Duration,
    /// Checks consistency tokens.
    pub token_key: TokenKey,
    /// The watchers of documents waited for.
    pub waits: Waits,
    /// Show documents by generation and id.
    show_cache: Arc<std::sync::Mutex<ShowCache>>,
}

/// Show documents by generation and show id.
type ShowCache = std::collections::HashMap<(u32, String), Arc<ShowDoc>>;

/// Most show documents kept in memory.
const SHOW_CACHE: usize = 10_000;

/// How often the generation pointer is read.
pub const GENERATION_REFRESH: Duration = Duration::from_millis(200);

/// A pointer not read for this long is not trusted: reads answer 503
/// rather than serve a generation that may be gone.
pub const POINTER_STALE: Duration = Duration::from_secs(3);

impl Reads {
    /// The generation to read now.
    ///
    /// # Errors
    /// [`QueryError::Unavailable`] when the pointer could not be read for
    /// [`POINTER_STALE`].
    pub fn generation(&self) -> Result<u32, QueryError> {
        let read_at = Duration::from_millis(self.pointer_read.load(Ordering::Relaxed));
        if self.epoch.elapsed().saturating_sub(read_at) > POINTER_STALE {
            return Err(QueryError::Unavailable(
                "the generation pointer cannot be read".to_owned(),
            ));
        }
        Ok(self.generation.load(Ordering::Relaxed))
    }

    /// Show documents of `generation`.
    pub fn shows(&self, generation: u32) -> Collection<ShowDoc> {
        self.database
            .collection(&read_model::collection_name(generation, SHOWS))
    }

    /// Block documents of `generation`.
    pub fn blocks(&self, generation: u32) -> Collection<BlockDoc> {
        self.database
            .collection(&read_model::collection_name(generation, BLOCKS))
    }

    /// The tallies of `generation`: each block's counts without its seats.
    pub fn tallies(&self, generation: u32) -> Collection<BlockDoc> {
        self.database
            .collection(&read_model::collection_name(generation, TALLIES))
    }

    /// A show document of `generation`, `None` if there is none. Show
    /// documents never change once written, so each is read once.
    ///
    /// # Errors
    /// The read models unavailable.
    pub async fn show_in(
        &self,
        generation: u32,
        show_id: &str,
    ) -> Result<Option<Arc<ShowDoc>>, QueryError> {
        let key = (generation, show_id.to_owned());
        if let Some(show) = self
            .show_cache
            .lock()
            .ok()
            .and_then(|c| c.get(&key).cloned())
        {
            return Ok(Some(show));
        }
        let Some(show) = self
            .bounded(self.shows(generation).find_one(doc! { "_id": show_id }))
            .await?
        else {
            return Ok(None);
        };
        let show = Arc::new(show);
        if let Ok(mut cache) = self.show_cache.lock() {
            // Bounded: a cache of the shows people are buying seats for.
            if cache.len() >= SHOW_CACHE {
                cache.clear();
            }
            cache.insert(key, Arc::clone(&show));
        }
        Ok(Some(show))
    }

    /// A show document of the current generation.
    ///
    /// # Errors
    /// [`QueryError::NotFound`], or the read models unavailable.
    pub async fn show(&self, show_id: &str) -> Result<Arc<ShowDoc>, QueryError> {
        self.show_in(self.generation()?, show_id)
            .await?
            .ok_or(QueryError::NotFound("show"))
    }

    /// Booking documents of `generation`.
    pub fn bookings(&self, generation: u32) -> Collection<BookingDoc> {
        self.database
            .collection(&read_model::collection_name(generation, BOOKINGS))
    }

    /// Runs one MongoDB operation, bounded by `MONGODB_TIMEOUT_MS`.
    ///
    /// # Errors
    /// [`QueryError::Unavailable`] when it fails or takes too long.
    pub async fn bounded<T>(
        &self,
        operation: impl IntoFuture<Output = Result<T, mongodb::error::Error>>,
    ) -> Result<T, QueryError> {
        match tokio::time::timeout(self.mongodb_timeout, operation.into_future()).await {
            Ok(result) => Ok(result?),
            Err(_) => Err(QueryError::Unavailable(format!(
                "a read took longer than {} ms",
                self.mongodb_timeout.as_millis()
            ))),
        }
    }

    /// Reads the generation pointer once. No pointer yet: generation 1.
    /// Of refreshes that overlap, the one that started last decides, so the
    /// generation read never steps back to one a slower, older read saw.
    ///
    /// # Errors
    /// MongoDB errors, or a pointer whose `current` is not a generation.
    pub async fn refresh(&self) -> Result<u32, QueryError> {
        let ticket = self.refreshes.fetch_add(1, Ordering::Relaxed) + 1;
        let pointer: Option<Document> = self
            .bounded(
                self.database
                    .collection::<Document>(GENERATIONS)
                    .find_one(doc! { "_id": GENERATION_POINTER })
                    .projection(doc! { "current": 1 }),
            )
            .await?;
        let generation = match pointer {
            None => 1,
            Some(pointer) => generation_of(pointer.get("current")).ok_or_else(|| {
                QueryError::Unavailable("the generation pointer holds no generation".to_owned())
            })?,
        };
        let mut seen = self
            .seen
            .lock()
            .map_err(|_| QueryError::Unavailable("the pointer state is poisoned".to_owned()))?;
        if ticket > seen.0 {
            *seen = (ticket, generation);
            self.generation.store(generation, Ordering::Relaxed);
            let now = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
            self.pointer_read.store(now, Ordering::Relaxed);
        }
        Ok(seen.1)
    }

    /// What a lookup in `collection` that found nothing in `generation`
    /// means: the generation switched meanwhile (`Ok(Some(new))`, to read
    /// again), the thing does not exist ([`QueryError::NotFound`]), or the
    /// read models are not there at all (a 503, never a 404).
    ///
    /// # Errors
    /// The answer, when it is not a generation to read again.
    pub async fn after_miss(
        &self,
        generation: u32,
        collection: &str,
        what: &'static str,
    ) -> Result<u32, QueryError> {
        match self.after_empty(generation, collection).await? {
            Some(now) => Ok(now),
            None => Err(QueryError::NotFound(what)),
        }
    }

    /// What an empty answer from `collection` of `generation` means: the
    /// generation switched meanwhile (`Some(new)`, to read again), it is
    /// truly empty (`None`), or the read models are not there (a 503).
    ///
    /// # Errors
    /// [`QueryError::Unavailable`] when the collection does not exist.
    pub async fn after_empty(
        &self,
        generation: u32,
        collection: &str,
    ) -> Result<Option<u32>, QueryError> {
        let now = self.refresh().await?;
        if now != generation {
            return Ok(Some(now));
        }
        let name = read_model::collection_name(generation, collection);
        let names = self
            .bounded(
                self.database
                    .list_collection_names()
                    .filter(doc! { "name": &name }),
            )
            .await?;
        if names.is_empty() {
            return Err(QueryError::Unavailable(format!(
                "the read models of generation {generation} are not there"
            )));
        }
        Ok(None)
    }

    /// The longest a request may take: its token wait and a few reads.
    pub fn request_timeout(&self) -> Duration {
        self.consistency_wait + self.mongodb_timeout * 3
    }
}

/// A generation number as stored: an integer of any width.
fn generation_of(value: Option<&mongodb::bson::Bson>) -> Option<u32> {
    mongodb::bson::from_bson::<read_model::GenerationNumber>(value?.clone())
        .ok()
        .map(|n| n.0)
}

/// The routes, for the server and for tests.
pub fn router(reads: Reads, live: Live, seat_map: SeatMap, access: Access) -> Router {
    let limit = reads.request_timeout();
    let router = Router::new()
        .route("/shows", get(routes::list_shows))
        .route("/shows/{id}", get(routes::show))
        .route("/shows/{id}/availability", get(routes::availability))
        .route(
            "/shows/{id}/availability/stream",
            get(crate::live::stream).with_state(live.clone()),
        )
        .route(
            "/shows/{id}/seatmap",
            get(crate::seatmap::page).with_state((reads.clone(), seat_map)),
        )
        .route("/bookings/{id}", get(routes::booking))
        .route("/users/{id}/bookings", get(routes::user_bookings))
        .route("/healthz", get(|| async { StatusCode::OK }))
        .route(
            "/readyz",
            get(readyz).with_state((reads.clone(), live.clone())),
        )
        .route("/metrics", get(metrics).with_state(live))
        .route(
            "/openapi.json",
            get(|| async { Json(routes::ApiDoc::openapi()) }),
        )
        .fallback(service_kit::problem::no_such_route)
        .method_not_allowed_fallback(service_kit::problem::no_such_method)
        .layer(middleware::from_fn_with_state(
            access,
            service_kit::auth::guard,
        ))
        // A read that takes longer than its token wait and a few MongoDB
        // operations is a 503 problem with `Retry-After`, so that no request
        // outlives the grace a replaced generation is kept for.
        .layer(middleware::from_fn(move |request, next| {
            service_kit::http::within(limit, request, next)
        }));
    let router = service_kit::http::observed(router);
    service_kit::http::with_request_ids(router).with_state(reads)
}

/// `GET /metrics`, with the live streams open now.
async fn metrics(State(live): State<Live>) -> axum::response::Response {
    #[allow(clippy::cast_precision_loss)] // a count of connections
    metrics::gauge!("sse_subscribers").set(live.subscribers() as f64);
    service_kit::metrics::render().await
}

/// `GET /readyz`: 200 while MongoDB answers, else 503.
async fn readyz(
    State((reads, live)): State<(Reads, Live)>,
) -> Result<Json<serde_json::Value>, QueryError> {
    let generation = reads.refresh().await?;
    Ok(Json(serde_json::json!({
        "mongodb": "up",
        "generation": generation,
        "consistency_waiters": reads.waits.waiting(),
        "live_subscribers": live.subscribers(),
        "live_shows": live.feeds(),
    })))
}

/// A bound, ready-to-run query-api.
pub struct App {
    listener: TcpListener,
    reads: Reads,
    live: Live,
    seat_map: SeatMap,
    access: Access,
}

impl App {
    /// Connects to MongoDB (failing with the host named when it does not
    /// answer) and binds the address.
    ///
    /// # Errors
    /// Unreachable MongoDB, malformed URI, address in use.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        // Before any connection: a service that cannot check tokens must
        // not start, whatever else is up.
        let access = Access::from_settings(&settings.auth, &settings.rates)?;
        let (client, hosts) = service_kit::connect::mongodb_client(
            &settings.mongodb_uri,
            Duration::from_millis(settings.mongodb_timeout_ms),
        )
        .await?;
        let database = client.database(&settings.mongodb_database);
        let token_key = TokenKey::new(settings.consistency_key.as_bytes().to_vec())
            .context("CONSISTENCY_KEY is too short")?;
        if settings.consistency_key == domain::consistency::DEVELOPMENT_KEY {
            tracing::warn!(
                "CONSISTENCY_KEY is the development key; set a secret of your own in production"
            );
        }
        let reads = Reads {
            database,
            generation: Arc::new(AtomicU32::new(1)),
            pointer_read: Arc::new(AtomicU64::new(0)),
            refreshes: Arc::new(AtomicU64::new(0)),
            seen: Arc::new(std::sync::Mutex::new((0, 1))),
            epoch: Instant::now(),
            consistency_wait: Duration::from_millis(settings.consistency_wait_ms),
            mongodb_timeout: Duration::from_millis(settings.mongodb_timeout_ms),
            token_key,
            waits: Waits::new(settings.consistency_max_waiters),
            show_cache: Arc::default(),
        };
        let startup = Duration::from_secs(settings.startup_timeout_secs);
        let mut connected = reads.refresh().await;
        let started = std::time::Instant::now();
        // Polled, not backed off: a MongoDB starting beside this service is
        // used the moment it answers, and the wait never runs past `startup`.
        let never = CancellationToken::new();
        while connected.is_err() && started.elapsed() < startup {
            service_kit::backoff::pause(&never, Duration::from_millis(200)).await;
            connected = reads.refresh().await;
        }
        connected.with_context(|| format!("mongodb at {hosts} is unreachable"))?;
        tracing::info!(%hosts, "connected to mongodb");
        let listener = TcpListener::bind(settings.addr)
            .await
            .with_context(|| format!("cannot listen on {}", settings.addr))?;
        let live = Live::new(reads.clone(), settings.live);
        let seat_map = SeatMap::new(&settings.command_api_url);
        Ok(Self {
            listener,
            reads,
            live,
            seat_map,
            access,
        })
    }

    /// Its routes, sharing its state: for tests that call it in process
    /// (and so decide when an answer's body is read).
    pub fn router(&self) -> Router {
        router(
            self.reads.clone(),
            self.live.clone(),
            self.seat_map.clone(),
            self.access.clone(),
        )
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
            while service_kit::backoff::pause(&refresher_stop, GENERATION_REFRESH).await {
                if let Err(error) = reads.refresh().await {
                    tracing::debug!(%error, "cannot read the generation pointer");
                }
            }
        });
        // Live streams never end by themselves: they end first, so that the
        // graceful shutdown does not wait for their clients.
        let live = self.live.clone();
        let closing = stop.clone();
        let closer = tokio::spawn(async move {
            closing.cancelled().await;
            live.close();
        });
        tracing::info!(addr = %self.addr()?, "query-api listening");
        // A stream whose client stopped reading is not polled, so it cannot
        // see the stop: once every request has had its longest time, the
        // server stops without waiting for such connections.
        let grace = self.reads.request_timeout();
        let stopped = stop.clone();
        // The peer address keys the rate limit of requests without a token.
        let app = router(self.reads, self.live, self.seat_map, self.access);
        let served = axum::serve(
            self.listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(stop.cancelled_owned());
        tokio::select! {
            served = served => served.context("server failed")?,
            () = async {
                stopped.cancelled().await;
                tokio::time::sleep(grace).await;
            } => tracing::warn!(
                grace_ms = grace.as_millis(),
                "connections still open after the grace period are cut"
            ),
        }
        refresher.abort();
        closer.abort();
        Ok(())
    }
}
