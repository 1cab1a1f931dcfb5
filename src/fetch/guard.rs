//! Which network destinations parasol may connect to, and a DNS resolver that enforces it.
//!
//! parasol fetches URLs chosen by strangers, so every destination is checked three ways: IP
//! literals in the URL (which reqwest never passes to a resolver), every address a name resolves
//! to (a name with one private answer is refused whole, so DNS cannot pick the private one
//! later), and every redirect hop (the caller re-runs the checks per hop).
//!
//! The classifier follows the IANA IPv4 and IPv6 special-purpose address registries rather than
//! std's predicates, which miss IPv4-mapped loopback, NAT64 and others. Embedded IPv4 addresses
//! (mapped, NAT64) are unwrapped and classified as IPv4.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;

use ipnet::IpNet;

/// Why an address is refused, for logs; viewers only ever see "destination not allowed".
pub type Reason = &'static str;

/// Classifies `ip` against the special-purpose registries; `None` means globally routable.
pub fn special_purpose(ip: IpAddr) -> Option<Reason> {
    match ip {
        IpAddr::V4(v4) => special_v4(v4),
        IpAddr::V6(v6) => special_v6(v6),
    }
}

fn special_v4(ip: Ipv4Addr) -> Option<Reason> {
    let [a, b, c, _] = ip.octets();
    let reason = match (a, b, c) {
        (0, _, _) => "this network (0.0.0.0/8)",
        (10, _, _) => "private (10.0.0.0/8)",
        (100, 64..=127, _) => "shared address space (100.64.0.0/10)",
        (127, _, _) => "loopback (127.0.0.0/8)",
        (169, 254, _) => "link-local (169.254.0.0/16)",
        (172, 16..=31, _) => "private (172.16.0.0/12)",
        (192, 0, 0) => "IETF protocol assignments (192.0.0.0/24)",
        (192, 0, 2) => "documentation (192.0.2.0/24)",
        (192, 31, 196) => "AS112-v4 (192.31.196.0/24)",
        (192, 52, 193) => "AMT (192.52.193.0/24)",
        (192, 88, 99) => "6to4 relay anycast (192.88.99.0/24)",
        (192, 168, _) => "private (192.168.0.0/16)",
        (192, 175, 48) => "direct delegation AS112 (192.175.48.0/24)",
        (198, 18..=19, _) => "benchmarking (198.18.0.0/15)",
        (198, 51, 100) => "documentation (198.51.100.0/24)",
        (203, 0, 113) => "documentation (203.0.113.0/24)",
        (224..=239, _, _) => "multicast (224.0.0.0/4)",
        (240..=255, _, _) => "reserved or broadcast (240.0.0.0/4)",
        _ => return None,
    };
    Some(reason)
}

fn special_v6(ip: Ipv6Addr) -> Option<Reason> {
    if let Some(v4) = embedded_v4(ip) {
        return special_v4(v4);
    }
    let s = ip.segments();
    if ip.is_unspecified() {
        return Some("unspecified (::/128)");
    }
    if ip.is_loopback() {
        return Some("loopback (::1/128)");
    }
    // Only 2000::/3 is global unicast; everything outside it (ULA, link-local, site-local,
    // multicast, discard, IPv4-compatible) is refused.
    if s[0] & 0xe000 != 0x2000 {
        return Some("not global unicast (outside 2000::/3)");
    }
    let reason = match s[0] {
        0x2001 if s[1] < 0x0200 => "IETF protocol assignments incl. Teredo (2001::/23)",
        0x2001 if s[1] == 0x0db8 => "documentation (2001:db8::/32)",
        0x2002 => "6to4 (2002::/16)",
        0x3fff if s[1] < 0x1000 => "documentation (3fff::/20)",
        _ => return None,
    };
    Some(reason)
}

/// The IPv4 address inside an IPv4-mapped (`::ffff:a.b.c.d`) or NAT64 well-known prefix
/// (`64:ff9b::a.b.c.d`) address. Local-use NAT64 (`64:ff9b:1::/48`) stays IPv6 and is refused
/// as not global unicast.
fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = ip.segments();
    let tail = Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
    match s {
        [0, 0, 0, 0, 0, 0xffff, _, _] => Some(tail),
        [0x64, 0xff9b, 0, 0, 0, 0, _, _] => Some(tail),
        _ => None,
    }
}

/// The destination policy: special-purpose addresses are refused unless listed in
/// `fetch.allow_networks`.
#[derive(Debug, Clone, Default)]
pub struct Guard {
    /// Operator-listed exceptions; the tests' origins on 127.0.0.x come in through here.
    allow: Vec<IpNet>,
    /// parasol's own listeners: fetching from them would be a request loop, even where
    /// `allow` admits their network.
    own: Vec<SocketAddr>,
    /// `fetch.ports`: the only ports dialled, but on `allow` networks (any port there).
    /// Otherwise parasol would knock on any port of any host for whoever signs a URL.
    ports: Vec<u16>,
}

/// Error raised inside the resolver; found again in reqwest's error chain to answer 403.
#[derive(Debug, thiserror::Error)]
#[error("destination {addr} refused: {reason}")]
pub struct Refused {
    /// The address refused.
    pub addr: IpAddr,
    /// Why.
    pub reason: Reason,
}

impl Guard {
    /// A guard that also lets `allow` through (`fetch.allow_networks`).
    pub fn new(allow: Vec<IpNet>) -> Self {
        Self { allow, own: Vec::new(), ports: vec![80, 443] }
    }

    /// Dial only these ports (on addresses outside `allow`).
    pub fn with_ports(mut self, ports: Vec<u16>) -> Self {
        self.ports = ports;
        self
    }

    /// Whether `port` is one of `fetch.ports` (dialled on any address that passes the rest).
    pub fn port_listed(&self, port: u16) -> bool {
        self.ports.contains(&port)
    }

    /// Ok when `port` may be dialled on `ip`: one of `fetch.ports`, or any port of an
    /// `allow_networks` address.
    pub fn check_port(&self, ip: IpAddr, port: u16) -> Result<(), Refused> {
        if self.ports.contains(&port) || self.allowed(ip) {
            return Ok(());
        }
        Err(Refused { addr: ip, reason: "port not in fetch.ports" })
    }

    fn allowed(&self, ip: IpAddr) -> bool {
        let unwrapped = match ip {
            IpAddr::V6(v6) => embedded_v4(v6).map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        self.allow.iter().any(|n| n.contains(&ip) || n.contains(&unwrapped))
    }

    /// Also refuse parasol's own listening addresses (`0.0.0.0:port` refuses that port on any
    /// address).
    pub fn with_own(mut self, own: Vec<SocketAddr>) -> Self {
        self.own = own;
        self
    }

    /// [`check`](Self::check) plus the loop check, for a destination whose port is known.
    ///
    /// Addresses are compared in one spelling: `::ffff:127.0.0.1` (or a NAT64 spelling) is
    /// `127.0.0.1`, and a listener on `0.0.0.0` or `::` is every address with its port.
    pub fn check_peer(&self, peer: SocketAddr) -> Result<(), Refused> {
        let canonical = |ip: IpAddr| match ip {
            IpAddr::V6(v6) => embedded_v4(v6).map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        let is_own = self.own.iter().any(|own| {
            own.port() == peer.port()
                && (own.ip().is_unspecified() || canonical(own.ip()) == canonical(peer.ip()))
        });
        if is_own {
            return Err(Refused { addr: peer.ip(), reason: "parasol's own listener (loop)" });
        }
        self.check(peer.ip())?;
        self.check_port(peer.ip(), peer.port())
    }

    /// Ok when parasol may connect to `ip`.
    pub fn check(&self, ip: IpAddr) -> Result<(), Refused> {
        if self.allowed(ip) {
            return Ok(());
        }
        match special_purpose(ip) {
            Some(reason) => Err(Refused { addr: ip, reason }),
            None => Ok(()),
        }
    }
}

/// Whether a host name is one that must never be resolved: `localhost` and `*.localhost`
/// (RFC 6761 lets resolvers answer loopback for them without asking DNS).
pub fn is_local_name(host: &str) -> bool {
    let h = host.trim_end_matches('.').as_bytes();
    h.eq_ignore_ascii_case(b"localhost")
        || (h.len() > 10 && h[h.len() - 10..].eq_ignore_ascii_case(b".localhost"))
}

/// Resolves names to addresses. Injectable so tests can map `*.test` names to loopback
/// origins without a DNS server, and so a hostile answer can be simulated without dialing it.
pub trait Lookup: Send + Sync + 'static {
    /// The addresses of `host`.
    fn lookup(&self, host: &str) -> Pin<Box<dyn Future<Output = io::Result<Vec<IpAddr>>> + Send>>;
}

/// A fixed table of names, for tests and for operators pinning an origin.
#[derive(Debug, Default, Clone)]
pub struct StaticLookup(pub HashMap<String, Vec<IpAddr>>);

impl StaticLookup {
    /// With `host` resolving to `addrs`.
    pub fn with(mut self, host: &str, addrs: &[IpAddr]) -> Self {
        self.0.insert(host.to_ascii_lowercase(), addrs.to_vec());
        self
    }
}

impl Lookup for StaticLookup {
    fn lookup(&self, host: &str) -> Pin<Box<dyn Future<Output = io::Result<Vec<IpAddr>>> + Send>> {
        let found = self.0.get(&host.trim_end_matches('.').to_ascii_lowercase()).cloned();
        Box::pin(async move {
            found.ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "name not in table"))
        })
    }
}

/// reqwest resolver that refuses a name when any of its addresses is refused by the [`Guard`].
#[derive(Clone)]
pub struct GuardedResolver {
    /// What may be dialed.
    pub guard: Arc<Guard>,
    /// How names are resolved.
    pub lookup: Arc<dyn Lookup>,
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let this = self.clone();
        Box::pin(async move {
            if is_local_name(name.as_str()) {
                let refused =
                    Refused { addr: Ipv4Addr::LOCALHOST.into(), reason: "localhost name" };
                return Err(Box::new(refused) as Box<dyn std::error::Error + Send + Sync>);
            }
            let addrs = this.lookup.lookup(name.as_str()).await?;
            for ip in &addrs {
                this.guard.check(*ip)?;
            }
            if addrs.is_empty() {
                return Err(Box::new(io::Error::new(io::ErrorKind::NotFound, "no addresses"))
                    as Box<dyn std::error::Error + Send + Sync>);
            }
            let iter: reqwest::dns::Addrs =
                Box::new(addrs.into_iter().map(|ip| SocketAddr::new(ip, 0)));
            Ok(iter)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(s: &str) -> bool {
        special_purpose(s.parse().unwrap()).is_some()
    }

    #[test]
    fn ipv4_special_ranges() {
        for s in [
            "0.0.0.0",
            "10.1.2.3",
            "100.64.0.1",
            "127.0.0.1",
            "127.255.255.254",
            "169.254.169.254",
            "172.16.0.1",
            "172.31.255.255",
            "192.0.0.170",
            "192.0.2.1",
            "192.168.1.1",
            "198.18.0.1",
            "198.51.100.7",
            "203.0.113.9",
            "224.0.0.1",
            "239.255.255.250",
            "240.0.0.1",
            "255.255.255.255",
        ] {
            assert!(refused(s), "{s} must be refused");
        }
        for s in ["1.1.1.1", "8.8.8.8", "100.63.255.255", "100.128.0.0", "172.15.0.1", "172.32.0.1"]
        {
            assert!(!refused(s), "{s} is public");
        }
    }

    #[test]
    fn ipv6_special_ranges_and_embedded_ipv4() {
        for s in [
            "::",
            "::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "::127.0.0.1",
            "64:ff9b::7f00:1",
            "64:ff9b::a9fe:a9fe",
            "64:ff9b:1::1",
            "2001::1",
            "2001:db8::1",
            "2002:7f00:1::",
            "fc00::1",
            "fd12:3456::1",
            "fe80::1",
            "fec0::1",
            "ff02::1",
            "100::1",
            "3fff::1",
        ] {
            assert!(refused(s), "{s} must be refused");
        }
        for s in ["2606:4700::1111", "2a00:1450:4001::200e", "::ffff:8.8.8.8", "64:ff9b::808:808"] {
            assert!(!refused(s), "{s} is public");
        }
    }

    #[test]
    fn allow_networks_is_exact() {
        let g = Guard::new(vec!["127.0.0.2/32".parse().unwrap()]);
        assert!(g.check("127.0.0.2".parse().unwrap()).is_ok());
        assert!(g.check("::ffff:127.0.0.2".parse().unwrap()).is_ok());
        assert!(g.check("127.0.0.3".parse().unwrap()).is_err());
        assert!(g.check("127.0.0.1".parse().unwrap()).is_err());
    }

    #[test]
    fn only_the_configured_ports_are_dialled_but_on_allowed_networks() {
        let g = Guard::new(vec!["127.0.0.2/32".parse().unwrap()]);
        assert!(g.check_peer("8.8.8.8:443".parse().unwrap()).is_ok());
        assert!(g.check_peer("8.8.8.8:80".parse().unwrap()).is_ok());
        for port in [22, 25, 6379, 8080, 9090] {
            let refused = g.check_peer(SocketAddr::from(([8, 8, 8, 8], port))).unwrap_err();
            assert_eq!(refused.reason, "port not in fetch.ports");
        }
        assert!(g.check_peer("127.0.0.2:6379".parse().unwrap()).is_ok(), "allowed: any port");
        assert!(g.check_peer("[::ffff:127.0.0.2]:6379".parse().unwrap()).is_ok());
        let g = Guard::new(vec![]).with_ports(vec![8443]);
        assert!(g.check_peer("8.8.8.8:8443".parse().unwrap()).is_ok());
        assert!(g.check_peer("8.8.8.8:443".parse().unwrap()).is_err());
    }

    #[test]
    fn own_listeners_are_refused_even_when_allowed() {
        let g = Guard::new(vec!["127.0.0.0/8".parse().unwrap()])
            .with_own(vec!["127.0.0.1:8080".parse().unwrap(), "0.0.0.0:9090".parse().unwrap()]);
        assert!(g.check_peer("127.0.0.1:8080".parse().unwrap()).is_err());
        assert!(g.check_peer("127.0.0.9:9090".parse().unwrap()).is_err());
        assert!(g.check_peer("127.0.0.1:8081".parse().unwrap()).is_ok());
        // Other spellings of the same listener.
        assert!(g.check_peer("[::ffff:127.0.0.1]:8080".parse().unwrap()).is_err());
        assert!(g.check_peer("[::ffff:7f00:1]:8080".parse().unwrap()).is_err());
        assert!(g.check_peer("[::ffff:127.0.0.9]:9090".parse().unwrap()).is_err());
        let v6 = Guard::new(vec![]).with_own(vec!["[::]:7000".parse().unwrap()]);
        assert!(v6.check_peer("192.0.2.1:7000".parse().unwrap()).is_err(), ":: is every address");
    }

    #[test]
    fn url_crate_spellings_of_loopback_are_refused() {
        // Every spelling the url crate accepts for an IPv4 host becomes the canonical address
        // before the guard sees it.
        for spelling in [
            "http://2130706433/",
            "http://0x7f000001/",
            "http://0177.0.0.1/",
            "http://127.1/",
            "http://127.0.0.1./",
            "http://0x7f.1/",
            "http://[::ffff:7f00:1]/",
            "http://[::1]/",
            "http://[64:ff9b::7f00:1]/",
            "http://[2002:7f00:1::]/",
            "http://[2001:0:7f00:1::]/",
            "http://0/",
            "http://[::]/",
            "http://169.254.169.254/",
            "http://[fd00::1]/",
        ] {
            let url = url::Url::parse(spelling).unwrap();
            let ip: IpAddr = match url.host().unwrap() {
                url::Host::Ipv4(v4) => v4.into(),
                url::Host::Ipv6(v6) => v6.into(),
                url::Host::Domain(d) => panic!("{spelling} parsed as a domain {d}"),
            };
            assert!(Guard::default().check(ip).is_err(), "{spelling} -> {ip} must be refused");
        }
    }

    #[test]
    fn localhost_names() {
        assert!(is_local_name("localhost"));
        assert!(is_local_name("LOCALHOST."));
        assert!(is_local_name("a.b.localhost"));
        assert!(!is_local_name("localhost.test"));
    }
}
