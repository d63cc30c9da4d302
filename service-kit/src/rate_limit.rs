//! Rate limits: each user (by the verified `sub` of its token) and each
//! address (for requests without a valid token, the open reads above all)
//! gets a bucket of requests refilled at a steady rate; a request finding
//! its bucket empty is answered 429 with `Retry-After`, before any work.
//!
//! The buckets live in the process (the `governor` crate's GCRA): with
//! several replicas behind a balancer a client gets up to that many times
//! the rate, which is what a per-process limit is for (sparing the process),
//! not a quota.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::time::Duration;

use axum::http::StatusCode;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use uuid::Uuid;

use crate::problem::Problem;

/// How fast users and addresses may call: the settings of both HTTP
/// services. A rate of 0 turns that limit off.
#[derive(Debug, Clone, clap::Args)]
pub struct RateSettings {
    /// Requests per second one user (token `sub`) may make; 0: no limit.
    #[arg(long, env = "RATE_LIMIT_USER_PER_SEC", default_value_t = 20)]
    pub user_per_sec: u32,
    /// Size of a user's bucket: requests it may make at once before the
    /// rate applies (never below the rate).
    #[arg(long, env = "RATE_LIMIT_USER_BURST", default_value_t = 60)]
    pub user_burst: u32,
    /// Requests per second one address may make without a valid token;
    /// 0: no limit.
    #[arg(long, env = "RATE_LIMIT_ADDRESS_PER_SEC", default_value_t = 100)]
    pub address_per_sec: u32,
    /// Size of an address's bucket (never below its rate).
    #[arg(long, env = "RATE_LIMIT_ADDRESS_BURST", default_value_t = 300)]
    pub address_burst: u32,
}

impl Default for RateSettings {
    fn default() -> Self {
        // The documented defaults (docs/configuration.md).
        Self {
            user_per_sec: 20,
            user_burst: 60,
            address_per_sec: 100,
            address_burst: 300,
        }
    }
}

impl RateSettings {
    /// No limits at all, for benchmarks and tests that measure speed.
    pub fn off() -> Self {
        Self {
            user_per_sec: 0,
            user_burst: 0,
            address_per_sec: 0,
            address_burst: 0,
        }
    }
}

/// Who a bucket belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Client {
    /// A verified user.
    User(Uuid),
    /// An address, for requests without a valid token.
    Address(IpAddr),
}

impl Client {
    /// The bucket of a peer address: an IPv4 address as itself (also when
    /// it arrives IPv4-mapped), an IPv6 address by its /64, the block one
    /// host is given, so that hopping between addresses of it gains nothing.
    pub fn address(ip: IpAddr) -> Self {
        Self::Address(match ip.to_canonical() {
            IpAddr::V6(v6) => {
                let bits = u128::from(v6) & !((1_u128 << 64) - 1);
                IpAddr::V6(std::net::Ipv6Addr::from(bits))
            }
            v4 => v4,
        })
    }
}

/// The buckets of one process.
pub struct RateLimits {
    users: Option<DefaultKeyedRateLimiter<Uuid>>,
    addresses: Option<DefaultKeyedRateLimiter<IpAddr>>,
    clock: DefaultClock,
}

impl std::fmt::Debug for RateLimits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimits")
            .field("users", &self.users.is_some())
            .field("addresses", &self.addresses.is_some())
            .finish()
    }
}

fn quota(per_sec: u32, burst: u32) -> Option<Quota> {
    let rate = NonZeroU32::new(per_sec)?;
    // A burst below the rate would refuse a steady client at its own rate.
    let burst = NonZeroU32::new(burst.max(per_sec)).unwrap_or(rate);
    Some(Quota::per_second(rate).allow_burst(burst))
}

impl RateLimits {
    /// The buckets the settings describe.
    pub fn new(settings: &RateSettings) -> Self {
        Self {
            users: quota(settings.user_per_sec, settings.user_burst).map(RateLimiter::keyed),
            addresses: quota(settings.address_per_sec, settings.address_burst)
                .map(RateLimiter::keyed),
            clock: DefaultClock::default(),
        }
    }

    /// Takes one request from `client`'s bucket, or says how long until
    /// one is there.
    ///
    /// # Errors
    /// The wait, when the bucket is empty.
    pub fn check(&self, client: Client) -> Result<(), Duration> {
        let outcome = match client {
            Client::User(id) => self.users.as_ref().map(|l| l.check_key(&id)),
            Client::Address(ip) => self.addresses.as_ref().map(|l| l.check_key(&ip)),
        };
        match outcome {
            Some(Err(not_until)) => Err(not_until.wait_time_from(self.clock.now())),
            _ => Ok(()),
        }
    }

    /// Forgets buckets that are full again, so that memory follows the
    /// clients of the last moments, not every client ever seen.
    pub fn forget_idle(&self) {
        if let Some(users) = &self.users {
            users.retain_recent();
            users.shrink_to_fit();
        }
        if let Some(addresses) = &self.addresses {
            addresses.retain_recent();
            addresses.shrink_to_fit();
        }
    }
}

/// The 429 problem of a client over its rate, with `Retry-After` in whole
/// seconds (at least 1).
pub fn too_many_requests(wait: Duration) -> Problem {
    let seconds = u32::try_from(wait.as_millis().div_ceil(1000))
        .unwrap_or(u32::MAX)
        .max(1);
    Problem::new(
        StatusCode::TOO_MANY_REQUESTS,
        "rate-limited",
        "Too many requests",
        format!("too many requests from this client; retry in {seconds} s"),
    )
    .retry_after(seconds)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_share_a_bucket_per_host() {
        let ip = |s: &str| s.parse::<IpAddr>().expect("an address");
        assert_eq!(
            Client::address(ip("::ffff:192.0.2.7")),
            Client::address(ip("192.0.2.7"))
        );
        assert_eq!(
            Client::address(ip("2001:db8:1:2:aaaa::1")),
            Client::address(ip("2001:db8:1:2:bbbb::9"))
        );
        assert_ne!(
            Client::address(ip("2001:db8:1:2::1")),
            Client::address(ip("2001:db8:1:3::1"))
        );
    }

    #[test]
    fn a_bucket_refuses_once_empty_and_says_how_long_to_wait() {
        let limits = RateLimits::new(&RateSettings {
            user_per_sec: 1,
            user_burst: 2,
            ..RateSettings::off()
        });
        let user = Client::User(Uuid::new_v4());
        assert!(limits.check(user).is_ok() && limits.check(user).is_ok());
        let wait = limits.check(user).expect_err("the bucket is empty");
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_secs(1),
            "{wait:?}"
        );
        assert_eq!(too_many_requests(wait).retry_after, Some(1));
        // Others, and addresses when that limit is off, are not held back.
        assert!(limits.check(Client::User(Uuid::new_v4())).is_ok());
        assert!((0..1000).all(|_| limits
            .check(Client::address("192.0.2.1".parse().expect("ip")))
            .is_ok()));
    }
}
