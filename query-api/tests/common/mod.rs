//! What the query-api tests share: the settings of a query-api of their own.

use ticketing_tests::mongodb_uri;

/// A query-api on a free port, reading `database` on the tests' MongoDB,
/// checking the tests' tokens, with no rate limits.
pub fn settings(database: String) -> query_api::startup::Settings {
    query_api::startup::Settings {
        mongodb_uri: mongodb_uri(),
        mongodb_database: database,
        addr: "127.0.0.1:0".parse().expect("an address"),
        startup_timeout_secs: 10,
        mongodb_timeout_ms: 2_000,
        consistency_wait_ms: 200,
        consistency_max_waiters: 100,
        consistency_key: domain::consistency::DEVELOPMENT_KEY.to_owned(),
        auth: service_kit::auth::AuthSettings {
            jwt_secret: Some(ticketing_tests::auth::SECRET.to_owned()),
            ..service_kit::auth::AuthSettings::default()
        },
        rates: service_kit::rate_limit::RateSettings::off(),
        command_api_url: "http://127.0.0.1:8081".to_owned(),
        live: query_api::live::LiveSettings::default(),
        log_json: false,
    }
}
