//! Identifiers and names, each built by a constructor that checks it, so the
//! rest of the domain never handles an unchecked string from a client.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use uuid::Uuid;

/// Why an identifier or a name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// The text is not a UUID.
    #[error("{what} must be a UUID, got {value:?}")]
    NotAUuid {
        /// Which identifier was being read.
        what: &'static str,
        /// The text that was refused.
        value: String,
    },
    /// The text is not a seat label such as `A12`.
    #[error("{0:?} is not a seat label: a row of 1 to 8 letters followed by a seat number from 1, such as A12")]
    BadSeatLabel(String),
    /// The text is not a row name.
    #[error("{0:?} is not a row name: 1 to 8 ASCII letters")]
    BadRowName(String),
    /// A name was empty (or only blanks) or too long.
    #[error("{what} must be 1 to {max} characters and not blank")]
    BadName {
        /// Which name was being read.
        what: &'static str,
        /// The longest accepted length, in characters.
        max: usize,
    },
    /// The text is not a seat stream id `{show_id}:{label}`.
    #[error("{0:?} is not a seat id of the form {{show_id}}:{{label}}")]
    BadSeatId(String),
}

macro_rules! uuid_id {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(Uuid);

        impl $name {
            /// Wraps an already-parsed UUID.
            pub const fn from_uuid(uuid: Uuid) -> Self {
                Self(uuid)
            }

            /// The underlying UUID.
            pub const fn as_uuid(&self) -> Uuid {
                self.0
            }
        }

        impl FromStr for $name {
            type Err = IdError;

            /// Only the hyphenated form (`8-4-4-4-12` hex digits), the one
            /// ids are written in: one spelling per id, as the OpenAPI
            /// documents' `format: uuid` says.
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                let bad = || IdError::NotAUuid {
                    what: $what,
                    value: s.to_owned(),
                };
                if s.len() != 36 {
                    return Err(bad());
                }
                Uuid::parse_str(s).map(Self).map_err(|_| bad())
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.hyphenated().fmt(f)
            }
        }
    };
}

uuid_id!(
    /// Identifies a show (a concert, a play, a match): the `Show` stream id.
    ShowId,
    "show_id"
);
uuid_id!(
    /// Identifies a booking: the `Booking` stream id.
    BookingId,
    "booking_id"
);
uuid_id!(
    /// Identifies the person who books.
    UserId,
    "user_id"
);

/// Most letters a row name may have; also bounds a seat label's row part.
const MAX_ROW_LETTERS: usize = 8;

/// A row of seats, such as `A` or `AA`: 1 to 8 ASCII letters, kept as given.
///
/// Letters only, so that a label `row + number` can always be split back.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct RowName(String);

impl RowName {
    /// Checks a row name.
    ///
    /// # Errors
    /// [`IdError::BadRowName`] unless it is 1 to 8 ASCII letters.
    pub fn new(name: &str) -> Result<Self, IdError> {
        if (1..=MAX_ROW_LETTERS).contains(&name.len())
            && name.bytes().all(|b| b.is_ascii_alphabetic())
        {
            Ok(Self(name.to_owned()))
        } else {
            Err(IdError::BadRowName(name.to_owned()))
        }
    }

    /// The row name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RowName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for RowName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::new(&s).map_err(serde::de::Error::custom)
    }
}

/// A seat within a show: its row and its number in that row, written `A12`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SeatLabel {
    row: RowName,
    number: u32,
}

impl SeatLabel {
    /// The seat `number` of `row`.
    ///
    /// # Errors
    /// [`IdError::BadSeatLabel`] when `number` is 0.
    pub fn new(row: RowName, number: u32) -> Result<Self, IdError> {
        if number == 0 {
            return Err(IdError::BadSeatLabel(format!("{row}0")));
        }
        Ok(Self { row, number })
    }

    /// The row this seat is in.
    pub fn row(&self) -> &RowName {
        &self.row
    }

    /// The seat's number within its row, from 1.
    pub fn number(&self) -> u32 {
        self.number
    }
}

impl FromStr for SeatLabel {
    type Err = IdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || IdError::BadSeatLabel(s.to_owned());
        let digits_at = s.find(|c: char| c.is_ascii_digit()).ok_or_else(bad)?;
        let (row, digits) = s.split_at(digits_at);
        // No sign, no leading zero: one spelling per seat, so labels compare as text.
        if digits.starts_with('0') || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        let number = digits.parse::<u32>().map_err(|_| bad())?;
        let row = RowName::new(row).map_err(|_| bad())?;
        Self::new(row, number)
    }
}

impl fmt::Display for SeatLabel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", self.row, self.number)
    }
}

impl Serialize for SeatLabel {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for SeatLabel {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// The stream id of one seat of one show: `{show_id}:{label}`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SeatId {
    /// The show the seat belongs to.
    pub show_id: ShowId,
    /// The seat within that show.
    pub label: SeatLabel,
}

impl SeatId {
    /// The seat `label` of show `show_id`.
    pub fn new(show_id: ShowId, label: SeatLabel) -> Self {
        Self { show_id, label }
    }
}

impl fmt::Display for SeatId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.show_id, self.label)
    }
}

impl FromStr for SeatId {
    type Err = IdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || IdError::BadSeatId(s.to_owned());
        let (show, label) = s.split_once(':').ok_or_else(bad)?;
        Ok(Self {
            show_id: show.parse().map_err(|_| bad())?,
            label: label.parse().map_err(|_| bad())?,
        })
    }
}

impl Serialize for SeatId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for SeatId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A character that does not make a name: Rust's white space, and what the
/// regular expression engines of schema validators also count as white
/// space in `\s` (the byte order mark; the information separators), so that
/// a name a validator finds blank is blank here too.
fn is_blank(c: char) -> bool {
    c.is_whitespace() || c == '\u{feff}' || ('\u{1c}'..='\u{1f}').contains(&c)
}

macro_rules! text_name {
    ($(#[$doc:meta])* $name:ident, $what:literal, $max:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            /// Longest accepted length, in characters.
            pub const MAX_CHARS: usize = $max;

            /// Checks the name; surrounding blanks are trimmed.
            ///
            /// # Errors
            /// [`IdError::BadName`] when it is blank or longer than `MAX_CHARS`
            /// as given (blanks included, as a JSON schema's `maxLength`
            /// counts).
            pub fn new(name: &str) -> Result<Self, IdError> {
                let trimmed = name.trim_matches(is_blank);
                if trimmed.is_empty() || name.chars().count() > $max {
                    Err(IdError::BadName { what: $what, max: $max })
                } else {
                    Ok(Self(trimmed.to_owned()))
                }
            }

            /// The name as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                Self::new(&s).map_err(serde::de::Error::custom)
            }
        }
    };
}

text_name!(
    /// What a show is called, such as `Jazz Night`.
    ShowName,
    "name",
    200
);
text_name!(
    /// Where a show takes place, such as `Blue Note`.
    VenueName,
    "venue",
    200
);
text_name!(
    /// A priced part of a venue, such as `VIP` or `Floor`.
    SectionName,
    "section name",
    100
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seat_labels_parse_and_print_the_same() {
        for text in ["A1", "A12", "AA100", "b7"] {
            let label: SeatLabel = text.parse().expect("valid label");
            assert_eq!(label.to_string(), text);
        }
    }

    #[test]
    fn malformed_seat_labels_are_refused() {
        for text in [
            "",
            "A",
            "12",
            "A0",
            "A01",
            "A-1",
            "A1B",
            "ABCDEFGHI1",
            "A 1",
            "A99999999999",
        ] {
            assert!(text.parse::<SeatLabel>().is_err(), "{text:?} was accepted");
        }
    }

    #[test]
    fn seat_ids_round_trip() {
        let text = "7f1d3c3e-8a4b-4f7e-9d59-2d3c1b0a9e11:B7";
        let id: SeatId = text.parse().expect("valid seat id");
        assert_eq!(id.to_string(), text);
        assert!("not-a-uuid:B7".parse::<SeatId>().is_err());
        assert!("7f1d3c3e-8a4b-4f7e-9d59-2d3c1b0a9e11"
            .parse::<SeatId>()
            .is_err());
    }

    #[test]
    fn names_are_trimmed_and_must_not_be_blank() {
        assert_eq!(
            ShowName::new("  Jazz Night ").map(|n| n.0),
            Ok("Jazz Night".into())
        );
        assert!(ShowName::new("   ").is_err());
        assert!(ShowName::new(&"x".repeat(201)).is_err());
        // Counted as given, as the document's maxLength counts.
        assert!(ShowName::new(&format!(" {} ", "x".repeat(199))).is_err());
        assert!(ShowName::new(&"x".repeat(200)).is_ok());
        // Blank to any validator's `\s`, blank here.
        for blank in ["\u{feff}", "\u{1c}\u{1f}", "\u{85}", "\u{3000}\t"] {
            assert!(ShowName::new(blank).is_err(), "{blank:?} was accepted");
        }
    }

    #[test]
    fn ids_refuse_non_uuids() {
        assert!(matches!(
            "42".parse::<BookingId>(),
            Err(IdError::NotAUuid {
                what: "booking_id",
                ..
            })
        ));
        // One spelling per id: the hyphenated form only.
        let id = "7f1d3c3e-8a4b-4f7e-9d59-2d3c1b0a9e11";
        assert!(id.parse::<ShowId>().is_ok());
        for other in [
            "7f1d3c3e8a4b4f7e9d592d3c1b0a9e11",
            "{7f1d3c3e-8a4b-4f7e-9d59-2d3c1b0a9e11}",
            "urn:uuid:7f1d3c3e-8a4b-4f7e-9d59-2d3c1b0a9e11",
        ] {
            assert!(other.parse::<ShowId>().is_err(), "{other} was accepted");
        }
    }
}
