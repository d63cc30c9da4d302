//! The one way the services reach Postgres and MongoDB: the session settings
//! every connection needs, timeouts that make an unreachable server an error
//! instead of a hang, and errors that name the server but never a password.

use std::time::Duration;

use mongodb::options::ClientOptions;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, PgPool};

/// Why a server could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The URL in the settings does not parse.
    #[error("{setting} is not a {server} URL: {reason}")]
    BadUrl {
        /// The setting that holds it.
        setting: &'static str,
        /// Postgres or MongoDB.
        server: &'static str,
        /// What the driver said.
        reason: String,
    },
    /// The server did not answer in time, or refused us.
    #[error("{server} at {target} is unreachable: {reason}")]
    Unreachable {
        /// Postgres or MongoDB.
        server: &'static str,
        /// Host, port (and database): never the credentials.
        target: String,
        /// What the driver said, or the timeout.
        reason: String,
    },
}

/// How big a pool, and how long to wait.
#[derive(Debug, Clone, Copy)]
pub struct PoolSettings {
    /// Connections at most.
    pub max_connections: u32,
    /// How long a query waits for a free connection.
    pub acquire_timeout: Duration,
    /// How long start-up waits for the server's first answer.
    pub startup_timeout: Duration,
}

/// The options of `DATABASE_URL`, with the session settings every connection
/// of the project gets.
///
/// # Errors
/// [`ConnectError::BadUrl`].
pub fn postgres_options(url: &str) -> Result<PgConnectOptions, ConnectError> {
    let options = url
        .parse::<PgConnectOptions>()
        .map_err(|error| ConnectError::BadUrl {
            setting: "DATABASE_URL",
            server: "Postgres",
            reason: error.to_string(),
        })?;
    // A generic plan cached while `events` was small stays a sequential
    // scan until the table is analyzed, and where autovacuum is off that is
    // never: each load then costs O(log size) (measured: 2091 events/s fell
    // to 183/s at 80,000 events). A custom plan sees the table as it is. A
    // transaction left open by a stray client holds back the relay of every
    // process (it publishes only below the oldest open transaction): one
    // idle in its transaction for 30 s is ended.
    Ok(options.options([
        ("plan_cache_mode", "force_custom_plan"),
        ("idle_in_transaction_session_timeout", "30s"),
    ]))
}

/// `host:port/database`, for logs and errors.
pub fn postgres_target(options: &PgConnectOptions) -> String {
    format!(
        "{}:{}/{}",
        options.get_host(),
        options.get_port(),
        options.get_database().unwrap_or("")
    )
}

/// A pool on `DATABASE_URL`, once Postgres has answered one connection.
/// Lazy from then on: a Postgres outage later fails the requests it hits,
/// and the pool reconnects by itself when Postgres is back.
///
/// # Errors
/// A malformed URL, or no answer within `settings.startup_timeout`.
pub async fn postgres_pool(url: &str, settings: PoolSettings) -> Result<PgPool, ConnectError> {
    let options = postgres_options(url)?;
    let target = postgres_target(&options);
    let unreachable = |reason: String| ConnectError::Unreachable {
        server: "Postgres",
        target: target.clone(),
        reason,
    };
    tokio::time::timeout(settings.startup_timeout, options.connect())
        .await
        .map_err(|_| unreachable(format!("no answer within {:?}", settings.startup_timeout)))?
        .map_err(|error| unreachable(error.to_string()))?;
    tracing::info!(%target, "connected to postgres");
    Ok(PgPoolOptions::new()
        .max_connections(settings.max_connections)
        // A ping before every use is a round trip per command; a broken
        // connection fails its statement instead, which is a 503 the client
        // retries, and the pool replaces it.
        .test_before_acquire(false)
        .acquire_timeout(settings.acquire_timeout)
        .connect_lazy_with(options))
}

/// A MongoDB client on `MONGODB_URI` whose operations give up after
/// `timeout` without a server, and the hosts it names, for logs. It connects
/// lazily: callers that must know MongoDB answers ping it.
///
/// # Errors
/// [`ConnectError::BadUrl`].
pub async fn mongodb_client(
    uri: &str,
    timeout: Duration,
) -> Result<(mongodb::Client, String), ConnectError> {
    let bad = |error: mongodb::error::Error| ConnectError::BadUrl {
        setting: "MONGODB_URI",
        server: "MongoDB",
        reason: error.to_string(),
    };
    let mut options = ClientOptions::parse(uri).await.map_err(bad)?;
    let hosts = options
        .hosts
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",");
    options.server_selection_timeout = Some(timeout);
    options.connect_timeout = Some(timeout);
    Ok((mongodb::Client::with_options(options).map_err(bad)?, hosts))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_url_names_its_setting_and_a_target_never_shows_the_password() {
        let error = postgres_options("postgres://db:port/tickets").expect_err("no port number");
        assert!(error
            .to_string()
            .starts_with("DATABASE_URL is not a Postgres URL"));
        let options = postgres_options("postgres://user:secret@db.example:6543/tickets")
            .expect("a Postgres URL");
        assert_eq!(postgres_target(&options), "db.example:6543/tickets");
    }
}
