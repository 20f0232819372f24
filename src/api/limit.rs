//! The per-client rate limit on the event routes
//! (`server.rate_limit_per_second`), off by default.
//!
//! A client is its bearer token when it presents a valid one, else its
//! address: the peer's, or, when the peer is one of
//! `server.trusted_proxies`, the address `X-Forwarded-For` names (behind a
//! load balancer every client would otherwise share one bucket). IPv6
//! clients count by their /64, which one host usually has to itself.
//! The buckets are `governor`'s (GCRA); idle ones are forgotten every few
//! seconds so that many addresses cannot grow memory for good.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::num::NonZeroU32;
use std::time::Instant;

use axum::http::HeaderMap;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use ipnet::IpNet;
use parking_lot::Mutex;

use crate::auth::TokenDigest;
use crate::config::ServerSettings;

/// Whom a request counts against.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum Client {
    /// A caller with a valid bearer token.
    Token(TokenDigest),
    /// Anyone else, by address (IPv6 by /64).
    Address(IpAddr),
}

/// The limiter and whom to believe about client addresses.
#[derive(Debug)]
pub struct RateLimit {
    buckets: DefaultKeyedRateLimiter<Client>,
    /// Addresses whose bucket refused a request, with when they may try
    /// again: until then their requests are refused before any token is
    /// looked at, so guessing tokens costs next to nothing.
    spent: Mutex<HashMap<IpAddr, Instant>>,
    trusted: Vec<IpNet>,
    limited: metrics::Counter,
}

impl RateLimit {
    /// The limit configured in `server`, if any; `limited` counts refusals.
    pub fn from_settings(server: &ServerSettings, limited: metrics::Counter) -> Option<Self> {
        let rate = NonZeroU32::new(server.rate_limit_per_second)?;
        let burst = NonZeroU32::new(server.rate_limit_burst).unwrap_or(rate);
        Some(Self {
            buckets: RateLimiter::keyed(Quota::per_second(rate).allow_burst(burst)),
            spent: Mutex::new(HashMap::new()),
            trusted: server.trusted_proxies.clone(),
            limited,
        })
    }

    /// Takes one request from `client`'s bucket, or says in how many
    /// seconds (at least 1) it may try again.
    pub(crate) fn check(&self, client: &Client) -> Result<(), u32> {
        self.buckets.check_key(client).map_err(|not_until| {
            self.limited.increment(1);
            let wait = not_until.wait_time_from(governor::clock::Clock::now(
                &governor::clock::DefaultClock::default(),
            ));
            if let Client::Address(address) = client {
                self.spent.lock().insert(*address, Instant::now() + wait);
            }
            u32::try_from(wait.as_secs().saturating_add(1)).unwrap_or(u32::MAX)
        })
    }

    /// When `address`'s rate is spent (its bucket refused a request that
    /// long ago that it may not try again yet), in how many seconds it may:
    /// the request is refused (and counted) without looking at its token.
    pub(crate) fn spent(&self, address: &Client) -> Option<u32> {
        let Client::Address(address) = address else {
            return None;
        };
        let until = *self.spent.lock().get(address)?;
        let wait = until.checked_duration_since(Instant::now())?;
        self.limited.increment(1);
        Some(u32::try_from(wait.as_secs().saturating_add(1)).unwrap_or(u32::MAX))
    }

    /// The client's address: `peer`, unless `peer` is a trusted proxy; then
    /// `X-Forwarded-For` is read from its right end (the entry the nearest
    /// proxy added) leftwards, past the trusted proxies, to the first
    /// address that is not one.
    pub(crate) fn client_address(&self, peer: IpAddr, headers: &HeaderMap) -> Client {
        // A dual-stack listener sees IPv4 peers as `::ffff:a.b.c.d`.
        let mut client = peer.to_canonical();
        if self.trusts(client) {
            let forwarded = headers
                .get_all("x-forwarded-for")
                .iter()
                .filter_map(|value| value.to_str().ok())
                .flat_map(|value| value.split(','))
                .collect::<Vec<_>>();
            for hop in forwarded.iter().rev() {
                // An address, or an address with a port.
                let hop = hop.trim();
                let Some(address) = hop
                    .parse::<IpAddr>()
                    .ok()
                    .or_else(|| hop.parse::<std::net::SocketAddr>().ok().map(|s| s.ip()))
                else {
                    break;
                };
                let address = address.to_canonical();
                client = address;
                if !self.trusts(address) {
                    break;
                }
            }
        }
        Client::Address(per_host(client))
    }

    fn trusts(&self, address: IpAddr) -> bool {
        trusted(&self.trusted, address)
    }

    /// Forgets buckets that are full again (their clients idle).
    pub fn forget_idle(&self) {
        self.buckets.retain_recent();
        self.buckets.shrink_to_fit();
        let now = Instant::now();
        let mut spent = self.spent.lock();
        spent.retain(|_, until| *until > now);
        spent.shrink_to_fit();
    }
}

/// Whether `address` is in one of the `trusted` networks.
pub(crate) fn trusted(trusted: &[IpNet], address: IpAddr) -> bool {
    trusted.iter().any(|network| network.contains(&address))
}

/// An IPv6 address cut to its /64; IPv4 (and IPv4-mapped) as it is.
pub(crate) fn per_host(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let bits = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(Ipv6Addr::from(bits))
            }
        },
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    fn limit(rate: u32, trusted: &[&str]) -> RateLimit {
        let mut server = crate::config::Settings::load_from(None, std::iter::empty())
            .unwrap()
            .server;
        server.rate_limit_per_second = rate;
        server.trusted_proxies = trusted.iter().map(|t| t.parse().unwrap()).collect();
        RateLimit::from_settings(&server, metrics::Counter::noop()).unwrap()
    }

    fn forwarded(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert("x-forwarded-for", HeaderValue::from_str(value).unwrap());
        headers
    }

    fn address(text: &str) -> Client {
        Client::Address(text.parse().unwrap())
    }

    #[test]
    fn off_unless_a_rate_is_set() {
        let server = crate::config::Settings::load_from(None, std::iter::empty())
            .unwrap()
            .server;
        assert!(RateLimit::from_settings(&server, metrics::Counter::noop()).is_none());
    }

    #[test]
    fn each_client_has_its_own_bucket() {
        let limit = limit(3, &[]);
        let a = address("192.0.2.1");
        for _ in 0..3 {
            assert_eq!(limit.check(&a), Ok(()));
        }
        assert_eq!(limit.check(&a), Err(1), "the fourth within a second");
        assert_eq!(limit.check(&address("192.0.2.2")), Ok(()));
    }

    #[test]
    fn an_address_whose_rate_is_spent_is_refused_before_its_token_is_looked_at() {
        let limit = limit(1, &[]);
        let a = address("192.0.2.1");
        assert_eq!(limit.spent(&a), None, "nothing spent yet");
        assert_eq!(limit.check(&a), Ok(()));
        assert_eq!(limit.spent(&a), None, "spent, not refused yet");
        assert_eq!(limit.check(&a), Err(1));
        assert_eq!(limit.spent(&a), Some(1));
        assert_eq!(limit.spent(&address("192.0.2.2")), None);
    }

    #[test]
    fn forwarded_for_counts_only_from_a_trusted_proxy() {
        let limit = limit(1, &["10.0.0.0/8"]);
        let headers = forwarded("198.51.100.7, 10.1.1.1");
        let proxy: IpAddr = "10.0.0.2".parse().unwrap();
        assert_eq!(
            limit.client_address(proxy, &headers),
            address("198.51.100.7"),
            "through two trusted hops"
        );
        let stranger: IpAddr = "203.0.113.9".parse().unwrap();
        assert_eq!(
            limit.client_address(stranger, &headers),
            address("203.0.113.9"),
            "a client cannot name itself someone else"
        );
        // A spoofed entry left of the real client is not believed.
        let headers = forwarded("1.2.3.4, 198.51.100.7");
        assert_eq!(
            limit.client_address(proxy, &headers),
            address("198.51.100.7")
        );
        let headers = forwarded("garbage");
        assert_eq!(limit.client_address(proxy, &headers), address("10.0.0.2"));
        // A dual-stack listener's IPv4 peer, and a hop with a port.
        let mapped: IpAddr = "::ffff:10.0.0.2".parse().unwrap();
        let headers = forwarded("198.51.100.9:4711");
        assert_eq!(
            limit.client_address(mapped, &headers),
            address("198.51.100.9")
        );
    }

    #[test]
    fn ipv6_clients_count_by_their_64() {
        let limit = limit(1, &[]);
        let one = limit.client_address("2001:db8:1:2:aaaa::1".parse().unwrap(), &HeaderMap::new());
        let other =
            limit.client_address("2001:db8:1:2:bbbb::9".parse().unwrap(), &HeaderMap::new());
        assert_eq!(one, other);
        assert_eq!(
            limit.client_address("::ffff:192.0.2.1".parse().unwrap(), &HeaderMap::new()),
            address("192.0.2.1")
        );
    }
}
