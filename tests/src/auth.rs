//! Bearer tokens for the tests, signed as an identity provider would sign
//! them, with the secret every test service is started with.

use reqwest::header::{HeaderMap, HeaderValue, AUTHORIZATION};
use serde_json::json;
use uuid::Uuid;

/// `AUTH_JWT_SECRET` of every service the tests start.
pub const SECRET: &str = "ticketing-tests-secret-of-at-least-32-bytes";

/// A role of a token.
pub const ORGANIZER: &str = "organizer";
/// A role of a token.
pub const ADMIN: &str = "admin";

/// A token for `user` with `roles`, valid for an hour.
pub fn token(user: Uuid, roles: &[&str]) -> String {
    token_until(user, roles, chrono::Utc::now().timestamp() + 3600)
}

/// A token for `user` with `roles` that expires at `exp` (seconds since the
/// epoch).
pub fn token_until(user: Uuid, roles: &[&str], exp: i64) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &json!({ "sub": user.to_string(), "exp": exp, "roles": roles }),
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap_or_else(|error| unreachable!("an HS256 token always encodes: {error}"))
}

/// The `Authorization` value of `token`.
pub fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// Headers carrying a token of a box-office operator (organizer and admin):
/// for tests about something else than who may do what.
pub fn staff_headers() -> HeaderMap {
    staff_headers_of(Uuid::new_v4())
}

/// [`staff_headers`] of the operator `user`.
pub fn staff_headers_of(user: Uuid) -> HeaderMap {
    let mut headers = HeaderMap::new();
    let value = bearer(&token(user, &[ORGANIZER, ADMIN]));
    if let Ok(value) = HeaderValue::from_str(&value) {
        headers.insert(AUTHORIZATION, value);
    }
    headers
}

/// A client whose every request carries a box-office operator's token.
///
/// # Errors
/// When the client cannot be built.
pub fn staff_client() -> reqwest::Result<reqwest::Client> {
    staff_client_of(Uuid::new_v4())
}

/// [`staff_client`] of the operator `user`.
///
/// # Errors
/// When the client cannot be built.
pub fn staff_client_of(user: Uuid) -> reqwest::Result<reqwest::Client> {
    reqwest::Client::builder()
        .default_headers(staff_headers_of(user))
        .build()
}

/// The environment that makes a service check tokens signed with
/// [`SECRET`], with no rate limits (tests of speed and of many requests).
pub fn service_env() -> Vec<(&'static str, String)> {
    vec![
        ("AUTH_JWT_SECRET", SECRET.to_owned()),
        ("RATE_LIMIT_USER_PER_SEC", "0".to_owned()),
        ("RATE_LIMIT_ADDRESS_PER_SEC", "0".to_owned()),
    ]
}
