//! The `X-Consistency-Token` of the HTTP contract: what a write changed, so
//! that a read can wait until the read models reflect it.
//!
//! A token names the streams one write appended to and the sequence each
//! reached. A read model reflects the write once every stream it holds has
//! reached that sequence. Stream sequences, unlike global positions, are
//! comparable whatever partition or batch an event travelled in, so the check
//! needs no global watermark. The text form is short, readable and
//! header-safe: `v1;show=<uuid>:<seq>;booking=<uuid>:<seq>;seat=<label>:<seq>`
//! (`show` once, its sequence 0 when the write did not touch the show stream;
//! `booking` and `seat` as often as needed).
//!
//! On the wire a token is signed: `;sig=<hex HMAC-SHA256>` follows the text,
//! keyed by a secret command-api and query-api share ([`TokenKey`]). A read
//! waits only for a token command-api issued, whose sequences the log holds,
//! so nobody can make the query side wait for a write that never happens.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::ids::{BookingId, SeatLabel, ShowId};

/// The HTTP header carrying a token, lower-case as HTTP/2 wants it.
pub const CONSISTENCY_HEADER: &str = "x-consistency-token";

/// Longest token accepted: one show, a few bookings, at most a few dozen
/// seats. Anything longer is not ours.
pub const MAX_TOKEN_LEN: usize = 4096;

/// What one write changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsistencyToken {
    /// The show the write belongs to.
    pub show_id: ShowId,
    /// The show stream's sequence after the write; 0 when untouched.
    pub show_sequence: u64,
    /// Booking streams and the sequence each reached.
    pub bookings: BTreeMap<BookingId, u64>,
    /// Seat streams of the show and the sequence each reached.
    pub seats: BTreeMap<SeatLabel, u64>,
}

/// Why a token could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Longer than [`MAX_TOKEN_LEN`].
    #[error("the token is longer than {MAX_TOKEN_LEN} characters")]
    TooLong,
    /// Not of version 1.
    #[error("the token does not start with v1")]
    UnknownVersion,
    /// A part is not `name=id:sequence`, or names something unknown.
    #[error("the token part {0:?} is not understood")]
    BadPart(String),
    /// No `show` part, or two.
    #[error("the token must name exactly one show")]
    Show,
    /// No signature, or one that is not this deployment's.
    #[error("the token is not signed by this deployment's command-api")]
    Signature,
}

/// The secret that signs and checks tokens (`CONSISTENCY_KEY`).
#[derive(Clone)]
pub struct TokenKey(Vec<u8>);

/// The separator between a token and its signature.
const SIGNATURE: &str = ";sig=";

/// The key command-api and query-api use when `CONSISTENCY_KEY` is not
/// set: fine on a laptop, never in production, where they share a secret of
/// their own.
pub const DEVELOPMENT_KEY: &str = "ticketing-development-consistency-key";

/// The shortest key accepted, in bytes.
pub const MIN_KEY_LEN: usize = 16;

/// Why a key was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a consistency key needs at least {MIN_KEY_LEN} bytes")]
pub struct WeakKey;

impl fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TokenKey(..)")
    }
}

impl TokenKey {
    /// A key of these bytes.
    ///
    /// # Errors
    /// [`WeakKey`] below [`MIN_KEY_LEN`] bytes.
    pub fn new(bytes: impl Into<Vec<u8>>) -> Result<Self, WeakKey> {
        let bytes = bytes.into();
        if bytes.len() < MIN_KEY_LEN {
            return Err(WeakKey);
        }
        Ok(Self(bytes))
    }

    fn mac(&self, text: &str) -> Hmac<Sha256> {
        // HMAC takes a key of any length; `new_from_slice` cannot fail.
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.0)
            .unwrap_or_else(|_| unreachable!("HMAC accepts keys of any length"));
        mac.update(text.as_bytes());
        mac
    }

    /// The signed text form of `token`, as sent in the header.
    pub fn sign(&self, token: &ConsistencyToken) -> String {
        let text = token.to_string();
        let signature = hex::encode(self.mac(&text).finalize().into_bytes());
        format!("{text}{SIGNATURE}{signature}")
    }

    /// The token of a signed text, if this key signed it.
    ///
    /// # Errors
    /// [`TokenError::Signature`] for an unsigned or foreign token, else what
    /// reading the text finds wrong.
    pub fn verify(&self, signed: &str) -> Result<ConsistencyToken, TokenError> {
        if signed.len() > MAX_TOKEN_LEN {
            return Err(TokenError::TooLong);
        }
        let (text, signature) = signed.rsplit_once(SIGNATURE).ok_or(TokenError::Signature)?;
        let signature = hex::decode(signature).map_err(|_| TokenError::Signature)?;
        self.mac(text)
            .verify_slice(&signature)
            .map_err(|_| TokenError::Signature)?;
        text.parse()
    }
}

impl ConsistencyToken {
    /// A token for a write to `show_id` that touched nothing yet.
    pub fn new(show_id: ShowId) -> Self {
        Self {
            show_id,
            show_sequence: 0,
            bookings: BTreeMap::new(),
            seats: BTreeMap::new(),
        }
    }
}

impl fmt::Display for ConsistencyToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "v1;show={}:{}", self.show_id, self.show_sequence)?;
        for (id, sequence) in &self.bookings {
            write!(f, ";booking={id}:{sequence}")?;
        }
        for (label, sequence) in &self.seats {
            write!(f, ";seat={label}:{sequence}")?;
        }
        Ok(())
    }
}

impl FromStr for ConsistencyToken {
    type Err = TokenError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if text.len() > MAX_TOKEN_LEN {
            return Err(TokenError::TooLong);
        }
        let mut parts = text.split(';');
        if parts.next() != Some("v1") {
            return Err(TokenError::UnknownVersion);
        }
        let mut show = None;
        let mut bookings = BTreeMap::new();
        let mut seats = BTreeMap::new();
        for part in parts {
            let bad = || TokenError::BadPart(part.chars().take(80).collect());
            let (kind, rest) = part.split_once('=').ok_or_else(bad)?;
            let (id, sequence) = rest.rsplit_once(':').ok_or_else(bad)?;
            let sequence: u64 = sequence.parse().map_err(|_| bad())?;
            match kind {
                "show" => {
                    let id: ShowId = id.parse().map_err(|_| bad())?;
                    if show.replace((id, sequence)).is_some() {
                        return Err(TokenError::Show);
                    }
                }
                "booking" => {
                    bookings.insert(id.parse().map_err(|_| bad())?, sequence);
                }
                "seat" => {
                    seats.insert(id.parse().map_err(|_| bad())?, sequence);
                }
                _ => return Err(bad()),
            }
        }
        let (show_id, show_sequence) = show.ok_or(TokenError::Show)?;
        Ok(Self {
            show_id,
            show_sequence,
            bookings,
            seats,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn token() -> ConsistencyToken {
        let mut token = ConsistencyToken::new(ShowId::from_uuid(uuid::Uuid::new_v4()));
        token
            .bookings
            .insert(BookingId::from_uuid(uuid::Uuid::new_v4()), 2);
        token.seats.insert("A1".parse().expect("a label"), 3);
        token.seats.insert("B12".parse().expect("a label"), 1);
        token
    }

    #[test]
    fn the_text_form_reads_back() {
        let token = token();
        let text = token.to_string();
        assert!(text.starts_with("v1;show="), "{text}");
        assert_eq!(text.parse::<ConsistencyToken>(), Ok(token));
    }

    #[test]
    fn malformed_tokens_are_refused_with_a_reason() {
        let show = ShowId::from_uuid(uuid::Uuid::new_v4());
        for (text, error) in [
            ("", TokenError::UnknownVersion),
            ("v2;show=x:1", TokenError::UnknownVersion),
            ("v1", TokenError::Show),
            ("v1;seat=A1:1", TokenError::Show),
            (
                "v1;show=not-a-uuid:1",
                TokenError::BadPart("show=not-a-uuid:1".into()),
            ),
            ("v1;show=x", TokenError::BadPart("show=x".into())),
        ] {
            assert_eq!(text.parse::<ConsistencyToken>(), Err(error), "{text:?}");
        }
        let twice = format!("v1;show={show}:1;show={show}:1");
        assert_eq!(twice.parse::<ConsistencyToken>(), Err(TokenError::Show));
        let odd = format!("v1;show={show}:1;table=A1:1");
        assert!(matches!(
            odd.parse::<ConsistencyToken>(),
            Err(TokenError::BadPart(_))
        ));
        let negative = format!("v1;show={show}:-1");
        assert!(negative.parse::<ConsistencyToken>().is_err());
        let long = format!("v1;show={show}:1{}", ";seat=A1:1".repeat(500));
        assert_eq!(long.parse::<ConsistencyToken>(), Err(TokenError::TooLong));
    }

    fn key(text: &str) -> TokenKey {
        TokenKey::new(text.as_bytes().to_vec()).expect("a long enough key")
    }

    #[test]
    fn a_signed_token_reads_back_only_with_its_key() {
        let token = token();
        let signed = key("the deployment's own key").sign(&token);
        assert!(signed.starts_with(&token.to_string()), "{signed}");
        assert_eq!(
            key("the deployment's own key").verify(&signed),
            Ok(token.clone())
        );
        assert_eq!(
            key("somebody else's key!!").verify(&signed),
            Err(TokenError::Signature)
        );
        assert_eq!(
            key("the deployment's own key").verify(&token.to_string()),
            Err(TokenError::Signature),
            "unsigned"
        );
        // A sequence raised by hand no longer matches its signature.
        let forged = signed.replacen(":3", ":9", 1);
        assert_ne!(forged, signed);
        assert_eq!(
            key("the deployment's own key").verify(&forged),
            Err(TokenError::Signature)
        );
        assert_eq!(TokenKey::new(b"short".to_vec()).map(|_| ()), Err(WeakKey));
    }

    proptest! {
        #[test]
        fn any_text_parses_or_is_refused_without_panicking(text in ".{0,200}") {
            let _ = text.parse::<ConsistencyToken>();
            let _ = key("a key for the property test").verify(&text);
        }
    }
}
