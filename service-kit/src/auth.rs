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
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use uuid::Uuid;

use crate::problem::Problem;
use crate::rate_limit::{too_many_requests, Client, RateLimits, RateSettings};

/// Clock difference allowed between the token's issuer and this service.
pub const LEEWAY_SECS: u64 = 60;
/// Shortest HS256 secret accepted: the hash's own size.
pub const MIN_SECRET_BYTES: usize = 32;
/// Longest `Authorization` value read; a longer one is refused unread.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// How tokens are checked: the settings of both HTTP services.
#[derive(Clone, Default, clap::Args)]
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

impl std::fmt::Debug for AuthSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Settings are logged at start-up; the secret must never be.
        f.debug_struct("AuthSettings")
            .field("jwt_secret", &self.jwt_secret.as_ref().map(|_| "<set>"))
            .field("jwks_file", &self.jwks_file)
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("disabled", &self.disabled)
            .finish()
    }
}

/// An empty variable (`AUTH_ISSUER=` in a compose file) means "not set".
fn set(value: &Option<String>) -> Option<&str> {
    value.as_deref().filter(|v| !v.trim().is_empty())
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Role {
    /// May create shows.
    Organizer,
    /// May act on any booking and read any user's bookings.
    Admin,
}

impl Role {
    /// The role as the `roles` claim names it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Organizer => "organizer",
            Self::Admin => "admin",
        }
    }
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

/// Verifies bearer tokens; the [`guard`] layer uses it, and handlers then
/// take a [`Caller`].
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
            if set(&settings.jwt_secret).is_some() || settings.jwks_file.is_some() {
                tracing::warn!("AUTH_DISABLED=true: the configured keys are ignored and every request is let in");
            }
            return Ok(Self(Arc::new(Keys::Off)));
        }
        let secret = match set(&settings.jwt_secret) {
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
            issuer: set(&settings.issuer).map(str::to_owned),
            audience: set(&settings.audience).map(str::to_owned),
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
        // The scheme is case-insensitive (RFC 9110, 11.1).
        let token = value
            .to_str()
            .ok()
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim())
            .filter(|token| !token.is_empty())
            .ok_or(Refusal::Malformed)?;
        let header = jsonwebtoken::decode_header(token).map_err(|_| Refusal::Malformed)?;
        let mut validation = Validation::new(header.alg);
        validation.leeway = LEEWAY_SECS;
        validation.validate_nbf = true;
        let mut required = vec!["exp", "sub"];
        if let Some(issuer) = issuer {
            validation.set_issuer(&[issuer]);
            required.push("iss");
        }
        match audience {
            Some(audience) => {
                validation.set_audience(&[audience]);
                required.push("aud");
            }
            None => validation.validate_aud = false,
        }
        validation.set_required_spec_claims(&required);
        let candidates: Vec<&DecodingKey> = match header.alg {
            Algorithm::HS256 => secret.iter().collect(),
            Algorithm::RS256 | Algorithm::ES256 => keyed
                .iter()
                .filter(|(kid, alg, _)| {
                    *alg == header.alg && (header.kid.is_none() || *kid == header.kid)
                })
                .map(|(_, _, key)| key)
                .collect(),
            _ => Vec::new(),
        };
        if candidates.is_empty() {
            return Err(Refusal::Invalid(match &header.kid {
                Some(kid) if header.alg != Algorithm::HS256 => {
                    format!("no {:?} key with kid {kid:?} here", header.alg)
                }
                _ => format!("no key here signs {:?} tokens", header.alg),
            }));
        }
        // A token without `kid` is tried against every key of its algorithm,
        // so that a key can be rotated in beside the old one.
        let mut refusal = None;
        let mut claims = None;
        for key in candidates {
            match jsonwebtoken::decode::<Claims>(token, key, &validation) {
                Ok(data) => {
                    claims = Some(data.claims);
                    break;
                }
                Err(error) => {
                    // A key that verified the signature and found the token
                    // expired says more than another key's "wrong signature".
                    if refusal != Some(Refusal::Expired) {
                        refusal = Some(match error.kind() {
                            jsonwebtoken::errors::ErrorKind::ExpiredSignature => Refusal::Expired,
                            _ => Refusal::Invalid(error.to_string()),
                        });
                    }
                }
            }
        }
        let claims = claims.ok_or_else(|| {
            refusal.unwrap_or_else(|| Refusal::Invalid("no key verifies it".to_owned()))
        })?;
        let id = Uuid::try_parse(&claims.sub)
            .ok()
            .filter(|id| claims.sub.len() == 36 && !id.is_nil())
            .ok_or_else(|| Refusal::Invalid("`sub` is not a user's UUID".to_owned()))?;
        let roles = claims
            .roles
            .unwrap_or_default()
            .iter()
            .filter_map(|role| {
                [Role::Organizer, Role::Admin]
                    .into_iter()
                    .find(|known| known.name() == role)
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
        use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, KeyAlgorithm, PublicKeyUse};
        // A key published for encryption, or for another algorithm, must not
        // verify a signature here.
        if matches!(&jwk.common.public_key_use, Some(u) if *u != PublicKeyUse::Signature) {
            continue;
        }
        let algorithm = match (&jwk.algorithm, &jwk.common.key_algorithm) {
            (AlgorithmParameters::RSA(_), None | Some(KeyAlgorithm::RS256)) => Algorithm::RS256,
            (AlgorithmParameters::EllipticCurve(ec), None | Some(KeyAlgorithm::ES256))
                if ec.curve == EllipticCurve::P256 =>
            {
                Algorithm::ES256
            }
            // Symmetric keys belong in AUTH_JWT_SECRET, not a public file;
            // other algorithms are not offered.
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

/// Why a token cannot be made here.
#[derive(Debug, thiserror::Error)]
pub enum MintError {
    /// Tokens are made with the HS256 secret only; key-file deployments
    /// get theirs from their identity provider.
    #[error("tokens are made with AUTH_JWT_SECRET (of at least {MIN_SECRET_BYTES} bytes); with AUTH_JWKS_FILE, ask the identity provider")]
    NoSecret,
    /// The token could not be encoded.
    #[error("cannot sign the token: {0}")]
    Sign(#[from] jsonwebtoken::errors::Error),
}

/// A token for `user` with `roles` that lasts `ttl`, signed with the
/// settings' HS256 secret (and carrying their `iss` and `aud`): for
/// development (`scripts/services.sh token`) and load generators, as an
/// identity provider would issue it.
///
/// # Errors
/// [`MintError::NoSecret`] without a usable secret.
pub fn mint(
    settings: &AuthSettings,
    user: Uuid,
    roles: &[Role],
    ttl: Duration,
) -> Result<String, MintError> {
    let secret = set(&settings.jwt_secret)
        .filter(|s| s.len() >= MIN_SECRET_BYTES)
        .ok_or(MintError::NoSecret)?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let mut claims = serde_json::json!({
        "sub": user.to_string(),
        "iat": now.as_secs(),
        "exp": now.saturating_add(ttl).as_secs(),
        "roles": roles.iter().map(|r| r.name()).collect::<Vec<_>>(),
    });
    if let Some(issuer) = set(&settings.issuer) {
        claims["iss"] = issuer.into();
    }
    if let Some(audience) = set(&settings.audience) {
        claims["aud"] = audience.into();
    }
    Ok(jsonwebtoken::encode(
        &jsonwebtoken::Header::new(Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )?)
}

/// Who the [`guard`] found calling, for the [`Caller`] extractor.
#[derive(Debug, Clone)]
struct Identified(Result<Caller, Refusal>);

/// What the [`guard`] layer checks requests with: one per process.
#[derive(Debug, Clone)]
pub struct Access {
    verifier: Verifier,
    limits: Arc<RateLimits>,
}

/// How often buckets of clients that went quiet are forgotten.
const FORGET_IDLE_EVERY: Duration = Duration::from_secs(60);

impl Access {
    /// Checks tokens with `verifier` and rates with `limits`. Starts a task
    /// that forgets idle clients' buckets, which ends with the last clone.
    pub fn new(verifier: Verifier, limits: RateLimits) -> Self {
        let limits = Arc::new(limits);
        let weak = Arc::downgrade(&limits);
        if tokio::runtime::Handle::try_current().is_ok() {
            tokio::spawn(async move {
                let mut every = tokio::time::interval(FORGET_IDLE_EVERY);
                every.tick().await;
                loop {
                    every.tick().await;
                    match weak.upgrade() {
                        Some(limits) => limits.forget_idle(),
                        None => break,
                    }
                }
            });
        }
        Self { verifier, limits }
    }

    /// From the services' settings.
    ///
    /// # Errors
    /// As [`Verifier::new`].
    pub fn from_settings(
        auth: &AuthSettings,
        rates: &RateSettings,
    ) -> Result<Self, AuthSetupError> {
        Ok(Self::new(Verifier::new(auth)?, RateLimits::new(rates)))
    }
}

/// Paths never rate limited: probes of orchestrators and balancers, which
/// come often and from few addresses, and must not make a healthy service
/// look down; and Prometheus's scrapes.
const PROBES: [&str; 3] = ["/healthz", "/readyz", "/metrics"];

/// The layer in front of every route: reads the caller's token (a request
/// without one, or with a bad one, goes on as anonymous: open routes take
/// it, and a route that takes a [`Caller`] refuses it with 401), then takes
/// one request from the caller's rate bucket, by user when the token is
/// valid and by address otherwise, answering 429 when it is empty.
/// `axum::middleware::from_fn_with_state(access, guard)`.
pub async fn guard(
    State(access): State<Access>,
    mut request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let identified = access
        .verifier
        .caller(request.headers().get(header::AUTHORIZATION));
    let client = match &identified {
        Ok(Caller::User { id, .. }) => {
            tracing::Span::current().record("user_id", tracing::field::display(id));
            Client::User(*id)
        }
        _ => Client::address(
            request
                .extensions()
                .get::<ConnectInfo<SocketAddr>>()
                .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |c| c.0.ip()),
        ),
    };
    let probe = PROBES.contains(&request.uri().path());
    if let Err(wait) = if probe {
        Ok(())
    } else {
        access.limits.check(client)
    } {
        // Debug, not info: a flood must not turn into a flood of log lines.
        tracing::debug!(?client, wait_ms = wait.as_millis(), "rate limited");
        return too_many_requests(wait).into_response();
    }
    request.extensions_mut().insert(Identified(identified));
    next.run(request).await
}

/// The caller of the request, as the [`guard`] found it: a 401 problem when
/// its token is missing or bad. A router without the guard refuses every
/// such request with 500: a missing layer must never mean an open door.
impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let Identified(identified) = parts.extensions.get::<Identified>().ok_or_else(|| {
            tracing::error!("a route takes a Caller but the router has no auth guard");
            Problem::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "Internal server error",
                "an unexpected error occurred",
            )
        })?;
        identified.clone().map_err(|refusal| refusal.problem())
    }
}

/// Adds the `bearer` security scheme (a JWT in `Authorization`) to an
/// OpenAPI document: `#[openapi(modifiers(&BearerScheme))]`, then
/// `security(("bearer" = []))` on each operation that needs a token.
#[derive(Debug)]
pub struct BearerScheme;

impl utoipa::Modify for BearerScheme {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        openapi
            .components
            .get_or_insert_with(Default::default)
            .add_security_scheme(
                "bearer",
                SecurityScheme::Http(
                    HttpBuilder::new()
                        .scheme(HttpAuthScheme::Bearer)
                        .bearer_format("JWT")
                        .description(Some(
                            "HS256 with AUTH_JWT_SECRET, or RS256/ES256 with a key of \
                             AUTH_JWKS_FILE; `sub` is the user's UUID, `roles` may hold \
                             `organizer` and `admin`",
                        ))
                        .build(),
                ),
            );
    }
}

/// The answers of an operation that needs a token, besides its own.
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)]
pub enum AuthProblems {
    /// No token, or a bad one.
    #[response(status = 401, description = "no bearer token, or one that is malformed, expired or \
        badly signed", content_type = "application/problem+json",
        headers(("WWW-Authenticate" = String, description = "`Bearer`")))]
    Unauthenticated(Problem),
    /// A valid token acting on what is not its own.
    #[response(
        status = 403,
        description = "the token's user may not do this (see the operation and docs/api.md, \
        \"Identity\")",
        content_type = "application/problem+json"
    )]
    Forbidden(Problem),
}

/// The answer every operation may give when its caller goes too fast.
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)]
pub enum RateProblems {
    /// Over the caller's rate.
    #[response(status = 429, description = "over the rate of this user (or address, without a \
        token); retry after `Retry-After`", content_type = "application/problem+json",
        headers(("Retry-After" = u32, description = "seconds")))]
    TooManyRequests(Problem),
}
