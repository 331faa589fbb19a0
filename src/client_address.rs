//! Who sent a request: the connection's address, or, when that is a proxy the
//! configuration trusts (`[server] trusted_proxies`), the nearest address in
//! `X-Forwarded-For` that is not one of them.
//!
//! Read from the right: each proxy appends the address it was called from, so everything
//! left of the nearest untrusted entry was written by the client and may name anyone.

use std::net::{IpAddr, SocketAddr};

use http::HeaderMap;
use ipnet::IpNet;

/// The client's address, by the rule above. An IPv4 peer on a dual-stack socket
/// (`::ffff:192.0.2.1`) is its IPv4 address.
pub fn client_address(peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    let is_trusted = |addr: &IpAddr| trusted.iter().any(|net| net.contains(addr));
    let peer = peer.to_canonical();
    if !is_trusted(&peer) {
        return peer;
    }
    // The nearest hop known so far; a proxy that sent no header (or a word such as
    // `unknown`) leaves it the client: an entry further left could be anyone's words.
    let mut nearest = peer;
    // A second `X-Forwarded-For` line was added after the first: read the last one first.
    for value in headers.get_all("x-forwarded-for").iter().rev() {
        let Ok(text) = value.to_str() else {
            return nearest;
        };
        for entry in text.rsplit(',').map(str::trim).filter(|e| !e.is_empty()) {
            let Some(addr) = forwarded_entry(entry) else {
                return nearest;
            };
            if !is_trusted(&addr) {
                return addr;
            }
            nearest = addr;
        }
    }
    nearest
}

/// Who sent a request: its client, and the trusted proxy it came through, if any.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Caller {
    pub client: IpAddr,
    /// The connection's own address when a trusted proxy forwarded the request.
    pub via: Option<IpAddr>,
}

impl Caller {
    /// The caller of a request that came from `peer` with `headers` ([`client_address`]).
    pub fn of(peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> Caller {
        let client = client_address(peer, headers, trusted);
        let peer = peer.to_canonical();
        Caller {
            client,
            via: (client != peer).then_some(peer),
        }
    }
}

/// `192.0.2.5`, or `192.0.2.5 via 10.0.0.2` behind a trusted proxy.
impl std::fmt::Display for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.via {
            Some(proxy) => write!(f, "{} via {proxy}", self.client),
            None => write!(f, "{}", self.client),
        }
    }
}

/// As its text, for records written straight from typed structs.
impl serde::Serialize for Caller {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// Whether an `allow_from` list lets `client` in: empty, it lets everyone.
pub fn allowed(allow_from: &[IpNet], client: IpAddr) -> bool {
    allow_from.is_empty() || allow_from.iter().any(|net| net.contains(&client))
}

/// One entry of `X-Forwarded-For`: an address, or an address with a port
/// (`192.0.2.1:4711`, `[2001:db8::1]:4711`), as some proxies write them.
fn forwarded_entry(entry: &str) -> Option<IpAddr> {
    entry
        .parse::<IpAddr>()
        .or_else(|_| entry.parse::<SocketAddr>().map(|addr| addr.ip()))
        .ok()
        .map(|addr| addr.to_canonical())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(values: &[&str]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for value in values {
            map.append("x-forwarded-for", value.parse().unwrap());
        }
        map
    }

    fn client(peer: &str, forwarded: &[&str]) -> String {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap(), "fd00::/8".parse().unwrap()];
        client_address(peer.parse().unwrap(), &headers(forwarded), &trusted).to_string()
    }

    #[test]
    fn an_untrusted_peer_is_the_client_whatever_it_forwards() {
        assert_eq!(client("192.0.2.1", &["203.0.113.9"]), "192.0.2.1");
        assert_eq!(client("::ffff:192.0.2.1", &[]), "192.0.2.1");
    }

    #[test]
    fn behind_trusted_proxies_the_nearest_untrusted_entry_is_the_client() {
        assert_eq!(
            client("10.1.2.3", &["203.0.113.9, 10.0.0.5"]),
            "203.0.113.9"
        );
        // What the client wrote itself, left of it, is not read.
        assert_eq!(
            client("10.1.2.3", &["198.51.100.1, 203.0.113.9"]),
            "203.0.113.9"
        );
        assert_eq!(client("10.1.2.3", &[]), "10.1.2.3");
        assert_eq!(client("10.1.2.3", &["10.0.0.9"]), "10.0.0.9");
        assert_eq!(client("fd00::1", &["2001:db8::7"]), "2001:db8::7");
        assert_eq!(client("10.1.2.3", &["203.0.113.9:4711"]), "203.0.113.9");
        assert_eq!(client("10.1.2.3", &["[2001:db8::7]:4711"]), "2001:db8::7");
        assert_eq!(client("10.1.2.3", &["::ffff:203.0.113.9"]), "203.0.113.9");
    }

    #[test]
    fn a_caller_names_the_proxy_it_came_through() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let caller = |peer: &str, forwarded: &[&str]| {
            Caller::of(peer.parse().unwrap(), &headers(forwarded), &trusted).to_string()
        };
        assert_eq!(caller("10.1.2.3", &["192.0.2.5"]), "192.0.2.5 via 10.1.2.3");
        assert_eq!(
            caller("::ffff:10.1.2.3", &["192.0.2.5"]),
            "192.0.2.5 via 10.1.2.3"
        );
        assert_eq!(caller("10.1.2.3", &[]), "10.1.2.3");
        assert_eq!(caller("192.0.2.9", &["192.0.2.5"]), "192.0.2.9");
        let peer: IpAddr = "10.1.2.3".parse().unwrap();
        assert_eq!(Caller::of(peer, &HeaderMap::new(), &trusted).via, None);
        assert_eq!(
            Caller::of(peer, &headers(&["192.0.2.5"]), &[]).via,
            None,
            "no proxy trusted"
        );
    }

    #[test]
    fn a_second_header_line_is_read_before_the_first() {
        // The client sent the first line; the proxy added the second.
        assert_eq!(
            client("10.1.2.3", &["198.51.100.1", "203.0.113.9"]),
            "203.0.113.9"
        );
        assert_eq!(
            client("10.1.2.3", &["198.51.100.1", "203.0.113.9, 10.0.0.5"]),
            "203.0.113.9"
        );
    }

    #[test]
    fn an_entry_that_is_no_address_stops_the_reading_at_the_nearest_hop() {
        assert_eq!(client("10.1.2.3", &["198.51.100.1, unknown"]), "10.1.2.3");
        assert_eq!(
            client("10.1.2.3", &["198.51.100.1, garbage, 10.0.0.5"]),
            "10.0.0.5"
        );
    }
}
