//! The command-api's settings, from flags or the environment.

use std::net::SocketAddr;
use std::time::Duration;

/// Settings of the command-api.
#[derive(Debug, Clone, clap::Args)]
pub struct Settings {
    /// Postgres holding the event log.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/ticketing"
    )]
    pub database_url: String,
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, env = "COMMAND_API_ADDR", default_value = "127.0.0.1:8081")]
    pub addr: SocketAddr,
    /// Most Postgres connections.
    #[arg(long, env = "DATABASE_MAX_CONNECTIONS", default_value_t = 16)]
    pub max_connections: u32,
    /// How long a request waits for a Postgres connection before a 503.
    #[arg(long, env = "DATABASE_ACQUIRE_TIMEOUT_SECS", default_value_t = 5)]
    pub acquire_timeout_secs: u64,
    /// How long to wait for Postgres at start-up before giving up.
    #[arg(long, env = "STARTUP_TIMEOUT_SECS", default_value_t = 10)]
    pub startup_timeout_secs: u64,
    /// How long a hold lasts, in seconds.
    #[arg(long, env = "HOLD_SECS", default_value_t = 600)]
    pub hold_secs: u64,
    /// How often the sweeper expires lapsed holds, in seconds.
    #[arg(long, env = "SWEEP_EVERY_SECS", default_value_t = 5)]
    pub sweep_every_secs: u64,
    /// How long idempotency keys are kept, in hours (at least 24).
    #[arg(long, env = "IDEMPOTENCY_KEEP_HOURS", default_value_t = 24,
          value_parser = clap::value_parser!(u64).range(24..))]
    pub idempotency_keep_hours: u64,
    /// How many times a command is run when it meets concurrent writers.
    #[arg(long, env = "COMMAND_ATTEMPTS", default_value_t = 8)]
    pub command_attempts: u32,
    /// The longest a command waits for all its streams' locks, in ms; then it
    /// starts over from a fresh snapshot (which most often refuses what the
    /// lock's holder took), and after `COMMAND_ATTEMPTS` answers 503.
    #[arg(long, env = "COMMAND_LOCK_WAIT_MS", default_value_t = 250,
          value_parser = clap::value_parser!(u64).range(1..=60_000))]
    pub command_lock_wait_ms: u64,
    /// Most booking commands decided and committed in one transaction (1:
    /// each on its own).
    #[arg(long, env = "COMMAND_BATCH_MAX", default_value_t = 64,
          value_parser = clap::value_parser!(u64).range(1..=1000))]
    pub command_batch_max: u64,
    /// How long a group of booking commands waits for more after its first,
    /// in microseconds (0: only what is already waiting).
    #[arg(long, env = "COMMAND_BATCH_WINDOW_US", default_value_t = 1000,
          value_parser = clap::value_parser!(u64).range(0..=100_000))]
    pub command_batch_window_us: u64,
    /// Groups of booking commands committing at once, each on a connection.
    #[arg(long, env = "COMMAND_BATCHES", default_value_t = 2,
          value_parser = clap::value_parser!(u64).range(1..=64))]
    pub command_batches: u64,
    /// Run the relay to Kafka in this process (`false` when another process
    /// runs `command-api relay`; running it in several is safe either way).
    #[arg(long, env = "RELAY_ENABLED", default_value_t = true, action = clap::ArgAction::Set)]
    pub relay_enabled: bool,
    /// The relay's settings.
    #[command(flatten)]
    pub relay: crate::relay::RelaySettings,
    /// Secret shared with query-api that signs consistency tokens (at
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
    /// Web origins whose pages may call this API from a browser (the seat
    /// map page of query-api), comma-separated; `*` for any, empty for none.
    #[arg(
        long,
        env = "CORS_ALLOWED_ORIGINS",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:8082,http://localhost:8082"
    )]
    pub cors_allowed_origins: Vec<String>,
    /// Log as JSON lines instead of text.
    #[arg(long, env = "LOG_JSON", default_value_t = false)]
    pub log_json: bool,
}

impl Settings {
    /// How long a hold lasts.
    pub fn hold_for(&self) -> Duration {
        Duration::from_secs(self.hold_secs)
    }

    /// The longest wait for all of a command's stream locks.
    pub fn lock_wait(&self) -> Duration {
        Duration::from_millis(self.command_lock_wait_ms)
    }

    /// How booking commands are grouped into transactions.
    pub fn grouping(&self) -> crate::group_commit::Grouping {
        crate::group_commit::Grouping {
            max: usize::try_from(self.command_batch_max).unwrap_or(1),
            window: Duration::from_micros(self.command_batch_window_us),
            concurrent: usize::try_from(self.command_batches).unwrap_or(1),
            wait_when_idle: false,
        }
    }
}
