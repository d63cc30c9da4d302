//! The process plumbing the three services share, so that they behave alike:
//! `RUST_LOG`-filtered logs to stderr (JSON lines with `LOG_JSON`), a
//! cancellation token fired by SIGTERM or Ctrl-C, the waits between retries
//! ([`backoff`]), the connections to Postgres and MongoDB ([`connect`]),
//! problem documents ([`problem`]), the span of an HTTP request ([`http`])
//! the caller's verified identity ([`auth`]) and its rate ([`rate_limit`]),
//! and the process's Prometheus metrics ([`metrics`]).

pub mod auth;
pub mod backoff;
pub mod connect;
pub mod http;
pub mod metrics;
pub mod problem;
pub mod rate_limit;

use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

/// Logs to stderr at `RUST_LOG` (default `info`), as JSON lines when `json`.
pub fn init_tracing(json: bool) {
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

/// A token cancelled on SIGTERM or Ctrl-C; the service then finishes what
/// it has in hand and stops.
pub fn stop_on_signal() -> CancellationToken {
    let stop = CancellationToken::new();
    tokio::spawn(wait_for_signal(stop.clone()));
    stop
}

async fn wait_for_signal(stop: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {},
                _ = term.recv() => {},
            }
        }
        Err(error) => {
            tracing::warn!(%error, "cannot watch SIGTERM; stopping on Ctrl-C only");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
    tracing::info!("shutting down: finishing the work in hand");
    stop.cancel();
}
