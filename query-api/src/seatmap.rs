//! `GET /shows/{id}/seatmap`: one static page that draws a show's seats,
//! keeps them current from the live stream and books through command-api.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};

use crate::problem::QueryError;
use crate::routes::{find_show, Path};
use crate::startup::Reads;

/// The page, with command-api's address written in.
#[derive(Debug, Clone)]
pub struct SeatMap {
    html: Arc<str>,
}

/// The page as shipped: no build step, no framework.
const PAGE: &str = include_str!("seatmap.html");

/// Where the page's `<meta name="command-api">` takes the address.
const COMMAND_API_SLOT: &str = "{{COMMAND_API_URL}}";

impl SeatMap {
    /// The page for browsers that reach command-api at `command_api_url`.
    pub fn new(command_api_url: &str) -> Self {
        let url = command_api_url.trim_end_matches('/');
        Self {
            html: PAGE.replace(COMMAND_API_SLOT, &escape(url)).into(),
        }
    }
}

/// Text safe inside a double-quoted HTML attribute.
fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('"', "&quot;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// `GET /shows/{id}/seatmap`: the page, or a 404 problem for a show that
/// does not exist.
///
/// # Errors
/// 404 for an unknown show, 503 when the read models cannot be read.
pub async fn page(
    State((reads, seat_map)): State<(Reads, SeatMap)>,
    Path(id): Path<String>,
) -> Result<Response, QueryError> {
    find_show(&reads, &id, &HeaderMap::new()).await?;
    Ok((
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
            (
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            ),
        ],
        seat_map.html.to_string(),
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_address_is_written_in_escaped() {
        let page = SeatMap::new("http://x.test/\"><script>/");
        assert!(page
            .html
            .contains(r#"content="http://x.test/&quot;&gt;&lt;script&gt;""#));
        assert!(!page.html.contains(COMMAND_API_SLOT));
    }
}
