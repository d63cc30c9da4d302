//! Wiring: the pool, migrations, the router, the sweeper, the server.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use axum::extract::DefaultBodyLimit;
use axum::http::{header, HeaderName, HeaderValue, Method, StatusCode};
use axum::routing::{get, post};
use axum::{middleware, Extension, Router};
use service_kit::auth::Access;
use service_kit::connect::PoolSettings;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower_http::cors::{AllowOrigin, CorsLayer};
use utoipa::OpenApi;

use crate::relay::{Relay, RelayStatus};
use crate::routes;
use crate::sales::Sales;
use crate::settings::Settings;
use crate::sweeper;

/// Longest a request may take before it is answered 503.
pub const REQUEST_TIME_LIMIT: Duration = Duration::from_secs(30);

/// Largest accepted request body.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// The migrations of `migrations/`, applied at start-up and by `migrate`.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

/// Which browser pages may call the API: the origins allowed, with the
/// headers a booking sends and the ones its answer carries.
///
/// # Errors
/// An origin that is not a header value.
pub fn cors(origins: &[String]) -> anyhow::Result<CorsLayer> {
    let origins: Vec<&str> = origins
        .iter()
        .map(|origin| origin.trim())
        .filter(|origin| !origin.is_empty())
        .collect();
    let allow = if origins.contains(&"*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(
            origins
                .iter()
                .map(|origin| {
                    HeaderValue::from_str(origin.trim_end_matches('/'))
                        .with_context(|| format!("CORS origin {origin:?} is not a header value"))
                })
                .collect::<anyhow::Result<Vec<_>>>()?,
        )
    };
    Ok(CorsLayer::new()
        .allow_origin(allow)
        .allow_methods([Method::GET, Method::POST])
        .allow_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            HeaderName::from_static("idempotency-key"),
        ])
        .expose_headers([
            header::LOCATION,
            HeaderName::from_static("x-consistency-token"),
            service_kit::http::REQUEST_ID,
        ])
        .max_age(Duration::from_secs(600)))
}

/// The HTTP routes, for the server and for tests.
pub fn router(sales: Sales, relay: RelayStatus, access: Access, cors: CorsLayer) -> Router {
    let router = Router::new()
        .route("/shows", post(routes::create_show))
        .route("/bookings", post(routes::place_booking))
        .route("/bookings/{id}/confirm", post(routes::confirm_booking))
        .route("/bookings/{id}/cancel", post(routes::cancel_booking))
        .route("/healthz", get(|| async { StatusCode::OK }))
        .route("/readyz", get(routes::readyz))
        .route("/metrics", get(service_kit::metrics::render))
        .route(
            "/openapi.json",
            get(|| async { axum::Json(routes::ApiDoc::openapi()) }),
        )
        .fallback(service_kit::problem::no_such_route)
        .method_not_allowed_fallback(service_kit::problem::no_such_method)
        .layer(middleware::from_fn(crate::cause::record))
        .layer(middleware::from_fn_with_state(
            access,
            service_kit::auth::guard,
        ))
        .layer(Extension(relay))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn(|request, next| {
            service_kit::http::within(REQUEST_TIME_LIMIT, request, next)
        }));
    let router = service_kit::http::observed(router);
    // CORS outermost: a browser's preflight is answered before the guard,
    // which would refuse it for carrying no token.
    service_kit::http::with_request_ids(router)
        .layer(cors)
        .with_state(sales)
}

/// Connects to Postgres, failing with the server named (never the password).
///
/// # Errors
/// When the URL is malformed or Postgres does not answer in time.
pub async fn connect(settings: &Settings) -> anyhow::Result<PgPool> {
    Ok(service_kit::connect::postgres_pool(
        &settings.database_url,
        PoolSettings {
            max_connections: settings.max_connections,
            acquire_timeout: Duration::from_secs(settings.acquire_timeout_secs),
            startup_timeout: Duration::from_secs(settings.startup_timeout_secs),
        },
    )
    .await?)
}

/// Applies the migrations.
///
/// # Errors
/// When a migration fails.
pub async fn migrate(pool: &PgPool) -> anyhow::Result<()> {
    MIGRATOR.run(pool).await.context("applying migrations")
}

/// `command-api relay`: only the relay, until `stop`.
///
/// # Errors
/// When Postgres is unreachable at start-up or a migration fails.
pub async fn run_relay(settings: Settings, stop: CancellationToken) -> anyhow::Result<()> {
    let pool = connect(&settings).await?;
    migrate(&pool).await?;
    let relay = Relay::new(pool.clone(), settings.relay)?;
    relay.run(stop).await;
    pool.close().await;
    Ok(())
}

/// A running command-api.
pub struct App {
    listener: TcpListener,
    sales: Sales,
    relay: Option<Relay>,
    access: Access,
    cors: CorsLayer,
    settings: Settings,
}

impl App {
    /// Connects, migrates and binds.
    ///
    /// # Errors
    /// When Postgres is unreachable, a migration fails or the address is taken.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        // Before any connection: a service that cannot check tokens must
        // not start, whatever else is up.
        let access = Access::from_settings(&settings.auth, &settings.rates)?;
        let cors = cors(&settings.cors_allowed_origins)?;
        let pool = connect(&settings).await?;
        migrate(&pool).await?;
        let listener = TcpListener::bind(settings.addr)
            .await
            .with_context(|| format!("cannot listen on {}", settings.addr))?;
        let sales = Sales::new(
            pool.clone(),
            settings.hold_for(),
            settings.command_attempts,
            settings.lock_wait(),
        )
        .grouped(settings.grouping())
        .signing(
            domain::TokenKey::new(settings.consistency_key.as_bytes().to_vec())
                .context("CONSISTENCY_KEY is too short")?,
        );
        if settings.consistency_key == domain::consistency::DEVELOPMENT_KEY {
            tracing::warn!(
                "CONSISTENCY_KEY is the development key; set a secret of your own in production"
            );
        }
        // Kafka is not needed to take commands: the relay connects, and
        // reconnects, on its own. It is woken by this process' commits and
        // polls for those of others.
        let relay = if settings.relay_enabled {
            Some(Relay::new(pool, settings.relay.clone())?.woken_by(sales.commits()))
        } else {
            None
        };
        Ok(Self {
            listener,
            sales,
            relay,
            access,
            cors,
            settings,
        })
    }

    /// The bound address (for tests that bind port 0).
    ///
    /// # Errors
    /// When the socket has no address.
    pub fn addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `stop` is cancelled, then lets in-flight requests finish.
    ///
    /// # Errors
    /// When the server fails.
    pub async fn run_until(self, stop: CancellationToken) -> anyhow::Result<()> {
        let sweeper = tokio::spawn(sweeper::run(
            self.sales.clone(),
            Duration::from_secs(self.settings.sweep_every_secs.max(1)),
            Duration::from_secs(self.settings.idempotency_keep_hours * 3600),
            stop.clone(),
        ));
        let relay_status = self.relay.as_ref().map_or_else(
            || RelayStatus::disabled(&self.settings.relay.relay_topic),
            Relay::status,
        );
        let relay = self
            .relay
            .map(|relay| tokio::spawn(relay.run(stop.clone())));
        tracing::info!(addr = %self.listener.local_addr()?, "command-api listening");
        let app = router(
            self.sales.clone(),
            relay_status,
            self.access.clone(),
            self.cors.clone(),
        );
        // The peer address keys the rate limit of requests without a token.
        let served = axum::serve(
            self.listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(stop.clone().cancelled_owned())
        .await
        .context("server failed");
        stop.cancel();
        let _ = sweeper.await;
        if let Some(relay) = relay {
            let _ = relay.await;
        }
        self.sales.pool().close().await;
        served
    }
}
