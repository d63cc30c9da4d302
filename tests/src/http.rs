//! Reading the services' answers in tests: one answer type and one check
//! of a problem document, for every test crate.

use anyhow::{ensure, Context};
use reqwest::header::HeaderMap;
use reqwest::StatusCode;
use serde_json::Value;

/// An answer: status, headers, and the body as JSON (a JSON string of the
/// text when it is not JSON, `Null` when empty).
#[derive(Debug)]
pub struct Answer {
    /// Its status.
    pub status: StatusCode,
    /// Its headers.
    pub headers: HeaderMap,
    /// Its body.
    pub body: Value,
}

impl Answer {
    /// Reads a whole response.
    ///
    /// # Errors
    /// When the body cannot be read.
    pub async fn of(response: reqwest::Response) -> anyhow::Result<Self> {
        let status = response.status();
        let headers = response.headers().clone();
        let text = response.text().await.context("reading the body")?;
        let body = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        Ok(Self {
            status,
            headers,
            body,
        })
    }

    /// A header as text (empty when missing).
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    /// The consistency token of a write's answer.
    pub fn token(&self) -> Option<String> {
        self.headers
            .get("x-consistency-token")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    }

    /// Checks that the answer is a problem document of `status` and
    /// `/problems/{kind}`, with the content type and members every problem
    /// has.
    ///
    /// # Errors
    /// What differs.
    pub fn is_problem(&self, status: StatusCode, kind: &str) -> anyhow::Result<()> {
        ensure!(
            self.status == status,
            "status {} instead of {status}: {}",
            self.status,
            self.body
        );
        ensure!(
            self.header("content-type") == "application/problem+json",
            "content type {:?} of a {status} answer",
            self.header("content-type")
        );
        ensure!(
            self.body["type"] == format!("/problems/{kind}"),
            "type {} instead of /problems/{kind}: {}",
            self.body["type"],
            self.body
        );
        ensure!(
            self.body["status"] == status.as_u16(),
            "status member {}",
            self.body["status"]
        );
        ensure!(
            self.body["title"].is_string() && self.body["detail"].is_string(),
            "a problem without title or detail: {}",
            self.body
        );
        Ok(())
    }
}
