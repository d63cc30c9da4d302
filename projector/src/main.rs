//! `projector`: keeps the MongoDB read models up to date from the event
//! topic (`projector`, the default), or rebuilds them from the Postgres log
//! (`projector replay`). The wiring is in `projector::startup`.

use std::process::ExitCode;

use clap::Parser;
use projector::startup::{self, Settings};

#[tokio::main]
async fn main() -> ExitCode {
    let settings = Settings::parse();
    service_kit::init_tracing(settings.log_json);
    match startup::run(settings, service_kit::stop_on_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // One line with the whole cause chain, not a backtrace.
            tracing::error!(error = %format_args!("{error:#}"), "projector stopped");
            ExitCode::FAILURE
        }
    }
}
