//! What caused the events a request appends: its request id and its
//! verified user, written into every event's `metadata` as
//! `correlation_id` and `user_id`, so that an event in the log, on Kafka
//! or in the projector's log leads back to the request that wrote it.
//!
//! A request's cause is set once, by [`record`], around everything the
//! request does; the log reads it when it appends ([`Cause::current`]).
//! Group commit appends many requests' events in one statement on another
//! task, so each placement carries its own cause there.

use std::collections::BTreeMap;

use axum::extract::Request;
use axum::middleware::Next;
use axum::response::Response;
use service_kit::auth::Caller;
use service_kit::problem::Problem;

tokio::task_local! {
    static CAUSE: Cause;
}

/// Who and what asked for an event.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cause {
    /// The request's `X-Request-Id`; for the sweeper, the sweep's.
    pub correlation_id: Option<String>,
    /// The token's `sub`, when the request had a verified token.
    pub user_id: Option<String>,
}

impl Cause {
    /// The cause of the request (or sweep) this task works for; none
    /// outside one.
    pub fn current() -> Self {
        CAUSE.try_with(Clone::clone).unwrap_or_default()
    }

    /// Runs `work` with `self` as its cause.
    pub async fn scope<F: std::future::Future>(self, work: F) -> F::Output {
        CAUSE.scope(self, work).await
    }

    /// The event metadata: only the members known, all strings.
    pub fn metadata(&self) -> BTreeMap<&'static str, &str> {
        let mut metadata = BTreeMap::new();
        if let Some(id) = &self.correlation_id {
            metadata.insert("correlation_id", id.as_str());
        }
        if let Some(user) = &self.user_id {
            metadata.insert("user_id", user.as_str());
        }
        metadata
    }
}

/// Sets the request's cause for everything it does. Layered inside the
/// auth guard (which verifies the token) and the request-id layers (which
/// give every request its id).
/// `axum::middleware::from_fn(record)`.
pub async fn record(caller: Result<Caller, Problem>, request: Request, next: Next) -> Response {
    let cause = Cause {
        correlation_id: request
            .headers()
            .get(&service_kit::http::REQUEST_ID)
            .and_then(|id| id.to_str().ok())
            .map(str::to_owned),
        user_id: caller
            .ok()
            .and_then(|caller| caller.user())
            .map(|id| id.to_string()),
    };
    cause.scope(next.run(request)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_cause_holds_within_its_scope_only() {
        assert_eq!(Cause::current(), Cause::default());
        let cause = Cause {
            correlation_id: Some("req-1".to_owned()),
            user_id: None,
        };
        let seen = cause.clone().scope(async { Cause::current() }).await;
        assert_eq!(seen, cause);
        assert_eq!(
            seen.metadata(),
            BTreeMap::from([("correlation_id", "req-1")])
        );
        assert_eq!(Cause::current(), Cause::default());
    }
}
