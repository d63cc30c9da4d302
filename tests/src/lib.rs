//! Shared helpers for the black-box tests: where the real servers are, and
//! fresh, uniquely named places in them, so that tests run side by side and
//! never see each other's data.
//!
//! The servers come from `make up` (`scripts/infra.sh`); their addresses can
//! be overridden with the same variables the services read.

#![forbid(unsafe_code)]

use anyhow::Context;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, PgPool};
use uuid::Uuid;

pub mod auth;
pub mod browser;
pub mod cluster;
pub mod http;
pub mod kafka;
pub mod log_order;
pub mod metrics;
pub mod openapi;
pub mod sse;
pub mod system;

/// Postgres server of the tests (`TEST_DATABASE_URL`, then `DATABASE_URL`).
pub fn postgres_url() -> String {
    std::env::var("TEST_DATABASE_URL")
        .or_else(|_| std::env::var("DATABASE_URL"))
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// Kafka bootstrap brokers (`KAFKA_BROKERS`).
pub fn kafka_brokers() -> String {
    std::env::var("KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".to_owned())
}

/// MongoDB server (`MONGODB_URI`).
pub fn mongodb_uri() -> String {
    std::env::var("MONGODB_URI").unwrap_or_else(|_| "mongodb://127.0.0.1:27017".to_owned())
}

/// A name no other test run uses: `prefix` and a random suffix.
pub fn unique_name(prefix: &str) -> String {
    format!("{prefix}_{}", Uuid::new_v4().simple())
}

/// A new, empty Postgres database with the project's migrations applied.
/// Dropped by [`TestDatabase::drop_database`].
pub struct TestDatabase {
    /// Pool on the new database.
    pub pool: PgPool,
    name: String,
    server: String,
    admin: PgConnectOptions,
}

impl TestDatabase {
    /// Creates the database on the tests' server and applies `migrations/`.
    ///
    /// # Errors
    /// When the server is unreachable or a migration fails.
    pub async fn create() -> anyhow::Result<Self> {
        Self::create_on(&postgres_url()).await
    }

    /// [`TestDatabase::create`] on the server of `server` (a Postgres URL).
    ///
    /// # Errors
    /// As [`TestDatabase::create`].
    pub async fn create_on(server: &str) -> anyhow::Result<Self> {
        let admin: PgConnectOptions = server.parse().context("bad Postgres URL")?;
        let name = unique_name("ticketing_test");
        let mut conn = admin
            .connect()
            .await
            .context("postgres is unreachable: run `make up`")?;
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .await
            .context("cannot create a test database")?;
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .connect_with(admin.clone().database(&name))
            .await
            .context("cannot connect to the test database")?;
        sqlx::migrate!("../migrations")
            .run(&pool)
            .await
            .context("migrations failed")?;
        Ok(Self {
            pool,
            name,
            server: server.to_owned(),
            admin,
        })
    }

    /// A URL of the database, for a service under test.
    pub fn url(&self) -> String {
        with_database(&self.server, &self.name)
    }

    /// Closes the pool and drops the database.
    ///
    /// # Errors
    /// When the server refuses.
    pub async fn drop_database(self) -> anyhow::Result<()> {
        self.pool.close().await;
        let mut conn = self.admin.connect().await?;
        sqlx::query(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        ))
        .execute(&mut conn)
        .await?;
        Ok(())
    }
}

/// `url` with its database replaced by `name`.
fn with_database(url: &str, name: &str) -> String {
    let (base, query) = url
        .split_once('?')
        .map_or((url, None), |(b, q)| (b, Some(q)));
    let authority_end = base.find("://").map_or(0, |i| i + 3);
    let base = match base[authority_end..].find('/') {
        Some(slash) => &base[..authority_end + slash],
        None => base,
    };
    match query {
        Some(query) => format!("{base}/{name}?{query}"),
        None => format!("{base}/{name}"),
    }
}

/// Every document of `collection`.
///
/// # Errors
/// MongoDB errors.
pub async fn all_documents<T>(collection: &mongodb::Collection<T>) -> anyhow::Result<Vec<T>>
where
    T: serde::de::DeserializeOwned + Send + Sync,
{
    let mut cursor = collection.find(mongodb::bson::doc! {}).await?;
    let mut documents = Vec::new();
    while cursor.advance().await? {
        documents.push(cursor.deserialize_current()?);
    }
    Ok(documents)
}

#[cfg(test)]
mod tests {
    use super::with_database;

    #[test]
    fn database_urls_keep_everything_but_the_name() {
        assert_eq!(
            with_database("postgres://u@h:5432/postgres", "t1"),
            "postgres://u@h:5432/t1"
        );
        assert_eq!(
            with_database("postgres://u@h:5432", "t1"),
            "postgres://u@h:5432/t1"
        );
        assert_eq!(
            with_database("postgres://u:p@h/db?sslmode=disable", "t1"),
            "postgres://u:p@h/t1?sslmode=disable"
        );
    }
}
