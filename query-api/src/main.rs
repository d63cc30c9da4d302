//! `query-api`: answers the reads of the ticket-booking API from the MongoDB
//! read models. This file only wires settings to start-up.

use std::process::ExitCode;

use clap::Parser;
use query_api::startup::{App, Settings};

#[tokio::main]
async fn main() -> ExitCode {
    let settings = Settings::parse();
    service_kit::init_tracing(settings.log_json);
    let stop = service_kit::stop_on_signal();
    let result = match App::build(settings).await {
        Ok(app) => app.run_until(stop).await,
        Err(error) => Err(error),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // One line with the whole cause chain, not a backtrace.
            tracing::error!(error = %format_args!("{error:#}"), "query-api stopped");
            ExitCode::FAILURE
        }
    }
}
