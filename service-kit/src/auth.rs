//! Who is calling: the bearer token of a request, verified the one way both
//! HTTP services verify it (docs/api.md, "Identity").
//!
//! Tokens are JWTs signed with `AUTH_JWT_SECRET` (HS256) or with a key of
//! `AUTH_JWKS_FILE` (RS256, ES256). `exp` is required; `iss` and `aud` are
//! checked when configured; clocks may differ by 60 s. `sub` is the user's
//! UUID and `roles`, when present, an array of strings among which
//! `organizer` and `admin` mean something here (others are ignored, so that
//! an identity provider may add its own).

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{header, HeaderValue, StatusCode};
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use uuid::Uuid;

use crate::problem::Problem;

/// Clock difference allowed between the token's issuer and this service.
pub const LEEWAY_SECS: u64 = 60;
/// Shortest HS256 secret accepted: the hash's own size.
pub const MIN_SECRET_BYTES: usize = 32;
/// Longest `Authorization` value read; a longer one is refused unread.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// How tokens are checked: the settings of both HTTP services.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct AuthSettings {
    /// HS256 secret of the tokens, at least 32 bytes.
    #[arg(long, env = "AUTH_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// A JWKS document whose RS256 and ES256 keys sign the tokens.
    #[arg(long, env = "AUTH_JWKS_FILE")]
    pub jwks_file: Option<PathBuf>,
    /// The `iss` every token must carry, when set.
    #[arg(long, env = "AUTH_ISSUER")]
    pub issuer: Option<String>,
    /// The `aud` every token must carry, when set.
    #[arg(long, env = "AUTH_AUDIENCE")]
    pub audience: Option<String>,
    /// No checking at all (version 1.0 behaviour): local experiments only.
    #[arg(long, env = "AUTH_DISABLED", default_value_t = false)]
    pub disabled: bool,
}

/// Why the settings cannot verify tokens.
#[derive(Debug, thiserror::Error)]
pub enum AuthSetupError {
    /// Neither a secret nor a key file, and checking not disabled.
    #[error("set AUTH_JWT_SECRET or AUTH_JWKS_FILE (or AUTH_DISABLED=true for local experiments)")]
    NoKeys,
    /// The secret is too short to be one.
    #[error("AUTH_JWT_SECRET must be at least {MIN_SECRET_BYTES} bytes")]
    ShortSecret,
    /// The key file cannot be read or holds no usable key.
    #[error("AUTH_JWKS_FILE {path}: {reason}")]
    BadKeyFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
}

/// A role a token may grant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// May create shows.
    Organizer,
    /// May act on any booking and read any user's bookings.
    Admin,
}

/// The caller of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// A verified user.
    User {
        /// `sub`.
        id: Uuid,
        /// The roles of `roles` this service knows.
        roles: BTreeSet<Role>,
    },
    /// Checking is off (`AUTH_DISABLED=true`): anyone may do anything.
    Unchecked,
}

impl Caller {
    /// Whether the caller may act for `user`: it is them, or an admin.
    pub fn acts_for(&self, user: Uuid) -> bool {
        match self {
            Self::User { id, roles } => *id == user || roles.contains(&Role::Admin),
            Self::Unchecked => true,
        }
    }

    /// Whether the caller holds `role` (always, when checking is off).
    pub fn has(&self, role: Role) -> bool {
        match self {
            Self::User { roles, .. } => roles.contains(&role),
            Self::Unchecked => true,
        }
    }

    /// The verified user, if checking is on.
    pub fn user(&self) -> Option<Uuid> {
        match self {
            Self::User { id, .. } => Some(*id),
            Self::Unchecked => None,
        }
    }
}

/// The claims read from a token beyond those the validation checks.
#[derive(Debug, Deserialize)]
struct Claims {
    sub: String,
    #[serde(default)]
    roles: Option<Vec<String>>,
}

/// Verifies bearer tokens. Put it in the router as an `Extension`; handlers
/// then take a [`Caller`].
#[derive(Clone)]
pub struct Verifier(Arc<Keys>);

enum Keys {
    Off,
    On {
        secret: Option<DecodingKey>,
        /// The key file's keys, by `kid`, each with its algorithm.
        keyed: Vec<(Option<String>, Algorithm, DecodingKey)>,
        issuer: Option<String>,
        audience: Option<String>,
    },
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the keys.
        match &*self.0 {
            Keys::Off => f.write_str("Verifier(off)"),
            Keys::On { keyed, .. } => write!(f, "Verifier({} keys from the key file)", keyed.len()),
        }
    }
}

/// Why a token was refused: the detail of the 401.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// No `Authorization` header.
    #[error("this request needs `Authorization: Bearer <token>`")]
    Missing,
    /// Not a bearer token, or not a JWT at all.
    #[error("the Authorization header is not a bearer token")]
    Malformed,
    /// Past `exp` (leeway included).
    #[error("the token has expired")]
    Expired,
    /// Signed with another key or algorithm, or claims that do not check.
    #[error("the token is not valid here: {0}")]
    Invalid(String),
}

impl Refusal {
    /// The 401 problem, with `WWW-Authenticate: Bearer`.
    pub fn problem(&self) -> Problem {
        Problem::new(
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
            "Authentication required",
            self.to_string(),
        )
        .with_header(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"))
    }
}

/// The 403 problem of a caller acting on what is not theirs.
pub fn forbidden(detail: impl Into<String>) -> Problem {
    Problem::new(StatusCode::FORBIDDEN, "forbidden", "Forbidden", detail)
}

impl Verifier {
    /// The verifier the settings describe.
    ///
    /// # Errors
    /// [`AuthSetupError`] when they describe none.
    pub fn new(settings: &AuthSettings) -> Result<Self, AuthSetupError> {
        if settings.disabled {
            return Ok(Self(Arc::new(Keys::Off)));
        }
        let secret = match &settings.jwt_secret {
            Some(secret) if secret.len() < MIN_SECRET_BYTES => {
                return Err(AuthSetupError::ShortSecret)
            }
            Some(secret) => Some(DecodingKey::from_secret(secret.as_bytes())),
            None => None,
        };
        let keyed = match &settings.jwks_file {
            Some(path) => read_key_file(path)?,
            None => Vec::new(),
        };
        if secret.is_none() && keyed.is_empty() {
            return Err(AuthSetupError::NoKeys);
        }
        Ok(Self(Arc::new(Keys::On {
            secret,
            keyed,
            issuer: settings.issuer.clone(),
            audience: settings.audience.clone(),
        })))
    }

    /// Whether tokens are checked at all.
    pub fn is_on(&self) -> bool {
        matches!(&*self.0, Keys::On { .. })
    }

    /// Who the `Authorization` header value names.
    ///
    /// # Errors
    /// [`Refusal`] for a missing, malformed, expired or badly signed token.
    pub fn caller(&self, authorization: Option<&HeaderValue>) -> Result<Caller, Refusal> {
        let Keys::On {
            secret,
            keyed,
            issuer,
            audience,
        } = &*self.0
        else {
            return Ok(Caller::Unchecked);
        };
        let value = authorization.ok_or(Refusal::Missing)?;
        if value.len() > MAX_TOKEN_BYTES {
            return Err(Refusal::Malformed);
        }
        let token = value
            .to_str()
            .ok()
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim)
            .ok_or(Refusal::Malformed)?;
        let header = jsonwebtoken::decode_header(token).map_err(|_| Refusal::Malformed)?;
        let key = match header.alg {
            Algorithm::HS256 => secret.as_ref(),
            Algorithm::RS256 | Algorithm::ES256 => keyed
                .iter()
                .find(|(kid, alg, _)| {
                    *alg == header.alg && (header.kid.is_none() || *kid == header.kid)
                })
                .map(|(_, _, key)| key),
            _ => None,
        }
        .ok_or_else(|| Refusal::Invalid(format!("no key here signs {:?} tokens", header.alg)))?;
        let mut validation = Validation::new(header.alg);
        validation.leeway = LEEWAY_SECS;
        validation.set_required_spec_claims(&["exp", "sub"]);
        if let Some(issuer) = issuer {
            validation.set_issuer(&[issuer]);
        }
        match audience {
            Some(audience) => validation.set_audience(&[audience]),
            None => validation.validate_aud = false,
        }
        let claims = jsonwebtoken::decode::<Claims>(token, key, &validation)
            .map_err(|error| match error.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => Refusal::Expired,
                _ => Refusal::Invalid(error.to_string()),
            })?
            .claims;
        let id = Uuid::try_parse(&claims.sub)
            .ok()
            .filter(|_| claims.sub.len() == 36)
            .ok_or_else(|| Refusal::Invalid("`sub` is not a user's UUID".to_owned()))?;
        let roles = claims
            .roles
            .unwrap_or_default()
            .iter()
            .filter_map(|role| match role.as_str() {
                "organizer" => Some(Role::Organizer),
                "admin" => Some(Role::Admin),
                _ => None,
            })
            .collect();
        Ok(Caller::User { id, roles })
    }
}

fn read_key_file(
    path: &std::path::Path,
) -> Result<Vec<(Option<String>, Algorithm, DecodingKey)>, AuthSetupError> {
    let bad = |reason: String| AuthSetupError::BadKeyFile {
        path: path.to_owned(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    let set: JwkSet = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    let mut keys = Vec::new();
    for jwk in &set.keys {
        let algorithm = match &jwk.algorithm {
            jsonwebtoken::jwk::AlgorithmParameters::RSA(_) => Algorithm::RS256,
            jsonwebtoken::jwk::AlgorithmParameters::EllipticCurve(_) => Algorithm::ES256,
            // Symmetric keys belong in AUTH_JWT_SECRET, not a public file.
            _ => continue,
        };
        let key = DecodingKey::from_jwk(jwk).map_err(|e| bad(e.to_string()))?;
        keys.push((jwk.common.key_id.clone(), algorithm, key));
    }
    if keys.is_empty() {
        return Err(bad("no RS256 or ES256 key".to_owned()));
    }
    Ok(keys)
}

/// The caller of the request, from the [`Verifier`] the router carries as
/// an `Extension`. A request without a verifier in the router is refused:
/// a missing layer must never mean an open door.
impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let verifier = parts.extensions.get::<Verifier>().ok_or_else(|| {
            tracing::error!("a route takes a Caller but the router has no Verifier");
            Refusal::Invalid("identity cannot be checked".to_owned()).problem()
        })?;
        verifier
            .caller(parts.headers.get(header::AUTHORIZATION))
            .map_err(|refusal| refusal.problem())
    }
}
