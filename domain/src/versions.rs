//! Event versions. The log is append-only: an event keeps the shape it was
//! written in forever, and its row says which (`event_version`). Code reads
//! only the current shape, so every event is brought to it first, by the
//! upcasters here, wherever events are read: the command side's loads, the
//! relay's and the replay's reads of the log, the projector's decoding of
//! the topic, and `projector unpark`.
//!
//! | event | version | change |
//! | --- | --- | --- |
//! | every type | 1 | as first released |
//! | `BookingCancelled` | 2 | `cancelled_by`: the buyer, staff (who), or unrecorded |
//!
//! Adding the next change (see docs/architecture.md, "Versioned events"):
//! raise the type's version in [`current`], add a step to [`upcast_once`]
//! that turns the previous version's payload into the new one, give the SQL
//! functions that read the type's payload paths both shapes, and add rows
//! of the old version to the tests that load, project and replay them.

use serde_json::Value;

/// The version an event type is written in now; `None` for a type this
/// release does not have (added by a later one).
pub fn current(event_type: &str) -> Option<&'static str> {
    match event_type {
        "BookingCancelled" => Some("2"),
        "ShowCreated" | "SeatHeld" | "SeatBooked" | "SeatReleased" | "BookingHeld"
        | "BookingPlaced" | "BookingConfirmed" | "BookingExpired" => Some("1"),
        _ => None,
    }
}

/// Why an event cannot be brought to the current shape.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VersionError {
    /// Written by a later release than this one: this release cannot know
    /// its shape. (The projector parks it until it is upgraded.)
    #[error("{event_type} version {version} is newer than this release knows ({current})")]
    Newer {
        /// Its type.
        event_type: String,
        /// Its version.
        version: String,
        /// The version this release writes.
        current: &'static str,
    },
    /// A type this release does not have: added by a later one, as far as
    /// this release can tell.
    #[error("{event_type} is an event type this release does not know")]
    UnknownType {
        /// Its type.
        event_type: String,
    },
    /// Not a version at all.
    #[error("{event_type} has no version {version:?}")]
    Unknown {
        /// Its type.
        event_type: String,
        /// What it says.
        version: String,
    },
    /// The payload is not `{"<event type>": {...}}`.
    #[error("the payload is not a tagged event object")]
    NotTagged,
}

/// Whether this release reads `version` of `event_type`: the cheap check,
/// without the payload.
///
/// # Errors
/// As [`upcast`], for the version.
pub fn readable(event_type: &str, version: &str) -> Result<(), VersionError> {
    span(event_type, version).map(|_| ())
}

/// The versions from `version` to the current one of `event_type`.
fn span(event_type: &str, version: &str) -> Result<(u32, u32), VersionError> {
    let current = current(event_type).ok_or_else(|| VersionError::UnknownType {
        event_type: event_type.to_owned(),
    })?;
    // `2` or `2.0` (the form cqrs-es's examples write): whole versions only.
    let number = |v: &str| {
        v.strip_suffix(".0")
            .unwrap_or(v)
            .parse::<u32>()
            .ok()
            .filter(|n| *n >= 1)
    };
    let (Some(at), Some(target)) = (number(version), number(current)) else {
        return Err(VersionError::Unknown {
            event_type: event_type.to_owned(),
            version: version.to_owned(),
        });
    };
    if at > target {
        return Err(VersionError::Newer {
            event_type: event_type.to_owned(),
            version: version.to_owned(),
            current,
        });
    }
    Ok((at, target))
}

/// `payload` (`{"<event type>": {...}}`), written as `version` of its type,
/// in the current shape of that type: borrowed when it is in it already
/// (every event but the old ones), so the common case copies nothing.
///
/// # Errors
/// As [`upcast`].
pub fn upcast_ref<'a>(
    version: &str,
    payload: &'a Value,
) -> Result<std::borrow::Cow<'a, Value>, VersionError> {
    let (at, target) = span(tag_of(payload)?, version)?;
    if at == target {
        return Ok(std::borrow::Cow::Borrowed(payload));
    }
    upcast(version, payload.clone()).map(std::borrow::Cow::Owned)
}

fn tag_of(payload: &Value) -> Result<&str, VersionError> {
    match payload.as_object() {
        Some(tagged) if tagged.len() == 1 => tagged.keys().next().map(String::as_str),
        _ => None,
    }
    .ok_or(VersionError::NotTagged)
}

impl VersionError {
    /// Whether a later release may well read it (a newer version, a newer
    /// type): published and parked, never taken for a corrupt log.
    pub fn is_from_a_later_release(&self) -> bool {
        matches!(self, Self::Newer { .. } | Self::UnknownType { .. })
    }
}

/// `payload` (`{"<event type>": {...}}`), written as `version` of its type,
/// in the current shape of that type.
///
/// # Errors
/// [`VersionError`]: a version from a later release, or none.
pub fn upcast(version: &str, mut payload: Value) -> Result<Value, VersionError> {
    let event_type = tag_of(&payload)?.to_owned();
    let (mut at, target) = span(&event_type, version)?;
    while at < target {
        if let Some(body) = payload.get_mut(&event_type) {
            upcast_once(&event_type, at, body);
        }
        at += 1;
    }
    Ok(payload)
}

/// Turns the body of an event of `event_type` from version `from` into
/// version `from + 1`.
fn upcast_once(event_type: &str, from: u32, body: &mut Value) {
    if let ("BookingCancelled", 1, Value::Object(fields)) = (event_type, from, body) {
        // Version 1 did not say who cancelled.
        fields
            .entry("cancelled_by")
            .or_insert_with(|| Value::from("unrecorded"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_version_1_cancellation_reads_as_unrecorded() {
        let v1 = json!({"BookingCancelled": {"booking_id": "b", "show_id": "s",
                                              "cancelled_at": "2026-01-01T00:00:00Z"}});
        let now = upcast("1", v1).ok();
        assert_eq!(
            now.as_ref()
                .and_then(|p| p["BookingCancelled"].get("cancelled_by")),
            Some(&json!("unrecorded"))
        );
    }

    #[test]
    fn current_events_pass_unchanged() {
        let v2 = json!({"BookingCancelled": {"cancelled_by": "buyer"}});
        assert_eq!(upcast("2", v2.clone()), Ok(v2.clone()));
        assert!(matches!(
            upcast_ref("2", &v2),
            Ok(std::borrow::Cow::Borrowed(_))
        ));
        assert!(readable("BookingCancelled", "2").is_ok());
        assert!(readable("ShowCreated", "1.0").is_ok());
        assert!(readable("ShowCreated", "1.5").is_err());
        let later = readable("SeatSwapped", "1");
        assert!(later.is_err_and(|e| e.is_from_a_later_release()));
        assert!(readable("BookingCancelled", "3").is_err());
        let held = json!({"SeatHeld": {"label": "A1"}});
        assert_eq!(upcast("1", held.clone()), Ok(held));
    }

    #[test]
    fn versions_from_later_releases_or_none_are_refused() {
        let later = upcast("3", json!({"BookingCancelled": {}}));
        assert!(matches!(later, Err(VersionError::Newer { .. })));
        assert!(matches!(
            upcast("2", json!({"SeatHeld": {}})),
            Err(VersionError::Newer { .. })
        ));
        assert!(matches!(
            upcast("one", json!({"SeatHeld": {}})),
            Err(VersionError::Unknown { .. })
        ));
        assert!(matches!(
            upcast("1", json!({"a": 1, "b": 2})),
            Err(VersionError::NotTagged)
        ));
    }
}
